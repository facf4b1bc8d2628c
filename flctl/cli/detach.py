"""`flctl train --detach`: the run goes on in the background, past the terminal.

The background process runs `python -m flctl train` with the flags given
here (without --detach and --json, with the run's id), so a detached run is
the same code as one in a terminal; flctl.service starts it (supervised:
restarted with --resume after a crash) and says when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flctl.cli import render
from flctl.cli.common import holding
from flctl.coordinator.records import new_run_id, resumable_run
from flctl.service import launch
from flctl.service.supervisor import Spec
from flctl.workspace import Workspace

NOT_PASSED_ON = {"detach", "json_output"}
# what a resume after a crash keeps of the flags (the run's settings are in its checkpoint)
KEPT_ON_RESUME = {"workspace_dir", "rounds", "metrics_port", "metrics_address"}


def command_args(ctx: typer.Context, values: dict[str, Any], keep: set[str] | None = None
                 ) -> list[str]:
    """The command line of `ctx`'s command with `values` (by parameter name):
    options whose value is not their default, each as its first name;
    arguments last. `keep` limits it to those parameters."""
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        if name in NOT_PASSED_ON or (keep is not None and name not in keep):
            continue
        value = values.get(name)
        if param.param_type_name == "argument":
            arguments += [] if value is None else [str(value)]
        elif value is None or (value == param.default and not isinstance(value, Path)):
            continue
        elif getattr(param, "is_flag", False):
            flag = param.opts[0] if value else (param.secondary_opts or [None])[0]
            options += [flag] if flag else []
        elif param.multiple:
            for item in value:
                options += [param.opts[0], str(item)]
        else:
            options += [param.opts[0], str(value)]
    return [ctx.command.name or "train", *options, *arguments]


def detached_spec(ctx: typer.Context, root: Path, run_id: str, resume: bool) -> Spec:
    """The background commands: this one for run `run_id` in workspace `root`,
    and what continues it after a crash."""
    values = {**ctx.params, "workspace_dir": root}
    values.update(run=run_id, run_id=None) if resume else values.update(run_id=run_id)
    resume_values = {**values, "resume": True, "run": run_id, "run_id": None}
    return Spec(command_args(ctx, values),
                command_args(ctx, resume_values, KEPT_ON_RESUME | {"resume", "run"}))


def start_detached(ctx: typer.Context, workspace: Workspace, *, resume: bool,
                   run: str | None, run_id: str | None, json_output: bool) -> None:
    """Start the run in the background; print its id (with --json: id, pid, log)."""
    runs_root = workspace.paths.runs
    the_id = resumable_run(runs_root, run).run_id if resume else (run_id or new_run_id())
    with holding(workspace, "train --detach", shares_membership=True):
        pass   # busy: say so here, not in the log (the run takes the lock itself)
    target = launch.prepare(runs_root, the_id, resume)
    spec = detached_spec(ctx, workspace.root.resolve(), the_id, resume)
    started = launch.start(target, spec, workspace.root.resolve())
    if json_output:
        render.emit_json({"run": started.run_id, "pid": started.pid, "log": str(started.log),
                          "service": started.service, "unit": started.unit})
        return
    if started.note:
        render.warn([f"not a systemd user unit ({started.note}): flctl's supervisor runs it"])
    how = f"unit {started.unit}" if started.unit else f"pid {started.pid}"
    render.out.print(render.literal(started.run_id))
    render.err.print(render.literal(
        f"run {started.run_id} runs in the background ({how}, log {started.log}); "
        f"follow it with `flctl runs attach {started.run_id}`, end it with "
        f"`flctl runs stop {started.run_id}`"), soft_wrap=True)
