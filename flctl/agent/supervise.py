"""Keep one agent process alive where there is no systemd.

The supervisor is what the pidfile names: it starts the agent, restarts it
with backoff if it dies (kill -9, crash, OOM), and on SIGTERM stops it and
removes both pidfiles so `status` never sees a stale pid. When the agent
dies it notes why for the next one (flctl.agent.exits): "out of memory"
when the kernel killed it in its memory cgroup (the cgroup's oom_kill
count went up), else its exit status.
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

from flctl.agent import exits, limits
from flctl.core.agentconfig import parse_agent_config
from flctl.core.fsutil import atomic_write
from flctl.core.limits import oom_reason

logger = logging.getLogger("flctl.supervisor")

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0


def agent_command(config: Path, log: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "flctl.agent.main", "--config", str(config),
            *(["--log", str(log)] if log else [])]


def exit_reason(code: int, oom_before: int, memory_cgroup: str | None) -> tuple[str, bool]:
    """Why the agent ended: out of memory when its cgroup counted a kill since it started."""
    if code < 0 and memory_cgroup and limits.oom_kills(memory_cgroup) > oom_before:
        return oom_reason(limits.memory_limit(memory_cgroup)), True
    return f"the agent {exits.describe(code)}", False


def supervise(config: Path, supervisor_pid: Path, agent_pid: Path, log: Path | None = None,
              memory_cgroup: str | None = None) -> int:
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
    note = exits.exit_file(parse_agent_config(config.read_text(), str(config)).state_file)
    try:
        while not stopping.is_set():
            started = time.monotonic()
            oom_before = limits.oom_kills(memory_cgroup)
            child = subprocess.Popen(agent_command(config, log), stdin=subprocess.DEVNULL)
            atomic_write(agent_pid, f"{child.pid}\n")
            code = child.wait()
            if stopping.is_set():
                break
            reason, oom = exit_reason(code, oom_before, memory_cgroup)
            try:
                exits.record(note, reason, oom=oom)
            except OSError as exc:
                logger.warning("cannot note why the agent stopped: %s", exc)
            lived = time.monotonic() - started
            backoff = MIN_BACKOFF_S if lived > HEALTHY_AFTER_S else min(backoff * 2, MAX_BACKOFF_S)
            restarts += 1
            logger.warning("%s after %.1fs; restart %d in %.1fs", reason, lived, restarts,
                           backoff)
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
    parser.add_argument("--log", type=Path, help="the agent's log (it rotates it itself)")
    parser.add_argument("--memory-cgroup", help="the cgroup bounding the agent's memory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return supervise(args.config, args.pidfile, args.agent_pidfile, args.log,
                     args.memory_cgroup)


if __name__ == "__main__":
    sys.exit(main())
