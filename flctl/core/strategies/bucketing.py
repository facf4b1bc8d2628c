"""Bucketing (Karimireddy, He and Jaggi, ICLR 2022): robust rules meet heterogeneous data.

On label-skewed data the honest updates disagree, and a coordinate-wise
median, trimmed mean or Krum, built for updates that agree, mistakes honest
hosts with rare classes for outliers (or is dragged by hostile ones that sit
on one side of them). Bucketing shrinks that spread before the rule runs:
the round's updates are shuffled, cut into buckets of s, and the rule sees
the ceil(n / s) bucket means. Averaging s updates divides the honest spread
(variance) by about s; a hostile update still spoils its bucket, so f hostile
hosts spoil at most f buckets: the share of bad inputs grows from f / n to
at most f / ceil(n / s). Hence s = 2 is the usual choice, and bucketing
helps only while f buckets are still a minority the rule can outvote (with 2
attackers among 8 hosts in buckets of 2, they may hold 2 of 4 buckets: a
median of 4 cannot drop 2).

The algorithm (the paper's Algorithm 1), as done here:
1. the updates in host-name order (so arrival order does not matter) are
   permuted by `np.random.default_rng([seed, round]).permutation(n)`: fixed
   by the `seed` strategy parameter (default 0; strategies do not see
   training.seed) and the round number, so `--resume` and a retried round
   draw the same buckets;
2. bucket i takes the permuted updates [i*s, (i+1)*s); the last bucket has
   n mod s members when s does not divide n;
3. each bucket's mean is summed in float64 in bucket order, divided by its
   own member count (the paper divides by s, which for the paper's gradients
   only shrinks a short last bucket, but would pull a bucket of full model
   weights towards zero), and stored in the held dtype of the round's copies;
4. the robust rule runs on the bucket means as if they were hosts, named
   "a+b" after their members (Krum's scores and selection use these names).

Measured through 8 real agents on the label-skewed demo split, one host
sending its change flipped and x10 (scripts/bench_robust_skew.py, 20
rounds, clean FedAvg 94.4%): median alone 86.1-90.5% depending on which host
attacks, bucketing (s = 2) + median 86.9-92.8% over 5 bucket seeds and 3
attackers (mean 88.4-90.6% per attacker): it helps the median by 0-4 points
on average, not up to FedAvg; centered clipping does better there (92.5-93.6%).
With two attackers (local2 and local3) bucketing + median collapses for
every seed, as the arithmetic above says; Multi-Krum holds (93.6%).

Means of updates held on disk (spooled FileArrays, see robust.py) are made
one column block at a time (robust.column_blocks) and written to a spool file
per bucket beside the copies, so memory stays one block whatever n and the
model size; the values are the same as in memory, bit for bit. The round's
own copies are dropped as soon as the means exist: a round holds at most
n + ceil(n / s) model copies, briefly, then ceil(n / s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flctl.core.aggregation import UpdateArray, all_finite
from flctl.core.spooled import SpoolFile
from flctl.core.strategies.base import StrategyError, check_count
from flctl.core.strategies.robust import column_blocks, spool_directory


def bucket_permutation(n: int, seed: int, round_number: int) -> np.ndarray:
    """The order of the round's n updates (sorted by host) before they are cut into buckets."""
    return np.random.default_rng([seed, round_number]).permutation(n)


def bucket_groups(n: int, size: int, seed: int, round_number: int) -> list[list[int]]:
    """Indices (into the host-sorted updates) of each of the ceil(n / size) buckets."""
    order = [int(i) for i in bucket_permutation(n, seed, round_number)]
    return [order[start:start + size] for start in range(0, n, size)]


def mean_rows(block: np.ndarray, members: Sequence[int], out: np.ndarray) -> None:
    """out = the mean of rows `members` of a float64 (n, C) block: summed in float64
    in member order, then divided by their count (out may be any float type)."""
    total = block[members[0]].copy()
    with np.errstate(over="ignore"):   # an overflow is refused by the caller
        for member in members[1:]:
            total += block[member]
        total /= len(members)
        np.copyto(out, total, casting="unsafe")


def _bucket_directory(members: Sequence[Sequence[UpdateArray]]) -> Path | None:
    """Where a bucket's mean goes: beside the first member held on disk (None: memory)."""
    for update in members:
        directory = spool_directory(update)
        if directory is not None:
            return directory
    return None


def bucket_means(updates: Sequence[Sequence[UpdateArray]], groups: Sequence[Sequence[int]],
                 spools: list[SpoolFile], round_number: int = 0
                 ) -> list[list[UpdateArray]]:
    """The mean of each group of updates, array by array, in the updates' dtypes.

    A bucket with a member on disk gets its mean in a new spool file beside it
    (appended to `spools` as soon as it exists, so the caller closes it even
    if this fails); the others get numpy arrays. Either way every value comes
    from the same float64 column blocks, so where an update or a mean is kept
    does not change a bit.
    """
    templates = updates[0]
    dtypes = [np.dtype(a.dtype) for a in templates]
    shapes = [tuple(a.shape) for a in templates]
    files: list[SpoolFile | None] = []
    means: list[list[UpdateArray]] = []
    for group in groups:
        directory = _bucket_directory([updates[i] for i in group])
        if directory is None:
            files.append(None)
            means.append([np.empty(shape, dtype) for dtype, shape in zip(dtypes, shapes)])
            continue
        try:
            spool = SpoolFile(directory, list(zip(dtypes, shapes)))
        except OSError as exc:
            raise StrategyError(f"round {round_number}: could not hold a bucket mean on "
                                f"disk: {exc}") from exc
        spools.append(spool)
        files.append(spool)
        means.append([])
    try:
        for index, dtype in enumerate(dtypes):
            if not math.prod(shapes[index]):
                continue
            for start, stop, block in column_blocks(updates, index, np.float64):
                for group, spool, mean in zip(groups, files, means):
                    if spool is None:
                        out = mean[index].reshape(-1)[start:stop]
                    else:
                        nbytes = (stop - start) * dtype.itemsize
                        out = np.frombuffer(spool.buffer(nbytes), dtype)
                    mean_rows(block, group, out)
                    if not all_finite(out):   # two float64 values near 1e308
                        raise StrategyError(f"round {round_number}: a bucket mean overflows "
                                            f"(array {index})")
                    if spool is not None:
                        spool.write(index, start * dtype.itemsize, out.nbytes)
    except OSError as exc:
        raise StrategyError(f"round {round_number}: could not hold a bucket mean on disk: "
                            f"{exc}") from exc
    for position, spool in enumerate(files):
        if spool is not None:
            means[position] = list(spool.arrays())
    return means


def bucket_label(hosts: Sequence[str], group: Sequence[int]) -> str:
    """A bucket's name: its members' names in bucket order, joined by '+'."""
    return "+".join(hosts[i] for i in group)


@dataclass(frozen=True)
class Bucketing:
    """The `bucket_size` and `seed` strategy parameters; size 1 is off."""

    size: int = 1
    seed: int = 0

    @classmethod
    def from_params(cls, bucket_size: object = 1, seed: object = 0) -> Bucketing:
        return cls(check_count("bucket_size", bucket_size, 1), check_count("seed", seed, 0))

    @property
    def active(self) -> bool:
        return self.size > 1

    def apply(self, round_number: int, hosts: Sequence[str],
              updates: Sequence[Sequence[UpdateArray]], spools: list[SpoolFile]
              ) -> tuple[list[str], list[list[UpdateArray]]]:
        """(bucket names, bucket means) of the host-sorted updates."""
        groups = bucket_groups(len(updates), self.size, self.seed, round_number)
        means = bucket_means(updates, groups, spools, round_number)
        return [bucket_label(hosts, group) for group in groups], means

    def describe(self, n_updates: int) -> str:
        """How the rule's inputs came about, for messages: '8 updates in buckets of 2'."""
        return f"{n_updates} updates in buckets of {self.size}"
