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
        self._hosts: set[str] = set()
        self._result: list[np.ndarray] | None = None

    @property
    def count(self) -> int:
        return self._acc.count

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
