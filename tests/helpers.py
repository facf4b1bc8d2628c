"""Shared test plumbing: run the CLI as a user would, pick free ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flctl.core.settings import AgentSettings, Settings, render_settings


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 180) -> CliResult:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    done = subprocess.run([sys.executable, "-m", "flctl", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    return CliResult(done.returncode, done.stdout, done.stderr)


def free_port_block(count: int) -> int:
    """A base port with `count` consecutive free ports after it (loopback)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65000:
            continue
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


def use_ports(workspace: Path, count: int) -> int:
    """Point a workspace's agents at free loopback ports."""
    from flctl.core.settings import load_settings

    settings = load_settings(workspace / "flctl.yaml")
    base = free_port_block(count)
    updated = Settings(project=settings.project, overlay=settings.overlay,
                       agent=AgentSettings(port=base, listen=settings.agent.listen),
                       training=settings.training, limits=settings.limits)
    (workspace / "flctl.yaml").write_text(render_settings(updated))
    return base
