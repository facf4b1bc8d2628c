"""FedTrimmedAvg (Yin et al., 2018): per coordinate, drop the extremes, average the rest.

With n updates, k = int(beta * n) values are cut from each end of every
coordinate (as scipy.stats.trim_mean and Flower do), and the remaining
n - 2k are averaged (unweighted). Up to k hostile hosts cannot push a
coordinate outside the honest range; set beta to at least the share of
hosts you must tolerate. Default beta 0.2 (Flower's). Note that with few
hosts k may be 0: beta 0.2 trims nothing below 5 hosts.

bucket_size s > 1 (with `seed`) trims the means of random buckets of s
updates instead (bucketing.py); beta is then a share of the ceil(n / s)
buckets, and f hostile hosts can spoil f of them: beta >= f / ceil(n / s).

Holds a copy of every update of the round (N x model of memory, or of disk
for spooled updates; see robust.py).
"""

from __future__ import annotations

import numpy as np

from flctl.core.strategies.base import StrategyError, check_number
from flctl.core.strategies.bucketing import Bucketing
from flctl.core.strategies.robust import HeldRound, RobustStrategy, merge_coordinates


class FedTrimmedAvgRound(HeldRound):
    def __init__(self, global_weights: list[np.ndarray], round_number: int,
                 beta: float, bucketing: Bucketing | None = None) -> None:
        super().__init__(global_weights, round_number, bucketing)
        self.beta = beta

    def aggregate(self, hosts: list[str], updates: list[list[np.ndarray]]) -> list[np.ndarray]:
        n = len(updates)
        cut = int(self.beta * n)
        if n - 2 * cut < 1:  # cannot happen for beta < 0.5; kept as a guard
            raise StrategyError(f"round {self.round_number}: trimming {cut} of "
                                f"{self.inputs(n)} from each end leaves none")
        def trimmed_mean(block: np.ndarray, out: np.ndarray) -> None:
            if cut:
                # numpy's SIMD sort beats a two-kth partition several times over.
                block.sort(axis=1)
            np.divide(block[:, cut:n - cut].sum(axis=1, dtype=np.float64), n - 2 * cut,
                      out=out, casting="unsafe")

        return merge_coordinates(updates, trimmed_mean)


class FedTrimmedAvg(RobustStrategy):
    name = "fedtrimmedavg"

    def __init__(self, beta: float = 0.2, bucket_size: int = 1, seed: int = 0) -> None:
        self.beta = check_number("beta", beta, 0.0, 0.5)
        self.bucketing = Bucketing.from_params(bucket_size, seed)

    def start_round(self, global_weights: list[np.ndarray],
                    round_number: int) -> FedTrimmedAvgRound:
        return FedTrimmedAvgRound(global_weights, round_number, self.beta, self.bucketing)
