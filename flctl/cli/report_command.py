"""`flctl report [RUN ...]`: a run's figures as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn

from flctl.cli import render
from flctl.cli.common import JsonOpt, WorkspaceOpt, named_run
from flctl.coordinator.records import RunDir, latest_run
from flctl.errors import WorkspaceError
from flctl.report.build import default_output, write_report
from flctl.workspace import load_workspace


def _runs(runs_root: Path, names: Optional[list[str]]) -> list[RunDir]:
    if not names:
        newest = latest_run(runs_root)
        if newest is None:
            raise WorkspaceError(f"no runs in {runs_root} yet (train one with `flctl train`)")
        return [RunDir(newest.path)]
    unique = list(dict.fromkeys(names))  # a run named twice is reported once
    return [named_run(runs_root, name) for name in unique]


def report(
    runs: Optional[list[str]] = typer.Argument(
        None, metavar="RUN", help="Run ids (see `flctl runs`); several: one page comparing them. "
                   "Default: the newest run."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o",
        help="Directory to write report.html and the PNGs to (default: the run's report/ "
             "folder; for several runs the workspace's reports/compare-<hash>/)."),
    workspace_dir: Path = WorkspaceOpt,
    json_output: bool = JsonOpt,
) -> None:
    """Write an HTML report of a run's metrics, or one comparing runs.

    One self-contained page (and its PNGs beside it): accuracy and loss, train
    loss, each host's participation and why it missed rounds, round time (the
    slowest host's compute and the overhead), bytes and epsilon per round. The
    page needs no network: open it anywhere. Needs matplotlib (flctl's "report"
    extra)."""
    workspace = load_workspace(workspace_dir)
    chosen = _runs(workspace.paths.runs, runs)
    target = output.absolute() if output else \
        default_output(chosen, workspace.paths.root / "reports")
    if json_output or not render.err.is_terminal:
        made = write_report(chosen, target)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), console=render.err,
                      transient=True) as bar:
            task = bar.add_task("report", total=None)

            def step(what: str, done: int, total: int) -> None:
                bar.update(task, description=render.literal(what).plain, completed=done,
                           total=total)

            made = write_report(chosen, target, progress=step)
    render.warn(made.warnings)
    if json_output:
        render.emit_json(made.as_dict())
    else:
        render.out.print(render.literal(f"wrote {made.page} ({len(made.figures)} figures)"),
                         soft_wrap=True)
