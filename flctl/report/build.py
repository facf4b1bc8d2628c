"""`write_report`: runs in, one HTML page and its PNGs out.

This layer never prints; the CLI passes a `progress(step, done, total)`
callback to show where it is. matplotlib is imported only when figures are
drawn (flctl.report.figures), so the rest of flctl works without it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flctl.coordinator.records import RunDir
from flctl.core.fsutil import atomic_write
from flctl.report.data import ReportError, load_run

PAGE = "report.html"
REPORT_DIR = "report"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Report:
    page: Path
    figures: list[Path]
    runs: list[str]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"report": str(self.page), "figures": [str(p) for p in self.figures],
                "runs": self.runs, "warnings": self.warnings}


def default_output(runs: Sequence[RunDir], reports_root: Path) -> Path:
    """One run: its own report/ folder. Several: reports_root/compare-<hash of
    their ids> (not under runs/, where it would be listed as a run)."""
    if len(runs) == 1:
        return runs[0].path / REPORT_DIR
    digest = hashlib.sha256("\n".join(r.run_id for r in runs).encode()).hexdigest()[:12]
    return reports_root / f"compare-{digest}"


def _figures_module() -> Any:
    try:
        from flctl.report import figures
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "matplotlib":
            raise
        raise ReportError("flctl report needs matplotlib: pip install 'flctl[report]'") \
            from None
    return figures


def _make_dir(output: Path) -> None:
    """Create `output`, keeping its parent's mtime: a run's report/ folder must
    not make an old run look like the newest one (runs are ordered by mtime)."""
    if output.is_dir():
        return
    parent = output.parent
    before = parent.stat() if parent.is_dir() else None
    output.mkdir(parents=True, exist_ok=True)
    if before is not None:
        os.utime(parent, ns=(before.st_atime_ns, before.st_mtime_ns))


def write_report(runs: Sequence[RunDir], output: Path,
                 progress: Progress | None = None) -> Report:
    """Read `runs`, draw their figures, write `output`/report.html and one PNG per
    figure; a single run gets its own figures, several share axes."""
    if not runs:
        raise ReportError("no run to report on")
    tell = progress or (lambda step, done, total: None)
    figures = _figures_module()
    from flctl.report.page import render_page  # it needs the figures module too

    loaded = []
    for run in runs:
        tell(f"reading {run.run_id}", 0, 1)
        loaded.append(load_run(run))
    warnings = [w for data in loaded for w in data.warnings]
    steps = figures.plans(loaded)
    total = len(steps) + 1
    drawn = []
    for done, (name, draw) in enumerate(steps):
        tell(f"drawing {name}", done, total)
        drawn.append(draw())
    tell("writing the page", len(steps), total)
    _make_dir(output)
    paths = []
    for figure in drawn:
        path = output / f"{figure.name}.png"
        atomic_write(path, figure.png)
        paths.append(path)
    page = output / PAGE
    atomic_write(page, render_page(loaded, drawn, warnings))
    tell("done", total, total)
    return Report(page, paths, [data.run_id for data in loaded], warnings)
