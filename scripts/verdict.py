"""A benchmark's targets as it reports them: each one met or MISSED, with the figure.

    t = Target("time ratio", 1.12, "<=", 1.25, "x")
    print(t.line())      # "time ratio 1.12x (target <= 1.25x): met"
    t.as_json()          # {"target": "time ratio", "measured": 1.12, ..., "met": true}
    exit_status([t])     # 0, or 1 if any target was missed

Imported by the bench_*.py scripts beside it (their folder is first on sys.path).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

_COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


@dataclass(frozen=True)
class Target:
    name: str
    measured: float
    comparison: str  # "<=", "<", ">=" or ">": measured <comparison> limit is met
    limit: float
    unit: str = ""

    def __post_init__(self) -> None:
        if self.comparison not in _COMPARE:
            raise ValueError(f"unknown comparison {self.comparison!r}")

    @property
    def met(self) -> bool:
        return bool(_COMPARE[self.comparison](self.measured, self.limit))

    def line(self, spec: str = ".3g") -> str:
        """One line: the name, the figure (format `spec`), the target, met or MISSED."""
        return (f"{self.name} {self.measured:{spec}}{self.unit} (target {self.comparison} "
                f"{self.limit:.4g}{self.unit}): {'met' if self.met else 'MISSED'}")

    def as_json(self) -> dict[str, Any]:
        return {"target": self.name, "measured": self.measured, "comparison": self.comparison,
                "limit": self.limit, "unit": self.unit, "met": self.met}


def exit_status(targets: list[Target]) -> int:
    """0 if every target was met, 1 if any was missed."""
    return 0 if all(t.met for t in targets) else 1
