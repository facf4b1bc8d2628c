"""Connector for hosts that are this machine (`connection: local`)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from flctl.core.fsutil import atomic_write
from flctl.deploy.connector import CommandResult, CommandTimeout


class LocalConnector:
    """Runs commands here, from /: `python -m flctl...` then imports the installed
    flctl, never a `flctl/` folder that happens to be in the caller's directory."""

    def __init__(self, host_name: str, python: str = sys.executable) -> None:
        self.host_name = host_name
        self.python = python

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> CommandResult:
        try:
            done = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL, cwd="/",
            )
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"{self.host_name}: {argv[0]} ran past {timeout:.0f}s") from None
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def run_shell(self, script: str, timeout: float = 120.0) -> CommandResult:
        return self.run(["sh", "-c", script], timeout)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        atomic_write(Path(path), data, mode)

    def put_file(self, local: Path, path: str, mode: int = 0o644,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        data = local.read_bytes()
        atomic_write(Path(path), data, mode)
        if on_bytes is not None:
            on_bytes(len(data))

    def get(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def stream(self, argv: Sequence[str], on_line: Callable[[str], None],
               stop: threading.Event | None = None) -> int:
        process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, text=True, cwd="/")
        assert process.stdout is not None
        try:
            for line in process.stdout:
                on_line(line.rstrip("\n"))
                if stop is not None and stop.is_set():
                    break
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait()
        return process.returncode

    def local_address(self) -> str:
        return "127.0.0.1"

    def close(self) -> None:
        return None
