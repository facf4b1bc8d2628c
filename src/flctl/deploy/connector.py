"""The one contract deploy uses to touch a host: run, put, get.

Local hosts and SSH hosts differ only in how these three things happen;
the steps above them are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from flctl.errors import FlctlError


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class HostUnreachable(FlctlError):
    """The host could not be reached at all (as opposed to a failed step)."""


class Connector(Protocol):
    host_name: str
    python: str

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> CommandResult: ...

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def get(self, path: str) -> bytes: ...

    def close(self) -> None: ...
