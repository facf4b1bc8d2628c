"""A diverging run stops with its fix instead of ending with a poor model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from flctl.core.divergence import RISING_EVALUATIONS, divergence
from flctl.core.settings import TrainingSettings
from flctl.errors import TrainingError
from test_coordinator import Federation

RISING_TASK = '''
import numpy as np

class Rising:
    """Trains to nothing; its evaluation loss doubles every round."""
    def __init__(self, **params):
        pass
    def init(self, seed):
        return [np.zeros(3, np.float32)]
    def fit(self, weights, data, config):
        return [weights[0] + 1], len(data.x_train), {"train_loss": 1.0}
    def evaluate(self, weights, data, config):
        return 2.0 ** config["round"], len(data.x_train), {"accuracy": 0.5}
'''


def test_a_steady_rise_far_above_the_best_is_divergence() -> None:
    rising = [(r, 2.0 ** r) for r in range(1, 6)]
    assert divergence(rising[:RISING_EVALUATIONS]) is None          # too early to say
    assert "rose at each of the last 3 evaluations" in divergence(rising[:4])
    assert "is nan after round 2" in divergence([(1, 1.0), (2, math.nan)])
    assert "is inf" in divergence([(1, math.inf)])


def test_noise_and_small_rises_are_not_divergence() -> None:
    noisy = [(1, 1.0), (2, 0.8), (3, 0.85), (4, 0.7), (5, 0.75), (6, 0.72)]
    assert divergence(noisy) is None
    slow = [(1, 1.0), (2, 1.05), (3, 1.1), (4, 1.2)]    # rising, but not 1.5x the best
    assert divergence(slow) is None
    recovered = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 2.5)]
    assert divergence(recovered) is None


def test_a_diverging_run_stops_and_says_what_to_do(tmp_path: Path) -> None:
    fed = Federation(tmp_path, [10, 30], task="rising:Rising", tasks={"rising": RISING_TASK})
    try:
        with pytest.raises(TrainingError) as caught:
            fed.coordinator(TrainingSettings(task="rising:Rising", rounds=20, lr=0.5)).train()
    finally:
        fed.close()
    line = str(caught.value)
    assert "the run is diverging" in line and "after round 4" in line
    assert "Lower training.lr (now 0.5, try 0.05)" in line and "\n" not in line
    runs = list((tmp_path / "runs").iterdir())
    assert (runs[0] / "state.json").exists()          # the checkpoints stay
