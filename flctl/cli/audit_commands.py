"""`flctl audit`: the workspace's audit log, as a table or (--json) one document."""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from flctl import audit
from flctl.cli import render
from flctl.cli.common import JsonOpt, WorkspaceOpt
from flctl.errors import ConfigError
from flctl.workspace import load_workspace


def _since(text: str | None) -> datetime.datetime | None:
    if text is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: expected a date or time such as 2026-12-03 or "
                          f"2026-12-03T14:00 (UTC)") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def _when(entry: dict[str, Any]) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(str(entry.get("time")))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def _flags_text(flags: Any) -> str:
    """The flags as typed, less the workspace (the log is that workspace's)."""
    if not isinstance(flags, dict):
        return ""
    words = []
    for name, value in flags.items():
        if name == "--workspace":
            continue
        if value is True:
            words.append(name)
        else:
            words.append(f"{name} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(words)


def _hosts_text(hosts: Any) -> str:
    """ "2 changed, 1 failed": how many hosts ended how (--json has each one)."""
    if not isinstance(hosts, dict):
        return ""
    counts = Counter(str(h.get("status")) if isinstance(h, dict) else "?" for h in hosts.values())
    return ", ".join(f"{n} {status}" for status, n in counts.most_common())


def _run_text(run: Any) -> str:
    if not isinstance(run, dict):
        return ""
    text = f"{run.get('run_id')} {run.get('event')}"
    if run.get("rounds") is not None:
        text += f", {run['rounds']} rounds"
    if isinstance(run.get("accuracy"), (int, float)):
        text += f", accuracy {100 * run['accuracy']:.2f}%"
    return text


def audit_table(entries: Sequence[dict[str, Any]]) -> Table:
    """The log, oldest first; every string in it is shown literally (a host's
    error, a step detail and a flag can hold anything)."""
    table = Table(title="audit log")
    for column in ("time (UTC)", "who", "command", "flags", "hosts", "run", "outcome"):
        table.add_column(column, no_wrap=column in ("time (UTC)", "command"))
    for entry in entries:
        outcome = entry.get("outcome", "ok")
        detail = "" if outcome == "ok" else f": {entry.get('error')} (exit {entry.get('exit_code')})"
        colour = {"ok": "green", "interrupted": "yellow"}.get(str(outcome), "red")
        when = _when(entry)
        table.add_row(
            render.literal(when.strftime("%Y-%m-%d %H:%M:%S") if when else entry.get("time")),
            render.literal(f"{entry.get('user')}@{entry.get('host')}"),
            render.literal(entry.get("command")),
            render.literal(_flags_text(entry.get("flags"))),
            render.literal(_hosts_text(entry.get("hosts"))),
            render.literal(_run_text(entry.get("run"))),
            render.literal(f"{outcome}{detail}", colour),
        )
    return table


def audit_command(
    workspace_dir: Path = WorkspaceOpt,
    last: Optional[int] = typer.Option(None, "--last", "-n", min=1,
                                       help="Only the newest N entries."),
    since: Optional[str] = typer.Option(None, "--since",
                                        help="Only entries from this UTC date or time on "
                                             "(2026-12-03 or 2026-12-03T14:00)."),
    json_output: bool = JsonOpt,
) -> None:
    """Who changed hosts or runs here, when, and how it went.

    Deploy, teardown, train (its start and end), resume, pki changes and init,
    from the workspace's audit.jsonl: time, user, command and flags, what
    changed on each host, the run, the outcome."""
    start = _since(since)
    workspace = load_workspace(workspace_dir)
    log = audit.read(workspace.paths)
    render.warn(log.warnings)
    entries = [e for e in log.entries
               if start is None or ((when := _when(e)) is not None and when >= start)]
    if last is not None:
        entries = entries[-last:]
    if json_output:
        render.emit_json({"entries": entries})
    else:
        render.out.print(audit_table(entries))
