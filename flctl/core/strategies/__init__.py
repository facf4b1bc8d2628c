"""Aggregation strategies by name (one strategy per module).

The coordinator builds its strategy once per run with `make_strategy` and
calls `start_round` every round; see base.py for the protocol, including
the optimiser state it checkpoints for `--resume`.
"""

from __future__ import annotations

from flctl.core.strategies.base import (
    RoundAggregator,
    StatelessStrategy,
    Strategy,
    StrategyError,
    StrategyState,
)
from flctl.core.strategies.bucketing import Bucketing
from flctl.core.strategies.centeredclip import CenteredClip
from flctl.core.strategies.fedadagrad import FedAdagrad
from flctl.core.strategies.fedadam import FedAdam
from flctl.core.strategies.fedavg import FedAvg, FedAvgRound
from flctl.core.strategies.fedavgm import FedAvgM
from flctl.core.strategies.fedmedian import FedMedian
from flctl.core.strategies.fedprox import FedProx
from flctl.core.strategies.fedtrimmedavg import FedTrimmedAvg
from flctl.core.strategies.fedyogi import FedYogi
from flctl.core.strategies.krum import Krum, MultiKrum
from flctl.core.strategies.serveropt import ServerOptStrategy

STRATEGIES: dict[str, type] = {
    cls.name: cls
    for cls in (FedAvg, FedAvgM, FedProx, FedAdagrad, FedAdam, FedYogi,
                FedMedian, FedTrimmedAvg, Krum, MultiKrum, CenteredClip)
}

__all__ = ["STRATEGIES", "Bucketing", "CenteredClip", "FedAdagrad", "FedAdam", "FedAvg",
           "FedAvgM", "FedAvgRound", "FedMedian", "FedProx", "FedTrimmedAvg", "FedYogi", "Krum", "MultiKrum",
           "RoundAggregator", "StatelessStrategy", "Strategy", "StrategyError",
           "StrategyState", "make_strategy", "needs_only_the_mean"]


def needs_only_the_mean(strategy: object) -> bool:
    """True for the FedAvg family, whose step depends only on the round's weighted
    mean update: the strategies central DP and secure aggregation can serve
    (median, trimmed mean, Krum and centered clipping need every single update)."""
    return isinstance(strategy, (FedAvg, ServerOptStrategy))


def make_strategy(name: str, params: dict | None = None) -> Strategy:
    """Build the strategy `name` with `params` from flctl.yaml (once per run)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise StrategyError(f"unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    try:
        return cls(**dict(params or {}))
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"strategy {name!r}: bad params {params}: {exc}") from exc
