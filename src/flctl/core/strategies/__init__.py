"""Aggregation strategies by name (one strategy per module)."""

from __future__ import annotations

from flctl.core.strategies.base import RoundAggregator, Strategy, StrategyError
from flctl.core.strategies.fedavg import FedAvg, FedAvgRound

STRATEGIES: dict[str, type] = {"fedavg": FedAvg}

__all__ = ["STRATEGIES", "FedAvg", "FedAvgRound", "RoundAggregator", "Strategy",
           "StrategyError", "make_strategy"]


def make_strategy(name: str, params: dict | None = None) -> Strategy:
    """Build the strategy `name` with `params` from flctl.yaml."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise StrategyError(f"unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    try:
        return cls(**dict(params or {}))
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"strategy {name!r}: bad params {params}: {exc}") from exc
