"""Top-k sparsification with error feedback: send only the largest entries of each array.

Per weight array, the k = ceil(fraction * size) entries of largest
magnitude go on the wire as uint32 flat (row-major) indices in increasing
order plus their values (float32, or float16 to halve them again), 8 (or 6)
bytes per entry: fraction 0.05 costs 0.1 of float32. Per array, not over
the whole model, so a small layer (a bias) is never starved by a large one.

Without memory top-k would drop the other entries for good; with
`error_feedback` (the default) each host keeps what it did not send and adds
it to its next delta before selecting (see feedback.py), the scheme of Stich
et al. 2018 and Lin et al., "Deep Gradient Compression", ICLR 2018. With
float16 values the rounding error goes into the residual as well.

The decoder requires exactly k strictly increasing indices below the array
size: a peer cannot send more than the run's budget, collide two values on
one coordinate, or write out of bounds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flctl.core.compression.base import (
    Codec,
    CompressionError,
    Shape,
    array_size,
    check_real,
    expect_array,
    expect_encodable,
    expect_finite,
)

VALUE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


def top_k_count(fraction: float, size: int) -> int:
    """ceil(fraction * size), at least 1 for a non-empty array.

    Rounded to 9 decimals before the ceiling so that float noise (0.07 * 100 =
    7.000000000000001) does not add an entry.
    """
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(round(fraction * size, 9))))


class TopKCodec(Codec):
    name = "topk"
    arrays_per_delta = 2  # uint32 indices, values (both 1-D, length k)

    def __init__(self, fraction: float = 0.05, values: str = "float32",
                 error_feedback: bool = True) -> None:
        self.fraction = check_real("fraction", fraction, 0.0, 1.0, low_open=True)
        if values not in VALUE_DTYPES:
            raise ValueError(f"values must be one of {', '.join(VALUE_DTYPES)}, got {values!r}")
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be true or false, got {error_feedback!r}")
        self.values = values
        self.error_feedback = error_feedback

    @property
    def needs_state(self) -> bool:
        return self.error_feedback

    def wire_params(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "values": self.values}

    def _encode_array(self, index: int, array: np.ndarray, rng: np.random.Generator,
                      want_residual: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
        flat = array.reshape(-1)
        k = top_k_count(self.fraction, flat.size)
        if k == flat.size:
            chosen = np.arange(flat.size, dtype=np.uint32)
        else:
            # Any k of the largest; ties at the threshold are broken arbitrarily.
            chosen = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
            chosen = np.sort(chosen).astype(np.uint32)
        with np.errstate(over="ignore"):
            values = flat[chosen].astype(VALUE_DTYPES[self.values])
        expect_encodable(index, values, "use topk values: float32")
        residual = None
        if want_residual:
            flat[chosen] -= values.astype(np.float32)  # 0 for float32, the rounding for float16
            residual = array
        return [chosen, values], residual

    def _decode_array(self, index: int, shape: Shape, parts: list[np.ndarray]) -> np.ndarray:
        indices, values = parts
        size = array_size(shape)
        k = top_k_count(self.fraction, size)
        if indices.ndim != 1 or values.ndim != 1 or indices.size != values.size:
            raise CompressionError(f"compressed update: array {index}: indices {indices.shape} "
                                   f"and values {values.shape} must be 1-D of equal length")
        if indices.size != k:
            raise CompressionError(f"compressed update: array {index}: expected {k} entries "
                                   f"(fraction {self.fraction:g} of {size}), got {indices.size}")
        expect_array(index, "indices", indices, np.uint32, (k,))
        expect_array(index, "values", values, VALUE_DTYPES[self.values], (k,))
        if k:
            top = int(indices.max())
            if top >= size:
                raise CompressionError(f"compressed update: array {index}: index {top} out of "
                                       f"range for {size} entries")
            steps = np.diff(indices.astype(np.int64))
            if steps.size and steps.min() <= 0:
                if np.any(steps == 0):
                    raise CompressionError(f"compressed update: array {index}: duplicate "
                                           f"index {int(indices[1:][steps == 0][0])}")
                raise CompressionError(f"compressed update: array {index}: indices are not "
                                       f"in increasing order")
        expect_finite(index, "values", values)
        out = np.zeros(size, dtype=np.float32)
        out[indices] = values
        return out.reshape(shape)
