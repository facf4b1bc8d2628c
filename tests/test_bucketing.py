"""Bucketing (bucket_size) for median, trimmed mean, Krum and Multi-Krum, by hand.

The buckets come from np.random.default_rng([seed, round]).permutation(n) over
the host-sorted updates; the permutations used below are pinned in
test_the_permutation_is_fixed_by_seed_and_round, and every expected value is
worked out from them in the comments.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flctl.core.spooled import FileArray
from flctl.core.strategies import StrategyError, make_strategy, robust
from flctl.core.strategies.bucketing import (
    Bucketing,
    bucket_groups,
    bucket_means,
    bucket_permutation,
)
from test_robust_spooled import model, open_spools, same, spool, traced_peak, updates

# Hosts a..e (sorted: indices 0..4), as in test_strategies.five_updates.
FIVE = {"a": (1.0, 10.0), "b": (2.0, -5.0), "c": (7.0, 0.0), "d": (100.0, 1.0),
        "e": (3.0, 4.0)}
# seed 0, round 1, n 5, s 2: buckets [b, e], [d, a], [c]; their means
#   b+e = (2.5, -0.5)   d+a = (50.5, 5.5)   c = (7, 0)
FIVE_BUCKETS = ("b+e", "d+a", "c")


def run(name: str, params: dict, points: dict, round_number: int = 1,
        global_weights: np.ndarray | None = None):
    g = np.zeros(2) if global_weights is None else global_weights
    round_ = make_strategy(name, params).start_round([g], round_number)
    for host in sorted(points, reverse=True):   # arrival order does not matter
        round_.add(host, [g + np.array(points[host])], 10)
    return round_, round_.result()[0]


# ----------------------------------------------------------------- the buckets


def test_the_permutation_is_fixed_by_seed_and_round() -> None:
    """Pinned: numpy's PCG64 permutation. If a numpy release changes it, buckets of
    runs resumed across the upgrade change too: this test says so first."""
    assert bucket_groups(5, 2, seed=0, round_number=1) == [[1, 4], [3, 0], [2]]
    assert bucket_groups(5, 2, seed=0, round_number=2) == [[4, 2], [1, 0], [3]]
    assert bucket_groups(5, 2, seed=1, round_number=1) == [[1, 4], [0, 3], [2]]
    assert bucket_groups(7, 3, seed=0, round_number=1) == [[1, 3, 6], [0, 4, 2], [5]]
    assert bucket_groups(10, 2, seed=0, round_number=1) == [[9, 1], [3, 8], [7, 6], [0, 4],
                                                            [2, 5]]
    # a function of (seed, round, n) only: a resumed run draws the same buckets
    assert np.array_equal(bucket_permutation(8, 3, 17), bucket_permutation(8, 3, 17))
    assert bucket_groups(3, 5, 0, 1) == [[int(i) for i in bucket_permutation(3, 0, 1)]]


def test_bucket_means_hand_computed_with_a_short_last_bucket() -> None:
    xs = [[np.array([v, 10 * v])] for v in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    spools: list = []
    means = bucket_means(xs, bucket_groups(7, 3, 0, 1), spools)
    # [1, 3, 6] -> 10/3;  [0, 4, 2] -> 2;  [5] -> 5 (its own mean: not 5/3 as a
    # division by s would give)
    np.testing.assert_allclose([m[0] for m in means], [[10 / 3, 100 / 3], [2.0, 20.0],
                                                       [5.0, 50.0]], rtol=1e-15)
    assert spools == [] and all(m[0].dtype == np.float64 for m in means)
    # float32 in, float32 out: summed in float64, rounded once
    xs32 = [[np.array([v], np.float32)] for v in (0.1, 0.2, 0.4)]
    (mean,), = bucket_means(xs32, [[0, 1, 2]], spools)
    assert mean.dtype == np.float32
    assert mean[0] == np.float32((np.float64(np.float32(0.1)) + np.float64(np.float32(0.2))
                                  + np.float64(np.float32(0.4))) / 3)


def test_a_bucket_mean_that_overflows_float64_is_refused() -> None:
    round_ = make_strategy("fedmedian", {"bucket_size": 2}).start_round([np.zeros(1)], 3)
    for host in "abc":
        round_.add(host, [np.array([1.5e308])], 1)
    with pytest.raises(StrategyError, match=r"round 3: a bucket mean overflows \(array 0\)"):
        round_.result()


# ----------------------------------------------------------------- each rule on buckets


def test_median_of_bucket_means_hand_computed() -> None:
    round_, result = run("fedmedian", {"bucket_size": 2}, FIVE)
    # [2.5, 50.5, 7] -> 7;  [-0.5, 5.5, 0] -> 0   (without buckets: (3, 1))
    np.testing.assert_array_equal(result, [7.0, 0.0])
    assert round_.buckets == FIVE_BUCKETS
    # round 2 draws other buckets: [e, c], [b, a], [d] -> (5, 2), (1.5, 2.5), (100, 1)
    _, result = run("fedmedian", {"bucket_size": 2}, FIVE, round_number=2)
    np.testing.assert_array_equal(result, [5.0, 2.0])
    # seed 1: [b, e], [a, d], [c]: the same buckets as seed 0, round 1
    _, result = run("fedmedian", {"bucket_size": 2, "seed": 1}, FIVE)
    np.testing.assert_array_equal(result, [7.0, 0.0])


def test_median_of_an_even_count_of_buckets() -> None:
    points = {f"h{i}": (float(i), float(-i)) for i in range(8)}
    _, result = run("fedmedian", {"bucket_size": 2}, points)
    # seed 0, round 1, n 8: [1, 3], [7, 6], [0, 4], [2, 5] -> 2, 6.5, 2, 3.5
    # sorted [2, 2, 3.5, 6.5]: (2 + 3.5) / 2 = 2.75
    np.testing.assert_array_equal(result, [2.75, -2.75])


def test_trimmed_mean_of_bucket_means_hand_computed() -> None:
    # beta is a share of the 3 buckets: int(0.34 * 3) = 1 cut from each end: the median
    _, result = run("fedtrimmedavg", {"beta": 0.34, "bucket_size": 2}, FIVE)
    np.testing.assert_array_equal(result, [7.0, 0.0])
    # beta 0.2 cuts int(0.6) = 0: the plain mean of the bucket means,
    # ((2.5 + 50.5 + 7) / 3, (-0.5 + 5.5 + 0) / 3) = (20, 5/3), not the mean of the
    # updates (22.6, 2): the short bucket [c] weighs as much as a full one
    _, result = run("fedtrimmedavg", {"bucket_size": 2}, FIVE)
    np.testing.assert_allclose(result, [20.0, 5.0 / 3.0], rtol=1e-15)


def test_krum_and_multikrum_on_bucket_means_hand_computed() -> None:
    g = np.array([5.0, -3.0])
    # Squared distances between the bucket means (f = 0: n - f - 2 = 1 nearest):
    # b+e - d+a: 48^2 + 6^2 = 2340;  b+e - c: 4.5^2 + 0.5^2 = 20.5;
    # d+a - c: 43.5^2 + 5.5^2 = 1922.5.  Scores 20.5, 1922.5, 20.5: a tie, the
    # first bucket wins.
    round_, result = run("krum", {"bucket_size": 2}, FIVE, global_weights=g)
    np.testing.assert_allclose(result, g + [2.5, -0.5], rtol=1e-15)
    assert round_.scores == pytest.approx({"b+e": 20.5, "d+a": 1922.5, "c": 20.5})
    assert round_.selected == ("b+e",)
    round_, result = run("multikrum", {"bucket_size": 2, "to_keep": 2}, FIVE, global_weights=g)
    np.testing.assert_allclose(result, g + [4.75, -0.25], rtol=1e-15)  # mean of b+e and c
    assert round_.selected == ("b+e", "c")


def test_krum_counts_num_malicious_as_hostile_buckets() -> None:
    """f hostile hosts spoil at most f buckets: Krum needs buckets > 2f + 2."""
    points = {f"h{i}": (float(i),) for i in range(10)}
    points["h9"] = (1000.0,)
    g = np.zeros(1)
    # buckets [h9, h1], [h3, h8], [h7, h6], [h0, h4], [h2, h5]: 500.5, 5.5, 6.5, 2, 3.5
    # f = 1: scores sum the 2 smallest squared distances to the others:
    # 5.5: 1 + 4 = 5;  6.5: 1 + 9 = 10;  2: 2.25 + 12.25 = 14.5;  3.5: 2.25 + 4 = 6.25
    round_, result = run("krum", {"num_malicious": 1, "bucket_size": 2}, points,
                         global_weights=g)
    assert result[0] == 5.5 and round_.selected == ("h3+h8",)
    assert round_.scores["h2+h5"] == pytest.approx(6.25)
    # Multi-Krum keeps buckets - f = 4: all but the outlier's: (5.5 + 6.5 + 2 + 3.5) / 4
    round_, result = run("multikrum", {"num_malicious": 1, "bucket_size": 2}, points,
                         global_weights=g)
    assert result[0] == pytest.approx(4.375, rel=1e-15)
    assert "h9+h1" not in round_.selected and len(round_.selected) == 4
    # 8 hosts in buckets of 2 are 4 buckets: too few for f = 1
    del points["h8"], points["h9"]
    with pytest.raises(StrategyError, match=r"^round 1: krum with num_malicious=1 needs at "
                                            r"least 5 buckets \(n > 2f \+ 2\), got 4 buckets "
                                            r"\(8 updates in buckets of 2\)$"):
        run("krum", {"num_malicious": 1, "bucket_size": 2}, points, global_weights=g)


def test_one_bucket_of_everything_is_the_plain_mean() -> None:
    for name in ("fedmedian", "fedtrimmedavg", "centeredclip"):
        _, result = run(name, {"bucket_size": 5}, FIVE)
        np.testing.assert_allclose(result, [22.6, 2.0], rtol=1e-15, err_msg=name)


# ----------------------------------------------------------------- off is today's rule


@pytest.mark.parametrize(("name", "params"), [("fedmedian", {}),
                                              ("fedtrimmedavg", {"beta": 0.3}),
                                              ("krum", {"num_malicious": 1}),
                                              ("multikrum", {"num_malicious": 1})])
def test_bucket_size_1_is_todays_rule_bit_for_bit(name: str, params: dict,
                                                  tmp_path: Path) -> None:
    hosts = updates(7)
    results = []
    for extra in ({}, {"bucket_size": 1}, {"bucket_size": 1, "seed": 12345}):
        round_ = make_strategy(name, {**params, **extra}).start_round(model(), 3)
        for host in sorted(hosts):
            round_.add(host, hosts[host], 10)
        results.append(round_.result())
        assert round_.buckets == ()
    same(results[0], results[1])
    same(results[0], results[2])


# ----------------------------------------------------------------- spooled updates

BUCKETED = [("fedmedian", {"bucket_size": 2}), ("fedtrimmedavg", {"bucket_size": 3}),
            ("fedtrimmedavg", {"bucket_size": 2, "beta": 0.3}),
            ("krum", {"num_malicious": 1, "bucket_size": 2, "seed": 5}),
            ("multikrum", {"num_malicious": 1, "bucket_size": 2}),
            ("multikrum", {"bucket_size": 4, "to_keep": 2}),
            ("centeredclip", {"bucket_size": 2}),
            ("centeredclip", {"bucket_size": 3, "tau": 0.5, "iterations": 3})]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items())}"
       for name, params in BUCKETED]


def aggregate(name: str, params: dict, hosts: dict, spooled: set[str], directory: Path,
              order: list[str]) -> tuple[object, list[np.ndarray]]:
    round_ = make_strategy(name, params).start_round(model(), 3)
    for host in order:
        if host in spooled:
            handle = spool(hosts[host], directory)
            try:
                round_.add(host, handle.arrays(), 10)
            finally:
                handle.close()
        else:
            round_.add(host, hosts[host], 10)
    return round_, round_.result()


@pytest.mark.parametrize("block", [50, robust.BLOCK_ELEMENTS])
@pytest.mark.parametrize(("name", "params"), BUCKETED, ids=IDS)
def test_spooled_updates_give_the_in_memory_result_bit_for_bit(
        name: str, params: dict, block: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(robust, "BLOCK_ELEMENTS", block)   # 50: many ragged blocks
    hosts = updates(11)
    order = sorted(hosts)
    memory_round, from_memory = aggregate(name, params, hosts, set(), tmp_path, order)
    shuffled = [order[i] for i in np.random.default_rng(block).permutation(len(order))]
    disk_round, from_disk = aggregate(name, params, hosts, set(hosts), tmp_path, shuffled)
    mixed_round, mixed = aggregate(name, params, hosts, {"h0", "h3", "h4"}, tmp_path, order)
    same(from_memory, from_disk)
    same(from_memory, mixed)
    assert [a.dtype for a in from_disk] == [a.dtype for a in model()]
    assert not any(isinstance(a, FileArray) for a in from_disk)
    assert memory_round.buckets == disk_round.buckets == mixed_round.buckets
    assert len(memory_round.buckets) == -(-11 // params["bucket_size"])
    for attribute in ("scores", "selected", "radii", "scales"):
        if hasattr(memory_round, attribute):
            assert getattr(memory_round, attribute) == getattr(disk_round, attribute) \
                == getattr(mixed_round, attribute)
    assert open_spools(tmp_path) == 0 and os.listdir(tmp_path) == []


def test_bucket_means_of_spooled_updates_are_files_and_the_copies_go_first(
        tmp_path: Path) -> None:
    hosts = updates(5)
    round_ = make_strategy("fedmedian", {"bucket_size": 2}).start_round(model(), 1)
    for host in sorted(hosts):
        handle = spool(hosts[host], tmp_path)
        round_.add(host, handle.arrays(), 10)
        handle.close()
    assert open_spools(tmp_path) == 5
    seen = {}
    aggregate_of = round_.aggregate

    def spy(names, inputs):
        seen["files"] = open_spools(tmp_path)
        seen["on_disk"] = all(isinstance(a, FileArray) for update in inputs for a in update)
        return aggregate_of(names, inputs)

    round_.aggregate = spy
    round_.result()
    # while the rule ran: the 3 bucket means, on disk; the 5 copies already closed
    assert seen == {"files": 3, "on_disk": True}
    assert open_spools(tmp_path) == 0 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["fedmedian", "multikrum"])
def test_spooled_bucketed_rounds_hold_about_one_model(name: str, tmp_path: Path) -> None:
    size, count = 8 << 20, 6   # 32 MB of float32 per update
    global_weights = [np.zeros(size, np.float32)]
    params = {"bucket_size": 2}
    handles = [spool([np.random.default_rng(i).standard_normal(size, np.float32)], tmp_path)
               for i in range(count)]
    result = {}

    def from_disk() -> None:
        round_ = make_strategy(name, params).start_round(global_weights, 1)
        for i, handle in enumerate(handles):
            round_.add(f"h{i}", handle.arrays(), 10)
            handle.close()
        result["weights"] = round_.result()

    peak = traced_peak(from_disk)
    assert open_spools(tmp_path) == 0
    # the result (1x), Multi-Krum's float64 mean (2x, narrowed in place), one block
    limit = 2.5 if name == "multikrum" else 1.5
    print(f"{name}: peak {peak / (size * 4):.2f}x the model")
    assert peak < limit * size * 4, f"{peak / (size * 4):.2f}x the model"


# ----------------------------------------------------------------- params


def test_resumed_strategy_draws_the_same_buckets() -> None:
    """Stateless: a strategy built afresh (as on --resume) buckets round 7 the same."""
    hosts = updates(9)
    results = []
    for _ in range(2):
        strategy = make_strategy("fedmedian", {"bucket_size": 2, "seed": 3})
        assert strategy.state() == {}
        round_ = strategy.start_round(model(), 7)
        for host in sorted(hosts):
            round_.add(host, hosts[host], 10)
        results.append((round_.buckets, round_.result()))
    assert results[0][0] == results[1][0]
    same(results[0][1], results[1][1])


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum",
                                  "centeredclip"])
@pytest.mark.parametrize(("params", "message"), [
    ({"bucket_size": 0}, "bucket_size must be an integer >= 1, got 0"),
    ({"bucket_size": -2}, "bucket_size must be an integer >= 1, got -2"),
    ({"bucket_size": 2.0}, "bucket_size must be an integer >= 1, got 2.0"),
    ({"bucket_size": True}, "bucket_size must be an integer >= 1, got True"),
    ({"bucket_size": 2, "seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_bad_bucketing_params_are_one_clear_line(name: str, params: dict, message: str) -> None:
    with pytest.raises(StrategyError) as caught:
        make_strategy(name, params)
    text = str(caught.value)
    assert text == f"strategy {name!r}: bad params {params}: {message}"
    assert "\n" not in text


def test_bucketing_params_object() -> None:
    assert Bucketing.from_params() == Bucketing(1, 0) and not Bucketing().active
    assert Bucketing.from_params(2, 9).active
    assert make_strategy("fedmedian", {"bucket_size": 3, "seed": 4}).bucketing == Bucketing(3, 4)
