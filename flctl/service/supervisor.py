"""Keep a detached run's coordinator going after the terminal is gone.

`flctl train --detach` starts this in a session of its own (setsid: no
controlling terminal, so a hangup or a Ctrl-C there never reaches it), stdin
/dev/null, output appended to the run's `detach.log`; or systemd starts it
as a user unit (flctl.service.systemd). It runs the run's coordinator as
`python -m flctl train ...`, the same command and code as a run in a
terminal, and records itself in the run's `supervisor.json`.

Supervised means: a coordinator that crashed (killed by a signal other than
a request to end: the OOM killer, kill -9, a segfault) is started again
with `--resume` from its last checkpoint, after a pause, at most
MAX_CRASHES times in a row without a new round checkpointed in between. Any
exit is final: the run finished (0), was stopped (`flctl runs stop`), was
interrupted (130), or flctl gave its verdict (bad input, busy, too few
hosts, diverging), which a restart would only repeat. SIGTERM or SIGINT to
the supervisor ends the coordinator with SIGINT (an interrupted run,
resumable) and then itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flctl.coordinator.control import (
    checkpointed_round,
    remove_own,
    stop_requested,
    this_process,
    write_process,
)
from flctl.coordinator.records import STATE, RunDir
from flctl.service.liveness import SUPERVISOR

SPEC = "service.json"     # what to run: the start and the resume command
LOG = "detach.log"
MAX_CRASHES = 3
PAUSE_S = 2.0             # times the crashes in a row
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM)   # someone asked it to end


@dataclass(frozen=True)
class Spec:
    """The flctl arguments to start the run, and to resume it after a crash."""

    start: list[str]
    resume: list[str]
    max_crashes: int = MAX_CRASHES

    def as_dict(self) -> dict[str, object]:
        return {"start": self.start, "resume": self.resume, "max_crashes": self.max_crashes}


def write_spec(run: RunDir, spec: Spec) -> None:
    (run.path / SPEC).write_text(json.dumps(spec.as_dict(), indent=2))


def read_spec(run: RunDir) -> Spec:
    document = json.loads((run.path / SPEC).read_text())

    def words(key: str) -> list[str]:
        value = document.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(w, str) for w in value):
            raise ValueError(f"{run.path / SPEC}: {key} must be a list of strings")
        return value

    limit = document.get("max_crashes", MAX_CRASHES)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"{run.path / SPEC}: max_crashes must be a count")
    return Spec(words("start"), words("resume"), limit)


def crashed(code: int) -> bool:
    """Whether an exit is a crash worth a restart (not a verdict, not a request to end)."""
    return code < 0 and -code not in [int(s) for s in ENDING_SIGNALS]


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def say(text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    sys.stderr.write(f"{stamp} UTC flctl supervisor: {text}\n")
    sys.stderr.flush()


def supervise(run: RunDir, spec: Spec, pause_s: float = PAUSE_S) -> int:
    """Run the coordinator until the run ends; its last exit code (128+N for signal N)."""
    ending = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def on_end(*_: object) -> None:
        ending.set()
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)   # KeyboardInterrupt: it ends, resumable

    # A handler (not SIG_IGN) for SIGINT: the coordinator, after exec, gets the
    # default back and so its KeyboardInterrupt, even when this was started
    # from a job that ignores SIGINT. SIGHUP stays ignored there too.
    signal.signal(signal.SIGTERM, on_end)
    signal.signal(signal.SIGINT, on_end)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    write_process(run.path / SUPERVISOR, this_process(), log=str(run.path / LOG))
    args, crashes, code = spec.start, 0, 0
    try:
        while True:
            before = checkpointed_round(run)
            say(f"starting flctl {' '.join(args)}")
            child = subprocess.Popen([sys.executable, "-m", "flctl", *args],
                                     stdin=subprocess.DEVNULL)
            if ending.is_set():   # the signal came between the check and the start
                child.send_signal(signal.SIGINT)
            code = child.wait()
            say(f"the coordinator {describe(code)}")
            if code == 0 or ending.is_set() or stop_requested(run) or not crashed(code):
                break
            crashes = 1 if checkpointed_round(run) > before else crashes + 1
            if crashes > spec.max_crashes:
                say(f"{crashes - 1} restarts in a row made no progress: giving up; "
                    f"`flctl train --resume {run.run_id}` continues the run")
                break
            wait = pause_s * crashes
            say(f"restarting it in {wait:g}s ({crashes} of {spec.max_crashes})")
            if _wait(ending, run, wait):
                say("asked to end meanwhile: not restarting")
                break
            args = spec.resume if (run.path / STATE).exists() else spec.start
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        remove_own(run.path / SUPERVISOR)
    return code if code >= 0 else 128 - code


def _wait(ending: threading.Event, run: RunDir, seconds: float) -> bool:
    """Sleep `seconds`; True at once when the run is asked to end meanwhile."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if ending.wait(min(0.2, max(0.0, until - time.monotonic()))) or stop_requested(run):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m flctl.service.supervisor RUN_DIR\n")
        return 2
    run = RunDir(Path(args[0]))
    try:
        spec = read_spec(run)
    except (OSError, ValueError) as exc:
        say(f"cannot read what to run: {exc}")
        return 2
    return supervise(run, spec)


if __name__ == "__main__":
    sys.exit(main())
