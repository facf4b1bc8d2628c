"""Exact sums of float64 vectors through the uint32 ring of secure aggregation.

The training path (fixedpoint.py) clips to +-8 at 20 fractional bits: fine for
model updates, useless for a column of house prices or its sum of squares.
Statistics need the hosts' sums as exactly as float64 adds them, at any scale.

Each value becomes the integer k = round(v * 2^frac_bits), written in two's
complement modulo 2^(16 * limbs) as `limbs` digits of 16 bits, one digit per
uint32 word. The ring adds word by word; a word holds at most 65535 per host,
so the words of up to MAX_HOSTS = 65536 hosts add up without wrapping, and the
unmasked sum is every digit's exact total. Decoding carries those totals into
base-2^16 digits again, reads the sign from the top bit and converts the
magnitude to float64 once: the federated sum is exact as an integer, and off
from the true sum of the hosts' values only by their rounding to 2^-frac_bits.

Why two's complement and not separate positive and negative parts: the carry
normalisation recovers the signed total exactly, so one set of limbs per
value is enough (half the words), and the sign is read once at the end, with
no cancellation between two rounded floats.

Capacity: a host's value must stay below 2^(16 limbs - frac_bits - 17) in
magnitude (one bit of sign, 16 bits for the sum over MAX_HOSTS hosts); larger
values are refused with their size, never wrapped. Nothing here can tell a
host's honest digits from made-up ones: a host that sends words above 65535
corrupts the sum, which the caller's consistency checks must catch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flctl.core.secagg.fixedpoint import FixedPointError

LIMB_BITS = 16
_BASE = 1 << LIMB_BITS
MAX_HOSTS = 1 << 16   # 65536 * 65535 < 2^32: a word's sum never wraps


@dataclass(frozen=True)
class ExactFormat:
    """How many fractional bits and 16-bit limbs each value gets."""

    frac_bits: int
    limbs: int

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits or not 1 <= self.limbs or self.max_bits < 1:
            raise FixedPointError(f"exact sums: {self.limbs} limbs cannot hold "
                                  f"{self.frac_bits} fractional bits and {MAX_HOSTS} hosts")

    @property
    def max_bits(self) -> int:
        """A host's |value| must be below 2^max_bits (see the module doc)."""
        return LIMB_BITS * self.limbs - self.frac_bits - 1 - 16

    def size(self, values: int) -> int:
        """uint32 words for `values` values."""
        return values * self.limbs


# Sums and sums of squares: 2^-80 resolution (a squared 1e-6 keeps 12 digits)
# and values up to 2^95 (squares of values up to ~2^47).
REALS = ExactFormat(frac_bits=80, limbs=12)
# Row and label counts, histogram bins: integers below 2^47 per host.
COUNTS = ExactFormat(frac_bits=0, limbs=4)


def encode(values: np.ndarray, fmt: ExactFormat) -> np.ndarray:
    """(n * limbs,) uint32: each value's limbs, least significant first."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise FixedPointError("exact sums: a value is NaN or infinite; refusing to encode it")
    magnitude = np.rint(np.ldexp(np.abs(v), fmt.frac_bits))
    limit = np.ldexp(1.0, fmt.max_bits + fmt.frac_bits)
    if v.size and magnitude.max() >= limit:
        biggest = float(np.abs(v).max())
        raise FixedPointError(f"exact sums: a value of magnitude {biggest:.3g} (about 2^"
                              f"{np.log2(biggest):.0f}) is beyond the 2^{fmt.max_bits} a host"
                              f" may send")
    digits = np.empty((v.size, fmt.limbs), dtype=np.int64)
    for i in range(fmt.limbs):
        # floor and fmod of integer-valued floats scaled by powers of two: exact
        digits[:, i] = np.fmod(np.floor(np.ldexp(magnitude, -LIMB_BITS * i)), _BASE)
    negative = v < 0
    if negative.any():
        digits[negative] = _negate(digits[negative])
    return digits.astype(np.uint32).reshape(-1)


def _negate(digits: np.ndarray) -> np.ndarray:
    """Two's complement of (n, limbs) base-2^16 digits: invert, add one, carry."""
    out = (_BASE - 1) - digits
    carry = np.ones(len(out), dtype=np.int64)
    for i in range(out.shape[1]):
        total = out[:, i] + carry
        out[:, i] = total & (_BASE - 1)
        carry = total >> LIMB_BITS
    return out


def decode(total: np.ndarray, fmt: ExactFormat, n_hosts: int) -> np.ndarray:
    """The float64 sums from the word-wise sum of `n_hosts` hosts' encodings."""
    if n_hosts > MAX_HOSTS:
        raise FixedPointError(f"exact sums: {n_hosts} hosts could wrap a limb (at most"
                              f" {MAX_HOSTS})")
    words = np.asarray(total)
    if words.dtype != np.uint32 or words.ndim != 1 or words.size % fmt.limbs:
        raise FixedPointError(f"exact sums: expected uint32 words in groups of {fmt.limbs}")
    sums = words.astype(np.int64).reshape(-1, fmt.limbs)
    digits = np.empty_like(sums)
    carry = np.zeros(len(sums), dtype=np.int64)
    for i in range(fmt.limbs):     # carries above the top limb are the modulus: dropped
        value = sums[:, i] + carry
        digits[:, i] = value & (_BASE - 1)
        carry = value >> LIMB_BITS
    negative = digits[:, -1] >= _BASE // 2
    if negative.any():
        digits[negative] = _negate(digits[negative])
    magnitude = np.zeros(len(digits))
    for i in reversed(range(fmt.limbs)):   # Horner from the top: one rounding at most per step
        magnitude = magnitude * _BASE + digits[:, i]
    return np.where(negative, -1.0, 1.0) * np.ldexp(magnitude, -fmt.frac_bits)


def word_sum(encodings: list[np.ndarray]) -> np.ndarray:
    """What the unmasked secure sum is: the encodings added modulo 2^32."""
    total = np.zeros_like(encodings[0])
    for e in encodings:
        total += e
    return total
