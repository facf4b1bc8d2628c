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

    def put_file(self, local: Path, path: str, mode: int = 0o644,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream a local file there; `on_bytes` hears the bytes sent so far."""

    def get(self, path: str) -> bytes: ...

    def stream(self, argv: Sequence[str], on_line: Callable[[str], None],
               stop: threading.Event | None = None) -> int: ...

    def local_address(self) -> str: ...

    def close(self) -> None: ...


def upload_files(connector: Connector, files: Sequence[tuple[Path, str]], what: str,
                 tell: Callable[[str], None], mode: int = 0o644) -> int:
    """Stream `files` (local path, remote path) to the host, telling `tell`
    "uploading WHAT: X of Y MB" as the bytes go out: wheels and frozen parts
    run to hundreds of MB, and a deploy that shows nothing for a minute
    looks hung. Returns the bytes sent."""
    total = sum(local.stat().st_size for local, _ in files)
    done = 0
    for local, remote in files:
        def sent(count: int, before: int = done) -> None:
            tell(f"uploading {what}: {(before + count) / 1e6:.1f} of {total / 1e6:.1f} MB")
        connector.put_file(local, remote, mode, on_bytes=sent)
        done += local.stat().st_size
    return done
