"""int8 with stochastic rounding: a quarter of the bytes, unbiased.

Each array is cut into chunks of `chunk` consecutive elements (row-major;
the last may be shorter) and each chunk gets its own float32 scale
max|x| / 127, so one large entry only coarsens its own chunk. The default
1024 costs 4 bytes per 1024 entries (+0.4% over a quarter of float32) and
keeps the rounding noise close to per-entry precision on layers whose
entries differ in size; chunk >= the array size gives one scale per array.

Rounding is stochastic: x / scale = l + f with l = floor, f in [0, 1) is
sent as l + 1 with probability f, else l, so E[decode(encode(x))] = x and
the averaging on the coordinator cancels the noise instead of accumulating
a bias (round-to-nearest would push every entry the same way each round).
The error of one entry is below one scale step. This is the stochastic
quantisation of QSGD (Alistarh et al., NeurIPS 2017) with 255 levels and
max-norm scaling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flctl.core.compression.base import (
    Codec,
    CompressionError,
    Shape,
    array_size,
    check_int,
    expect_array,
    expect_finite,
)

LEVELS = 127
DEFAULT_CHUNK = 1024
MAX_CHUNK = 2**31
# Scales above this could overflow float32 when multiplied by -128 (the one
# int8 value the encoder never uses, but a peer may send).
MAX_SCALE = float(np.finfo(np.float32).max) / 128


def stochastic_round(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """floor(y) + 1 with probability y - floor(y), else floor(y) (float32, in place of y)."""
    low = np.floor(y)
    y -= low
    up = rng.random(y.shape, dtype=np.float32) < y
    low += up
    return low


class Int8Codec(Codec):
    name = "int8"
    arrays_per_delta = 2  # int8 payload (the array's shape), float32 scales (1-D)

    def __init__(self, chunk: int = DEFAULT_CHUNK) -> None:
        self.chunk = check_int("chunk", chunk, 1, MAX_CHUNK)

    def wire_params(self) -> dict[str, Any]:
        return {"chunk": self.chunk}

    def _encode_array(self, index: int, array: np.ndarray, rng: np.random.Generator,
                      want_residual: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
        flat = array.reshape(-1)
        full = flat.size // self.chunk
        blocks = [flat[:full * self.chunk].reshape(full, self.chunk)]
        if full * self.chunk < flat.size:
            blocks.append(flat[full * self.chunk:].reshape(1, -1))
        coded = [_quantise(block, rng) for block in blocks]
        codes = np.concatenate([c.reshape(-1) for c, _ in coded]).reshape(array.shape)
        scales = np.concatenate([s for _, s in coded])
        return [codes, scales], None

    def _decode_array(self, index: int, shape: Shape, parts: list[np.ndarray]) -> np.ndarray:
        codes, scales = parts
        size = array_size(shape)
        expect_array(index, "int8 codes", codes, np.int8, shape)
        expect_array(index, "scales", scales, np.float32, (_n_chunks(size, self.chunk),))
        expect_finite(index, "scales", scales)
        if scales.size and not (scales.min() >= 0 and scales.max() <= MAX_SCALE):
            raise CompressionError(f"compressed update: array {index}: scales must be in "
                                   f"[0, {MAX_SCALE:.3g}]")
        out = codes.astype(np.float32).reshape(-1)
        full = size // self.chunk
        body = out[:full * self.chunk].reshape(full, self.chunk)
        body *= scales[:full, None]
        if full < scales.size:
            out[full * self.chunk:] *= scales[full]
        return out.reshape(shape)


def _quantise(block: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and float32 scales for a (chunks, chunk) block, one scale per row."""
    scales = np.abs(block).max(axis=1) / np.float32(LEVELS)
    y = np.zeros_like(block)
    # A zero scale (an all-zero chunk, or one so small the scale underflows) codes as 0.
    np.divide(block, scales[:, None], out=y, where=scales[:, None] > 0)
    np.clip(y, -LEVELS, LEVELS, out=y)  # x / (peak / 127) may round a hair past 127
    return stochastic_round(y, rng).astype(np.int8), scales


def _n_chunks(size: int, chunk: int) -> int:
    return -(-size // chunk)
