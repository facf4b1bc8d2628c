"""Centered clipping (strategy centeredclip) against hand-computed values.

v <- v + (1/n) sum_i min(1, tau / |x_i - v|) (x_i - v), with x_i = u_i - w the
hosts' changes of the model; the new model is w + v and v is kept as the next
round's starting centre. Expected values are worked out in the comments.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator.records import RunDir, load_checkpoint
from flctl.core.strategies import CenteredClip, StrategyError, make_strategy, robust
from flctl.core.strategies.centeredclip import auto_tau, centered_clip, clip_scales
from test_robust_spooled import model, open_spools, same, spool, traced_peak, updates

W = np.array([10.0, -10.0])


def play(strategy, global_weights: list[np.ndarray], deltas: dict[str, list],
         round_number: int = 1):
    """One round whose host h sends global_weights + deltas[h]."""
    round_ = strategy.start_round(global_weights, round_number)
    for host in sorted(deltas, reverse=True):   # arrival order does not matter
        round_.add(host, [w + np.asarray(d, w.dtype) for w, d in zip(global_weights,
                                                                       deltas[host])], 10)
    return round_, round_.result()


# ----------------------------------------------------------------- the math


def test_the_plain_functions() -> None:
    np.testing.assert_array_equal(clip_scales(np.array([0.0, 1.0, 4.0]), 2.0), [1, 1, 0.5])
    assert auto_tau(np.array([5.0, 1.0, 1.0, 3.0])) == 2.0
    # the three hosts of test_one_iteration_clips_only_what_is_beyond_tau
    v = centered_clip(np.array([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]]), np.zeros(2), 2.0)
    np.testing.assert_allclose(v, [2.2 / 3, 2.6 / 3], rtol=1e-15)


def test_without_clipping_it_is_the_plain_mean() -> None:
    # tau 100 is beyond every distance (5, 1, 1): v = mean = (4/3, 5/3)
    round_, (new,) = play(CenteredClip(tau=100.0), [W],
                          {"a": [(3.0, 4.0)], "b": [(0.0, 1.0)], "c": [(1.0, 0.0)]})
    np.testing.assert_allclose(new, W + [4.0 / 3.0, 5.0 / 3.0], rtol=1e-15)
    assert round_.scales == [{"a": 1.0, "b": 1.0, "c": 1.0}] and round_.radii == [100.0]


def test_one_iteration_clips_only_what_is_beyond_tau() -> None:
    # tau 2, centre 0: a = (3, 4) is 5 away -> scaled by 2/5 to (1.2, 1.6);
    # b = (0, 1) and c = (1, 0) are 1 away -> whole.  v = (2.2, 2.6) / 3
    round_, (new,) = play(CenteredClip(tau=2.0), [W],
                          {"a": [(3.0, 4.0)], "b": [(0.0, 1.0)], "c": [(1.0, 0.0)]})
    np.testing.assert_allclose(new, W + [2.2 / 3, 2.6 / 3], rtol=1e-15)
    assert round_.scales == [pytest.approx({"a": 0.4, "b": 1.0, "c": 1.0})]


def test_the_default_radius_is_the_median_distance() -> None:
    # distances 5, 1, 1 -> tau 1: a scaled by 1/5 to (0.6, 0.8); v = (1.6, 1.8) / 3
    round_, (new,) = play(CenteredClip(), [W],
                          {"a": [(3.0, 4.0)], "b": [(0.0, 1.0)], "c": [(1.0, 0.0)]})
    np.testing.assert_allclose(new, W + [1.6 / 3, 1.8 / 3], rtol=1e-15)
    assert round_.radii == [1.0]


ONE_D = {"a": [(0.0,)], "b": [(1.0,)], "c": [(10.0,)]}


def test_several_iterations_hand_computed() -> None:
    w = [np.array([5.0])]
    # tau 1: iteration 1 from v = 0: distances 0, 1, 10 -> scales 1, 1, 0.1:
    #   v = (0 + 1 + 1) / 3 = 2/3
    # iteration 2: x - v = -2/3, 1/3, 28/3 -> scales 1, 1, 3/28:
    #   v = 2/3 + (-2/3 + 1/3 + 1) / 3 = 2/3 + 2/9 = 8/9
    round_, (new,) = play(CenteredClip(tau=1.0, iterations=2), w, ONE_D)
    np.testing.assert_allclose(new, [5.0 + 8.0 / 9.0], rtol=1e-15)
    assert round_.radii == [1.0, 1.0]
    assert round_.scales[1] == pytest.approx({"a": 1.0, "b": 1.0, "c": 3.0 / 28.0})
    # default tau: iteration 1 median(0, 1, 10) = 1, as above: v = 2/3;
    # iteration 2 median(2/3, 1/3, 28/3) = 2/3 -> c scaled by 1/14 to 2/3:
    #   v = 2/3 + (-2/3 + 1/3 + 2/3) / 3 = 7/9
    round_, (new,) = play(CenteredClip(iterations=2), w, ONE_D)
    np.testing.assert_allclose(new, [5.0 + 7.0 / 9.0], rtol=1e-15)
    assert round_.radii == pytest.approx([1.0, 2.0 / 3.0])
    # one iteration stops at 2/3
    _, (new,) = play(CenteredClip(tau=1.0), w, ONE_D)
    np.testing.assert_allclose(new, [5.0 + 2.0 / 3.0], rtol=1e-15)


@pytest.mark.parametrize("iterations", [1, 3])
def test_a_huge_outlier_moves_the_result_by_at_most_tau_over_n(iterations: int) -> None:
    rng = np.random.default_rng(2)
    honest = {f"h{i}": [rng.normal(0.0, 0.3, 20)] for i in range(7)}
    g = [np.zeros(20)]
    tau, n = 0.5, 8
    _, (at_centre,) = play(CenteredClip(tau=tau, iterations=iterations), g,
                           {**honest, "x": [np.zeros(20)]})
    for scale in (1e3, 1e9):
        wild = rng.normal(0.0, 1.0, 20) * scale
        _, (attacked,) = play(CenteredClip(tau=tau, iterations=iterations), g,
                              {**honest, "x": [wild]})
        shift = np.linalg.norm(attacked - at_centre)
        # Against the same host sitting at the centre: in one iteration the wild update
        # enters as at most tau (exactly tau, along itself), so the mean moves by tau/n.
        # Each further iteration adds at most 2 tau/n: a host's term, the projection of
        # x_i on the ball B(v, tau), never moves farther than v does (1-Lipschitz), and
        # the two runs' terms for host x both lie in a ball of radius tau.
        assert shift <= (2 * iterations - 1) * tau / n + 1e-12, (scale, shift)
        if iterations == 1:
            assert shift == pytest.approx(tau / n, rel=1e-9)
    # FedAvg would move by |wild| / n: ~1e9 / 8 * sqrt(20)


# ----------------------------------------------------------------- state


def test_the_centre_carries_over_hand_computed() -> None:
    strategy = CenteredClip(tau=1.0)
    assert strategy.state() == {}
    # round 1 (as in test_several_iterations): w1 = 5 + 2/3, centre 2/3
    _, (w1,) = play(strategy, [np.array([5.0])], ONE_D)
    np.testing.assert_allclose(strategy.state()["center"][0], [2.0 / 3.0], rtol=1e-15)
    # round 2, changes 1, 2, -20 from w1, centre 2/3: distances 1/3, 4/3, 62/3 ->
    # scales 1, 3/4, 3/62 -> steps 1/3, 1, -1: v = 2/3 + (1/3) / 3 = 7/9
    deltas = {"a": [(1.0,)], "b": [(2.0,)], "c": [(-20.0,)]}
    _, (w2,) = play(strategy, [w1], deltas, 2)
    # (w1 + d - w1 is d only up to one rounding of w1 + d)
    np.testing.assert_allclose(w2, w1 + 7.0 / 9.0, rtol=1e-14)
    np.testing.assert_allclose(strategy.state()["center"][0], [7.0 / 9.0], rtol=1e-14)
    # from centre 0 (a fresh strategy): scales 1, 1/2, 1/20 -> v = (1 + 1 - 1) / 3
    _, (fresh,) = play(CenteredClip(tau=1.0), [w1], deltas, 2)
    np.testing.assert_allclose(fresh, w1 + 1.0 / 3.0, rtol=1e-14)


@pytest.mark.parametrize("params", [{}, {"tau": 0.3, "iterations": 2},
                                    {"bucket_size": 2, "seed": 4}])
def test_state_round_trip_gives_the_identical_next_round(params: dict) -> None:
    hosts = [updates(7, seed) for seed in (1, 2, 3)]

    def round_of(strategy, weights, number):
        round_ = strategy.start_round(weights, number)
        for host, update in sorted(hosts[number - 1].items()):
            round_.add(host, update, 10)
        return round_.result()

    original = make_strategy("centeredclip", params)
    w1 = round_of(original, model(), 1)
    saved = original.state()
    assert sorted(saved) == ["center"]
    assert [a.dtype for a in saved["center"]] == [np.float32, np.float64, np.float32,
                                                 np.float64, np.float32, np.float32]
    w2 = round_of(original, w1, 2)
    w3 = round_of(original, w2, 3)
    resumed = make_strategy("centeredclip", params)   # as --resume builds it
    resumed.load_state(saved)
    same(round_of(resumed, w1, 2), w2)
    same(round_of(resumed, w2, 3), w3)
    same(original.state()["center"], resumed.state()["center"])
    fresh = round_of(make_strategy("centeredclip", params), w1, 2)
    assert not all(np.array_equal(a, b) for a, b in zip(fresh, w2))   # the state matters


def test_the_centre_survives_the_run_checkpoint(tmp_path: Path) -> None:
    """Through the coordinator's checkpoint files, as `flctl train --resume` reads them."""
    hosts = [updates(6, seed) for seed in (4, 5)]
    params = {"bucket_size": 2, "iterations": 2}

    def round_of(strategy, weights, number):
        round_ = strategy.start_round(weights, number)
        for host, update in sorted(hosts[number - 1].items()):
            round_.add(host, update, 10)
        return round_.result()

    original = make_strategy("centeredclip", params)
    w1 = round_of(original, model(), 1)
    run = RunDir(tmp_path)
    run.save_checkpoint(1, w1, {"run_id": "r"}, original.state())
    w2 = round_of(original, w1, 2)
    checkpoint = load_checkpoint(run)
    resumed = make_strategy("centeredclip", params)
    resumed.load_state(checkpoint.strategy_state)
    same(round_of(resumed, checkpoint.weights, 2), w2)


def test_state_is_a_copy_and_empty_state_resets() -> None:
    strategy = CenteredClip(tau=1.0)
    play(strategy, [np.array([5.0])], ONE_D)
    state = strategy.state()
    state["center"][0][:] = 1000.0
    assert strategy.state()["center"][0][0] != 1000.0
    strategy.load_state({})
    assert strategy.state() == {}


def test_load_state_refuses_what_it_cannot_use() -> None:
    strategy = CenteredClip()
    good = np.zeros(2)
    for state, message in [
        ({"momentum": [good]}, "centeredclip state must hold center; got momentum"),
        ({"center": [good], "m": [good]}, "must hold center; got center, m"),
        ({"center": good}, "'center' must be a list of arrays"),
        ({"center": [np.array([1, 2])]}, "array 0: dtype int64 is not a float type"),
        ({"center": [np.array([np.inf, 0.0])]}, "array 0: NaN or infinite values"),
    ]:
        with pytest.raises(StrategyError, match=message):
            strategy.load_state(state)
    assert strategy.state() == {}
    strategy.load_state({"center": [np.zeros(3)]})   # checked against the model at start
    with pytest.raises(StrategyError, match=r"centeredclip state 'center' array 0 has shape "
                                            r"\(3,\), the model \(2,\)"):
        strategy.start_round([W], 5)
    with pytest.raises(StrategyError, match="'center' has 1 arrays, the model 2"):
        strategy.start_round([W, W], 5)


def test_a_stale_round_cannot_commit_twice() -> None:
    strategy = CenteredClip(tau=1.0)
    first = strategy.start_round([W], 3)
    retry = strategy.start_round([W], 3)
    for round_ in (first, retry):
        round_.add("a", [W + 1.0], 1)
    first.result()
    with pytest.raises(StrategyError, match="round 3: the centeredclip state changed since "
                                            "this round started"):
        retry.result()


def test_a_step_that_overflows_is_refused_and_leaves_the_state_alone() -> None:
    strategy = CenteredClip(tau=1e39)
    w = [np.array([-3e38], np.float32)]
    round_ = strategy.start_round(w, 1)
    round_.add("a", [np.array([3e38], np.float32)], 1)
    # the weights come back to 3e38, but the change, 6e38, is infinite in float32
    with pytest.raises(StrategyError, match=r"round 1: the centered clipping step makes the "
                                            r"centre non-finite \(array 0\); the round is "
                                            r"refused and the state is unchanged"):
        round_.result()
    assert strategy.state() == {}


# ----------------------------------------------------------------- types, buckets, disk


def test_the_model_dtypes_and_shapes_come_back() -> None:
    strategy = make_strategy("centeredclip")
    hosts = updates(5)
    round_ = strategy.start_round(model(), 1)
    for host in sorted(hosts):
        round_.add(host, hosts[host], 10)
    result = round_.result()
    assert [(a.dtype, a.shape) for a in result] == [(a.dtype, a.shape) for a in model()]


def test_with_buckets_it_clips_bucket_means() -> None:
    # seed 0, round 1, 5 hosts, s 2: buckets [b, e], [d, a], [c]
    deltas = {"a": [(0.0, 0.0)], "b": [(2.0, 0.0)], "c": [(0.0, 2.0)], "d": [(40.0, 0.0)],
              "e": [(0.0, 0.0)]}
    # means (1, 0), (20, 0), (0, 2); tau 2: (20, 0) scaled by 1/10 to (2, 0);
    # v = ((1 + 2 + 0) / 3, (0 + 0 + 2) / 3) = (1, 2/3)
    round_, (new,) = play(CenteredClip(tau=2.0, bucket_size=2), [W], deltas)
    np.testing.assert_allclose(new, W + [1.0, 2.0 / 3.0], rtol=1e-15)
    assert round_.buckets == ("b+e", "d+a", "c")
    assert round_.scales == [pytest.approx({"b+e": 1.0, "d+a": 0.1, "c": 1.0})]


@pytest.mark.parametrize("block", [50, robust.BLOCK_ELEMENTS])
@pytest.mark.parametrize("params", [{}, {"tau": 0.5, "iterations": 3}])
def test_spooled_updates_give_the_in_memory_result_bit_for_bit(
        params: dict, block: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(robust, "BLOCK_ELEMENTS", block)
    hosts = updates(9)
    results, states = [], []
    for spooled in (set(), set(hosts), {"h1", "h5"}):
        strategy = make_strategy("centeredclip", params)
        weights = model()
        for number in (1, 2):   # round 2 starts from round 1's centre
            round_ = strategy.start_round(weights, number)
            for host in sorted(hosts, reverse=bool(spooled)):
                if host in spooled:
                    handle = spool(hosts[host], tmp_path)
                    round_.add(host, handle.arrays(), 10)
                    handle.close()
                else:
                    round_.add(host, hosts[host], 10)
            weights = round_.result()
        results.append(weights)
        states.append(strategy.state()["center"])
    for other in (1, 2):
        same(results[0], results[other])
        same(states[0], states[other])
    assert open_spools(tmp_path) == 0 and os.listdir(tmp_path) == []


def test_spooled_rounds_hold_a_few_models_not_one_per_host(tmp_path: Path) -> None:
    size, count = 8 << 20, 6   # 32 MB of float32 per update
    global_weights = [np.zeros(size, np.float32)]
    handles = [spool([np.random.default_rng(i).standard_normal(size, np.float32)], tmp_path)
               for i in range(count)]
    strategy = make_strategy("centeredclip", {"iterations": 2})

    def from_disk() -> None:
        round_ = strategy.start_round(global_weights, 1)
        for i, handle in enumerate(handles):
            round_.add(f"h{i}", handle.arrays(), 10)
            handle.close()
        round_.result()

    peak = traced_peak(from_disk)
    assert open_spools(tmp_path) == 0
    # the float64 centre (2x), narrowed in place to the result, the centre state
    # in float32 (1x), one column block
    print(f"centeredclip: peak {peak / (size * 4):.2f}x the model")
    assert peak < 3.5 * size * 4, f"{peak / (size * 4):.2f}x the model"


# ----------------------------------------------------------------- params


@pytest.mark.parametrize(("params", "message"), [
    ({"tau": 0}, r"tau must be in (0, inf), got 0"),
    ({"tau": -1.0}, r"tau must be in (0, inf), got -1.0"),
    ({"tau": float("nan")}, r"tau must be in (0, inf), got nan"),
    ({"tau": "1"}, r"tau must be a number, got '1'"),
    ({"iterations": 0}, r"iterations must be an integer >= 1, got 0"),
    ({"iterations": 1.5}, r"iterations must be an integer >= 1, got 1.5"),
])
def test_bad_params_are_one_clear_line(params: dict, message: str) -> None:
    with pytest.raises(StrategyError) as caught:
        make_strategy("centeredclip", params)
    assert str(caught.value) == f"strategy 'centeredclip': bad params {params}: {message}"


def test_defaults_and_unknown_params() -> None:
    strategy = make_strategy("centeredclip")
    assert strategy.tau is None and strategy.iterations == 1
    assert strategy.bucketing.size == 1 and strategy.fit_config_extra() == {}
    with pytest.raises(StrategyError, match="unexpected keyword argument 'radius'"):
        make_strategy("centeredclip", {"radius": 1.0})
