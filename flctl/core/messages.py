"""The flctl frame format: prelude + JSON header + raw little-endian array bytes.

Why this shape: the JSON header stays human-debuggable and pickle-free, while
model weights travel as raw bytes that are written from and read straight
into numpy buffers (no base64, no concatenation). The prelude carries both
lengths up front so a receiver can refuse an oversize frame *before* it
allocates anything; every array's byte length is derived from a whitelisted
dtype and its shape, and must add up exactly to the declared body length.

Layout (network byte order):
    magic  4s   b"FLCT"
    version B   PROTOCOL_VERSION
    pad    3x
    header I    JSON header length in bytes
    body   Q    total array bytes following the header

A message whose arrays are bigger than one chunk travels as a stream: a head
frame whose header describes every array and says `"stream": CHUNK` (its own
body is empty), then one "chunk" frame per CHUNK bytes of each array, in
order (array 0 from offset 0, ...; the last chunk of an array is shorter).
Where every chunk must start and how long it is follows from the head, so a
receiver checks each chunk's header against that before it reads a byte of
the chunk's body: a chunk out of order, repeated, too long or from another
array ends the stream. The frame bound (`max_body_bytes`) then bounds one
chunk, not the model: arrays of any size, and models of any total size,
travel with bounded buffers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flctl.core.dtypes import BFLOAT16, bfloat16, is_bfloat16
from flctl.core.schema import Maybe, count
from flctl.core.text import clean_text
from flctl.errors import FlctlError, ProtocolError

PROTOCOL_VERSION = 1
# A streamed message's array bytes travel in chunks of this size (a multiple
# of 8, so a chunk always holds whole elements of any wire dtype).
STREAM_CHUNK_BYTES = 16 << 20
CHUNK_KIND = "chunk"
# Sent by a peer while it handles a request that asked for them (meta
# "heartbeat_s"): proof of life during a long fit.
HEARTBEAT_KIND = "heartbeat"
MAGIC = b"FLCT"
_PRELUDE = struct.Struct("!4sB3xIQ")
PRELUDE_SIZE: int = _PRELUDE.size
MAX_KIND_CHARS = 64

# Wire dtype strings -> numpy dtypes. Only plain little-endian numbers: no
# objects, strings, structured or big-endian types can ever be decoded.
_WIRE_DTYPES: dict[str, np.dtype] = {
    np.dtype("<" + name).str: np.dtype("<" + name)
    for name in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
}
# Accept explicit "<" spelling of single-byte types too ("<i1" == "|i1").
_WIRE_DTYPES.update({"<b1": np.dtype("?"), "<i1": np.dtype("i1"), "<u1": np.dtype("u1")})


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before any allocation.

    `max_body_bytes` bounds one frame: a whole small message, or one chunk of
    a streamed one. `max_stream_bytes` bounds a streamed message's total: by
    default none, a receiver that cannot hold what the head announces refuses
    it in its allocator (the coordinator checks a reply's layout against the
    model first).
    """

    max_header_bytes: int = 1 << 20
    max_body_bytes: int = 4 << 30
    max_stream_bytes: int | None = None
    max_arrays: int = 4096
    max_ndim: int = 8
    # Once buffers are allocated for a body, it must arrive within
    # body_grace_s + bytes / min_body_rate (0: no floor), so a peer that
    # trickles bytes cannot keep a receiver's memory reserved.
    min_body_rate: float = 0.0
    body_grace_s: float = 10.0


DEFAULT_LIMITS = Limits()

# A data set larger than this is a claim, not a data set.
MAX_EXAMPLES = 2**40
# An agent's `info` answer, as far as anyone reads it (status, discovery).
INFO_SPEC = {
    "name": str,
    "task": Maybe(str),
    "version": Maybe(str),
    "state": Maybe(str),
    # n_features and n_classes: the built-in data's shape; null for a task's own data
    "data": Maybe({"n_train": count(MAX_EXAMPLES), "n_test": count(MAX_EXAMPLES),
                   "n_features": Maybe(count(MAX_EXAMPLES)),
                   "n_classes": Maybe(count(MAX_EXAMPLES))}),
    "data_error": Maybe(str),
    "last_round": Maybe(count()),
    "rounds_served": Maybe(count()),
    # the frozen part this host loads from its disk (flctl.core.frozen)
    "frozen": Maybe({"sha256": str, "bytes": count(), "files": count()}),
    "frozen_error": Maybe(str),
    "memory": Maybe({"available_bytes": Maybe(count())}),
    # why the agent before this one stopped ("out of memory (limit 512 MB)")
    "last_exit": Maybe(str),
}


# (array index, byte offset) in a message's arrays, as a stream goes.
Position = tuple[int, int]


@dataclass
class Message:
    """One request or reply: a kind, JSON metadata and a list of numpy arrays."""

    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)
    # A resumed stream: its bytes start at (array index, byte offset), the
    # receiver holding what came before (see flctl.net.framing).
    resume: Position | None = None

    @property
    def body_bytes(self) -> int:
        return sum(int(np.asarray(a).nbytes) for a in self.arrays)


@dataclass(frozen=True)
class ArraySpec:
    """A validated array descriptor from a header: what the receiver must allocate."""

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class FrameHead:
    """A validated frame header. `stream` is the chunk size when the arrays
    follow as chunk frames (then the frame's own body is empty), else None."""

    kind: str
    meta: dict[str, Any]
    specs: list[ArraySpec]
    stream: int | None = None
    resume: Position | None = None

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)


def chunk_size(limits: Limits) -> int:
    """The chunk a sender streams with: STREAM_CHUNK_BYTES, or less when its
    frame bound is smaller (peers of one project share their limits)."""
    return max(8, min(STREAM_CHUNK_BYTES, limits.max_body_bytes) // 8 * 8)


def chunk_plan(specs: list[ArraySpec], chunk: int,
               start: Position = (0, 0)) -> list[tuple[int, int, int]]:
    """(array index, byte offset, byte count) of every chunk of a stream, in
    order; a resumed stream's plan begins at `start`."""
    first, begin = start
    return [(index, offset, min(chunk, spec.nbytes - offset))
            for index, spec in enumerate(specs) if index >= first
            for offset in range(begin if index == first else 0, spec.nbytes, chunk)]


def check_position(position: Any, specs: list[ArraySpec]) -> Position:
    """A stream position within `specs`: whole elements of an existing array."""
    if (not isinstance(position, (list, tuple)) or len(position) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in position)):
        raise ProtocolError(f"stream position {_shown(position)} is not [array, offset]")
    index, offset = position
    if not 0 <= index < max(1, len(specs)) or (specs and not (
            0 <= offset <= specs[index].nbytes and offset % specs[index].dtype.itemsize == 0)):
        raise ProtocolError(f"stream position {_shown(list(position))} is outside the arrays")
    return int(index), int(offset)


def _wire_dtype(dtype: np.dtype) -> np.dtype:
    """The little-endian dtype an array is sent as, or ProtocolError if not allowed."""
    if is_bfloat16(dtype):
        return dtype          # ml_dtypes' bfloat16: two little-endian bytes, named in the header
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"dtype {dtype!s} is not allowed on the wire")
    little = dtype.newbyteorder("<")
    wire = _WIRE_DTYPES.get(little.str)
    if wire is None:
        raise ProtocolError(f"dtype {dtype!s} is not allowed on the wire")
    return wire


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_CHARS:
        raise ProtocolError(f"message kind must be a non-empty string of <= {MAX_KIND_CHARS} chars")
    return kind


def encode_head(msg: Message, stream: int | None = None,
                resume: Position | None = None) -> bytes:
    """Prelude + header. Array bytes are not included: send body_views(msg) after
    it, or, with `stream` (the chunk size), one chunk frame per chunk_plan entry."""
    _check_kind(msg.kind)
    if not isinstance(msg.meta, dict):
        raise ProtocolError("message meta must be a dict")
    descriptors = []
    body_len = 0
    for arr in msg.arrays:
        arr = np.asarray(arr)
        wire = _wire_dtype(arr.dtype)
        descriptors.append({"dtype": BFLOAT16 if is_bfloat16(wire) else wire.str,
                            "shape": list(arr.shape)})
        body_len += arr.size * wire.itemsize
    fields: dict[str, Any] = {"kind": msg.kind, "meta": msg.meta, "arrays": descriptors}
    if stream is not None:
        if stream < 8 or stream % 8:
            raise ProtocolError(f"stream chunk size {stream} is not a positive multiple of 8")
        fields["stream"] = stream
        body_len = 0
        if resume is not None:
            fields["resume"] = list(resume)
    try:
        header = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message meta is not JSON-serialisable: {exc}") from exc
    if len(header) > 0xFFFFFFFF:
        raise ProtocolError("message header too large")
    return _PRELUDE.pack(MAGIC, PROTOCOL_VERSION, len(header), body_len) + header


def encode_chunk_head(index: int, offset: int, nbytes: int) -> bytes:
    """Prelude + header of one chunk frame; its `nbytes` body bytes follow."""
    header = json.dumps({"kind": CHUNK_KIND, "meta": {"array": index, "offset": offset},
                         "arrays": [{"dtype": "|u1", "shape": [nbytes]}]},
                        separators=(",", ":")).encode("ascii")
    return _PRELUDE.pack(MAGIC, PROTOCOL_VERSION, len(header), nbytes) + header


def check_chunk(head: FrameHead, expected: tuple[int, int, int], position: int,
                count: int) -> None:
    """Refuse a chunk frame that is not exactly the next one the stream's head implies."""
    index, offset, nbytes = expected
    meta = head.meta
    got = (meta.get("array"), meta.get("offset"), head.total_bytes)
    if head.kind != CHUNK_KIND or head.stream is not None or len(head.specs) != 1 \
            or head.specs[0].dtype != np.dtype("u1") \
            or any(isinstance(v, bool) or not isinstance(v, int) for v in got) \
            or got != (index, offset, nbytes):
        shown = (f"{head.kind[:20]!r} frame" if head.kind != CHUNK_KIND else
                 f"array {_shown(meta.get('array'))} offset {_shown(meta.get('offset'))} "
                 f"({head.total_bytes} bytes)")
        raise ProtocolError(f"stream chunk {position + 1} of {count}: expected array {index} "
                            f"offset {offset} ({nbytes} bytes), got {shown}")


def _shown(value: Any) -> str:
    """A peer's value, short and printable, for an error line."""
    return clean_text(repr(value)[:24])


def body_views(msg: Message) -> list[memoryview]:
    """Flat byte views of each array, sharing memory with it whenever it is already
    C-contiguous and little-endian (the normal case), so nothing is copied."""
    views = []
    for arr in msg.arrays:
        arr = np.asarray(arr)
        wire = _wire_dtype(arr.dtype)
        if arr.dtype != wire:
            arr = arr.astype(wire)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        views.append(memoryview(arr.reshape(-1).view(np.uint8)))
    return views


class VersionMismatch(ProtocolError):
    """The peer speaks another version of this protocol (`peer`): one side
    needs upgrading, and the side that sees it can say which."""

    def __init__(self, peer: int) -> None:
        super().__init__(f"protocol version mismatch: peer speaks {peer}, this side speaks "
                         f"{PROTOCOL_VERSION}")
        self.peer = peer


def parse_prelude(data: bytes, limits: Limits) -> tuple[int, int]:
    """(header_len, body_len) after checking magic, version and bounds."""
    if len(data) != PRELUDE_SIZE:
        raise ProtocolError(f"prelude must be {PRELUDE_SIZE} bytes, got {len(data)}")
    magic, version, header_len, body_len = _PRELUDE.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (not an flctl peer?)")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    if header_len == 0:
        raise ProtocolError("empty header")
    if header_len > limits.max_header_bytes:
        raise ProtocolError(f"header of {header_len} bytes exceeds limit {limits.max_header_bytes}")
    if body_len > limits.max_body_bytes:
        raise ProtocolError(f"body of {body_len} bytes exceeds limit {limits.max_body_bytes}")
    return header_len, body_len


def _parse_array_spec(item: Any, limits: Limits) -> ArraySpec:
    if not isinstance(item, dict):
        raise ProtocolError("array descriptor must be an object")
    dtype_str = item.get("dtype")
    dtype = _WIRE_DTYPES.get(dtype_str) if isinstance(dtype_str, str) else None
    if dtype_str == BFLOAT16:
        try:
            dtype = bfloat16()
        except FlctlError as exc:
            raise ProtocolError(f"a peer sent bfloat16 arrays: {exc.message}") from None
    if dtype is None:
        raise ProtocolError(f"dtype {str(dtype_str)[:32]!r} is not allowed")
    shape = item.get("shape")
    if not isinstance(shape, list):
        raise ProtocolError("array shape must be a list")
    if len(shape) > limits.max_ndim:
        raise ProtocolError(f"array has {len(shape)} dims, limit {limits.max_ndim}")
    count = 1
    for dim in shape:
        # bool is an int subclass in Python; true/false is not a dimension.
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise ProtocolError("array dims must be non-negative integers")
        count *= dim  # Python ints: no overflow, checked against body_len by the caller
    return ArraySpec(dtype=dtype, shape=tuple(shape), nbytes=count * dtype.itemsize)


def parse_header(data: bytes, body_len: int, limits: Limits) -> FrameHead:
    """Validate a header completely, so the receiver can allocate exactly what is declared."""
    try:
        header = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    kind = _check_kind(header.get("kind"))
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise ProtocolError("header meta must be an object")
    items = header.get("arrays", [])
    if not isinstance(items, list):
        raise ProtocolError("header arrays must be a list")
    if len(items) > limits.max_arrays:
        raise ProtocolError(f"{len(items)} arrays exceed limit {limits.max_arrays}")
    stream = header.get("stream")
    if stream is not None:
        if isinstance(stream, bool) or not isinstance(stream, int) or stream < 8 \
                or stream % 8 or stream > limits.max_body_bytes:
            raise ProtocolError(f"stream chunk size {_shown(stream)} is not a multiple of 8 "
                                f"within the frame limit {limits.max_body_bytes}")
        if body_len:
            raise ProtocolError("a stream's head frame must have an empty body")
    bound = body_len if stream is None else limits.max_stream_bytes
    specs = []
    total = 0
    for item in items:
        spec = _parse_array_spec(item, limits)
        total += spec.nbytes
        if bound is not None and total > bound:
            raise ProtocolError(f"arrays need more than the declared body of {body_len} bytes"
                                if stream is None else
                                f"streamed arrays exceed the limit of {bound} bytes")
        specs.append(spec)
    if stream is None and total != body_len:
        raise ProtocolError(f"arrays need {total} bytes but body is {body_len}")
    resume = header.get("resume")
    if resume is not None:
        if stream is None:
            raise ProtocolError("only a stream can be resumed")
        resume = check_position(resume, specs)
    return FrameHead(kind, meta, specs, stream, resume)
