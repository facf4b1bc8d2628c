"""Whether a run is running: its processes are alive and are the ones recorded.

A run is running while the process training it (`process.json`, written by
the coordinator: flctl.coordinator.control) or the supervisor keeping it
going (`supervisor.json`) is alive. A pidfile alone proves nothing: the
process must be alive, not a zombie, have started at the tick the file
records (a pid reused by the kernel after a crash did not) and run flctl
(its /proc/PID/cmdline). flctl.agent.proc is the one place that reads
/proc for that.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from flctl.agent import proc
from flctl.coordinator.control import PROCESS, ProcessRecord, read_process
from flctl.coordinator.records import RunDir, RunInfo, latest_run

SUPERVISOR = "supervisor.json"
SUPERVISOR_MODULE = "flctl.service.supervisor"
RUNNING = "running"


def verified(record: ProcessRecord | None, needles: tuple[bytes, ...]) -> bool:
    """Whether `record` names a live process that is still the one it recorded."""
    if record is None:
        return False
    if not Path("/proc/self/stat").exists():   # no /proc: the pid is all there is
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = proc.proc_stat(record.pid)
    if stat is None or not stat.alive:
        return False
    if record.start_ticks is not None and stat.start_ticks != record.start_ticks:
        return False
    return proc.matching_pid(record.pid, needles)


def coordinator(run: RunDir) -> ProcessRecord | None:
    """The live process training the run, if any."""
    record = read_process(run.path / PROCESS)
    return record if verified(record, (b"flctl",)) else None


def supervisor(run: RunDir) -> ProcessRecord | None:
    """The live supervisor of a detached run, if any."""
    record = read_process(run.path / SUPERVISOR)
    needles = (SUPERVISOR_MODULE.encode(), str(run.path).encode())
    return record if verified(record, needles) else None


def is_running(run: RunDir) -> bool:
    return coordinator(run) is not None or supervisor(run) is not None


def latest_live_run(runs_root: Path) -> RunInfo | None:
    """The newest run as `flctl status` and `top` show it, running ones as such."""
    latest = latest_run(runs_root)
    return with_liveness(latest) if latest is not None else None


def with_liveness(info: RunInfo) -> RunInfo:
    """`info` as `flctl runs` shows it: "running" while its processes are."""
    if info.state == "finished" or not is_running(RunDir(info.path)):
        return info
    return dataclasses.replace(info, state=RUNNING)
