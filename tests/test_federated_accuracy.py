"""FedAvg on non-IID digits must come close to training on the pooled data.

An in-process simulation (no network): the same task, strategy and default
settings the coordinator and agents use, with hosts as a Python loop. The
central baseline trains the same model on the pooled training set to
convergence (CENTRAL_EPOCHS passes, same lr and batch size), which is the
stricter comparison. tests/test_demo.py repeats the check end to end with
real agents.
"""

from __future__ import annotations

import numpy as np
import pytest

from flctl.core.data import Dataset, make_federated_shards
from flctl.core.settings import TrainingSettings
from flctl.core.simulation import simulate
from flctl.core.tasks import LogRegTask, MLPTask

DEFAULTS = TrainingSettings()  # what flctl.yaml, the demo and the agents use
CENTRAL_EPOCHS = 200  # the central baseline trains to convergence

N_HOSTS = 4
ALPHA = 0.5
MAX_GAP_POINTS = 3.0


def fit_config(seed: int, round_number: int) -> dict:
    return {"epochs": DEFAULTS.epochs, "batch_size": DEFAULTS.batch_size,
            "lr": DEFAULTS.lr, "seed": seed, "round": round_number}


def federated(task, shards: list[Dataset], seed: int) -> list[np.ndarray]:
    def check_finite(host, round_number, weights, update):
        assert all(np.isfinite(w).all() for w in update)
        return update

    return simulate(shards, training=DEFAULTS, task=task, seed=seed, on_update=check_finite)


def central(task, pooled: Dataset, seed: int) -> list[np.ndarray]:
    config = fit_config(seed, 0)
    config["epochs"] = CENTRAL_EPOCHS
    weights, _, _ = task.fit(task.init(seed), Dataset(pooled.x_train, pooled.y_train), config)
    return weights


def accuracy(task, weights, data: Dataset) -> float:
    return task.evaluate(weights, data, {})[2]["accuracy"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedavg_logreg_matches_central(seed):
    shards, pooled = make_federated_shards(N_HOSTS, alpha=ALPHA, seed=seed)
    task = LogRegTask()
    fed_weights = federated(task, shards, seed)
    fed = accuracy(task, fed_weights, pooled)
    base = accuracy(task, central(task, pooled, seed), pooled)
    print(f"seed {seed}: federated {fed:.4f}, central {base:.4f}")
    assert base > 0.93  # the baseline itself is sound
    assert fed >= base - MAX_GAP_POINTS / 100

    # Federated evaluation: every host scores the model on its own test data, and
    # those local results, weighted by examples, add up to the pooled score.
    local = [task.evaluate(fed_weights, shard, {}) for shard in shards]
    assert sum(n for _, n, _ in local) == pooled.n_test
    weighted = sum(m["accuracy"] * n for _, n, m in local) / pooled.n_test
    assert weighted == pytest.approx(fed, abs=1e-9)


def test_fedavg_mlp_reaches_sensible_accuracy():
    shards, pooled = make_federated_shards(N_HOSTS, alpha=ALPHA, seed=0)
    task = MLPTask()
    fed = accuracy(task, federated(task, shards, 0), pooled)
    base = accuracy(task, central(task, pooled, 0), pooled)
    print(f"mlp: federated {fed:.4f}, central {base:.4f}")
    assert fed > 0.94
    assert fed >= base - MAX_GAP_POINTS / 100


def test_label_skew_makes_local_training_alone_worse():
    """Sanity check that the split is hard: one host's data alone falls well short."""
    shards, pooled = make_federated_shards(N_HOSTS, alpha=ALPHA, seed=0)
    task = LogRegTask()
    config = fit_config(0, 0)
    config["epochs"] = CENTRAL_EPOCHS
    alone = [accuracy(task, task.fit(task.init(0), shard, config)[0], pooled)
             for shard in shards]
    assert max(alone) < 0.85
