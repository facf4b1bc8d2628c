"""FedAvgM (Hsu et al., 2019): FedAvg with server momentum.

With delta = avg - w the change the hosts' average proposes, the server keeps
a velocity v = momentum * v + delta and moves w = w + server_lr * v. This is
Flower's FedAvgM written with the opposite sign convention (Flower's
pseudo-gradient is w - avg); the first round gives v = delta, as in Flower.
momentum = 0 and server_lr = 1 is plain FedAvg.

Defaults: server_lr 1.0 and momentum 0.9 (Hsu et al.'s usual beta; Flower's
default momentum 0.0 would make the strategy FedAvg). State: "momentum", one
model-sized array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from flctl.core.strategies.base import check_number
from flctl.core.strategies.serveropt import ServerOptStrategy


class FedAvgM(ServerOptStrategy):
    name = "fedavgm"
    STATE_KEYS = ("momentum",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr = check_number("server_lr", server_lr, 0.0, float("inf"), low_open=True)
        self.momentum = check_number("momentum", momentum, 0.0, 1.0)

    def step(self, delta: np.ndarray, weights: np.ndarray, old: Mapping[str, np.ndarray],
             new: Mapping[str, np.ndarray], new_weights: np.ndarray,
             scratch: Sequence[np.ndarray]) -> None:
        v = new["momentum"]
        np.multiply(old["momentum"], self.momentum, out=v)
        np.add(v, delta, out=v)
        np.multiply(v, self.server_lr, out=scratch[0])
        np.add(weights, scratch[0], out=new_weights)
