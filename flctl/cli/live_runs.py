"""`flctl runs attach RUN` and `flctl runs stop RUN`: a run some other
process trains (detached, or in another terminal), followed from its
metrics.jsonl and asked to stop through its directory (flctl.coordinator.
control); whether it runs is its processes' word (flctl.service.liveness)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import typer

from flctl.cli import render
from flctl.cli.common import JsonOpt, WorkspaceOpt, named_run
from flctl.cli.progress import TrainView
from flctl.coordinator.control import checkpointed_round, request_stop, stop_requested
from flctl.coordinator.metrics_tail import MetricsTail
from flctl.coordinator.progress import TransferProgress
from flctl.coordinator.records import RunDir, RunInfo, describe_run, read_metrics
from flctl.coordinator.summary import RoundRecord
from flctl.errors import TrainingError, WorkspaceError
from flctl.service.launch import last_error
from flctl.service.liveness import is_running
from flctl.service.supervisor import LOG
from flctl.workspace import load_workspace

POLL_S = 0.2


class NotRunning(WorkspaceError):
    """The run named is not running (finished, interrupted, or never started)."""


def _where(info: RunInfo) -> str:
    planned = "?" if info.rounds_planned is None else str(info.rounds_planned)
    if info.state == "finished":
        return f"it finished after {info.rounds_done} rounds"
    if info.state == "interrupted":
        return (f"interrupted after round {info.rounds_done} of {planned}; continue it with "
                f"`flctl train --resume {info.run_id}`")
    log = info.path / LOG
    return f"it ended before its first round: {last_error(log)}" if log.exists() else (
        "it ended before its first round")


def _round_line(record: RoundRecord) -> str:
    accuracy = "-" if record.accuracy is None else f"{100 * record.accuracy:.2f}%"
    loss = "-" if record.train_loss is None else f"{record.train_loss:.4f}"
    return (f"round {record.round}: {len(record.participants)} hosts, train loss {loss}, "
            f"accuracy {accuracy}, {record.seconds:.2f}s")


def _show_rounds(records: list[dict[str, Any]]) -> None:
    table = render.round_table(privacy=any(r.get("epsilon") is not None for r in records))
    for record in records:
        render.add_round_row(table, RoundRecord.from_dict(record))
    render.out.print(table)


def runs_attach(
    run_id: str = typer.Argument(..., help="The run's id (see `flctl runs`)."),
    workspace_dir: Path = WorkspaceOpt,
) -> None:
    """Follow a run's rounds as they come, until it ends; Ctrl-C leaves it running.
    A run that is not running is summarised (exit 0 when it finished)."""
    workspace = load_workspace(workspace_dir)
    run = named_run(workspace.paths.runs, run_id)
    if not is_running(run):
        info = describe_run(run)
        render.warn(info.warnings)
        render.out.print(render.runs_table([info]))
        _show_rounds(read_metrics(run).records)
        if info.state != "finished":
            raise NotRunning(f"run {run_id} is not running ({_where(info)})")
        return
    try:
        render.err.print(render.literal(
            f"attached to run {run_id}: Ctrl-C detaches, the run goes on"), soft_wrap=True)
        _follow(run)
    except KeyboardInterrupt:
        render.err.print(render.literal(
            f"detached from run {run_id}; it goes on (`flctl runs attach {run_id}`)"),
            soft_wrap=True)
        return
    info = describe_run(run)
    if info.state != "finished":
        raise TrainingError(f"run {run_id} ended without finishing: {_where(info)}")
    accuracy = "-" if info.accuracy is None else f"{100 * info.accuracy:.2f}%"
    render.out.print(render.literal(
        f"run {run_id} finished: {info.rounds_done} rounds on {len(info.hosts)} hosts, "
        f"federated accuracy {accuracy}"))


def _follow(run: RunDir) -> None:
    """Show the run's rounds (those done, then each new one) until it stops running:
    the live table on a terminal, else a line per round on stdout."""
    tail = MetricsTail(run)
    with ExitStack() as stack:
        view: TrainView | None = None

        def show(records: list[dict[str, Any]]) -> None:
            nonlocal view
            for raw in records:
                record = RoundRecord.from_dict(raw)
                if not render.err.is_terminal:
                    render.out.print(render.literal(_round_line(record)))
                    continue
                if view is None:
                    table = render.round_table(privacy=record.epsilon is not None)
                    view = stack.enter_context(TrainView(table, TransferProgress()))
                view.round_done(record)

        while is_running(run):
            show(tail.new_records())
            time.sleep(POLL_S)
        show(tail.new_records())   # what was written before it ended


def runs_stop(
    run_id: str = typer.Argument(..., help="The run's id (see `flctl runs`)."),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", min=0, help="Give up waiting after this many seconds (the run "
                                       "still stops after its round). Default: wait."),
    workspace_dir: Path = WorkspaceOpt,
    json_output: bool = JsonOpt,
) -> None:
    """End a running run after its current round: checkpointed, and resumable with
    `flctl train --resume RUN`. Waits until it has stopped."""
    workspace = load_workspace(workspace_dir)
    run = named_run(workspace.paths.runs, run_id)
    if not is_running(run):
        raise NotRunning(f"run {run_id} is not running ({_where(describe_run(run))})")
    request_stop(run)
    started = time.monotonic()
    at = checkpointed_round(run)
    if not json_output:
        render.err.print(render.literal(
            f"asked run {run_id} to stop after its current round (round {at + 1}); waiting"),
            soft_wrap=True)
    with ExitStack() as stack:
        if not json_output and render.err.is_terminal:
            status = stack.enter_context(render.err.status(f"run {run_id}: ending round"))
        while is_running(run):
            if not stop_requested(run):   # a coordinator starting up clears an older request
                request_stop(run)
            waited = time.monotonic() - started
            if timeout is not None and waited > timeout:
                raise TrainingError(f"run {run_id} is still running after {timeout:g}s; it "
                                    "stops after its current round (the request stands)")
            if not json_output and render.err.is_terminal:
                done = checkpointed_round(run)
                status.update(f"run {run_id}: ending round {done + 1} ({waited:.0f}s)")
            time.sleep(POLL_S)
    info = describe_run(run)
    seconds = time.monotonic() - started
    if json_output:
        render.emit_json({"run": run_id, "state": info.state, "rounds_done": info.rounds_done,
                          "rounds_planned": info.rounds_planned, "asked_after_round": at,
                          "seconds": round(seconds, 3)})
        return
    render.out.print(render.literal(
        f"run {run_id} stopped after {seconds:.1f}s: {_where(info)}"), soft_wrap=True)
