"""Recording commands in the workspace's audit log (flctl.audit).

A command that changes hosts or runs is decorated with `@audited("deploy")`:
its flags as given (those that differ from their defaults) are taken from
its arguments, and when it ends, however it ends, one line goes to the
workspace's audit.jsonl with its outcome (flctl.audit). What a command
learns on the way is added with `note_hosts(results)` (deploy_hosts does it
for every deploying command), `audit_note(**fields)` and, for training,
`audit_run_start`, which writes the run's start line at once. A command
that does several audited things (`flctl demo`) writes one line per step
with `audit_block`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from flctl import audit
from flctl.cli import render
from flctl.coordinator.records import new_run_id, resumable_run
from flctl.deploy.results import HostResult
from flctl.errors import EXIT_INTERRUPTED, FlctlError
from flctl.workspace import Workspace, WorkspacePaths

Command = TypeVar("Command", bound=Callable[..., Any])


@dataclass
class Record:
    """What one audited command (or step) has done so far."""

    command: str
    flags: dict[str, Any]
    paths: WorkspacePaths | None
    hosts: dict[str, Any] | None = None
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_current: ContextVar[Optional[Record]] = ContextVar("flctl_audit_record", default=None)


def note_hosts(results: Sequence[HostResult]) -> None:
    """Per-host changes for the line of the command under way (if it is audited)."""
    record = _current.get()
    if record is not None:
        record.hosts = {**(record.hosts or {}), **audit.host_changes(results)}


def audit_note(**fields: Any) -> None:
    """More fields for the line of the command under way (revoked serials...)."""
    record = _current.get()
    if record is not None:
        record.extra.update(fields)


def audit_run_start(workspace: Workspace, run_id: str | None, resume: bool) -> str | None:
    """The id of the run about to start (or be resumed), named now so that its
    start and end lines say which run; writes the start line. Without an
    audited command around it, the run is left to name itself."""
    record = _current.get()
    if record is None or record.paths is None:
        return run_id
    run = resumable_run(workspace.paths.runs, run_id).run_id if resume else (run_id or new_run_id())
    if resume and not record.command.endswith("--resume"):
        record.command += " --resume"
    record.run_id = run
    audit.append(record.paths, audit.new_entry(
        record.command, record.flags, run=audit.run_fields(record.paths, run, "start")))
    return run


def _outcome(error: BaseException | None) -> dict[str, Any]:
    if error is None:
        return {"outcome": "ok", "exit_code": 0, "error": None}
    if isinstance(error, FlctlError):
        return {"outcome": "failed", "exit_code": error.exit_code, "error": error.message}
    if isinstance(error, (KeyboardInterrupt, typer.Abort)):
        return {"outcome": "interrupted", "exit_code": EXIT_INTERRUPTED, "error": "interrupted"}
    if isinstance(error, typer.Exit):
        code = error.exit_code
        return {"outcome": "ok" if code == 0 else "failed", "exit_code": code, "error": None}
    return {"outcome": "failed", "exit_code": 1,
            "error": f"unexpected error: {type(error).__name__}"}


@contextmanager
def audit_block(command: str, paths: WorkspacePaths | None,
                flags: dict[str, Any] | None = None) -> Iterator[Record]:
    """One audit line for the block, written when it ends with how it ended.
    Flags default to those of the audited command around it. Nothing is
    written where there is no workspace (yet, or any more)."""
    parent = _current.get()
    record = Record(command, flags if flags is not None else (parent.flags if parent else {}),
                    paths)
    token = _current.set(record)
    error: BaseException | None = None
    try:
        yield record
    except BaseException as exc:
        error = exc
        raise
    finally:
        _current.reset(token)
        _write_end(record, error)


def _write_end(record: Record, error: BaseException | None) -> None:
    if record.paths is None or not record.paths.settings.exists():
        return
    fields: dict[str, Any] = {**record.extra, **_outcome(error)}
    if record.hosts is not None:
        fields["hosts"] = record.hosts
    if record.run_id is not None:
        fields["run"] = audit.run_fields(record.paths, record.run_id, "end")
    entry = audit.new_entry(record.command, record.flags, **fields)
    try:
        audit.append(record.paths, entry)
    except FlctlError as exc:
        if error is None:
            raise
        render.warn([exc.message])  # the command's own error is the one to show


def given_flags(signature: inspect.Signature, values: dict[str, Any]) -> dict[str, Any]:
    """The options and arguments that differ from their defaults, by their
    command-line names ("--rounds": 3, "run": "2026..."), as JSON values."""
    flags = {}
    for name, parameter in signature.parameters.items():
        info = parameter.default
        default = getattr(info, "default", info)
        value = values.get(name, default)
        if value == default or info is inspect.Parameter.empty:  # the Context typer passes
            continue
        decls = [d for d in (getattr(info, "param_decls", None) or ()) if d.startswith("--")]
        flags[decls[0].split("/")[0] if decls else name] = _json_value(value)
    return flags


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def audited(command: str, workspace_param: str | None = "workspace_dir"
            ) -> Callable[[Command], Command]:
    """Decorate a Typer command: one audit line in the workspace named by its
    `workspace_param` argument when it ends. With None, the command writes its
    own lines with audit_block (it makes its workspace) and this only supplies
    the flags."""
    def decorate(func: Command) -> Command:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = signature.bind_partial(*args, **kwargs).arguments
            root = values.get(workspace_param) if workspace_param else None
            paths = WorkspacePaths(Path(root).resolve()) if root is not None else None
            with audit_block(command, paths, given_flags(signature, values)):
                return func(*args, **kwargs)

        return run  # type: ignore[return-value]
    return decorate
