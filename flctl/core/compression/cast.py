"""The dense codecs: float32 (the reference, identity) and float16 (a cast, half the bytes).

float16 keeps 11 significant bits, so each decoded entry is within a
relative 2**-11 of the delta (absolute 2**-25 below float16's normal range,
~6e-5). Deltas, unlike weights, are small, so that range is rarely an issue;
entries past float16's largest value (65504) cannot be sent and are refused
rather than silently turned into infinity.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from flctl.core.compression.base import (
    Codec,
    Shape,
    expect_array,
    expect_encodable,
    expect_finite,
)


class _CastCodec(Codec):
    """Sends each delta array whole, in `dtype`, with the array's own shape."""

    dtype: ClassVar[np.dtype]

    def _encode_array(self, index: int, array: np.ndarray, rng: np.random.Generator,
                      want_residual: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
        with np.errstate(over="ignore"):
            sent = array.astype(self.dtype, copy=False)
        expect_encodable(index, sent, "use compression float32 or int8")
        return [sent], None

    def _decode_array(self, index: int, shape: Shape, parts: list[np.ndarray]) -> np.ndarray:
        (values,) = parts
        expect_array(index, "values", values, self.dtype, shape)
        expect_finite(index, "values", values)
        return values.astype(np.float32)


class Float32Codec(_CastCodec):
    name = "float32"
    dtype = np.dtype(np.float32)


class Float16Codec(_CastCodec):
    name = "float16"
    dtype = np.dtype(np.float16)
