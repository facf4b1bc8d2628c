"""The one contract deploy uses to touch a host: run a command, put a file,
get a file (plus streaming, for `flctl logs -f`).

Local hosts and SSH hosts differ only in how these things happen; the steps
above them are shared.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flctl.errors import FlctlError


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class HostUnreachable(FlctlError):
    """The host could not be reached at all (as opposed to a failed step)."""


class CommandTimeout(FlctlError):
    """A command on the host ran past its time limit (the host is still reachable)."""


class Connector(Protocol):
    host_name: str
    python: str

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> CommandResult: ...

    def run_shell(self, script: str, timeout: float = 120.0) -> CommandResult: ...

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def put_file(self, local: Path, path: str, mode: int = 0o644) -> None: ...

    def get(self, path: str) -> bytes: ...

    def stream(self, argv: Sequence[str], on_line: Callable[[str], None],
               stop: threading.Event | None = None) -> int: ...

    def local_address(self) -> str: ...

    def close(self) -> None: ...
