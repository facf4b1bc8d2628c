"""One changing command at a time per workspace.

Two `flctl train` in one workspace would race on the same agents and run
records, and a `deploy` or `teardown` under a running `train` would restart
or remove the agents it trains on. So the commands that change a workspace
or its hosts (train, deploy, teardown, demo) hold an exclusive, non-blocking
flock on `.flctl/lock` while they run, and a second one is refused at once
with a message naming the holder. Read-only commands (status, runs, logs)
never take it.

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
from contextlib import contextmanager
from pathlib import Path

from flctl.errors import WorkspaceError

LOCK_FILE = "lock"


class WorkspaceBusy(WorkspaceError):
    """Another flctl command is changing this workspace."""


@contextmanager
def workspace_lock(state_dir: Path, command: str) -> Iterator[None]:
    """Hold the workspace whose state directory is `state_dir` while the block runs.

    Raises WorkspaceBusy at once when another process holds it. `command`
    (e.g. "flctl train") is what a refused command is told.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(_busy_message(os.pread(fd, 4096, 0))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(command), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # nobody holds it; a stale record is harmless, but misleads
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


def local_user() -> str:
    """Who runs this command: the login name, or the uid without one."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME / USER
        return str(os.getuid())


def _holder_record(command: str) -> bytes:
    return json.dumps({"command": command, "pid": os.getpid(), "since": time.time(),
                       "user": local_user(), "host": os.uname().nodename}).encode()


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
