"""FedProx (Li et al., 2020): FedAvg aggregation, proximal term in local training.

Each host minimises its loss plus mu/2 * ||w - w_global||^2, which keeps
local models on skewed data from drifting far from the global one. The
server side is plain FedAvg; the strategy's part is to tell the hosts mu:
the coordinator merges `fit_config_extra()` ({"proximal_mu": mu}) into every
fit config, and the built-in tasks' trainer adds mu * (w - w_global) to each
gradient (flctl.core.tasks). A user's own task must read "proximal_mu" from
its fit config to take part; one that ignores it trains as under FedAvg.

Default mu 0.01 (Flower requires it to be given; Li et al. tune it in
{0.001, 0.01, 0.1, 0.5, 1}). mu = 0 is FedAvg.
"""

from __future__ import annotations

from typing import Any

from flctl.core.strategies.base import check_number
from flctl.core.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, proximal_mu: float = 0.01, reject_non_finite: bool = True) -> None:
        super().__init__(reject_non_finite=reject_non_finite)
        self.proximal_mu = check_number("proximal_mu", proximal_mu, 0.0, float("inf"))

    def fit_config_extra(self) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
