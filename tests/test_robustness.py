"""Strategies against hostile hosts, and the server optimisers, on non-IID digits.

An in-process simulation like tests/test_federated_accuracy.py: the built-in
logistic regression, flctl's default training settings, 8 hosts with
Dirichlet(0.5) label skew, a strategy built once per run as the coordinator
does. In the attack scenarios hosts 0 and 1 (chosen before looking at any
result) train honestly and then send
  scaled:   w + SCALE * (their update - w), the honest change flipped and blown up,
  boosted:  w + BOOST * (their update - w), the honest change blown up,
  gaussian: w + N(0, SIGMA^2) noise, an update that has nothing to do with their data;
reporting their true example counts. Accuracy is on the pooled held-out test set.

What the numbers show (run with -s for the table):
- FedAvg collapses under the flipped and the random updates (the boosted
  ones, pointing the honest way, cost it about 5 points).
- Multi-Krum (f = 2) stays within 5 points of clean FedAvg under all three.
- FedMedian and FedTrimmedAvg (beta 0.25 = trim as many as there are
  attackers) hold within 5 points against random and boosted updates. Against the
  flipped, scaled updates they do not collapse but lose 5-8 points: on
  label-skewed data the honest updates disagree, and two extreme values on
  one side shift every coordinate's median / trimmed mean towards them.
  (Flower's default beta 0.2 trims only 1 of 8 and collapses like FedAvg.)
- Krum keeps ONE host's model per round, which on label-skewed data is a
  model of that host's classes: about 10-20 points below FedAvg with or
  without attackers. The attack itself does not hurt it.
These are coordinate-wise / single-pick statistics meeting label skew, not
accidents of one seed: on seeds 1 and 2 FedMedian and FedTrimmedAvg lose
more (the split gives one host almost all of a class, and a median outvotes it).

FedProx and FedAdam are compared with FedAvg without attackers, averaged over
three splits because single runs differ by one or two of the 360 test digits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from flctl.core.data import Dataset, make_federated_shards
from flctl.core.simulation import accuracy_percent, simulate
from flctl.core.strategies import make_strategy

N_HOSTS = 8
ALPHA = 0.5
SEED = 0
BAD_HOSTS = (0, 1)
SCALE = -10.0
BOOST = 10.0
SIGMA = 3.0
OPTIMISER_SEEDS = (0, 1, 2)

CONTENDERS: dict[str, tuple[str, dict]] = {
    "fedavg": ("fedavg", {}),
    "krum f=2": ("krum", {"num_malicious": 2}),
    "multikrum f=2": ("multikrum", {"num_malicious": 2}),
    "fedmedian": ("fedmedian", {}),
    "fedtrimmedavg 0.25": ("fedtrimmedavg", {"beta": 0.25}),
    "fedtrimmedavg 0.2": ("fedtrimmedavg", {}),  # Flower's default, for the table
}
SCENARIOS = ("clean", "scaled", "boosted", "gaussian")
OPTIMISERS: dict[str, tuple[str, dict]] = {
    "fedavg": ("fedavg", {}),
    "fedprox mu=0.01": ("fedprox", {"proximal_mu": 0.01}),
    "fedadam": ("fedadam", {}),
}

Attack = Callable[[list[np.ndarray], list[np.ndarray], np.random.Generator], list[np.ndarray]]


def scaled(global_weights, update, rng, factor=SCALE):
    return [w + np.float32(factor) * (u - w) for w, u in zip(global_weights, update)]


def boosted(global_weights, update, rng):
    return scaled(global_weights, update, rng, BOOST)


def gaussian(global_weights, update, rng):
    return [w + rng.normal(0.0, SIGMA, w.shape).astype(np.float32) for w in global_weights]


ATTACKS: dict[str, Attack | None] = {"clean": None, "scaled": scaled, "boosted": boosted,
                                     "gaussian": gaussian}


def federated_accuracy(name: str, params: dict, shards: list[Dataset], pooled: Dataset,
                       seed: int, attack: Attack | None) -> float:
    def on_update(host, round_number, weights, update):
        if attack is None or host not in BAD_HOSTS:
            return update
        return attack(weights, update, np.random.default_rng([seed, round_number, host]))

    # one strategy per run, as the coordinator builds it: server state lives there
    weights = simulate(shards, strategy=make_strategy(name, params), seed=seed,
                       on_update=on_update)
    return accuracy_percent(weights, pooled)


@pytest.fixture(scope="module")
def attack_table() -> dict[str, dict[str, float]]:
    shards, pooled = make_federated_shards(N_HOSTS, alpha=ALPHA, seed=SEED)
    table = {label: {scenario: federated_accuracy(name, params, shards, pooled, SEED,
                                                  ATTACKS[scenario])
                     for scenario in SCENARIOS}
             for label, (name, params) in CONTENDERS.items()}
    print(f"\naccuracy % on pooled test digits, {N_HOSTS} hosts, Dirichlet {ALPHA}, seed {SEED};"
          f" hosts {BAD_HOSTS} attack (scaled {SCALE:g}x / boosted {BOOST:g}x delta,"
          f" gaussian sigma {SIGMA:g})")
    print(f"{'strategy':20}" + "".join(f"{s:>10}" for s in SCENARIOS))
    for label, row in table.items():
        print(f"{label:20}" + "".join(f"{row[s]:10.1f}" for s in SCENARIOS))
    return table


@pytest.fixture(scope="module")
def optimiser_table() -> dict[str, list[float]]:
    table: dict[str, list[float]] = {label: [] for label in OPTIMISERS}
    for seed in OPTIMISER_SEEDS:
        shards, pooled = make_federated_shards(N_HOSTS, alpha=ALPHA, seed=seed)
        for label, (name, params) in OPTIMISERS.items():
            table[label].append(federated_accuracy(name, params, shards, pooled, seed, None))
    print(f"\nno attack, accuracy % per split seed {OPTIMISER_SEEDS} and mean")
    for label, accs in table.items():
        print(f"{label:20}" + "".join(f"{a:8.1f}" for a in accs) + f"{np.mean(accs):10.2f}")
    return table


def test_fedavg_visibly_degrades_under_attack(attack_table):
    clean = attack_table["fedavg"]["clean"]
    assert clean > 93.0  # the clean baseline itself is sound
    for scenario in ("scaled", "gaussian"):
        assert attack_table["fedavg"][scenario] < clean - 10.0, scenario


def test_multikrum_stays_within_5_points_of_clean_fedavg(attack_table):
    clean = attack_table["fedavg"]["clean"]
    for scenario in ("scaled", "gaussian"):
        assert attack_table["multikrum f=2"][scenario] >= clean - 5.0, scenario


def test_median_and_trimmed_mean_hold_against_random_and_boosted_updates(attack_table):
    clean = attack_table["fedavg"]["clean"]
    for label in ("fedmedian", "fedtrimmedavg 0.25"):
        for scenario in ("gaussian", "boosted"):
            assert attack_table[label][scenario] >= clean - 5.0, (label, scenario)


def test_median_and_trimmed_mean_bend_but_do_not_break_under_scaled_updates(attack_table):
    """Biased by 5-8 points on this label skew (see the module docstring), far from FedAvg's 10%."""
    clean = attack_table["fedavg"]["clean"]
    broken = attack_table["fedavg"]["scaled"]
    for label in ("fedmedian", "fedtrimmedavg 0.25"):
        assert attack_table[label]["scaled"] >= clean - 8.0, label
        assert attack_table[label]["scaled"] >= broken + 50.0, label


def test_krum_is_not_hurt_by_the_attack(attack_table):
    krum = attack_table["krum f=2"]
    for scenario in ("scaled", "gaussian"):
        assert krum[scenario] >= krum["clean"] - 5.0, scenario
        assert krum[scenario] >= attack_table["fedavg"][scenario] + 20.0, scenario


def test_fedprox_and_fedadam_reach_fedavg_accuracy(optimiser_table):
    fedavg = float(np.mean(optimiser_table["fedavg"]))
    for label in ("fedprox mu=0.01", "fedadam"):
        assert float(np.mean(optimiser_table[label])) >= fedavg - 0.5, label
