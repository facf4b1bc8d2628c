"""Keep one agent process alive where there is no systemd.

The supervisor is what the pidfile names: it starts the agent, restarts it
with backoff if it dies (kill -9, crash, OOM), and on SIGTERM stops it and
removes both pidfiles so `status` never sees a stale pid.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from flctl.core.fsutil import atomic_write

log = logging.getLogger("flctl.supervisor")

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0


def agent_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "flctl.agent.main", "--config", str(config)]


def supervise(config: Path, supervisor_pid: Path, agent_pid: Path) -> int:
    stopping = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def on_term(*_: object) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    atomic_write(supervisor_pid, f"{os.getpid()}\n")
    backoff = MIN_BACKOFF_S
    restarts = 0
    try:
        while not stopping.is_set():
            started = time.monotonic()
            child = subprocess.Popen(agent_command(config), stdin=subprocess.DEVNULL)
            atomic_write(agent_pid, f"{child.pid}\n")
            code = child.wait()
            if stopping.is_set():
                break
            lived = time.monotonic() - started
            backoff = MIN_BACKOFF_S if lived > HEALTHY_AFTER_S else min(backoff * 2, MAX_BACKOFF_S)
            restarts += 1
            log.warning("agent exited with %s after %.1fs; restart %d in %.1fs",
                        code, lived, restarts, backoff)
            stopping.wait(backoff)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for path in (agent_pid, supervisor_pid):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flctl-supervise")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--pidfile", required=True, type=Path)
    parser.add_argument("--agent-pidfile", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return supervise(args.config, args.pidfile, args.agent_pidfile)


if __name__ == "__main__":
    sys.exit(main())
