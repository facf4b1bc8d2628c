"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

v = beta_2 * v + (1 - beta_2) * delta^2: an exponential average of the
squared pseudo-gradient. The rest of the rule (m, the step, start values)
is in serveropt.AdaptiveOptStrategy.

Defaults as in Flower's FedAdam: eta 0.1, beta_1 0.9, beta_2 0.99,
tau 1e-9. State: "m", "v".
"""

from __future__ import annotations

import numpy as np

from flctl.core.strategies.serveropt import AdaptiveOptStrategy


class FedAdam(AdaptiveOptStrategy):
    name = "fedadam"

    def __init__(self, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 1e-9) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, squared: np.ndarray, old_v: np.ndarray, new_v: np.ndarray,
                      scratch: np.ndarray) -> None:
        np.multiply(squared, 1.0 - self.beta_2, out=scratch)
        np.multiply(old_v, self.beta_2, out=new_v)
        np.add(new_v, scratch, out=new_v)
