"""Crash-safe file writes.

A checkpoint or key that is half-written after a crash is worse than none,
so every file flctl owns is written to a temp file in the same directory,
fsynced, then renamed over the target (rename is atomic on POSIX).
Secrets get their mode before any byte is written, never after.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

SECRET_MODE = 0o600


def atomic_write(path: Path | str, data: bytes | str | Callable[[BinaryIO], None],
                 mode: int = 0o644) -> None:
    """Write `data` to `path` atomically with permission bits `mode`.

    `data` may be a function that writes into the open file: large content
    (a model) then goes to disk as it is produced, never whole in memory.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)


def write_secret(path: Path | str, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write a private key or token readable by its owner only."""
    atomic_write(path, data, SECRET_MODE)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_hex(data: bytes | str) -> str:
    """The sha256 of `data` (text as UTF-8), in hex: how flctl names file contents."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_sha256(path: Path | str) -> str:
    """sha256_hex of a file's contents, read in blocks (wheels run to tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256_or_none(path: Path | str) -> str | None:
    """file_sha256, or None when the file cannot be read (a fact: "not there")."""
    try:
        return file_sha256(path)
    except OSError:
        return None
