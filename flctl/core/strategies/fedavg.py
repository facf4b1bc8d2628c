"""FedAvg (McMahan et al., 2017): the new model is the example-weighted mean of the updates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flctl.core.aggregation import (
    WeightedAccumulator,
    accumulation_dtype,
    all_finite,
    narrow_in_place,
)
from flctl.core.dtypes import float_max, is_float
from flctl.core.spooled import FileArray
from flctl.core.strategies.base import StatelessStrategy, StrategyError, check_num_examples


class FedAvgRound:
    """One round's running average; keeps shapes and sums, never the updates themselves."""

    def __init__(self, global_weights: Sequence[np.ndarray], round_number: int,
                 reject_non_finite: bool) -> None:
        self.round_number = round_number
        self._dtypes = [np.asarray(w).dtype for w in global_weights]
        self._reject_non_finite = reject_non_finite
        self._acc = WeightedAccumulator(global_weights, accumulation_dtype(global_weights),
                                        require_finite=reject_non_finite)
        self._global = global_weights   # read-only: what a site's change is from
        self._hosts: set[str] = set()
        self._result: list[np.ndarray] | None = None

    @property
    def count(self) -> int:
        """Hosts whose updates are in (a site's partial counts each of its members)."""
        return len(self._hosts)

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(self._hosts)

    def add(self, host: str, weights: list[np.ndarray], num_examples: int) -> None:
        """Fold in one host's update; a refused update leaves the round unchanged."""
        if self._result is not None:
            raise StrategyError(f"round {self.round_number}: update from {host} after result()")
        if host in self._hosts:
            raise StrategyError(f"round {self.round_number}: second update from {host}")
        check_num_examples(self.round_number, host, num_examples)
        if self._reject_non_finite:
            self._check_fits_model(host, weights)
        try:
            self._acc.add(weights, float(num_examples))
        except ValueError as exc:
            raise StrategyError(f"round {self.round_number}: update from {host}: {exc}") \
                from None
        self._hosts.add(host)

    def add_site(self, site: str, members: Sequence[str], delta: list[np.ndarray],
                 num_examples: int, sampled: int) -> None:
        """Fold in a site's example-weighted mean of its `members`' updates, sent
        as its change from the model (`result_delta`), with weight num_examples
        (their total): the sum adding each update makes, up to float rounding
        (flctl.core.sitefold). `sampled` is the DP wrapper's business, not ours."""
        where = f"site {site}"
        if self._result is not None:
            raise StrategyError(f"round {self.round_number}: update from {where} after result()")
        again = sorted(set(members) & self._hosts)
        if again or not members or len(set(members)) != len(members):
            raise StrategyError(f"round {self.round_number}: {where}: its members "
                                f"{', '.join(again) or '(none, or repeated)'} already counted")
        check_num_examples(self.round_number, where, num_examples)
        if self._reject_non_finite:
            self._check_fits_model(where, delta)
        try:
            self._acc.add_delta(self._global, delta, float(num_examples))
        except ValueError as exc:
            raise StrategyError(f"round {self.round_number}: update from {where}: {exc}") \
                from None
        self._hosts.update(members)

    def result(self) -> list[np.ndarray]:
        """The new global weights, in the global model's dtypes. Idempotent."""
        if self._result is None:
            if self._acc.count == 0:
                raise StrategyError(f"round {self.round_number}: no updates to aggregate")
            if self._acc.total_weight == 0:
                raise StrategyError(f"round {self.round_number}: every update reported "
                                    f"0 training examples")
            mean = self._acc.take_mean()
            with np.errstate(over="ignore", invalid="ignore"):
                result = [narrow_in_place(m, dtype) for m, dtype in zip(mean, self._dtypes)]
            del mean  # the float64 sum: free it before the check allocates its chunk
            # Finite updates can still overflow a float64 model's sum; one cheap pass per round.
            if self._reject_non_finite and not all(all_finite(r) for r in result):
                raise StrategyError(f"round {self.round_number}: the aggregate overflowed "
                                    f"(non-finite values)")
            self._result = result
        return self._result

    def result_delta(self) -> list[np.ndarray]:
        """A site's reply: the mean minus the model, taken in float64 and only then
        rounded to the model's dtypes (ends the round; result() is not called)."""
        if self._result is not None or self._acc.count == 0 or self._acc.total_weight == 0:
            raise StrategyError(f"round {self.round_number}: no updates to aggregate")
        mean = self._acc.take_mean()
        with np.errstate(over="ignore", invalid="ignore"):
            for m, g in zip(mean, self._global):
                np.subtract(m, g, out=m)
            delta = [narrow_in_place(m, dtype) for m, dtype in zip(mean, self._dtypes)]
        if self._reject_non_finite and not all(all_finite(d) for d in delta):
            raise StrategyError(f"round {self.round_number}: the site's mean overflowed")
        self._result = delta
        return delta

    def _check_fits_model(self, host: str, weights: Sequence[np.ndarray]) -> None:
        """Refuse values a wider float carries beyond the model's float range.

        The float64 sum would hold them, and the round would fail only when
        the mean is cast back, for every host. The wire sends the model's own
        dtype, so this costs nothing there.
        """
        for i, (x, dtype) in enumerate(zip(weights, self._dtypes)):
            if isinstance(x, FileArray):
                continue   # spooled in the dtype the round expected (replies.expect_weights)
            x = np.asarray(x)
            if (is_float(dtype) and is_float(x.dtype)
                    and x.dtype.itemsize > dtype.itemsize and x.size
                    and not np.abs(x).max() <= float_max(dtype)):
                raise StrategyError(f"round {self.round_number}: update from {host}: array "
                                    f"{i}: contains NaN or infinite values as {dtype}")


class FedAvg(StatelessStrategy):
    """Federated averaging weighted by each host's number of training examples.

    Stateless: `state()` is {} and each round starts from the global weights alone.
    """

    name = "fedavg"

    def __init__(self, reject_non_finite: bool = True) -> None:
        # A single NaN from one host would poison the global model for everyone;
        # checking costs one extra read of each update.
        self.reject_non_finite = bool(reject_non_finite)

    def start_round(self, global_weights: list[np.ndarray], round_number: int) -> FedAvgRound:
        return FedAvgRound(global_weights, round_number, self.reject_non_finite)
