"""Start a run in the background and return once it runs.

The run's directory is made first (its log lives there from the first
byte), then its supervisor is started: as a systemd user unit where that
works (flctl.service.systemd), else in a session of its own (setsid), stdin
/dev/null, stdout and stderr appended to the run's detach.log. `start`
returns when the coordinator has recorded itself in the run (it holds the
workspace lock then, and its settings and hosts were accepted), or raises
with the coordinator's own error line when it ended before that.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flctl.coordinator.control import read_process
from flctl.coordinator.records import RunDir, create_run_dir, has_rounds
from flctl.core.run_unit import RunUnitSpec
from flctl.core.text import clean_text
from flctl.errors import FlctlError
from flctl.service import liveness, systemd
from flctl.service.supervisor import LOG, SPEC, Spec, write_spec

START_TIMEOUT_S = 120.0
SUPERVISOR = "supervisor"
SYSTEMD = "systemd"


class StartFailed(FlctlError):
    """The detached run ended before it started; carries the coordinator's exit code."""

    def __init__(self, message: str, exit_code: int = 6) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Started:
    run_id: str
    pid: int              # the supervisor's
    log: Path
    service: str          # SUPERVISOR or SYSTEMD
    unit: str | None = None
    note: str | None = None   # why the systemd unit was not used, when systemd runs


def prepare(runs_root: Path, run_id: str, resume: bool) -> RunDir:
    """The run's directory, made for a new run (refused when it recorded rounds)."""
    run = RunDir(runs_root / run_id) if resume else create_run_dir(runs_root, run_id)
    for stale in (SPEC, liveness.SUPERVISOR):
        (run.path / stale).unlink(missing_ok=True)
    return run


def start(run: RunDir, spec: Spec, workspace_root: Path,
          timeout_s: float = START_TIMEOUT_S) -> Started:
    """Start `spec` in the background for `run` and wait until its coordinator runs."""
    write_spec(run, spec)
    log = run.path / LOG
    argv = [sys.executable, "-m", liveness.SUPERVISOR_MODULE, str(run.path)]
    why_not = systemd.why_not()
    if why_not is None:
        environment = {k: os.environ[k] for k in ("PYTHONPATH",) if os.environ.get(k)}
        try:
            unit = systemd.start_unit(RunUnitSpec(run.run_id, str(workspace_root), argv,
                                                  str(log), environment))
        except ValueError as exc:   # a run id or path a unit file cannot hold
            why_not = f"no unit can name it: {exc}"
        else:
            return Started(run.run_id, _wait_started(run, log, None, timeout_s), log,
                           SYSTEMD, unit)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                   cwd=workspace_root, start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    pid = _wait_started(run, log, process.poll, timeout_s)
    # where systemd runs but could not be used, say why
    return Started(run.run_id, pid, log, SUPERVISOR,
                   note=None if why_not == systemd.NOT_INIT else why_not)


def _wait_started(run: RunDir, log: Path, exited: Callable[[], int | None] | None,
                  timeout_s: float) -> int:
    """The supervisor's pid once the coordinator has recorded itself (or the
    run already finished); StartFailed with the run's error when it ended first."""
    deadline = time.monotonic() + timeout_s
    grace = time.monotonic() + 10.0   # a unit's supervisor takes a moment to appear
    while True:
        supervisor = read_process(run.path / liveness.SUPERVISOR)
        if liveness.coordinator(run) is not None and supervisor is not None:
            return supervisor.pid
        code = exited() if exited is not None else (
            None if liveness.supervisor(run) is not None or time.monotonic() < grace else -1)
        if code is not None:
            if code == 0 and has_rounds(run):   # so short that it is over already
                return supervisor.pid if supervisor is not None else 0
            raise StartFailed(f"run {run.run_id} did not start: {last_error(log)}",
                              code if code > 0 else 6)
        if time.monotonic() > deadline:
            raise StartFailed(f"run {run.run_id} did not start within {timeout_s:g}s; "
                              f"see {log}")
        time.sleep(0.05)


def last_error(log: Path) -> str:
    """The coordinator's error line from the log (else its last line)."""
    try:
        lines = [clean_text(line).strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return f"no log at {log}"
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    last = errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else "")
    return f"{last} (log: {log})" if last else f"it wrote nothing (log: {log})"
