"""Robust strategies end to end: 8 real local agents, 1 or 2 of them hostile.

tests/test_robustness.py measures the strategies in an in-process simulation
(the full table); this runs the same attack through the real path: agent
processes, mutual TLS, the coordinator's streaming round loop, checkpoints.
The hostile agents (local2, and local3 when there are two) run a test-only
task that trains honestly and then sends its change flipped and scaled by
-10, with its true example count.

FedAvg breaks under one attacker already (the coordinator stops the run as
diverging). With one attacker centered clipping stays within 3 points of
clean FedAvg; bucketing (s = 2) + median does here (bucket seed 0) but not
for every draw of the buckets: scripts/bench_robust_skew.py measures 5 bucket
seeds and 3 attackers, 1.6 to 7.5 points below clean FedAvg, so the test
asserts 6. With two, centered clipping bends (each attacker, clipped to the
radius, still pulls as hard as an honest host, the wrong way) and
bucketing + median collapses like FedAvg: two attackers in different
buckets of two hold 2 of the 4 bucket means, and a median of 4 cannot drop
2 (they share a bucket in 1 round of 7). Multi-Krum, which drops them
outright, is the one to use there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import deployed_local_workspace, run_cli, set_training

HOSTS = 8
ROUNDS = 20
HOSTILE = ["local2", "local3"]   # the first one alone in the 1-of-8 runs
HOSTILE_TASK = '''
import numpy as np
from flctl.core.tasks import LogRegTask


class Hostile(LogRegTask):
    """Hosts whose training set has one of `bad_sizes` examples send
    w + scale * (their update - w) (test-only)."""

    def __init__(self, bad_sizes=(), scale=-10.0, **params):
        super().__init__(**params)
        self.bad_sizes = set(bad_sizes)
        self.scale = np.float32(scale)

    def fit(self, weights, data, config):
        update, n, metrics = super().fit(weights, data, config)
        if len(data.x_train) in self.bad_sizes:
            update = [w + self.scale * (u - w) for w, u in zip(weights, update)]
        return update, n, metrics
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    def ship_task(root: Path) -> None:
        # the task is fixed at deploy; which hosts misbehave is a parameter
        (root / "tasks" / "hostile.py").write_text(HOSTILE_TASK)
        set_training(root, task="hostile:Hostile")

    for root in deployed_local_workspace(tmp_path_factory.mktemp("hostile"), HOSTS, ship_task):
        status = run_cli("status", "-w", str(root), "--json").json()
        sizes = {row["host"]: row["n_train"] for row in status["hosts"]}
        # hosts chosen by name before any result is seen; the task knows them by size
        bad = [sizes[host] for host in HOSTILE]
        assert list(sizes.values()).count(bad[0]) == list(sizes.values()).count(bad[1]) == 1
        yield root, bad


@dataclass(frozen=True)
class Run:
    accuracy: float          # % after the last round run
    rounds: int              # ROUNDS, or fewer when the coordinator stopped the run
    diverged: bool = False   # stopped by the coordinator as diverging (a broken model)


def train(root: Path, run_id: str, strategy: str, params: dict, bad: list[int],
          norm_bound: float) -> Run:
    set_training(root, task_params={"bad_sizes": bad}, strategy_params=params,
                 max_update_norm=norm_bound)
    result = run_cli("train", "-w", str(root), "--strategy", strategy, "--rounds", str(ROUNDS),
                     "--run-id", run_id, "--json", timeout=300)
    diverged = result.returncode != 0 and "the run is diverging" in result.stderr
    assert result.returncode == 0 or diverged, result.stderr
    if diverged:   # the rounds before the stop, as `flctl runs show` has them
        history = run_cli("runs", "show", run_id, "-w", str(root), "--json").json()["history"]
    else:
        history = result.json()["history"]
    for record in history:
        refused = sorted(record["dropped"])
        assert refused == ([] if not norm_bound else HOSTILE[:len(bad)])
        assert all(r.startswith("update rejected") for r in record["dropped"].values())
        assert len(record["participants"]) == HOSTS - len(refused)
    return Run(history[-1]["accuracy"] * 100, history[-1]["round"], diverged)


@pytest.fixture(scope="module")
def runs(workspace) -> dict[str, Run]:
    root, bad = workspace
    plan = {
        "fedavg clean": ("fedavg", {}, [], 0.0),
        "fedavg": ("fedavg", {}, bad, 0.0),
        "multikrum": ("multikrum", {"num_malicious": 2}, bad, 0.0),
        "fedmedian": ("fedmedian", {}, bad, 0.0),
        "fedtrimmedavg": ("fedtrimmedavg", {"beta": 0.25}, bad, 0.0),
        # honest updates move the model by 0.8-4.9 (L2) per round on this split,
        # the flipped x10 ones by 8-49: the norm bound refuses them outright
        "fedmedian bound 8": ("fedmedian", {}, bad, 8.0),
        "fedavg bound 8": ("fedavg", {}, bad, 8.0),
        "median bucket 2": ("fedmedian", {"bucket_size": 2}, bad, 0.0),
        "centeredclip": ("centeredclip", {}, bad, 0.0),
        # one attacker, local2
        "fedavg 1/8": ("fedavg", {}, bad[:1], 0.0),
        "fedmedian 1/8": ("fedmedian", {}, bad[:1], 0.0),
        "median bucket 2 1/8": ("fedmedian", {"bucket_size": 2}, bad[:1], 0.0),
        "centeredclip 1/8": ("centeredclip", {}, bad[:1], 0.0),
    }
    out = {label: train(root, f"run{index:02d}", name, params, hosts, bound)
           for index, (label, (name, params, hosts, bound)) in enumerate(plan.items())}
    print("\nreal agents, 2 of 8 (1 of 8: '1/8') send -10x updates, accuracy % after",
          ROUNDS, "rounds:")
    for label, run in out.items():
        stop = f"  stopped as diverging after round {run.rounds}" if run.diverged else ""
        print(f"  {label:20} {run.accuracy:6.1f}{stop}")
    return out


@pytest.fixture(scope="module")
def table(runs) -> dict[str, float]:
    """Accuracy % of each run that trained every round (a diverged one: absent)."""
    return {label: run.accuracy for label, run in runs.items() if not run.diverged}


def broken(runs: dict[str, Run], label: str, clean: float) -> bool:
    """Stopped as diverging, or 30 points below clean FedAvg at the end."""
    return runs[label].diverged or runs[label].accuracy < clean - 30.0


def test_fedavg_breaks_under_the_attack(runs, table) -> None:
    assert table["fedavg clean"] > 90.0
    assert broken(runs, "fedavg", table["fedavg clean"])


def test_multikrum_holds_within_5_points_through_real_agents(table) -> None:
    assert table["multikrum"] >= table["fedavg clean"] - 5.0


def test_median_and_trimmed_mean_do_not_collapse_but_are_biased(table) -> None:
    """The measured shortfall (about 13-15 points with these two attackers; see
    test_robustness for why label skew biases coordinate-wise statistics)."""
    for label in ("fedmedian", "fedtrimmedavg"):
        assert table[label] >= table["fedavg clean"] - 20.0, label


def test_the_update_norm_bound_refuses_the_scaled_updates(table) -> None:
    for label in ("fedmedian bound 8", "fedavg bound 8"):
        assert table[label] >= table["fedavg clean"] - 5.0, label


def test_one_attacker_centered_clipping_holds_within_3_points(runs, table) -> None:
    assert broken(runs, "fedavg 1/8", table["fedavg clean"])   # one is enough for FedAvg
    assert table["centeredclip 1/8"] >= table["fedavg clean"] - 3.0


def test_one_attacker_bucketing_helps_the_median_within_6_points(table) -> None:
    """Within 3 points here (bucket seed 0: 92.8 against 94.4), but that is one draw
    of the buckets: seeds 1-4 give 89.4-90.3, and other lone attackers lose more
    (local8: 86.9-90.8; scripts/bench_robust_skew.py). Asserted: what holds for
    local2 on every draw (the plain median: 90.5)."""
    assert table["median bucket 2 1/8"] >= table["fedavg clean"] - 6.0
    assert table["median bucket 2 1/8"] >= table["fedmedian 1/8"] - 2.0


def test_two_attackers_centered_clipping_bends_bucketing_breaks(runs, table) -> None:
    """Beside Multi-Krum (within 5 points, above): the measured limits of the two."""
    assert table["centeredclip"] >= table["fedavg clean"] - 12.0
    assert table["centeredclip"] >= table["fedmedian"]
    assert broken(runs, "median bucket 2", table["fedavg clean"])
