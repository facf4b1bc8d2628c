"""Frame format: roundtrips, zero-copy views, and every header validation rule."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from flctl.core.messages import (
    MAGIC,
    PRELUDE_SIZE,
    PROTOCOL_VERSION,
    Limits,
    Message,
    body_views,
    encode_head,
    parse_header,
    parse_prelude,
)
from flctl.errors import ProtocolError

LIMITS = Limits()
PRELUDE = struct.Struct("!4sB3xIQ")


def decode(frame: bytes, limits: Limits = LIMITS) -> Message:
    """Reference decoder over a byte string, using only the public parse functions."""
    header_len, body_len = parse_prelude(frame[:PRELUDE_SIZE], limits)
    header = frame[PRELUDE_SIZE:PRELUDE_SIZE + header_len]
    head = parse_header(header, body_len, limits)
    kind, meta, specs = head.kind, head.meta, head.specs
    body = frame[PRELUDE_SIZE + header_len:]
    assert len(body) == body_len
    arrays, offset = [], 0
    for spec in specs:
        arrays.append(np.frombuffer(body, spec.dtype, count=spec.nbytes // spec.dtype.itemsize,
                                    offset=offset).reshape(spec.shape))
        offset += spec.nbytes
    return Message(kind, meta, arrays)


def encode(msg: Message) -> bytes:
    return encode_head(msg) + b"".join(bytes(v) for v in body_views(msg))


def frame(header: object, body: bytes = b"", *, version: int = PROTOCOL_VERSION,
          magic: bytes = MAGIC, body_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    declared = len(body) if body_len is None else body_len
    return PRELUDE.pack(magic, version, len(raw), declared) + raw + body


def test_prelude_size_and_layout() -> None:
    head = encode_head(Message("ping"))
    assert PRELUDE_SIZE == 20
    magic, version, header_len, body_len = PRELUDE.unpack(head[:PRELUDE_SIZE])
    assert (magic, version, body_len) == (MAGIC, PROTOCOL_VERSION, 0)
    assert header_len == len(head) - PRELUDE_SIZE


ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(3.5, dtype=np.float64),  # 0-d
    np.zeros((0, 5), dtype=np.int64),  # empty
    np.array([True, False, True]),
    np.arange(-4, 4, dtype=np.int8),
    np.arange(6, dtype=np.uint16).reshape(1, 2, 3),
    np.array([1, 2**63 + 5], dtype=np.uint64),
    np.linspace(-1, 1, 7).astype(np.float16),
    np.array([-(2**31)], dtype=np.int32),
]


def test_roundtrip_dtypes_shapes_and_unicode_meta() -> None:
    meta = {"round": 3, "note": "grüße – 模型 ✓", "loss": 0.25, "ids": [1, 2], "nested": {"a": None}}
    out = decode(encode(Message("update", meta, ARRAYS)))
    assert out.kind == "update"
    assert out.meta == meta
    assert len(out.arrays) == len(ARRAYS)
    for got, want in zip(out.arrays, ARRAYS):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_header_only_message() -> None:
    data = encode(Message("health"))
    assert len(data) == len(encode_head(Message("health")))
    out = decode(data)
    assert (out.kind, out.meta, out.arrays) == ("health", {}, [])


def test_body_views_share_memory_with_arrays() -> None:
    arrays = [np.random.default_rng(0).random((64, 32), dtype=np.float32), np.arange(10)]
    views = body_views(Message("m", {}, arrays))
    for view, arr in zip(views, arrays):
        assert view.nbytes == arr.nbytes
        assert np.shares_memory(np.frombuffer(view, np.uint8), arr)


def test_non_contiguous_and_big_endian_are_converted() -> None:
    base = np.arange(20, dtype=np.float32).reshape(4, 5)
    strided = base[:, ::2]
    big = np.arange(5, dtype=">i4")
    msg = Message("m", {}, [strided, big])
    views = body_views(msg)
    assert not np.shares_memory(np.frombuffer(views[0], np.uint8), base)
    out = decode(encode(msg))
    np.testing.assert_array_equal(out.arrays[0], strided)
    assert out.arrays[1].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out.arrays[1], big)


@pytest.mark.parametrize("bad", [
    np.array(["a", "b"]), np.array([object()], dtype=object),
    np.zeros(2, dtype=np.complex64), np.zeros(2, dtype="datetime64[s]"),
    np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
])
def test_encode_refuses_non_whitelisted_dtypes(bad: np.ndarray) -> None:
    with pytest.raises(ProtocolError, match="not allowed"):
        encode_head(Message("m", {}, [bad]))


def test_encode_refuses_bad_kind_and_meta() -> None:
    for kind in ("", "k" * 65, 5):
        with pytest.raises(ProtocolError):
            encode_head(Message(kind))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="JSON"):
        encode_head(Message("m", {"x": object()}))
    encode_head(Message("k" * 64))


def test_prelude_checks() -> None:
    ok = frame({"kind": "x"})
    assert parse_prelude(ok[:PRELUDE_SIZE], LIMITS)[1] == 0
    with pytest.raises(ProtocolError, match="magic"):
        parse_prelude(frame({"kind": "x"}, magic=b"HTTP")[:PRELUDE_SIZE], LIMITS)
    with pytest.raises(ProtocolError) as info:
        parse_prelude(frame({"kind": "x"}, version=7)[:PRELUDE_SIZE], LIMITS)
    assert "7" in str(info.value) and str(PROTOCOL_VERSION) in str(info.value)
    small = Limits(max_header_bytes=100, max_body_bytes=1000)
    with pytest.raises(ProtocolError, match="header"):
        parse_prelude(PRELUDE.pack(MAGIC, PROTOCOL_VERSION, 101, 0), small)
    with pytest.raises(ProtocolError, match="body"):
        parse_prelude(PRELUDE.pack(MAGIC, PROTOCOL_VERSION, 10, 1001), small)
    with pytest.raises(ProtocolError, match="body"):
        parse_prelude(PRELUDE.pack(MAGIC, PROTOCOL_VERSION, 10, 2**64 - 1), LIMITS)
    with pytest.raises(ProtocolError, match="empty"):
        parse_prelude(PRELUDE.pack(MAGIC, PROTOCOL_VERSION, 0, 0), LIMITS)
    with pytest.raises(ProtocolError):
        parse_prelude(b"FLCT", LIMITS)
    assert parse_prelude(PRELUDE.pack(MAGIC, PROTOCOL_VERSION, 100, 1000), small) == (100, 1000)


def arr(dtype: object, shape: object) -> dict:
    return {"kind": "x", "meta": {}, "arrays": [{"dtype": dtype, "shape": shape}]}


@pytest.mark.parametrize("header, body_len, reason", [
    (b"\xff\xfe", 0, "JSON"),
    (b"{not json", 0, "JSON"),
    (b"[" * 100_000, 0, "JSON"),
    (b"[1, 2]", 0, "object"),
    (b'"kind"', 0, "object"),
    ({"meta": {}}, 0, "kind"),
    ({"kind": ""}, 0, "kind"),
    ({"kind": "k" * 65}, 0, "kind"),
    ({"kind": 3}, 0, "kind"),
    ({"kind": "x", "meta": [1]}, 0, "meta"),
    ({"kind": "x", "arrays": {}}, 0, "list"),
    ({"kind": "x", "arrays": [5]}, 0, "object"),
    (arr("|O", [1]), 8, "dtype"),
    (arr(">f4", [1]), 4, "dtype"),
    (arr("<U4", [1]), 16, "dtype"),
    (arr("|V8", [1]), 8, "dtype"),
    (arr("<c8", [1]), 8, "dtype"),
    (arr("<f16", [1]), 16, "dtype"),
    (arr(None, [1]), 4, "dtype"),
    (arr("<f4", [-1]), 0, "non-negative"),
    (arr("<f4", [1.5]), 6, "non-negative"),
    (arr("<f4", [True]), 4, "non-negative"),
    (arr("<f4", "3"), 12, "shape"),
    (arr("<f4", [1] * 9), 4, "dims"),
    (arr("<f4", [3]), 11, "bytes"),
    (arr("<f4", [3]), 13, "body"),
    (arr("<f4", [2**40, 2**40, 2**40]), 4096, "body"),
    (arr("<f4", [10**30] * 8), 4, "body"),
])
def test_header_violations(header: object, body_len: int, reason: str) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with pytest.raises(ProtocolError, match=reason):
        parse_header(raw, body_len, LIMITS)


def test_max_arrays_limit() -> None:
    header = {"kind": "x", "arrays": [{"dtype": "|u1", "shape": [1]}] * 5}
    raw = json.dumps(header).encode()
    assert len(parse_header(raw, 5, Limits(max_arrays=5)).specs) == 5
    with pytest.raises(ProtocolError, match="arrays"):
        parse_header(raw, 5, Limits(max_arrays=4))


def test_valid_header_specs() -> None:
    header = {"kind": "x", "meta": {"a": 1}, "arrays": [
        {"dtype": "<f4", "shape": [2, 3]}, {"dtype": "|b1", "shape": []},
        {"dtype": "<i8", "shape": [0]},
    ]}
    head = parse_header(json.dumps(header).encode(), 25, LIMITS)
    kind, meta, specs = head.kind, head.meta, head.specs
    assert (kind, meta) == ("x", {"a": 1}) and head.stream is None
    assert [(s.dtype, s.shape, s.nbytes) for s in specs] == [
        (np.dtype("<f4"), (2, 3), 24), (np.dtype("?"), (), 1), (np.dtype("<i8"), (0,), 0)]
