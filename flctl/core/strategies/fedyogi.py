"""FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

v = v - (1 - beta_2) * delta^2 * sign(v - delta^2): unlike Adam, v moves
towards delta^2 by an additive amount, so one sudden large delta cannot
make v (and so the step size) jump. v stays positive: a step moves it
towards delta^2 by at most (1 - beta_2) * delta^2. The rest of the rule is
in serveropt.AdaptiveOptStrategy.

Defaults as in Flower's FedYogi: eta 0.01, beta_1 0.9, beta_2 0.99,
tau 1e-3. State: "m", "v".
"""

from __future__ import annotations

import numpy as np

from flctl.core.strategies.serveropt import AdaptiveOptStrategy


class FedYogi(AdaptiveOptStrategy):
    name = "fedyogi"

    def __init__(self, eta: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, squared: np.ndarray, old_v: np.ndarray, new_v: np.ndarray,
                      scratch: np.ndarray) -> None:
        np.subtract(old_v, squared, out=scratch)
        np.sign(scratch, out=scratch)
        np.multiply(scratch, squared, out=scratch)
        np.multiply(scratch, 1.0 - self.beta_2, out=scratch)
        np.subtract(old_v, scratch, out=new_v)
