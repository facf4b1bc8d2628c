"""One changing command at a time per workspace.

Two `flctl train` in one workspace would race on the same agents and run
records, and a `deploy` or `teardown` under a running `train` would restart
or remove the agents it trains on. So the commands that change a workspace
or its hosts (train, deploy, teardown, demo) hold an exclusive, non-blocking
flock on `.flctl/lock` while they run, and a second one is refused at once
with a message naming the holder. Read-only commands (status, runs, logs)
never take it.

A running `train` lets hosts join and leave it (flctl.core.members): it
holds `.flctl/lock` with `"membership": true` in its record, and then a
`deploy --limit` or `teardown --limit` goes ahead beside it under a second
flock, `.flctl/members.lock`, which allows one such change at a time. Every
exclusive holder takes that second lock too (train only while it starts),
so no change of members overlaps another command, nor the start of a run.

The lock is the flock, not the file's text: the kernel drops it when the
holding process exits, however it dies, so a holder left behind by a killed
process never blocks anyone. The text (command, pid, start time, user and
host) is written after the flock is won and only read to say who is in the
way.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from flctl.errors import WorkspaceError

LOCK_FILE = "lock"
MEMBERS_LOCK_FILE = "members.lock"

ALONE = "alone"          # the command holds the workspace by itself
ALONGSIDE = "alongside"  # a change of members beside a running train


class WorkspaceBusy(WorkspaceError):
    """Another flctl command is changing this workspace."""


@contextmanager
def workspace_lock(state_dir: Path, command: str, *, membership: bool = False,
                   shares_membership: bool = False) -> Iterator[str]:
    """Hold the workspace whose state directory is `state_dir` while the block runs.

    Raises WorkspaceBusy at once when another process holds it. `command`
    (e.g. "flctl train") is what a refused command is told. A `membership`
    command (deploy or teardown of some hosts) may also run beside a holder
    that `shares_membership` (a train); the block is given ALONE or ALONGSIDE.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = _holder_record(command, shares_membership)
    with ExitStack() as held:
        main = _open(state_dir / LOCK_FILE)
        held.callback(os.close, main)   # closing the only descriptor releases the flock
        mode = ALONE
        if not _try_flock(main):
            holder = os.pread(main, 4096, 0)
            if not (membership and _shares_membership(holder)):
                raise WorkspaceBusy(_busy_message(holder))
            mode = ALONGSIDE
        else:
            _write_record(main, record)
            held.callback(os.ftruncate, main, 0)  # a stale record is harmless, but misleads
        members = _open(state_dir / MEMBERS_LOCK_FILE)
        held.callback(os.close, members)
        if not _try_flock(members):
            raise WorkspaceBusy(_busy_message(os.pread(members, 4096, 0)))
        _write_record(members, record)
        if shares_membership:   # hosts may join and leave from now on
            os.ftruncate(members, 0)
            fcntl.flock(members, fcntl.LOCK_UN)
        else:
            held.callback(os.ftruncate, members, 0)
        yield mode


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_record(fd: int, record: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)


def _shares_membership(raw: bytes) -> bool:
    """Whether the holder's record says it lets hosts join and leave (a record
    being written, or unreadable, says no: the command is refused)."""
    try:
        return json.loads(raw.decode("utf-8")).get("membership") is True
    except (ValueError, AttributeError):
        return False


def local_user() -> str:
    """Who runs this command: the login name, or the uid without one."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME / USER
        return str(os.getuid())


def _holder_record(command: str, shares_membership: bool = False) -> bytes:
    return json.dumps({"command": command, "pid": os.getpid(), "since": time.time(),
                       "user": local_user(), "host": os.uname().nodename,
                       "membership": shares_membership}).encode()


def _busy_message(raw: bytes) -> str:
    """One line naming the holder from its record (which may be half written)."""
    try:
        holder = json.loads(raw.decode("utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder["since"])))
        who = (f"`{holder['command']}` (pid {int(holder['pid'])}, "
               f"{holder['user']}@{holder['host']}) has held it since {since}")
    except (ValueError, TypeError, KeyError, OverflowError, OSError):
        who = "another flctl command holds it"
    return f"workspace busy: {who}; wait for it or stop it"
