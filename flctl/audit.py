"""The workspace's audit log: who changed which hosts or runs, when, and how.

Every command that changes hosts or runs (deploy, teardown, train's start
and end, resume, pki changes, init, and the deploy/train/teardown of
`flctl demo`) appends one JSON line to `audit.jsonl` at the workspace root:
the UTC time, the local user and machine, the command and the flags given,
what changed on each host, the run, flctl's version and the outcome.

What goes in is names, states, step names and their details, counts and
the flags as typed, never a file's contents: keys and certificates are
made and kept by deploy (pki/, the hosts' own directories) and no step
reports them. A flag whose name says it carries a secret is recorded as
given, not by value, should one ever exist.

The file is 0600 (who did what is for the workspace's owner), appended
to with one fsynced write per line; a reader skips a torn line with a
warning, as `metrics.jsonl`'s readers do. The log is a record beside the
run records, never read to decide anything.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flctl import __version__
from flctl.coordinator.records import RunDir, describe_run
from flctl.core.fsutil import SECRET_MODE, append_line, read_json_lines
from flctl.deploy.results import HostResult
from flctl.errors import WorkspaceError
from flctl.workspace import WorkspacePaths
from flctl.workspace_lock import local_user

SECRET_WORDS = ("password", "passphrase", "secret", "token", "private", "key")
REDACTED = "<given>"


def new_entry(command: str, flags: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A line of the log: who and when, then `fields` (hosts, run, outcome...)."""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "user": local_user(),
        "host": os.uname().nodename,
        "command": command,
        "flags": {name: (REDACTED if _secret(name, value) else value)
                  for name, value in flags.items()},
        "version": __version__,
        **fields,
    }


def _secret(name: str, value: Any) -> bool:
    """A flag named like a secret, with a value (a yes/no switch holds none)."""
    return not isinstance(value, bool) and any(word in name.lower() for word in SECRET_WORDS)


def host_changes(results: Sequence[HostResult]) -> dict[str, dict[str, Any]]:
    """Per host: its recap status, the steps that changed (with their detail), its error."""
    return {r.host: {"status": r.status,
                     "changes": [f"{s.name} ({s.detail})" if s.detail else s.name
                                 for s in r.steps if s.changed],
                     "error": r.error} for r in results}


def run_fields(paths: WorkspacePaths, run_id: str, event: str) -> dict[str, Any]:
    """A run as the log names it; at its end, how far it got, from its own records."""
    fields: dict[str, Any] = {"run_id": run_id, "event": event}
    run = RunDir(paths.runs / run_id)
    if event == "end" and run.path.is_dir():
        info = describe_run(run)
        fields.update(state=info.state, rounds=info.rounds_done, accuracy=info.accuracy)
    return fields


def append(paths: WorkspacePaths, entry: dict[str, Any]) -> None:
    """Add one line; WorkspaceError if it cannot be written."""
    line = json.dumps(entry, sort_keys=True, default=str).encode() + b"\n"
    try:
        append_line(paths.audit, line, SECRET_MODE)
    except OSError as exc:
        raise WorkspaceError(f"cannot write the audit log {paths.audit}: {exc.strerror}") from None


@dataclass(frozen=True)
class AuditLog:
    entries: list[dict[str, Any]]
    warnings: list[str]


def read(paths: WorkspacePaths) -> AuditLog:
    """Every readable line, oldest first; a warning for each unreadable one."""
    if not paths.audit.exists():
        return AuditLog([], [])
    lines, bad = read_json_lines(paths.audit, lambda value: isinstance(value, dict))
    return AuditLog([entry for _, _, entry in lines],
                    [f"{paths.audit}:{n}: skipped an unreadable line (torn by a crash or a "
                     f"full disk?)" for n in bad])
