"""Crash-safe file writes.

A checkpoint or key that is half-written after a crash is worse than none,
so every file flctl owns is written to a temp file in the same directory,
fsynced, then renamed over the target (rename is atomic on POSIX).
Secrets get their mode before any byte is written, never after.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

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


def append_line(path: Path, line: bytes, mode: int = 0o644) -> None:
    """Append one line (`line` ends in a newline) to a log file and fsync it.

    One write with O_APPEND, so lines of concurrent writers never interleave.
    A torn last line (a crash, a full disk) stays its own line: a good record
    is never glued onto it. The file has at most the bits of `mode`, from its
    first byte (an existing file with more is narrowed).
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        status = os.fstat(fd)
        if status.st_mode & 0o7777 & ~mode:
            os.fchmod(fd, status.st_mode & mode)
        size = status.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if size == 0:
        fsync_dir(path.parent)  # the file may be new: make its name durable too


def read_json_lines(path: Path, accept: Callable[[Any], bool] = lambda value: True,
                    ) -> tuple[list[tuple[int, str, Any]], list[int]]:
    """(line number, text, value) of every readable line of a JSON-lines file
    that `accept`s its value, and the numbers of the other lines (not UTF-8,
    not JSON, not accepted: what a torn append leaves). Blank lines are skipped."""
    good: list[tuple[int, str, Any]] = []
    bad: list[int] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            value = json.loads(text)
        except ValueError:  # UnicodeDecodeError is one too
            bad.append(number)
            continue
        if accept(value):
            good.append((number, text, value))
        else:
            bad.append(number)
    return good, bad


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
