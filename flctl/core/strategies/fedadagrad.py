"""FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

v = v + delta^2: the step size of each coordinate only ever shrinks, by how
much that coordinate has moved so far. The rest of the rule (m, the step,
start values) is in serveropt.AdaptiveOptStrategy.

Defaults as in Flower's FedAdagrad: eta 0.1, tau 1e-9, beta_1 0.0 (Flower
fixes it at 0, so m is this round's delta; the paper allows momentum, hence
the parameter). State: "m", "v".
"""

from __future__ import annotations

import numpy as np

from flctl.core.strategies.serveropt import AdaptiveOptStrategy


class FedAdagrad(AdaptiveOptStrategy):
    name = "fedadagrad"

    def __init__(self, eta: float = 0.1, tau: float = 1e-9, beta_1: float = 0.0) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=0.0, tau=tau)

    def second_moment(self, squared: np.ndarray, old_v: np.ndarray, new_v: np.ndarray,
                      scratch: np.ndarray) -> None:
        np.add(old_v, squared, out=new_v)
