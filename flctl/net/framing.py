"""Send and receive flctl frames on a (TLS) socket without copying array bytes.

Arrays go out with one sendall per array straight from numpy memory, and come
in through recv_into loops that write directly into freshly allocated (or
caller-provided) numpy buffers. Lengths are validated before any allocation.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

import numpy as np

from flctl.core.messages import (
    DEFAULT_LIMITS,
    PRELUDE_SIZE,
    ArraySpec,
    Limits,
    Message,
    body_views,
    encode_head,
    parse_header,
    parse_prelude,
)
from flctl.errors import ProtocolError

# Upper bound per recv_into call; TLS hands out at most one 16 KiB record per
# read anyway, but plain sockets benefit from large reads.
RECV_CHUNK = 4 << 20

Allocator = Callable[[list[ArraySpec]], list[np.ndarray]]


class ConnectionClosed(ProtocolError):
    """The peer closed the stream. clean=True means it did so between frames."""

    def __init__(self, message: str, *, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean


def send_message(sock: socket.socket, msg: Message) -> int:
    """Write one frame; returns the number of frame bytes written."""
    head = encode_head(msg)
    views = body_views(msg)  # validate everything before the first byte goes out
    sock.sendall(head)
    total = len(head)
    for view in views:
        if view.nbytes:
            sock.sendall(view)
            total += view.nbytes
    return total


def _recv_exact(sock: socket.socket, view: memoryview, *, frame_started: bool,
                deadline: float | None = None) -> None:
    """Fill view completely, raising ConnectionClosed on EOF and ProtocolError
    when `deadline` (time.monotonic) passes first."""
    got = 0
    size = view.nbytes
    while got < size:
        if deadline is not None and time.monotonic() > deadline:
            raise ProtocolError("the frame's body arrived too slowly (below the receiver's "
                                "minimum rate); giving up on it")
        n = sock.recv_into(view[got:got + RECV_CHUNK] if size - got > RECV_CHUNK else view[got:])
        if n == 0:
            clean = not frame_started and got == 0
            raise ConnectionClosed(
                "connection closed by peer" if clean else "connection closed mid-frame",
                clean=clean,
            )
        got += n


def default_allocate(specs: list[ArraySpec]) -> list[np.ndarray]:
    return [np.empty(spec.shape, dtype=spec.dtype) for spec in specs]


def _check_allocated(arrays: list[np.ndarray], specs: list[ArraySpec]) -> None:
    if len(arrays) != len(specs):
        raise ValueError(f"allocate returned {len(arrays)} arrays for {len(specs)} specs")
    for arr, spec in zip(arrays, specs):
        if (arr.dtype != spec.dtype or arr.shape != spec.shape or not arr.flags.c_contiguous
                or not arr.flags.writeable):
            raise ValueError(
                f"allocate returned {arr.dtype}{arr.shape}, need writeable C-contiguous "
                f"{spec.dtype}{spec.shape}"
            )


def recv_message(sock: socket.socket, limits: Limits = DEFAULT_LIMITS,
                 allocate: Allocator | None = None) -> tuple[Message, int]:
    """Read one frame. `allocate` may reuse buffers or raise ProtocolError to refuse
    a frame that is within protocol limits but too big for the caller right now."""
    prelude = bytearray(PRELUDE_SIZE)
    _recv_exact(sock, memoryview(prelude), frame_started=False)
    header_len, body_len = parse_prelude(bytes(prelude), limits)
    header = bytearray(header_len)
    _recv_exact(sock, memoryview(header), frame_started=True)
    kind, meta, specs = parse_header(header, body_len, limits)
    # A frame without arrays (a heartbeat, an error) costs the caller no buffer.
    arrays = (allocate or default_allocate)(specs) if specs else []
    _check_allocated(arrays, specs)
    deadline = (time.monotonic() + limits.body_grace_s + body_len / limits.min_body_rate
                if limits.min_body_rate > 0 and arrays else None)
    for arr in arrays:
        if arr.nbytes:
            _recv_exact(sock, memoryview(arr.reshape(-1).view(np.uint8)), frame_started=True,
                        deadline=deadline)
    return Message(kind=kind, meta=meta, arrays=list(arrays)), PRELUDE_SIZE + header_len + body_len
