"""Krum and Multi-Krum (Blanchard et al., 2017).

With n updates of which at most f may be hostile, each update i gets the
score  sum of ||u_i - u_j||^2  over its n - f - 2 nearest other updates.
An update far from the honest crowd scores high whatever it claims. Krum
takes the single update with the lowest score; Multi-Krum averages the m
lowest-scoring ones (plain mean, as in the paper: the example counts hosts
report are unverified, and a selected hostile host could otherwise claim a
huge one to dominate). The guarantee needs n > 2f + 2, so a round with fewer
updates is refused. Ties go to the host name that sorts first.

Distances come from the Gram matrix of the deltas u_i - w_global, summed in
float64 one column block at a time (BLAS does the N^2 x P work); deltas
rather than raw weights, so nearby updates of a large model do not lose
their distance to cancellation. Holds a copy of every update of the round
(N x model of memory, or of disk for spooled updates; see robust.py) plus
the N x N matrix; Multi-Krum's float64 mean is narrowed in place, so its
result costs 2x the model, not 3x.

Parameters: num_malicious f (default 0, as in Flower), and for Multi-Krum
to_keep m (default n - f; never more than n - f, since averaging more would
take in a hostile update for sure).

bucket_size s > 1 (with `seed`) scores the means of random buckets of s
updates instead (bucketing.py); scores and selection then name buckets
("h1+h5"). num_malicious stays the number of hostile HOSTS, and counts as
that many hostile buckets: in the worst case every hostile host lands in a
bucket of its own, so f hosts spoil f buckets (the paper's reading). The
n > 2f + 2 rule then applies to the ceil(n / s) buckets, and to_keep counts
buckets (at most buckets - f); with 8 hosts in buckets of 2 that leaves 4
buckets: not even f = 1 (which needs 5) is possible.
"""

from __future__ import annotations

import numpy as np

from flctl.core.aggregation import WeightedAccumulator, narrow_in_place
from flctl.core.strategies.base import StrategyError, check_count
from flctl.core.strategies.bucketing import Bucketing
from flctl.core.strategies.robust import HeldRound, RobustStrategy, column_blocks, in_memory


def krum_scores(distances: np.ndarray, num_malicious: int) -> np.ndarray:
    """Score of each row: the sum of its n - f - 2 smallest distances to the others."""
    n = distances.shape[0]
    nearest = n - num_malicious - 2
    others = np.where(np.eye(n, dtype=bool), np.inf, distances)
    return np.sort(others, axis=1)[:, :nearest].sum(axis=1)


class KrumRound(HeldRound):
    def __init__(self, global_weights: list[np.ndarray], round_number: int,
                 num_malicious: int, multi: bool, to_keep: int | None = None,
                 bucketing: Bucketing | None = None) -> None:
        super().__init__(global_weights, round_number, bucketing)
        self.num_malicious = num_malicious
        self.multi = multi
        self.to_keep = to_keep
        self.scores: dict[str, float] = {}
        self.selected: tuple[str, ...] = ()

    def aggregate(self, hosts: list[str], updates: list[list[np.ndarray]]) -> list[np.ndarray]:
        n, f = len(updates), self.num_malicious
        if n < 2 * f + 3:
            needed, got = "updates", f"{n}"
            if self.bucketing is not None:
                needed, got = "buckets", self.inputs(n)
            raise StrategyError(f"round {self.round_number}: krum with num_malicious={f} "
                                f"needs at least {2 * f + 3} {needed} (n > 2f + 2), got {got}")
        scores = krum_scores(self.squared_distances(updates), f)
        keep = min(self.to_keep or n - f, n - f) if self.multi else 1
        order = np.argsort(scores, kind="stable")[:keep]
        self.scores = {h: float(s) for h, s in zip(hosts, scores)}
        self.selected = tuple(hosts[i] for i in order)
        if keep == 1:   # read whole if it is on disk: its file closes after this
            return in_memory(updates[int(order[0])])
        acc = WeightedAccumulator(updates[0], np.float64)
        for i in order:
            acc.add(updates[int(i)], 1.0)
        # What result() would cast to, without a second model-sized buffer.
        return [narrow_in_place(mean, dtype) for mean, dtype in zip(acc.take_mean(),
                                                                     self._dtypes)]

    def squared_distances(self, updates: list[list[np.ndarray]]) -> np.ndarray:
        n = len(updates)
        gram = np.zeros((n, n))
        for index, reference in enumerate(self.global_weights):
            if not updates[0][index].size:
                continue
            ref = np.ascontiguousarray(reference).reshape(-1)
            for start, stop, block in column_blocks(updates, index, np.float64):
                block -= ref[start:stop]
                gram += block @ block.T
        norms = np.diag(gram)
        return np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)


class Krum(RobustStrategy):
    """Krum: the one update closest to its n - f - 2 nearest others."""

    name = "krum"

    def __init__(self, num_malicious: int = 0, bucket_size: int = 1, seed: int = 0) -> None:
        self.num_malicious = check_count("num_malicious", num_malicious, 0)
        self.bucketing = Bucketing.from_params(bucket_size, seed)

    def start_round(self, global_weights: list[np.ndarray], round_number: int) -> KrumRound:
        return KrumRound(global_weights, round_number, self.num_malicious, multi=False,
                         bucketing=self.bucketing)


class MultiKrum(RobustStrategy):
    """Multi-Krum: the plain mean of the to_keep best-scoring updates."""

    name = "multikrum"

    def __init__(self, num_malicious: int = 0, to_keep: int | None = None,
                 bucket_size: int = 1, seed: int = 0) -> None:
        self.num_malicious = check_count("num_malicious", num_malicious, 0)
        self.to_keep = None if to_keep is None else check_count("to_keep", to_keep, 1)
        self.bucketing = Bucketing.from_params(bucket_size, seed)

    def start_round(self, global_weights: list[np.ndarray], round_number: int) -> KrumRound:
        return KrumRound(global_weights, round_number, self.num_malicious, multi=True,
                         to_keep=self.to_keep, bucketing=self.bucketing)
