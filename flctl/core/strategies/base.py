"""What the coordinator needs from an aggregation strategy.

Like Flower's strategies, but the round is a streaming object: the
coordinator hands each update to `add` as soon as it arrives and drops it,
so a round of a FedAvg-family strategy never holds more than a couple of
model-sized buffers. (The robust strategies, median, trimmed mean and Krum,
must see every update at once and hold a copy of each: N x model.)

Lifetime: the coordinator creates the strategy ONCE per run and calls
`start_round` every round. Server-side optimisers (FedAvgM momentum,
FedAdagrad/FedAdam/FedYogi moments) live in the strategy object between
rounds; `state()` exports them for the run's checkpoint and `load_state()`
puts them back on `--resume`, so a resumed run continues exactly where the
killed one stopped. A round's `result()` is what advances that state: call it
once per accepted round, and only then.
"""

from __future__ import annotations

import numbers
from typing import Any, Protocol, runtime_checkable

import numpy as np

from flctl.errors import FlctlError

# What state() returns and load_state() takes: named lists of arrays, one array
# per model array, so a checkpoint can store it like the weights themselves.
StrategyState = dict[str, list[np.ndarray]]


class StrategyError(FlctlError):
    """Unknown strategy, bad strategy settings, or an update the round must refuse."""


@runtime_checkable
class RoundAggregator(Protocol):
    def add(self, host: str, weights: list[np.ndarray], num_examples: int) -> None: ...

    def result(self) -> list[np.ndarray]:
        """The new global weights (for stateful strategies: also commits the server step)."""
        ...

    @property
    def count(self) -> int: ...


@runtime_checkable
class Strategy(Protocol):
    name: str

    def start_round(self, global_weights: list[np.ndarray],
                    round_number: int) -> RoundAggregator: ...

    def fit_config_extra(self) -> dict[str, Any]:
        """Keys the coordinator merges into every fit config (FedProx: proximal_mu)."""
        ...

    def state(self) -> StrategyState:
        """Copies of the server-side state to checkpoint; {} for stateless strategies."""
        ...

    def load_state(self, state: StrategyState) -> None:
        """Restore what `state()` returned (on resume); {} resets to a fresh start."""
        ...


class StatelessStrategy:
    """Base for strategies that keep nothing between rounds."""

    name = "stateless"

    def fit_config_extra(self) -> dict[str, Any]:
        return {}

    def state(self) -> StrategyState:
        return {}

    def load_state(self, state: StrategyState) -> None:
        if state:
            # A checkpoint with optimiser state was written by another strategy:
            # silently dropping it would resume a different algorithm.
            raise StrategyError(f"strategy {self.name!r} keeps no state, but the checkpoint "
                                f"holds {', '.join(sorted(state))}")


def check_num_examples(round_number: int, host: str, num_examples: object) -> None:
    """Refuse example counts that are not non-negative integers (bool included)."""
    if (isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral)
            or num_examples < 0):
        raise StrategyError(f"round {round_number}: update from {host}: num_examples "
                            f"must be a non-negative integer, got {num_examples!r}")


def check_number(name: str, value: object, low: float, high: float, *,
                 low_open: bool = False, high_open: bool = True) -> float:
    """A strategy parameter as float, within [low, high) unless told otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if below or above or number != number:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value!r}")
    return number


def check_count(name: str, value: object, low: int) -> int:
    """A strategy parameter that counts hosts: an integer >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)
