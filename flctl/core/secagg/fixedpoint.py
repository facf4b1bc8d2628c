"""Float updates as integers modulo 2^32, so masks can cancel exactly.

Pairwise masks only cancel in a group where addition wraps, so every
coordinate travels as a two's-complement fixed-point number in uint32:
`round(x * 2^frac_bits)`, clipped to +-clip. The modular sum of N such
vectors is the true integer sum as long as it cannot leave the int32 range,
i.e. N * clip * 2^frac_bits < 2^31 (`FixedPointParams.max_hosts`); each
encoded coordinate is off by at most 2^-(frac_bits+1), so a decoded sum of N
vectors is within N * 2^-(frac_bits+1) of the float sum (`sum_error_bound`).

Weighted FedAvg through one secure sum. The server may only ever see sums, so
the weights travel inside the masked vector too. A host with `n_k` examples
quantises its weight to q_k = k_k / 2^frac_bits with
k_k = round(2^frac_bits * n_k / weight_bound) (so 0 < q_k <= 1), sends
encode(q_k * delta_k) followed by one extra element k_k, and the unmasked sum
yields S = sum q_k delta_k and W = sum q_k: S / W is the FedAvg mean with
weights q_k. When weight_bound is a power of two no larger than 2^frac_bits,
q_k is exactly n_k / weight_bound for integer n_k, so S / W is exactly the
example-weighted mean up to the rounding bound above divided by W. Pick
weight_bound as a tight upper bound on the hosts' example counts: the
absolute error of S is fixed, so small weights lose relative precision. The
clip applies to q_k * delta_k, the value actually encoded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flctl.errors import FlctlError

# Elements converted per step: the float64 scratch stays in L2 cache.
_CHUNK = 65536
_INT32_LIMIT = 2 ** 31


class FixedPointError(FlctlError):
    """Parameters that could overflow, a non-finite update, or an out-of-range weight."""


@dataclass(frozen=True)
class FixedPointParams:
    """What every host of a round must agree on (the roster carries it)."""

    frac_bits: int = 20
    clip: float = 8.0
    weight_bound: float = 65536.0

    def __post_init__(self) -> None:
        if not 1 <= self.frac_bits <= 30:
            raise FixedPointError(f"frac_bits must be 1..30, got {self.frac_bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise FixedPointError(f"clip must be a positive number, got {self.clip}")
        if not (math.isfinite(self.weight_bound) and self.weight_bound > 0):
            raise FixedPointError(f"weight_bound must be positive, got {self.weight_bound}")
        if self.max_hosts < 1:
            raise FixedPointError(
                f"clip {self.clip} with {self.frac_bits} fractional bits overflows int32")

    @property
    def scale(self) -> float:
        return float(2 ** self.frac_bits)

    @property
    def limit(self) -> int:
        """Largest encoded magnitude of one coordinate."""
        return math.floor(self.clip * self.scale)

    @property
    def max_hosts(self) -> int:
        """Most vectors whose sum is guaranteed not to wrap. The weight element
        (at most 2^frac_bits per host) counts too, hence the max with 1."""
        per_host = max(self.limit, 2 ** self.frac_bits)
        return (_INT32_LIMIT - 1) // per_host

    def check_capacity(self, n_hosts: int) -> None:
        if n_hosts > self.max_hosts:
            raise FixedPointError(
                f"{n_hosts} hosts could overflow the fixed-point sum (at most {self.max_hosts}"
                f" with clip {self.clip} and {self.frac_bits} fractional bits)")

    def sum_error_bound(self, n_hosts: int) -> float:
        """Worst-case |decoded sum - float sum| per coordinate, without clipping."""
        return n_hosts * 2.0 ** -(self.frac_bits + 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FixedPointParams:
        try:
            return cls(frac_bits=int(data["frac_bits"]), clip=float(data["clip"]),
                       weight_bound=float(data["weight_bound"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FixedPointError(f"bad fixed-point parameters: {data!r}") from exc


def _encode_into(out: np.ndarray, values: np.ndarray, multiplier: float, limit: int) -> int:
    """out = clip(round(values * multiplier)); returns how many were clipped."""
    clipped = 0
    scratch = np.empty(min(_CHUNK, values.size), dtype=np.float64)
    for start in range(0, values.size, _CHUNK):
        stop = min(start + _CHUNK, values.size)
        tmp = scratch[:stop - start]
        np.multiply(values[start:stop], multiplier, out=tmp, dtype=np.float64)
        if not np.isfinite(tmp).all():
            raise FixedPointError("update contains NaN or infinity; refusing to encode it")
        clipped += int(np.count_nonzero(np.abs(tmp) > limit))
        np.clip(tmp, -limit, limit, out=tmp)
        np.rint(tmp, out=tmp)
        out[start:stop] = tmp.astype(np.int32).view(np.uint32)
    return clipped


def _as_flat(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1)


def encode(values: np.ndarray, params: FixedPointParams) -> np.ndarray:
    """Unweighted encoding (one coordinate per value, no weight element)."""
    flat = _as_flat(values)
    out = np.empty(flat.size, dtype=np.uint32)
    _encode_into(out, flat, params.scale, params.limit)
    return out


def decode(encoded: np.ndarray, params: FixedPointParams) -> np.ndarray:
    """Inverse of `encode` (and of a modular sum of encodings that did not wrap)."""
    ints = np.ascontiguousarray(encoded, dtype=np.uint32).view(np.int32)
    return ints.astype(np.float64) / params.scale


def quantise_weight(weight: float, params: FixedPointParams) -> int:
    """k with q = k / 2^frac_bits ~ weight / weight_bound, 1 <= k <= 2^frac_bits."""
    if not (math.isfinite(weight) and 0 < weight <= params.weight_bound):
        raise FixedPointError(
            f"weight {weight} is outside (0, {params.weight_bound}] (the round's weight_bound)")
    k = round(weight / params.weight_bound * params.scale)
    if k < 1:
        raise FixedPointError(
            f"weight {weight} is too small for weight_bound {params.weight_bound}"
            f" at {params.frac_bits} fractional bits")
    return k


def encode_weighted(update: np.ndarray, weight: float,
                    params: FixedPointParams) -> tuple[np.ndarray, int]:
    """[encode(q * update), k] and the number of clipped coordinates (see module doc)."""
    k = quantise_weight(weight, params)
    flat = _as_flat(update)
    out = np.empty(flat.size + 1, dtype=np.uint32)
    # values * k == q * values * 2^frac_bits exactly: k is an integer below 2^31.
    clipped = _encode_into(out[:-1], flat, float(k), params.limit)
    out[-1] = k
    return out, clipped


def decode_weighted(total: np.ndarray, params: FixedPointParams) -> tuple[np.ndarray, float]:
    """(sum of q_k * update_k, sum of q_k) from the unmasked modular sum."""
    decoded = decode(total, params)
    return decoded[:-1], float(decoded[-1])


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A list of model arrays as one float32 vector, in list order."""
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays])


def unflatten(vector: np.ndarray, template: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Split `vector` back into arrays shaped like `template`, in its numpy float
    types (float32 for bfloat16, integer and boolean arrays: these are deltas,
    which the caller adds and casts back)."""
    sizes = [int(np.asarray(t).size) for t in template]
    if vector.size != sum(sizes):
        raise FixedPointError(f"vector has {vector.size} values, the model has {sum(sizes)}")
    out, start = [], 0
    for t, size in zip(template, sizes):
        t = np.asarray(t)
        dtype = t.dtype if np.issubdtype(t.dtype, np.floating) else np.dtype(np.float32)
        out.append(vector[start:start + size].astype(dtype).reshape(t.shape))
        start += size
    return out
