"""Robust strategies end to end: 8 real local agents, 2 of them hostile.

tests/test_robustness.py measures the strategies in an in-process simulation
(the full table); this runs the same attack through the real path: agent
processes, mutual TLS, the coordinator's streaming round loop, checkpoints.
The two hostile agents run a test-only task that trains honestly and then
sends its change flipped and scaled by -10, with its true example count.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import deployed_local_workspace, run_cli, set_training

HOSTS = 8
ROUNDS = 20
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
        bad = [sizes["local2"], sizes["local3"]]
        assert list(sizes.values()).count(bad[0]) == list(sizes.values()).count(bad[1]) == 1
        yield root, bad


def train(root: Path, strategy: str, params: dict, bad: list[int], norm_bound: float) -> float:
    set_training(root, task_params={"bad_sizes": bad}, strategy_params=params,
                 max_update_norm=norm_bound)
    result = run_cli("train", "-w", str(root), "--strategy", strategy, "--rounds", str(ROUNDS),
                     "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    history = result.json()["history"]
    for record in history:
        refused = sorted(record["dropped"])
        assert refused == ([] if not norm_bound or not bad else ["local2", "local3"])
        assert all(r.startswith("update rejected") for r in record["dropped"].values())
        assert len(record["participants"]) == HOSTS - len(refused)
    return history[-1]["accuracy"] * 100


@pytest.fixture(scope="module")
def table(workspace) -> dict[str, float]:
    root, bad = workspace
    runs = {
        "fedavg clean": ("fedavg", {}, [], 0.0),
        "fedavg": ("fedavg", {}, bad, 0.0),
        "multikrum": ("multikrum", {"num_malicious": 2}, bad, 0.0),
        "fedmedian": ("fedmedian", {}, bad, 0.0),
        "fedtrimmedavg": ("fedtrimmedavg", {"beta": 0.25}, bad, 0.0),
        # honest updates move the model by 0.8-4.9 (L2) per round on this split,
        # the flipped x10 ones by 8-49: the norm bound refuses them outright
        "fedmedian bound 8": ("fedmedian", {}, bad, 8.0),
        "fedavg bound 8": ("fedavg", {}, bad, 8.0),
    }
    out = {label: train(root, name, params, hosts, bound)
           for label, (name, params, hosts, bound) in runs.items()}
    print("\nreal agents, 2 of 8 send -10x updates, accuracy % after", ROUNDS, "rounds:")
    for label, acc in out.items():
        print(f"  {label:16} {acc:6.1f}")
    return out


def test_fedavg_breaks_under_the_attack(table) -> None:
    assert table["fedavg clean"] > 90.0
    assert table["fedavg"] < table["fedavg clean"] - 30.0


def test_multikrum_holds_within_5_points_through_real_agents(table) -> None:
    assert table["multikrum"] >= table["fedavg clean"] - 5.0


def test_median_and_trimmed_mean_do_not_collapse_but_are_biased(table) -> None:
    """The measured shortfall (about 13-15 points with these two attackers; see
    test_robustness for why label skew biases coordinate-wise statistics)."""
    for label in ("fedmedian", "fedtrimmedavg"):
        assert table[label] >= table["fedavg"] + 60.0, label
        assert table[label] >= table["fedavg clean"] - 20.0, label


def test_the_update_norm_bound_refuses_the_scaled_updates(table) -> None:
    for label in ("fedmedian bound 8", "fedavg bound 8"):
        assert table[label] >= table["fedavg clean"] - 5.0, label
