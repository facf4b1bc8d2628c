"""`flctl runs`: the runs of a workspace, finished or interrupted."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from flctl.cli import render
from flctl.cli.common import JsonOpt, WorkspaceOpt, named_run
from flctl.cli.live_runs import runs_attach, runs_stop
from flctl.coordinator.export import FORMATS, export_run
from flctl.coordinator.records import describe_run, list_runs, read_metrics
from flctl.coordinator.summary import RoundRecord, host_history
from flctl.errors import WorkspaceError
from flctl.service.liveness import with_liveness
from flctl.workspace import load_workspace

runs_app = typer.Typer(help="Runs in this workspace: list them, summarise one, follow or "
                            "stop a running one.",
                       invoke_without_command=True)


@runs_app.callback()
def runs(
    ctx: typer.Context,
    workspace_dir: Path = WorkspaceOpt,
    json_output: bool = JsonOpt,
) -> None:
    """List runs: running, finished, or interrupted (resumable with
    `flctl train --resume RUN`)."""
    if ctx.invoked_subcommand is not None:
        return
    workspace = load_workspace(workspace_dir)
    infos = [with_liveness(info) for info in list_runs(workspace.paths.runs)]
    for info in infos:
        render.warn(info.warnings)
    if json_output:
        render.emit_json({"runs": [info.as_dict() for info in infos]})
    else:
        render.out.print(render.runs_table(infos))


@runs_app.command("export")
def runs_export(
    run_id: str = typer.Argument(..., help="The run's id (see `flctl runs`)."),
    fmt: str = typer.Option("safetensors", "--format", "-f",
                            help=f"One of: {', '.join(FORMATS)}."),
    output: Path | None = typer.Option(None, "--output", "-o",
                                       help="Where to write (default: the run's export/ "
                                            "folder, final.<ext>)."),
    workspace_dir: Path = WorkspaceOpt,
    json_output: bool = JsonOpt,
) -> None:
    """Write a finished run's weights as safetensors, a PyTorch state dict, or a named .npz."""
    workspace = load_workspace(workspace_dir)
    path = export_run(named_run(workspace.paths.runs, run_id), fmt, output)
    if json_output:
        render.emit_json({"run_id": run_id, "format": fmt, "path": str(path),
                          "bytes": path.stat().st_size})
    else:
        render.out.print(render.literal(f"wrote {path} ({path.stat().st_size:,} bytes)"),
                         soft_wrap=True)


def _show_host(members: list[str], history: list[dict[str, Any]], host: str,
               json_output: bool) -> None:
    if host not in members:
        known = render.names_line(members) or "none recorded"
        raise WorkspaceError(f"host {host!r} was not in this run (its hosts: {known})")
    rows = host_history(history, host)
    if json_output:
        render.emit_json({"host": host, "rounds": rows})
    else:
        render.out.print(render.host_history_table(host, rows))



@runs_app.command("show")
def runs_show(
    run_id: str = typer.Argument(..., help="The run's id (see `flctl runs`)."),
    host: Optional[str] = typer.Option(
        None, "--host", help="One host over the run: answered, dropped or straggled (and why), "
                             "train loss, examples, fit seconds and bytes per round."),
    workspace_dir: Path = WorkspaceOpt,
    json_output: bool = JsonOpt,
) -> None:
    """Summarise one run: settings, hosts, and every round's metrics."""
    workspace = load_workspace(workspace_dir)
    run = named_run(workspace.paths.runs, run_id)
    info = with_liveness(describe_run(run))
    render.warn(info.warnings)
    history = read_metrics(run).records
    if host is not None:
        _show_host(info.hosts, history, host, json_output)
        return
    if json_output:
        render.emit_json({**info.as_dict(), "history": history})
        return
    render.out.print(render.runs_table([info]))
    table = render.round_table(privacy=any(r.get("epsilon") is not None for r in history))
    for record in history:
        render.add_round_row(table, RoundRecord.from_dict(record))
    render.out.print(table)


runs_app.command("attach")(runs_attach)
runs_app.command("stop")(runs_stop)
