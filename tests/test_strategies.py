"""Every strategy against hand-computed values, their state, params and refusals.

The server-optimiser tests share one story, in float64 so the numbers can be
compared tightly: global w0 = [0, 1]; in round 1 the hosts' weighted average
moves it by d1 = [0.2, -0.5], in round 2 by d2 = [0.01, 0.3] (chosen so Yogi's
sign flips for the first coordinate). Expected values are worked out from the
formulas in the comments.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest

from flctl.core.data import Dataset
from flctl.core.strategies import (
    STRATEGIES,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    RoundAggregator,
    Strategy,
    StrategyError,
    make_strategy,
    robust,
)
from flctl.core.tasks import LogRegTask, TaskError

W0 = np.array([0.0, 1.0])
D1 = np.array([0.2, -0.5])
D2 = np.array([0.01, 0.3])
STATEFUL = ["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
ROBUST = ["fedmedian", "fedtrimmedavg", "krum", "multikrum"]


def two_rounds(strategy: Strategy) -> tuple[np.ndarray, np.ndarray]:
    """Round 1 average = w0 + d1 (weights 1 and 3), round 2 average = w1 + d2."""
    r1 = strategy.start_round([W0], 1)
    r1.add("a", [W0 + np.array([0.5, -0.8])], 1)  # (0.5 + 3 * 0.1) / 4 = 0.2
    r1.add("b", [W0 + np.array([0.1, -0.4])], 3)  # (-0.8 - 1.2) / 4 = -0.5
    w1 = r1.result()[0]
    r2 = strategy.start_round([w1], 2)
    r2.add("a", [w1 + np.array([0.02, 0.5])], 1)
    r2.add("b", [w1 + np.array([0.0, 0.1])], 1)
    return w1, r2.result()[0]


# --------------------------------------------------------------------------- server optimisers


def test_fedavgm_hand_computed():
    strategy = make_strategy("fedavgm", {"server_lr": 0.5, "momentum": 0.9})
    w1, w2 = two_rounds(strategy)
    # v1 = d1 = [0.2, -0.5];  w1 = w0 + 0.5 * v1 = [0.1, 0.75]
    np.testing.assert_allclose(w1, [0.1, 0.75], rtol=1e-12)
    # v2 = 0.9 * v1 + d2 = [0.19, -0.15];  w2 = w1 + 0.5 * v2 = [0.195, 0.675]
    np.testing.assert_allclose(w2, [0.195, 0.675], rtol=1e-12)
    np.testing.assert_allclose(strategy.state()["momentum"][0], [0.19, -0.15], rtol=1e-12)


def test_fedavgm_without_momentum_is_fedavg():
    w1, w2 = two_rounds(make_strategy("fedavgm", {"server_lr": 1.0, "momentum": 0.0}))
    np.testing.assert_allclose(w1, W0 + D1, rtol=1e-12)
    np.testing.assert_allclose(w2, W0 + D1 + D2, rtol=1e-12)


def test_fedadagrad_hand_computed():
    strategy = make_strategy("fedadagrad", {"eta": 0.1, "tau": 0.01})
    w1, w2 = two_rounds(strategy)
    # beta_1 = 0: m = delta. v0 = tau^2 = 1e-4.
    # v1 = 1e-4 + d1^2 = [0.0401, 0.2501]
    # w1 = w0 + 0.1 * d1 / (sqrt(v1) + 0.01) = [0.02 / 0.21024984, 1 - 0.05 / 0.51009999]
    np.testing.assert_allclose(w1, [0.0951249219725, 0.901980002], rtol=1e-10)
    # v2 = v1 + d2^2 = [0.0402, 0.3401];  w2 = w1 + 0.1 * d2 / (sqrt(v2) + 0.01)
    np.testing.assert_allclose(w2, [0.0998755298667, 0.952554790159], rtol=1e-10)
    state = strategy.state()
    np.testing.assert_allclose(state["m"][0], [0.01, 0.3], rtol=1e-12)
    np.testing.assert_allclose(state["v"][0], [0.0402, 0.3401], rtol=1e-12)


def test_fedadam_hand_computed():
    strategy = make_strategy("fedadam", {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99,
                                         "tau": 0.01})
    w1, w2 = two_rounds(strategy)
    # m1 = 0.1 * d1 = [0.02, -0.05]
    # v1 = 0.99 * 1e-4 + 0.01 * d1^2 = [0.000499, 0.002599]
    # w1 = w0 + 0.1 * m1 / (sqrt(v1) + 0.01)
    np.testing.assert_allclose(w1, [0.0618461549057, 0.918006425798], rtol=1e-10)
    # m2 = 0.9 * m1 + 0.1 * d2 = [0.019, -0.015]
    # v2 = 0.99 * v1 + 0.01 * d2^2 = [0.00049501, 0.00347301]
    np.testing.assert_allclose(w2, [0.120763038953, 0.896245928837], rtol=1e-10)
    state = strategy.state()
    np.testing.assert_allclose(state["m"][0], [0.019, -0.015], rtol=1e-12)
    np.testing.assert_allclose(state["v"][0], [0.00049501, 0.00347301], rtol=1e-12)


def test_fedyogi_hand_computed():
    strategy = make_strategy("fedyogi", {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99,
                                         "tau": 0.01})
    w1, w2 = two_rounds(strategy)
    # v0 = 1e-4 < d1^2, so v grows: v1 = v0 + 0.01 * d1^2 = [0.0005, 0.0026]
    # w1 = w0 + 0.1 * m1 / (sqrt(v1) + 0.01), m1 = [0.02, -0.05]
    np.testing.assert_allclose(w1, [0.061803398875, 0.918019609728], rtol=1e-10)
    # coordinate 0: v1 = 0.0005 > d2^2 = 1e-4, so v shrinks: 0.0005 - 0.01 * 1e-4 = 0.000499
    # coordinate 1: v1 = 0.0026 < d2^2 = 0.09, so v grows: 0.0026 + 0.01 * 0.09 = 0.0035
    np.testing.assert_allclose(strategy.state()["v"][0], [0.000499, 0.0035], rtol=1e-12)
    np.testing.assert_allclose(w2, [0.120557246035, 0.89633102245], rtol=1e-10)


def test_server_step_in_float32_keeps_dtypes_and_shapes():
    strategy = make_strategy("fedadam", {"tau": 0.01})
    global_weights = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]
    round_ = strategy.start_round(global_weights, 1)
    round_.add("a", [np.full((2, 3), 0.5, np.float32), np.full(4, 2.0, np.float32)], 10)
    new = round_.result()
    assert [(w.shape, w.dtype) for w in new] == [((2, 3), np.float32), ((4,), np.float32)]
    # delta 0.5: m = 0.05, v = 0.99e-4 + 0.0025; w = 0.1 * 0.05 / (sqrt(v) + 0.01)
    expected = 0.1 * 0.05 / (np.sqrt(0.99e-4 + 0.0025) + 0.01)
    np.testing.assert_allclose(new[0], expected, rtol=1e-6)
    assert all(a.dtype == np.float32 for arrays in strategy.state().values() for a in arrays)


@pytest.mark.parametrize("name", STATEFUL)
def test_state_round_trip_gives_identical_next_round(name):
    rng = np.random.default_rng(5)
    shapes = [(7, 3), (3,)]
    w0 = [rng.normal(size=s).astype(np.float32) for s in shapes]

    def updates(w, round_number):
        local = np.random.default_rng(round_number)
        return [[x + local.normal(0, 0.1, x.shape).astype(np.float32) for x in w]
                for _ in range(3)]

    def play(strategy, w, round_number):
        round_ = strategy.start_round(w, round_number)
        for i, update in enumerate(updates(w, round_number)):
            round_.add(f"h{i}", update, 10 + i)
        return round_.result()

    original = make_strategy(name)
    assert original.state() == {}  # nothing before the first step
    w1 = play(original, w0, 1)
    saved = original.state()
    assert sorted(saved) == sorted(type(original).STATE_KEYS)
    w2 = play(original, w1, 2)

    resumed = make_strategy(name)
    resumed.load_state(saved)
    w2_resumed = play(resumed, w1, 2)
    for a, b in zip(w2, w2_resumed):
        assert np.array_equal(a, b)
    for key in saved:
        for a, b in zip(original.state()[key], resumed.state()[key]):
            assert np.array_equal(a, b)

    # A fresh strategy (no state) steps differently: the state matters.
    fresh = play(make_strategy(name), w1, 2)
    assert not all(np.array_equal(a, b) for a, b in zip(fresh, w2))


def test_state_is_a_copy_and_empty_state_resets():
    strategy = make_strategy("fedavgm")
    w1, _ = two_rounds(strategy)
    state = strategy.state()
    state["momentum"][0][:] = 1000.0
    assert strategy.state()["momentum"][0][0] != 1000.0
    strategy.load_state({})
    assert strategy.state() == {}


def test_load_state_refuses_what_it_cannot_use():
    strategy = make_strategy("fedadam")
    good = np.zeros(2)
    cases = [
        ({"m": [good]}, "must hold m, v; got m"),
        ({"m": [good], "v": [good], "extra": [good]}, "must hold m, v"),
        ({"m": [good], "v": [np.array([1.0, -1.0])]}, "'v' array 0: negative second moment"),
        ({"m": [np.array([np.nan, 0.0])], "v": [good]}, "'m' array 0: NaN or infinite"),
        ({"m": [good], "v": [np.zeros(3)]}, "'v' does not match 'm'"),
        ({"m": [np.array([1, 2])], "v": [good]}, "not a float type"),
        ({"m": good, "v": [good]}, "'m' must be a list of arrays"),
    ]
    for state, message in cases:
        with pytest.raises(StrategyError, match=message):
            strategy.load_state(state)
    assert strategy.state() == {}
    # Shapes are checked against the model when the next round starts.
    strategy.load_state({"m": [np.zeros(3)], "v": [np.zeros(3)]})
    with pytest.raises(StrategyError, match=r"fedadam state 'm' array 0 has shape \(3,\), "
                                            r"the model \(2,\)"):
        strategy.start_round([W0], 5)
    with pytest.raises(StrategyError, match="'m' has 1 arrays, the model 2"):
        strategy.start_round([W0, W0], 5)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"] + ROBUST)
def test_stateless_strategies_have_empty_state_and_refuse_foreign_state(name):
    strategy = make_strategy(name)
    assert strategy.state() == {}
    strategy.load_state({})
    with pytest.raises(StrategyError, match=f"strategy '{name}' keeps no state, but the "
                                            f"checkpoint holds momentum"):
        strategy.load_state({"momentum": [np.zeros(2)]})


def test_a_stale_round_cannot_step_the_optimiser_twice():
    strategy = make_strategy("fedavgm")
    first = strategy.start_round([W0], 3)
    retry = strategy.start_round([W0], 3)
    for round_ in (first, retry):
        round_.add("a", [W0 + D1], 1)
    first.result()
    with pytest.raises(StrategyError, match="round 3: the fedavgm state changed since this "
                                            "round started"):
        retry.result()
    np.testing.assert_allclose(strategy.state()["momentum"][0], D1)  # stepped once


def test_an_overflowing_step_is_refused_and_leaves_the_state_alone():
    strategy = make_strategy("fedavgm", {"server_lr": 1.0, "momentum": 0.9})
    w = [np.array([1.0, 1.0], np.float32)]
    round_ = strategy.start_round(w, 1)
    round_.add("a", [np.array([2.0, 3.0], np.float32)], 1)
    w1 = round_.result()
    before = strategy.state()
    # The update is finite, but delta = 3e38 - (-3e38) overflows float32 in the step.
    huge = [np.array([-3e38, 1.0], np.float32)]
    round_ = strategy.start_round(huge, 2)
    round_.add("a", [np.array([3e38, 1.0], np.float32)], 1)
    with pytest.raises(StrategyError, match="round 2: the fedavgm step makes momentum "
                                            "non-finite .array 0.; .* state is unchanged"):
        round_.result()
    assert np.array_equal(strategy.state()["momentum"][0], before["momentum"][0])
    round_ = strategy.start_round(w1, 3)  # the run can go on
    round_.add("a", [w1[0] + 1.0], 1)
    np.testing.assert_allclose(round_.result()[0], w1[0] + 0.9 * np.array([1.0, 2.0]) + 1.0)


# --------------------------------------------------------------------------- FedProx


def test_fedprox_aggregates_like_fedavg_and_sends_mu():
    prox = make_strategy("fedprox", {"proximal_mu": 0.1})
    assert prox.fit_config_extra() == {"proximal_mu": 0.1}
    assert make_strategy("fedprox").fit_config_extra() == {"proximal_mu": 0.01}
    for name in sorted(set(STRATEGIES) - {"fedprox"}):
        assert make_strategy(name).fit_config_extra() == {}
    w1, w2 = two_rounds(prox)
    np.testing.assert_allclose(w1, W0 + D1, rtol=1e-12)
    np.testing.assert_allclose(w2, W0 + D1 + D2, rtol=1e-12)


def test_trainer_adds_the_proximal_gradient():
    """Two full-batch steps: the proximal term changes only the second one, by -lr*mu*(w1-w0)."""
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((40, 64), dtype=np.float32), rng.integers(0, 10, 40))
    task = LogRegTask()
    w0 = task.init(3)
    lr, mu = 0.5, 0.3
    config = {"epochs": 2, "batch_size": 64, "lr": lr, "seed": 1, "round": 1}
    plain, _, _ = task.fit(w0, data, config)
    prox, _, _ = task.fit(w0, data, {**config, "proximal_mu": mu})
    one_step, _, _ = task.fit(w0, data, {**config, "epochs": 1})
    for p, q, w1, w in zip(plain, prox, one_step, w0):
        np.testing.assert_allclose(q - p, -lr * mu * (w1 - w), rtol=1e-4, atol=1e-6)
        assert np.abs(q - p).max() > 1e-4  # the term did something
    # Many epochs: a strong pull keeps the local model closer to the global one.
    far = {**config, "epochs": 20, "batch_size": 8}
    drift = [sum(float(np.sum((a - b) ** 2)) for a, b in zip(task.fit(w0, data, c)[0], w0))
             for c in (far, {**far, "proximal_mu": 1.0})]
    assert drift[1] < 0.5 * drift[0]


@pytest.mark.parametrize("mu", [-0.1, float("inf"), "0.1", True])
def test_trainer_refuses_bad_proximal_mu(mu):
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((10, 64), dtype=np.float32), rng.integers(0, 10, 10))
    task = LogRegTask()
    with pytest.raises(TaskError, match="'proximal_mu' must be a number >= 0"):
        task.fit(task.init(0), data, {"proximal_mu": mu})


# --------------------------------------------------------------------------- robust


def test_fedmedian_hand_computed():
    g = [np.zeros(2), np.zeros((1, 1))]
    round_ = make_strategy("fedmedian").start_round(g, 1)
    round_.add("a", [np.array([1.0, 10.0]), np.array([[5.0]])], 1)
    round_.add("b", [np.array([2.0, -5.0]), np.array([[6.0]])], 100)  # counts do not weigh
    round_.add("c", [np.array([7.0, 0.0]), np.array([[-1.0]])], 1)
    round_.add("d", [np.array([100.0, 1.0]), np.array([[9.0]])], 1)
    new = round_.result()
    # sorted [1, 2, 7, 100] -> (2 + 7) / 2;  [-5, 0, 1, 10] -> (0 + 1) / 2;  [-1, 5, 6, 9] -> 5.5
    np.testing.assert_array_equal(new[0], [4.5, 0.5])
    np.testing.assert_array_equal(new[1], [[5.5]])
    odd = make_strategy("fedmedian").start_round([np.zeros(1)], 1)
    for host, x in zip("abc", (3.0, -50.0, 4.0)):
        odd.add(host, [np.array([x])], 1)
    np.testing.assert_array_equal(odd.result()[0], [3.0])


@pytest.mark.parametrize("n", [6, 7])
def test_median_and_trimmed_mean_match_numpy_across_blocks(n, monkeypatch):
    monkeypatch.setattr(robust, "BLOCK_ELEMENTS", 50)  # many column blocks, a ragged last one
    rng = np.random.default_rng(n)
    shapes = [(13, 4), (5,), (0, 3)]
    g = [np.zeros(s, np.float32) for s in shapes]
    updates = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(n)]
    results = {}
    for name, params in [("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.3})]:
        round_ = make_strategy(name, params).start_round(g, 1)
        for i, update in enumerate(updates):
            round_.add(f"h{i}", update, 1)
        results[name] = round_.result()
    cut = int(0.3 * n)
    for i, shape in enumerate(shapes):
        stacked = np.stack([u[i] for u in updates]).astype(np.float64)
        np.testing.assert_allclose(results["fedmedian"][i], np.median(stacked, axis=0),
                                   rtol=1e-6)
        trimmed = np.sort(stacked, axis=0)[cut:n - cut].mean(axis=0)
        np.testing.assert_allclose(results["fedtrimmedavg"][i], trimmed, rtol=1e-5, atol=1e-7)
        assert results["fedmedian"][i].shape == shape


def test_median_of_huge_values_does_not_overflow():
    round_ = make_strategy("fedmedian").start_round([np.zeros(1, np.float32)], 1)
    for host in "ab":
        round_.add(host, [np.array([3e38], np.float32)], 1)
    assert round_.result()[0][0] == np.float32(3e38)


def five_updates() -> list[tuple[str, np.ndarray]]:
    return [("a", np.array([1.0, 10.0])), ("b", np.array([2.0, -5.0])),
            ("c", np.array([7.0, 0.0])), ("d", np.array([100.0, 1.0])),
            ("e", np.array([3.0, 4.0]))]


def test_fedtrimmedavg_hand_computed():
    round_ = make_strategy("fedtrimmedavg", {"beta": 0.25}).start_round([np.zeros(2)], 1)
    for host, x in five_updates():
        round_.add(host, [x], 1)
    # cut int(0.25 * 5) = 1 from each end:
    # [1, 2, 3, 7, 100] -> mean(2, 3, 7) = 4;  [-5, 0, 1, 4, 10] -> mean(0, 1, 4) = 5/3
    np.testing.assert_allclose(round_.result()[0], [4.0, 5.0 / 3.0], rtol=1e-12)

    # beta 0.4 cuts 2 of 5 from each end: the median
    round_ = make_strategy("fedtrimmedavg", {"beta": 0.4}).start_round([np.zeros(2)], 1)
    for host, x in five_updates():
        round_.add(host, [x], 1)
    np.testing.assert_array_equal(round_.result()[0], [3.0, 1.0])

    # default beta 0.2 with 4 updates cuts int(0.8) = 0: the plain mean
    round_ = make_strategy("fedtrimmedavg").start_round([np.zeros(2)], 1)
    for host, x in five_updates()[:4]:
        round_.add(host, [x], 7)
    np.testing.assert_allclose(round_.result()[0], [27.5, 1.5], rtol=1e-12)


KRUM_GLOBAL = np.array([5.0, -3.0])
# Points relative to the global model; e is the outlier.
KRUM_POINTS = {"a": (0.0, 0.0), "b": (1.0, 0.0), "c": (0.0, 2.0), "d": (1.0, 1.0),
               "e": (10.0, 10.0)}


def krum_round(strategy: Strategy, hosts: str = "abcde") -> RoundAggregator:
    round_ = strategy.start_round([KRUM_GLOBAL.copy()], 4)
    for host in hosts:
        round_.add(host, [KRUM_GLOBAL + np.array(KRUM_POINTS[host])], 10)
    return round_


def test_krum_hand_computed():
    # f = 1, n = 5: each score sums the n - f - 2 = 2 smallest squared distances.
    # a: b 1, c 4, d 2, e 200 -> 1 + 2 = 3      b: a 1, c 5, d 1, e 181 -> 2
    # c: a 4, b 5, d 2, e 164 -> 2 + 4 = 6      d: a 2, b 1, c 2, e 162 -> 3
    # e: a 200, b 181, c 164, d 162 -> 326
    round_ = krum_round(Krum(num_malicious=1))
    np.testing.assert_allclose(round_.result()[0], KRUM_GLOBAL + [1.0, 0.0])  # b wins
    assert round_.scores == pytest.approx({"a": 3, "b": 2, "c": 6, "d": 3, "e": 326})
    assert round_.selected == ("b",)


def test_multikrum_hand_computed():
    # Best three: b (2), then a and d tied at 3 (ties go by host name): mean of b, a, d.
    round_ = krum_round(MultiKrum(num_malicious=1, to_keep=3))
    np.testing.assert_allclose(round_.result()[0], KRUM_GLOBAL + [2.0 / 3.0, 1.0 / 3.0])
    assert round_.selected == ("b", "a", "d")
    backwards = krum_round(MultiKrum(num_malicious=1, to_keep=2), hosts="edcba")
    assert backwards.result()[0] == pytest.approx(KRUM_GLOBAL + [0.5, 0.0])  # a, not d
    assert backwards.selected == ("b", "a")
    # Default to_keep = n - f = 4 drops only the outlier: mean of b, a, d, c.
    round_ = krum_round(MultiKrum(num_malicious=1))
    np.testing.assert_allclose(round_.result()[0], KRUM_GLOBAL + [0.5, 0.75])
    # to_keep beyond n - f is capped at n - f.
    round_ = krum_round(MultiKrum(num_malicious=1, to_keep=5))
    assert round_.result()[0] == pytest.approx(KRUM_GLOBAL + [0.5, 0.75])
    assert "e" not in round_.selected


def test_krum_needs_more_than_2f_plus_2_updates():
    round_ = krum_round(Krum(num_malicious=1), hosts="abcd")
    with pytest.raises(StrategyError, match=r"round 4: krum with num_malicious=1 needs at "
                                            r"least 5 updates \(n > 2f \+ 2\), got 4"):
        round_.result()
    with pytest.raises(StrategyError, match="needs at least 3 updates"):
        krum_round(Krum(), hosts="ab").result()


@pytest.mark.parametrize("name", ROBUST)
def test_robust_result_does_not_depend_on_arrival_order(name):
    rng = np.random.default_rng(9)
    g = [rng.normal(size=(50, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    updates = {f"h{i}": [x + rng.normal(size=x.shape).astype(np.float32) for x in g]
               for i in range(7)}
    results = []
    for order in (sorted(updates), sorted(updates, reverse=True)):
        round_ = make_strategy(name, {"num_malicious": 1} if "krum" in name else {}) \
            .start_round(g, 1)
        for host in order:
            round_.add(host, updates[host], 1)
        results.append(round_.result())
    for a, b in zip(*results):
        assert a.dtype == np.float32 and np.array_equal(a, b)


def test_robust_strategies_ignore_a_wild_update_fedavg_does_not():
    rng = np.random.default_rng(3)
    honest = [rng.normal(1.0, 0.01, 1000) for _ in range(6)]
    wild = np.full(1000, -1e6)
    merged = {}
    for name, params in [("fedavg", {}), ("fedmedian", {}), ("fedtrimmedavg", {}),
                         ("krum", {"num_malicious": 1}), ("multikrum", {"num_malicious": 1})]:
        round_ = make_strategy(name, params).start_round([np.zeros(1000)], 1)
        for i, x in enumerate(honest + [wild]):
            round_.add(f"h{i}", [x], 100)
        merged[name] = round_.result()[0]
    assert merged.pop("fedavg").mean() < -1e5
    for name, values in merged.items():
        assert np.abs(values - 1.0).max() < 0.05, name


@pytest.mark.parametrize("name", ROBUST)
def test_robust_rounds_copy_updates_and_drop_them_after_result(name):
    round_ = make_strategy(name).start_round([np.zeros(4)], 1)
    kept = []
    for i in range(3):
        update = np.full(4, float(i))
        round_.add(f"h{i}", [update], 1)
        kept.append(weakref.ref(update))
        update[:] = 100.0  # changing the caller's array after add changes nothing
        del update
    gc.collect()
    assert all(ref() is None for ref in kept)
    result = round_.result()[0]
    assert np.all(result <= 2.0)
    assert round_._updates == {}  # the N copies are freed once the round is done
    assert round_.result()[0] is result  # idempotent


# --------------------------------------------------------------------------- all strategies


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_refuses_bad_updates_naming_host_and_round(name):
    round_ = make_strategy(name).start_round([np.zeros(3, np.float32)], 7)
    round_.add("a", [np.ones(3, np.float32)], 10)
    cases = [
        ("a", [np.ones(3, np.float32)], 10, "round 7: second update from a"),
        ("b", [np.ones(4, np.float32)], 10, r"round 7: update from b: array 0: expected shape"),
        ("b", [np.ones(3, np.float32)] * 2, 10, r"round 7: update from b: expected 1 arrays"),
        ("c", [np.ones(3, np.float32)], -5, "round 7: update from c: num_examples"),
        ("d", [np.ones(3, np.float32)], True, "num_examples must be a non-negative integer"),
        ("e", [np.array([1.0, np.nan, 1.0], np.float32)], 10, "update from e: .*NaN or infinite"),
        ("f", [np.array([1.0, -np.inf, 1.0], np.float32)], 10, "NaN or infinite"),
        ("g", [np.array([1.0, 1e300, 1.0])], 10, "NaN or infinite"),  # inf once in float32
        ("h", [np.array(["x", "y", "z"])], 10, "not a real number type"),
    ]
    for host, weights, n, message in cases:
        with pytest.raises(StrategyError, match=message):
            round_.add(host, weights, n)
    assert round_.count == 1
    with pytest.raises(StrategyError, match="round 8: no updates"):
        make_strategy(name).start_round([np.zeros(3, np.float32)], 8).result()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_keeps_no_reference_to_the_callers_update(name):
    round_ = make_strategy(name).start_round([np.zeros(10, np.float32)], 1)
    refs = []
    for i in range(3):
        update = [np.full(10, float(i), np.float32)]
        refs.append(weakref.ref(update[0]))
        round_.add(f"h{i}", update, 1)
        del update
    gc.collect()
    assert all(ref() is None for ref in refs)


@pytest.mark.parametrize("name", STATEFUL)
def test_server_optimisers_stay_streaming(name):
    """Peak memory is the same for 4 or 16 updates: O(model), not O(hosts x model)."""
    size = 200_000
    rng = np.random.default_rng(1)
    updates = [rng.random(size, dtype=np.float32) for _ in range(16)]
    strategy = make_strategy(name)
    template = [np.zeros(size, np.float32)]
    peaks = []
    for count in (4, 16):
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            round_ = strategy.start_round(template, count)
            for i, update in enumerate(updates[:count]):
                round_.add(f"h{i}", [update], 10)
            round_.result()
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
        finally:
            tracemalloc.stop()
    model = size * 4
    assert peaks[1] < peaks[0] + 0.2 * model
    assert peaks[1] < 6 * model  # float64 sum (2) + result (1) + state (1-2) + chunks


def test_robust_rounds_hold_one_copy_per_update():
    size = 100_000
    updates = [np.full(size, float(i), np.float32) for i in range(10)]
    template = [np.zeros(size, np.float32)]
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        round_ = FedMedian().start_round(template, 1)
        for i, update in enumerate(updates):
            round_.add(f"h{i}", [update], 1)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert 10 * size * 4 <= held < 10.5 * size * 4
    assert round_.result()[0][0] == 4.5


# --------------------------------------------------------------------------- registry, params


def test_registry_names_and_protocol():
    assert sorted(STRATEGIES) == ["centeredclip", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian",
                                  "fedprox", "fedtrimmedavg", "fedyogi", "krum", "multikrum"]
    for name, cls in STRATEGIES.items():
        strategy = make_strategy(name)
        assert isinstance(strategy, cls) and isinstance(strategy, Strategy)
        assert strategy.name == name
        assert isinstance(strategy.start_round([np.zeros(2)], 1), RoundAggregator)
    assert isinstance(make_strategy("fedprox"), FedAvg)
    assert isinstance(make_strategy("fedprox"), FedProx)


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(StrategyError, match="unknown strategy 'fedsgd'; valid: centeredclip, fedadagrad, "
                                            "fedadam, fedavg, fedavgm, fedmedian, fedprox, "
                                            "fedtrimmedavg, fedyogi, krum, multikrum"):
        make_strategy("fedsgd")


@pytest.mark.parametrize(("name", "params", "message"), [
    ("fedtrimmedavg", {"beta": 0.5}, r"beta must be in \[0, 0.5\), got 0.5"),
    ("fedtrimmedavg", {"beta": -0.1}, r"beta must be in \[0, 0.5\)"),
    ("krum", {"num_malicious": -1}, "num_malicious must be an integer >= 0"),
    ("krum", {"num_malicious": 1.5}, "num_malicious must be an integer >= 0"),
    ("krum", {"to_keep": 2}, "unexpected keyword argument 'to_keep'"),
    ("multikrum", {"to_keep": 0}, "to_keep must be an integer >= 1"),
    ("fedavgm", {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ("fedavgm", {"server_lr": 0}, r"server_lr must be in \(0, inf\)"),
    ("fedadam", {"beta_2": 1.2}, r"beta_2 must be in \[0, 1\)"),
    ("fedadam", {"tau": 0.0}, r"tau must be in \(0, inf\)"),
    ("fedyogi", {"eta": float("nan")}, "eta must be in"),
    ("fedadagrad", {"eta": "0.1"}, "eta must be a number"),
    ("fedadagrad", {"beta_2": 0.9}, "unexpected keyword argument 'beta_2'"),
    ("fedprox", {"proximal_mu": -1}, r"proximal_mu must be in \[0, inf\)"),
])
def test_bad_params_are_refused_clearly(name, params, message):
    with pytest.raises(StrategyError, match=f"strategy '{name}': bad params .*{message}"):
        make_strategy(name, params)


def test_trimmed_default_matches_flower():
    assert FedTrimmedAvg().beta == 0.2
    assert Krum().num_malicious == 0 and MultiKrum().to_keep is None
