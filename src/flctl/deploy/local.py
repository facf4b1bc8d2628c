"""Connector for hosts that are this machine (`connection: local`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from flctl.core.fsutil import atomic_write
from flctl.deploy.connector import CommandResult


class LocalConnector:
    def __init__(self, host_name: str, python: str = sys.executable) -> None:
        self.host_name = host_name
        self.python = python

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> CommandResult:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        atomic_write(Path(path), data, mode)

    def get(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def close(self) -> None:
        return None
