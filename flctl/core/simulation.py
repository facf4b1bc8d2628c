"""Federated training as a plain Python loop: no agents, no network.

The same task, strategy and fit settings the coordinator and agents use,
with hosts as list entries. Tests and benchmark scripts use it to measure
what an algorithm does to accuracy (attacks, privacy noise, compression)
without paying for processes and sockets; the real-agent tests then check
that the coordinator does the same thing end to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np

from flctl.core.data import Dataset
from flctl.core.settings import TrainingSettings
from flctl.core.strategies import Strategy, make_strategy
from flctl.core.tasks import LogRegTask, Task

# (host index, round, global weights, the host's trained weights) -> what the
# host sends. Attacks, compression and local noise are all this shape.
UpdateHook = Callable[[int, int, list[np.ndarray], list[np.ndarray]], list[np.ndarray]]


def host_fit_config(training: TrainingSettings, seed: int, host: int, round_number: int,
                    strategy: Strategy) -> dict:
    """What the coordinator would send host `host` in round `round_number`."""
    return {"epochs": training.epochs, "batch_size": training.batch_size, "lr": training.lr,
            "lr_bound": training.lr_bound, "seed": seed * 1000 + host, "round": round_number,
            **strategy.fit_config_extra()}


def simulate(shards: Sequence[Dataset], *, training: TrainingSettings | None = None,
             strategy: Strategy | None = None, task: Task | None = None, seed: int = 0,
             rounds: int | None = None, on_update: UpdateHook | None = None,
             ) -> list[np.ndarray]:
    """Run `rounds` federated rounds over every shard; return the final weights."""
    training = training or TrainingSettings()
    task = task or LogRegTask()
    strategy = strategy or make_strategy(training.strategy, dict(training.strategy_params))
    weights = [np.asarray(w) for w in task.init(seed)]
    for round_number in range(1, (rounds or training.rounds) + 1):
        aggregator = strategy.start_round(weights, round_number)
        for host, shard in enumerate(shards):
            config = host_fit_config(training, seed, host, round_number, strategy)
            update, n_examples, _ = task.fit(weights, shard, config)
            if on_update is not None:
                update = on_update(host, round_number, weights, update)
            aggregator.add(f"host{host}", update, n_examples)
        weights = aggregator.result()
    return weights


def accuracy_percent(weights: list[np.ndarray], data: Dataset, task: Task | None = None) -> float:
    """Accuracy on `data`'s test part, in percent."""
    task = task or LogRegTask()
    return float(task.evaluate(weights, data, {})[2]["accuracy"]) * 100.0
