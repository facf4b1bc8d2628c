"""A run while it runs: which process trains it, and asking it to stop.

`process.json` in the run's directory names the process training the run:
its pid and its start time in clock ticks since boot (/proc/PID/stat), so
that a pid the kernel hands to another process after a crash is never taken
for the run. A coordinator killed with -9 leaves the file behind: readers
check the process is alive and is the one recorded (flctl.service.liveness)
and never trust the file alone.

`stop.request` is how `flctl runs stop` asks a run to end: the coordinator
looks for it after each round, once that round is checkpointed, and ends the
run there, resumable with `flctl train --resume`. It works the same for a
run started in a terminal and one started with `--detach`. A start or a
resume clears a request left from before (it was for an earlier process).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flctl.coordinator.records import STATE, RunDir
from flctl.core.facts import parse_proc_stat
from flctl.core.fsutil import atomic_write
from flctl.errors import TrainingError

PROCESS = "process.json"
STOP_REQUEST = "stop.request"


class RunStopped(TrainingError):
    """The run ended after a round because `flctl runs stop` asked it to."""


@dataclass(frozen=True)
class ProcessRecord:
    """A process as a pidfile names it (validated: the file is on disk)."""

    pid: int
    start_ticks: int | None   # None where there is no /proc (then only the pid is known)

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks}


def own_start_ticks() -> int | None:
    """This process's start time, in clock ticks since boot."""
    try:
        return parse_proc_stat(Path("/proc/self/stat").read_text()).start_ticks
    except (OSError, IndexError, ValueError):
        return None


def this_process() -> ProcessRecord:
    return ProcessRecord(os.getpid(), own_start_ticks())


def write_process(path: Path, record: ProcessRecord, **extra: Any) -> None:
    atomic_write(path, json.dumps({**record.as_dict(), "since": time.time(), **extra}))


def read_process(path: Path) -> ProcessRecord | None:
    """The record in `path`, or None when it is missing or not a record."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    pid, ticks = document.get("pid"), document.get("start_ticks")
    if not _count(pid) or pid <= 0 or not (ticks is None or _count(ticks)):
        return None
    return ProcessRecord(pid, ticks)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def remove_own(path: Path) -> None:
    """Remove the record at `path` if it names this process (a later one may own it)."""
    record = read_process(path)
    if record is not None and record.pid == os.getpid():
        path.unlink(missing_ok=True)


def checkpointed_round(run: RunDir) -> int:
    """The round of the run's last checkpoint (0: none), read cheaply while it runs."""
    try:
        value = json.loads((run.path / STATE).read_text()).get("round")
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def request_stop(run: RunDir) -> None:
    atomic_write(run.path / STOP_REQUEST, json.dumps({"since": time.time()}))


def stop_requested(run: RunDir) -> bool:
    return (run.path / STOP_REQUEST).exists()


class LiveRun:
    """What the process training a run tells about it (see `live_run`)."""

    def __init__(self, run: RunDir, planned_rounds: int) -> None:
        self.run = run
        self.planned_rounds = planned_rounds

    def running(self) -> None:
        """The run is this process's now, its settings accepted: say so in the run."""
        write_process(self.run.path / PROCESS, this_process())

    def after_round(self, round_number: int) -> None:
        """Call once the round is checkpointed: RunStopped when a stop was asked
        for and rounds are left."""
        if round_number < self.planned_rounds and stop_requested(self.run):
            raise RunStopped(
                f"run {self.run.run_id} stopped after round {round_number} as asked (`flctl "
                f"runs stop`); continue it with `flctl train --resume {self.run.run_id}`")


@contextmanager
def live_run(run: RunDir, planned_rounds: int) -> Iterator[LiveRun]:
    """The run as trained by this process while the block runs; the record
    it writes (`running()`) goes when the block ends, however it ends."""
    (run.path / STOP_REQUEST).unlink(missing_ok=True)
    try:
        yield LiveRun(run, planned_rounds)
    finally:
        remove_own(run.path / PROCESS)
