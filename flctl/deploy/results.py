"""What deploy and teardown report per host: steps, status, the error.

A host's failure is recorded in its result, never raised past it, so one
host (unreachable, refusing, or answering nonsense) never stops the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from flctl.deploy.connector import HostUnreachable
from flctl.errors import FlctlError


@dataclass
class StepResult:
    name: str
    changed: bool
    detail: str = ""


# A host's last progress line starts with this (see engine._pool_map).
DONE = "done"


@dataclass
class HostResult:
    host: str
    status: str = "ok"  # ok | changed | failed | unreachable
    steps: list[StepResult] = field(default_factory=list)
    error: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0  # of the expected error that failed this host, if any
    # what did not stop the host but should be known (a limit it cannot enforce)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return sum(1 for step in self.steps if step.changed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "status": self.status,
            "changed": self.changed,
            "steps": [{"name": s.name, "changed": s.changed, "detail": s.detail} for s in self.steps],
            "error": self.error,
            "warnings": list(self.warnings),
        }


def run_guarded(result: HostResult, action: Callable[[], None]) -> HostResult:
    """Turn a host's failures into its recap; never raise past it.

    Expected failures keep their message; anything else (a bug, or a host
    answer some check missed) is still that host's alone, named as such.
    """
    try:
        action()
        result.status = "changed" if result.changed else "ok"
    except HostUnreachable as exc:
        result.status, result.error = "unreachable", exc.message
    except FlctlError as exc:
        result.status, result.error, result.exit_code = "failed", exc.message, exc.exit_code
    except OSError as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one host's surprise must not stop the others
        result.status = "failed"
        result.error = f"unexpected error (please report it): {type(exc).__name__}: {exc}"
    return result
