"""Exact sums through the uint32 ring: hand-computed limbs, random sums against
numpy's float64 sums, signs, zeros, and values or host counts that would wrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flctl.core.secagg import FixedPointError
from flctl.core.secagg.exactsum import (
    COUNTS,
    MAX_HOSTS,
    REALS,
    ExactFormat,
    decode,
    encode,
    word_sum,
)

SMALL = ExactFormat(frac_bits=16, limbs=3)   # 48 bits: values below 2^15


def test_limbs_by_hand() -> None:
    # 1.5 * 2^16 = 0x18000 -> digits 0x8000, 0x0001, 0x0000
    assert encode(np.array([1.5]), SMALL).tolist() == [0x8000, 0x0001, 0x0000]
    # -1.5 -> 2^48 - 0x18000 = 0xFFFF_FFFE_8000
    assert encode(np.array([-1.5]), SMALL).tolist() == [0x8000, 0xFFFE, 0xFFFF]
    # their word sums: 0x10000, 0xFFFF, 0xFFFF carry to 2^48, which is 0
    both = word_sum([encode(np.array([1.5]), SMALL), encode(np.array([-1.5]), SMALL)])
    assert both.tolist() == [0x10000, 0xFFFF, 0xFFFF]
    assert decode(both, SMALL, 2).tolist() == [0.0]
    # 3 + (-1.25) + 0.25 = 2.0 exactly
    parts = [encode(np.array([v]), SMALL) for v in (3.0, -1.25, 0.25)]
    assert decode(word_sum(parts), SMALL, 3).tolist() == [2.0]
    assert SMALL.max_bits == 48 - 16 - 1 - 16 and SMALL.size(5) == 15


def test_random_sums_match_numpy_to_float64_precision() -> None:
    rng = np.random.default_rng(0)
    hosts = [rng.normal(0, 1, 500) * 10.0 ** rng.integers(-6, 12, 500) for _ in range(8)]
    hosts[3][:50] = 0.0
    hosts[5][50:100] = -np.abs(hosts[5][50:100])
    total = decode(word_sum([encode(h, REALS) for h in hosts]), REALS, len(hosts))
    exact = [math.fsum(column) for column in zip(*hosts)]
    assert np.allclose(total, exact, rtol=1e-12, atol=0)
    # the error is the rounding of each value to 2^-80, not float64 addition order
    assert np.all(np.abs(total - exact) <= np.maximum(np.abs(exact) * 4e-16, 8 * 2.0 ** -81))


def test_sums_of_squares_of_small_and_large_features_keep_their_digits() -> None:
    rng = np.random.default_rng(1)
    for scale in (1e-6, 1.0, 1e9):
        hosts = [rng.uniform(0, scale, 300) for _ in range(4)]
        squares = [np.array([np.dot(h, h)]) for h in hosts]
        total = decode(word_sum([encode(s, REALS) for s in squares]), REALS, 4)[0]
        assert abs(total - math.fsum(float(s[0]) for s in squares)) <= 1e-13 * total


def test_counts_are_exact_integers() -> None:
    counts = [np.array([0, 1, 65535, 65536, 2 ** 40 + 3]) for _ in range(7)]
    total = decode(word_sum([encode(c, COUNTS) for c in counts]), COUNTS, 7)
    assert total.tolist() == [0, 7, 7 * 65535, 7 * 65536, 7 * (2 ** 40 + 3)]


def test_negative_totals_and_negative_zero() -> None:
    parts = [np.array([-2.5, -0.0, 1e-30, 4.0]), np.array([1.0, 0.0, -1e-30, -9.0])]
    total = decode(word_sum([encode(p, REALS) for p in parts]), REALS, 2)
    assert total.tolist() == [-1.5, 0.0, 0.0, -5.0]


def test_too_big_values_and_too_many_hosts_are_refused() -> None:
    assert REALS.max_bits == 95
    encode(np.array([2.0 ** 94]), REALS)
    with pytest.raises(FixedPointError, match=r"magnitude 3.96e\+28 \(about 2\^95\)"):
        encode(np.array([1.0, -(2.0 ** 95)]), REALS)
    with pytest.raises(FixedPointError, match="NaN or infinite"):
        encode(np.array([np.nan]), REALS)
    with pytest.raises(FixedPointError, match="could wrap"):
        decode(np.zeros(12, np.uint32), REALS, MAX_HOSTS + 1)
    with pytest.raises(FixedPointError, match="groups of 12"):
        decode(np.zeros(13, np.uint32), REALS, 2)
    with pytest.raises(FixedPointError, match="cannot hold"):
        ExactFormat(frac_bits=40, limbs=3)


def test_the_most_hosts_at_the_largest_value_do_not_wrap() -> None:
    # MAX_HOSTS copies of the largest value: the worst case the capacity promises
    largest = np.array([2.0 ** SMALL.max_bits - 2.0 ** -SMALL.frac_bits,
                        -(2.0 ** SMALL.max_bits - 2.0 ** -SMALL.frac_bits)])
    one = encode(largest, SMALL).astype(np.uint64)
    total = (one * MAX_HOSTS).astype(np.uint32)
    assert np.all(one * MAX_HOSTS < 2 ** 32)
    assert decode(total, SMALL, MAX_HOSTS).tolist() == (largest * MAX_HOSTS).tolist()
