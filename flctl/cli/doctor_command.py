"""`flctl doctor`: a preflight of every host, one table, a fix per problem."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flctl.cli import render
from flctl.cli.common import JsonOpt, LimitOpt, WorkspaceOpt, selected
from flctl.deploy.doctor import HostReport, examine_hosts
from flctl.errors import HostError
from flctl.workspace import load_workspace


def doctor_table(reports: list[HostReport], every: bool) -> Table:
    table = Table(title="doctor")
    for column in ("host", "check", "result", "detail", "fix"):
        table.add_column(column)
    for report in reports:
        shown = [c for c in report.checks if every or c.ok is not True]
        if not shown:
            table.add_row(render.literal(report.host), "all", render.literal("ok", "green"),
                          f"{len(report.checks)} checks passed", "")
        for check in shown:
            result = {True: ("ok", "green"), False: ("problem", "red")}.get(
                check.ok, ("unknown", "yellow"))
            # details and fixes quote the host's own answers: shown literally
            table.add_row(render.literal(report.host), check.name, render.literal(*result),
                          render.literal(check.detail), render.literal(check.fix))
    return table


def doctor(
    workspace_dir: Path = WorkspaceOpt,
    limit: Optional[list[str]] = LimitOpt,
    every: bool = typer.Option(False, "--all", "-a", help="Show passed checks too."),
    forks: int = typer.Option(32, "--forks", "-f", min=1, help="Hosts examined in parallel."),
    json_output: bool = JsonOpt,
) -> None:
    """Check every host before deploying or training: SSH and its host key, sudo,
    Python and venv, free disk, clock skew, the agent and WireGuard ports,
    nftables, WireGuard, the overlay's MTU, the data path and GPUs. Exits 5
    when any host has a problem."""
    workspace = load_workspace(workspace_dir)
    reports = examine_hosts(workspace, selected(workspace, limit), forks)
    if json_output:
        render.emit_json({"ok": not any(r.problems for r in reports),
                          "hosts": [r.as_dict() for r in reports]})
    else:
        render.out.print(doctor_table(reports, every))
    bad = [r.host for r in reports if r.problems]
    if bad:
        raise HostError(f"doctor found problems on {len(bad)} of {len(reports)} hosts: "
                        + ", ".join(bad))
