"""Why the last agent process ended, told by the next one.

A task runs inside the agent process, so a task that outgrows its memory
limit gets the agent killed; whoever restarts it (our supervisor, or systemd
through ExecStopPost= with $SERVICE_RESULT) writes the reason into
run_dir/last_exit.json, and the new agent takes it at start and reports it
(`info`, and `transfer_status` to a coordinator resuming the request that
was cut). The coordinator then names the reason ("out of memory (limit
512 MB)") instead of a bare dropout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flctl.core.agentconfig import parse_agent_config
from flctl.core.fsutil import atomic_write
from flctl.core.limits import oom_reason

FILE = "last_exit.json"


def exit_file(state_file: str) -> Path:
    """Beside the agent's state, in the one directory it (and its supervisor) may write."""
    return Path(state_file).parent / FILE


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def record(path: Path, reason: str, *, oom: bool) -> None:
    atomic_write(path, json.dumps({"reason": reason, "oom": oom, "at": time.time()}) + "\n")


def take(path: Path) -> dict[str, Any] | None:
    """The predecessor's exit, once: the file goes, so a later restart of a
    healthy agent reports nothing stale."""
    try:
        data = json.loads(path.read_text())
        path.unlink()
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("reason"), str):
        return None
    return {"reason": data["reason"][:200], "oom": data.get("oom") is True}


def main(argv: list[str] | None = None) -> int:
    """systemd's ExecStopPost=: note an OOM kill of the unit for the next agent."""
    parser = argparse.ArgumentParser(prog="flctl-agent-exits")
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    result = os.environ.get("SERVICE_RESULT", "")
    if result != "oom-kill":
        return 0
    config = parse_agent_config(args.config.read_text(), str(args.config))
    record(exit_file(config.state_file), oom_reason(config.memory_max), oom=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
