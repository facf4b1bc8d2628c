"""Streaming weighted averaging and the FedAvg strategy."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest

from flctl.core.aggregation import (
    CHUNK,
    WeightedAccumulator,
    accumulation_dtype,
    all_finite,
    weighted_average,
)
from flctl.core.strategies import (
    FedAvg,
    RoundAggregator,
    Strategy,
    StrategyError,
    make_strategy,
)
from flctl.errors import FlctlError


def test_hand_computed_weighted_average():
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    b = [np.array([3.0, 6.0], np.float32), np.array([[4.0]], np.float32)]
    mean = weighted_average([a, b], [1, 3])
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5, (0 + 3*4)/4 = 3
    np.testing.assert_array_equal(mean[0], [2.5, 5.0])
    np.testing.assert_array_equal(mean[1], [[3.0]])
    assert all(m.dtype == np.float32 for m in mean)


def test_accumulator_counts_and_mean_keeps_it_usable():
    acc = WeightedAccumulator([np.zeros(3)])
    acc.add([np.array([2.0, 4.0, 6.0])], 2.0)
    assert (acc.count, acc.total_weight) == (1, 2.0)
    np.testing.assert_array_equal(acc.mean()[0], [2.0, 4.0, 6.0])
    acc.add([np.zeros(3)], 2.0)
    np.testing.assert_array_equal(acc.mean()[0], [1.0, 2.0, 3.0])
    assert (acc.count, acc.total_weight) == (2, 4.0)
    taken = acc.take_mean()
    np.testing.assert_array_equal(taken[0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="consumed"):
        acc.add([np.zeros(3)], 1.0)
    with pytest.raises(ValueError, match="consumed"):
        acc.mean()


def test_streaming_equals_stacked_np_average():
    rng = np.random.default_rng(0)
    shapes = [(17, 5), (5,), (3, 4, 2)]
    updates = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(25)]
    weights = rng.integers(1, 500, size=25).astype(float)
    streamed = weighted_average(updates, weights)
    for i in range(len(shapes)):
        stacked = np.stack([u[i] for u in updates]).astype(np.float64)
        expected = np.average(stacked, axis=0, weights=weights)
        np.testing.assert_allclose(streamed[i], expected, rtol=1e-5, atol=1e-6)


def test_chunk_boundaries_odd_shapes_and_strided_input():
    rng = np.random.default_rng(2)
    shapes = [(2 * CHUNK + 17,), (3, CHUNK // 2 + 1), (), (0, 4)]
    updates = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(3)]
    strided = rng.normal(size=(2, 2 * (2 * CHUNK + 17))).astype(np.float32)[1, ::2]
    assert not strided.flags.c_contiguous
    updates[1][0] = strided
    weights = [1.0, 2.0, 5.0]
    streamed = weighted_average(updates, weights)
    for i, shape in enumerate(shapes):
        assert streamed[i].shape == shape
        expected = sum(w * u[i].astype(np.float64) for w, u in zip(weights, updates)) / 8.0
        np.testing.assert_allclose(streamed[i], expected, rtol=1e-5, atol=1e-6)


def test_all_finite():
    big = np.zeros(3 * CHUNK + 5, np.float32)
    assert all_finite(big)
    for bad in (np.nan, np.inf, -np.inf):
        big[-1] = bad  # in the last, partial chunk
        assert not all_finite(big)
        big[-1] = 0.0
    assert all_finite(np.arange(10)) and all_finite(np.zeros(0))
    assert not all_finite(np.array([[1.0, np.nan]], np.float64))
    assert all_finite(np.array(3.0))
    # float16 values near its maximum are finite even though their sum is not
    assert all_finite(np.full(70_000, 60_000.0, np.float16))
    assert not all_finite(np.array([1.0, np.inf], np.float16))


def test_sums_are_float64_so_arrival_order_does_not_matter():
    for template in ([np.zeros(2, np.float32)], [np.zeros(2, np.float16)], [np.zeros(1)]):
        assert accumulation_dtype(template) == np.float64
    rng = np.random.default_rng(3)
    updates = [[(rng.standard_normal(5000) * 10.0 ** rng.integers(-6, 6)).astype(np.float32)]
               for _ in range(8)]
    counts = [int(n) for n in rng.integers(1, 5000, 8)]
    forward = weighted_average(updates, counts)
    backward = weighted_average(updates[::-1], counts[::-1])
    assert forward[0].dtype == np.float32
    assert np.array_equal(forward[0], backward[0])  # bit for bit
    big = [np.array([1e8 + 1.0])]
    mean = weighted_average([big, big], [1, 1])
    assert mean[0].dtype == np.float64 and mean[0][0] == 1e8 + 1.0


def test_shape_and_count_mismatch_leave_the_sum_untouched():
    acc = WeightedAccumulator([np.zeros((2, 2)), np.zeros(3)])
    acc.add([np.ones((2, 2)), np.ones(3)], 1.0)
    with pytest.raises(ValueError, match=r"array 1: expected shape \(3,\), got \(4,\)"):
        acc.add([np.full((2, 2), 100.0), np.ones(4)], 1.0)
    with pytest.raises(ValueError, match="expected 2 arrays, got 1"):
        acc.add([np.ones((2, 2))], 1.0)
    with pytest.raises(ValueError, match="weight"):
        acc.add([np.ones((2, 2)), np.ones(3)], -1.0)
    with pytest.raises(ValueError, match="weight"):
        acc.add([np.ones((2, 2)), np.ones(3)], float("nan"))
    with pytest.raises(ValueError, match="not a real number type"):
        acc.add([np.ones((2, 2)), np.array(["a", "b", "c"])], 1.0)
    assert acc.count == 1
    np.testing.assert_array_equal(acc.mean()[0], np.ones((2, 2)))


def test_nothing_to_average():
    with pytest.raises(ValueError, match="no updates"):
        WeightedAccumulator([np.zeros(2)]).mean()
    acc = WeightedAccumulator([np.zeros(2)])
    acc.add([np.ones(2)], 0.0)
    with pytest.raises(ValueError, match="total weight is 0"):
        acc.take_mean()
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        weighted_average([[np.ones(2)], [np.ones(2)]], [1.0])


def test_accumulator_keeps_no_reference_to_updates():
    acc = WeightedAccumulator([np.zeros(1000, np.float32)])
    update = np.ones(1000, np.float32)
    alive = weakref.ref(update)
    acc.add([update], 2.0)
    update[:] = 50.0  # mutating after add must not change the sum
    del update
    gc.collect()
    assert alive() is None
    np.testing.assert_array_equal(acc.mean()[0], np.ones(1000, np.float32))


def test_peak_memory_stays_at_the_float64_sum():
    """Twenty updates in: a float64 sum (2x a float32 model), into which the
    float32 result is written, plus chunk buffers, whatever the number of
    updates (budget: 3x)."""
    size = 1_000_000
    model_bytes = size * 4
    rng = np.random.default_rng(1)
    updates = [rng.random(size, dtype=np.float32) for _ in range(20)]
    template = [np.zeros(size, np.float32)]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        round_ = FedAvg().start_round(template, 1)
        for i, update in enumerate(updates):
            round_.add(f"h{i}", [update], 10 + i)
        result = round_.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (peak - base) <= 2 * model_bytes + 3 * CHUNK * 8  # the sum + chunk buffers
    expected = np.average(np.stack(updates), axis=0, weights=np.arange(10, 30))
    np.testing.assert_allclose(result[0], expected, rtol=1e-5)


# --------------------------------------------------------------------------- FedAvg


def test_fedavg_weights_by_num_examples():
    strategy = make_strategy("fedavg")
    assert isinstance(strategy, Strategy) and strategy.name == "fedavg"
    global_weights = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]
    round_ = strategy.start_round(global_weights, 3)
    assert isinstance(round_, RoundAggregator)
    round_.add("alpha", [np.array([1.0, 1.0], np.float32), np.array([[2.0]], np.float32)], 100)
    round_.add("beta", [np.array([5.0, -3.0], np.float32), np.array([[6.0]], np.float32)], 300)
    assert round_.count == 2
    new = round_.result()
    np.testing.assert_allclose(new[0], [4.0, -2.0])
    np.testing.assert_allclose(new[1], [[5.0]])
    assert [w.dtype for w in new] == [np.float32, np.float32]
    assert round_.result() is new  # idempotent
    np.testing.assert_array_equal(global_weights[0], [0.0, 0.0])  # global untouched


def test_fedavg_refuses_bad_updates_without_damage():
    round_ = FedAvg().start_round([np.zeros(3, np.float32)], 7)
    round_.add("a", [np.ones(3, np.float32)], 10)
    cases = [
        ("a", [np.ones(3, np.float32)], 10, "round 7: second update from a"),
        ("b", [np.ones(4, np.float32)], 10, r"round 7: update from b: array 0: expected shape"),
        ("c", [np.ones(3, np.float32)], -5, "num_examples must be a non-negative integer"),
        ("d", [np.ones(3, np.float32)], 2.5, "num_examples must be a non-negative integer"),
        ("e", [np.array([1.0, np.nan, 1.0], np.float32)], 10, "NaN or infinite"),
        ("f", [np.array([1.0, np.inf, 1.0], np.float32)], 10, "NaN or infinite"),
    ]
    for host, weights, n, message in cases:
        with pytest.raises(StrategyError, match=message):
            round_.add(host, weights, n)
    assert round_.count == 1
    round_.add("b", [np.full(3, 4.0, np.float32)], 30)  # b may retry with a good update
    np.testing.assert_allclose(round_.result()[0], [3.25, 3.25, 3.25])
    with pytest.raises(StrategyError, match="after result"):
        round_.add("g", [np.ones(3, np.float32)], 1)


def test_fedavg_reports_overflowing_aggregate():
    # float32 means cannot overflow a float64 sum; float64 models still can
    round_ = FedAvg().start_round([np.zeros(2)], 4)
    round_.add("a", [np.array([1.7e308, 1.0])], 1)
    round_.add("b", [np.array([1.7e308, 1.0])], 1)
    with pytest.raises(StrategyError, match="round 4: the aggregate overflowed"):
        round_.result()


def test_fedavg_finds_nan_deep_in_a_large_update():
    round_ = FedAvg().start_round([np.zeros(4 * CHUNK, np.float32)], 2)
    bad = np.ones(4 * CHUNK, np.float32)
    bad[3 * CHUNK + 7] = np.nan
    with pytest.raises(StrategyError, match="update from h: array 0: contains NaN"):
        round_.add("h", [bad], 3)
    assert round_.count == 0


def test_fedavg_can_accept_non_finite_when_asked():
    round_ = make_strategy("fedavg", {"reject_non_finite": False}).start_round(
        [np.zeros(2, np.float32)], 1)
    round_.add("a", [np.array([np.nan, 1.0], np.float32)], 1)
    assert np.isnan(round_.result()[0][0])


def test_fedavg_empty_or_weightless_round():
    with pytest.raises(StrategyError, match="no updates"):
        FedAvg().start_round([np.zeros(2, np.float32)], 1).result()
    round_ = FedAvg().start_round([np.zeros(2, np.float32)], 1)
    round_.add("a", [np.ones(2, np.float32)], 0)
    with pytest.raises(StrategyError, match="0 training examples"):
        round_.result()


def test_fedavg_round_keeps_no_reference_to_updates():
    round_ = FedAvg().start_round([np.zeros(10, np.float32)], 1)
    update = [np.ones(10, np.float32)]
    alive = weakref.ref(update[0])
    round_.add("a", update, 5)
    del update
    gc.collect()
    assert alive() is None


def test_make_strategy_errors():
    with pytest.raises(StrategyError, match="unknown strategy 'fedsgd'; valid: .*fedavg.*krum") \
            as info:
        make_strategy("fedsgd")
    assert isinstance(info.value, FlctlError)
    with pytest.raises(StrategyError, match="bad params"):
        make_strategy("fedavg", {"mu": 0.1})


@pytest.mark.parametrize("shape", [(1,), (7,), (CHUNK,), (3 * CHUNK + 5,), (300, 7)])
def test_narrowing_in_place_equals_astype(shape):
    from flctl.core.aggregation import narrow_in_place

    wide = np.random.default_rng(0).standard_normal(shape) * 1e3
    expected = wide.astype(np.float32)
    tracemalloc.start()
    try:
        copy = wide.copy()
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        narrow = narrow_in_place(copy, np.float32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert narrow.dtype == np.float32 and narrow.shape == shape
    assert np.array_equal(narrow, expected)
    assert peak - before <= min(CHUNK, wide.size) * 4 + 4096  # a chunk, never a model copy
