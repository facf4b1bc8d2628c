"""What the coordinator needs from an aggregation strategy.

Like Flower's strategies, but the round is a streaming object: the
coordinator hands each update to `add` as soon as it arrives and drops it,
so a round never holds more than a couple of model-sized buffers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from flctl.errors import FlctlError


class StrategyError(FlctlError):
    """Unknown strategy, bad strategy settings, or an update the round must refuse."""


@runtime_checkable
class RoundAggregator(Protocol):
    def add(self, host: str, weights: list[np.ndarray], num_examples: int) -> None: ...

    def result(self) -> list[np.ndarray]:
        """The new global weights."""
        ...

    @property
    def count(self) -> int: ...


@runtime_checkable
class Strategy(Protocol):
    name: str

    def start_round(self, global_weights: list[np.ndarray],
                    round_number: int) -> RoundAggregator: ...
