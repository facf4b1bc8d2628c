"""Send and receive flctl messages on a (TLS) socket without copying array bytes.

Arrays go out with one sendall per array (or per chunk, for a streamed
message) straight from numpy memory, and come in through recv_into loops
that write directly where a Receiver says: freshly allocated numpy buffers,
caller-provided ones, or a spool file's small piece buffer (the coordinator
folds large updates without ever holding one whole). Lengths are validated
before any allocation, and every chunk's header before its body is read.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Protocol, Union, runtime_checkable

import numpy as np

from flctl.core.messages import (
    DEFAULT_LIMITS,
    PRELUDE_SIZE,
    ArraySpec,
    FrameHead,
    Limits,
    Message,
    Position,
    body_views,
    check_chunk,
    chunk_plan,
    chunk_size,
    encode_chunk_head,
    encode_head,
    parse_header,
    parse_prelude,
)
from flctl.errors import ProtocolError

# Bytes asked of a Receiver at a time (and upper bound per recv_into call);
# TLS hands out at most one 16 KiB record per read anyway.
RECV_PIECE = 4 << 20

Allocator = Callable[[list[ArraySpec]], list[np.ndarray]]


@runtime_checkable
class Receiver(Protocol):
    """Where a message's array bytes go as they arrive.

    `begin` sees the validated head first (kind, meta, layout, and where a
    resumed stream starts) and may refuse it (raise); then `buffer(index,
    offset, nbytes)` hands out a writable view of exactly `nbytes` for array
    `index` at byte `offset`, which `received` confirms once filled, in
    order; `finish` returns the arrays. A message that fails part way leaves
    the receiver as it was after its last `received`: its owner may resume
    the stream into it (a head with `resume`) or free it.
    """

    def begin(self, head: FrameHead) -> None: ...

    def buffer(self, index: int, offset: int, nbytes: int) -> memoryview: ...

    def received(self, index: int, offset: int, nbytes: int) -> None: ...

    def finish(self) -> list[np.ndarray]: ...


class ArrayReceiver:
    """Receive into numpy arrays from an Allocator (default: fresh ones)."""

    def __init__(self, allocate: Allocator | None = None) -> None:
        self._allocate = allocate or default_allocate
        self._arrays: list[np.ndarray] = []
        self._views: list[memoryview] = []

    def begin(self, head: FrameHead) -> None:
        if head.resume is not None:
            raise ProtocolError("a resumed stream arrived where none was interrupted")
        self._arrays = self._allocate(head.specs)
        _check_allocated(self._arrays, head.specs)
        self._views = [memoryview(a.reshape(-1).view(np.uint8)) for a in self._arrays]

    def buffer(self, index: int, offset: int, nbytes: int) -> memoryview:
        return self._views[index][offset:offset + nbytes]

    def received(self, index: int, offset: int, nbytes: int) -> None:
        pass

    def finish(self) -> list[np.ndarray]:
        self._views = []
        return list(self._arrays)


class KeptReceiver(ArrayReceiver):
    """An ArrayReceiver that keeps what arrived when the connection drops, so
    a reply sent again from `position` continues it (a resumable transfer's
    reply that has no receiver of its own, such as the first model)."""

    def __init__(self, allocate: Allocator | None = None) -> None:
        super().__init__(allocate)
        self._specs: list[ArraySpec] | None = None
        self.position: Position = (0, 0)

    @property
    def started(self) -> bool:
        return self._specs is not None

    def begin(self, head: FrameHead) -> None:
        if head.resume is None:
            if self._specs is not None:
                # sent again whole: fine while nothing of the first one arrived
                if self.position == (0, 0) and list(head.specs) == self._specs:
                    return
                raise ProtocolError("a second reply arrived for one request")
            super().begin(head)
            self._specs = list(head.specs)
            return
        if self._specs is None or list(head.specs) != self._specs:
            raise ProtocolError("a resumed reply does not continue the interrupted one")
        if tuple(head.resume) != tuple(self.position):
            raise ProtocolError(f"the reply resumed at {list(head.resume)}, this end holds "
                                f"it up to {list(self.position)}")

    def received(self, index: int, offset: int, nbytes: int) -> None:
        self.position = (index, offset + nbytes)


Receive = Union[Allocator, Receiver, None]

class ConnectionClosed(ProtocolError):
    """The peer closed the stream. clean=True means it did so between frames."""

    def __init__(self, message: str, *, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean


def send_message(sock: socket.socket, msg: Message, limits: Limits = DEFAULT_LIMITS,
                 on_sent: Callable[[int], None] | None = None) -> int:
    """Write one message: one frame, or a stream of chunk frames when its arrays
    are bigger than one chunk (messages.chunk_size). Returns the bytes written;
    `on_sent` hears the running total after each chunk (progress of a large model)."""
    chunk = chunk_size(limits)
    views = body_views(msg)  # validate everything before the first byte goes out
    if msg.resume is None and msg.body_bytes <= chunk:
        head = encode_head(msg)
        sock.sendall(head)
        total = len(head)
        for view in views:
            if view.nbytes:
                sock.sendall(view)
                total += view.nbytes
        return total
    head = encode_head(msg, chunk, msg.resume)
    sock.sendall(head)
    total = len(head)
    for index, offset, nbytes in chunk_plan(_specs(msg), chunk, msg.resume or (0, 0)):
        chunk_head = encode_chunk_head(index, offset, nbytes)
        sock.sendall(chunk_head)
        sock.sendall(views[index][offset:offset + nbytes])
        total += len(chunk_head) + nbytes
        if on_sent is not None:
            on_sent(total)
    return total


def _specs(msg: Message) -> list[ArraySpec]:
    """What a receiver will parse from the message's head (for the chunk plan)."""
    specs = []
    for array in msg.arrays:
        array = np.asarray(array)
        specs.append(ArraySpec(array.dtype, tuple(array.shape), array.size * array.itemsize))
    return specs


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
        n = sock.recv_into(view[got:got + RECV_PIECE] if size - got > RECV_PIECE else view[got:])
        if n == 0:
            clean = not frame_started and got == 0
            raise ConnectionClosed(
                "connection closed by peer" if clean else "connection closed mid-frame",
                clean=clean,
            )
        got += n


def default_allocate(specs: list[ArraySpec]) -> list[np.ndarray]:
    try:
        return [np.empty(spec.shape, dtype=spec.dtype) for spec in specs]
    except MemoryError:
        raise ProtocolError(f"cannot hold a message of {sum(s.nbytes for s in specs)} bytes: "
                            f"not enough memory") from None


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


def _recv_head(sock: socket.socket, limits: Limits, *,
               frame_started: bool) -> tuple[FrameHead, int]:
    """One frame's prelude and header, validated; (head, bytes read so far)."""
    prelude = bytearray(PRELUDE_SIZE)
    _recv_exact(sock, memoryview(prelude), frame_started=frame_started)
    header_len, body_len = parse_prelude(bytes(prelude), limits)
    header = bytearray(header_len)
    _recv_exact(sock, memoryview(header), frame_started=True)
    return parse_header(header, body_len, limits), PRELUDE_SIZE + header_len


def _recv_span(sock: socket.socket, receiver: Receiver, index: int, offset: int,
               nbytes: int, deadline: float | None) -> None:
    """Bytes [offset, offset + nbytes) of array `index`, piece by piece into the receiver."""
    end = offset + nbytes
    while offset < end:
        size = min(RECV_PIECE, end - offset)
        _recv_exact(sock, receiver.buffer(index, offset, size), frame_started=True,
                    deadline=deadline)
        receiver.received(index, offset, size)
        offset += size


def recv_message(sock: socket.socket, limits: Limits = DEFAULT_LIMITS,
                 receive: Receive = None) -> tuple[Message, int]:
    """Read one message (one frame, or a stream's head and chunks).

    `receive` is a Receiver, or an Allocator (which may reuse buffers, or
    raise ProtocolError to refuse a message that is within protocol limits but
    too big for the caller right now), or None for fresh arrays.
    """
    head, read = _recv_head(sock, limits, frame_started=False)
    # A message without arrays (a heartbeat, an error) costs the caller no buffer.
    if not head.specs:
        return Message(head.kind, head.meta, []), read
    receiver = receive if isinstance(receive, Receiver) else ArrayReceiver(receive)
    receiver.begin(head)
    if head.stream is None:
        total = head.total_bytes
        deadline = _deadline(limits, total)
        for index, spec in enumerate(head.specs):
            _recv_span(sock, receiver, index, 0, spec.nbytes, deadline)
    else:
        plan = chunk_plan(head.specs, head.stream, head.resume or (0, 0))
        total = sum(nbytes for _, _, nbytes in plan)
        deadline = _deadline(limits, total)
        for position, expected in enumerate(plan):
            chunk, chunk_read = _recv_head(sock, limits, frame_started=True)
            check_chunk(chunk, expected, position, len(plan))
            read += chunk_read
            _recv_span(sock, receiver, *expected, deadline)
    return Message(head.kind, head.meta, receiver.finish(), head.resume), read + total


def _deadline(limits: Limits, nbytes: int) -> float | None:
    """When `nbytes` must have arrived by, under the receiver's minimum rate."""
    if limits.min_body_rate <= 0:
        return None
    return time.monotonic() + limits.body_grace_s + nbytes / limits.min_body_rate
