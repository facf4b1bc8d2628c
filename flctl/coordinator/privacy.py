"""The run's privacy budget: which strategy DP needs, and what each round costs.

Central DP wraps the configured strategy in CentralDP (clip every update,
noise the aggregate) and is accounted as the sampled Gaussian mechanism at
q = hosts asked per round / hosts in the run (fixed-size sampling counted as
Poisson sampling at that rate, the usual approximation). Local DP counts
every round at q = 1 with sensitivity 2C: an upper bound for every host,
whichever rounds it took part in. The accountant is rebuilt from the round
count on resume, so a resumed run reports the same epsilon.
"""

from __future__ import annotations

import math

from flctl.core.privacy import CentralDP, RdpAccountant, local_accounting
from flctl.core.settings import TrainingSettings
from flctl.core.strategies import Strategy


def hosts_per_round(training: TrainingSettings, hosts: int) -> int:
    """How many hosts a round asks: the fraction, at least min_hosts, at most all."""
    return min(hosts, max(training.min_hosts, math.ceil(training.fraction * hosts)))


class PrivacyLedger:
    def __init__(self, training: TrainingSettings, hosts: int) -> None:
        self.training = training
        self.mode = training.privacy
        self.expected = hosts_per_round(training, hosts)
        if self.mode == "central":
            self.step = (self.expected / hosts, training.noise_multiplier)
        elif self.mode == "local":
            self.step = local_accounting(training.noise_multiplier)
        else:
            self.step = (0.0, 0.0)
        self.accountant = RdpAccountant() if self.enabled else None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def wrap(self, strategy: Strategy) -> Strategy:
        """The strategy the run aggregates with (CentralDP around it for central DP)."""
        if self.mode != "central":
            return strategy
        return CentralDP(strategy, self.training.clip_norm, self.training.noise_multiplier,
                         self.expected)

    def resume_after(self, rounds: int) -> None:
        if self.enabled:
            self.accountant = RdpAccountant.after_rounds(*self.step, rounds)

    def next_round_exceeds_target(self) -> bool:
        target = self.training.target_epsilon
        if self.accountant is None or target <= 0:
            return False
        return self.accountant.would_exceed(target, self.training.dp_delta, *self.step)

    def spend_round(self) -> float | None:
        """Account one accepted round; the epsilon so far (None: no DP or no bound)."""
        if self.accountant is None:
            return None
        self.accountant.compose(*self.step)
        return self.epsilon()

    def epsilon(self) -> float | None:
        if self.accountant is None or self.accountant.steps == 0:
            return None
        epsilon = self.accountant.epsilon(self.training.dp_delta)
        return epsilon if math.isfinite(epsilon) else None
