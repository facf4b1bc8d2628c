"""core.dtypes: which arrays are numbers, how aggregates are cast back, and
bfloat16 (numpy has none; ml_dtypes supplies it, imported only when used)."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

from flctl.core import dtypes
from flctl.core.messages import DEFAULT_LIMITS, Message, encode_head, parse_header, parse_prelude
from flctl.errors import FlctlError, ProtocolError

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_kinds() -> None:
    assert dtypes.is_float(BF16) and dtypes.is_bfloat16(BF16) and dtypes.is_float(np.float16)
    assert dtypes.is_number(np.int64) and dtypes.is_number(np.bool_)
    assert not dtypes.is_float(np.int32) and not dtypes.is_number(np.dtype("U3"))
    assert dtypes.float_max(BF16) == float(ml_dtypes.finfo(BF16).max)


def test_cast_back_rounds_integers_and_votes_booleans() -> None:
    assert dtypes.cast_back(np.array([10.4, 10.6, -2.5]), np.int64).tolist() == [10, 11, -2]
    assert dtypes.cast_back(np.array([300.0, -5.0]), np.uint8).tolist() == [255, 0]
    assert dtypes.cast_back(np.array([0.49, 0.5, 1.0]), np.bool_).tolist() == [False, True, True]
    back = dtypes.cast_back(np.array([1.0, 2.5]), BF16)
    assert back.dtype == BF16 and back.astype(np.float32).tolist() == [1.0, 2.5]


def test_bfloat16_storage_keys_round_trip() -> None:
    array = np.array([1.5, -3.0], dtype=BF16)
    key = dtypes.storage_key("w0001", array.dtype)
    assert key == "w0001__bfloat16"
    name, back = dtypes.from_storage(key, dtypes.storage_array(array))
    assert name == "w0001" and back.dtype == BF16 and back.tolist() == array.tolist()
    assert dtypes.from_storage("w0002", np.zeros(2))[0] == "w0002"


def test_without_ml_dtypes_bfloat16_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    head = encode_head(Message("m", {}, [np.zeros(3, BF16)]))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)   # as if not installed
    with pytest.raises(FlctlError, match="pip install 'flctl\\[torch\\]'"):
        dtypes.bfloat16()
    header_len, body_len = parse_prelude(head[:20], DEFAULT_LIMITS)
    with pytest.raises(ProtocolError, match="a peer sent bfloat16 arrays: .*ml_dtypes"):
        parse_header(head[20:20 + header_len], body_len, DEFAULT_LIMITS)
