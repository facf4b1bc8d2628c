"""What a site's aggregator folds, and how: one partial update per site.

The coordinator says how to fold (`FoldSpec`, from its own strategy and
settings, in the `site_fit` request); the aggregator folds its members'
updates with the very round objects the coordinator uses, as each arrives
(`SiteFold`), and sends one update back, as a change from the model:

* FedAvg family (`mean`): the members' example-weighted mean, in the model's
  dtypes, weighing their total examples. The coordinator adds it with that
  weight (FedAvgRound.add_site), which is the flat sum up to float rounding,
  so FedAvgM, FedAdam, FedProx ... step from the same mean.
* central DP (`clipped`): each member's delta clipped to clip_norm, summed
  uniformly and divided by the members asked (CentralDP with no noise); the
  coordinator multiplies back and noises the total once (CentralDPRound.add_site).

Robust strategies need every single update, secure aggregation must not let
anyone but the hosts see one: they are refused for sites (the coordinator's
`fold_spec` returns None), never folded here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flctl.core.privacy import CentralDP
from flctl.core.strategies import FedAvg, ServerOptStrategy
from flctl.core.updates import check_update
from flctl.errors import FlctlError

FOLD_MEAN = "mean"
FOLD_CLIPPED = "clipped"
MAX_EXAMPLES = 10**12   # what a member may claim at the site; the coordinator checks its profile


class SiteError(FlctlError):
    """A site_fit request or a site's fold cannot go on."""


@dataclass(frozen=True)
class FoldSpec:
    mode: str
    reject_non_finite: bool = True
    max_update_norm: float = 0.0   # 0: no bound
    clip_norm: float = 0.0         # FOLD_CLIPPED only

    def as_meta(self) -> dict[str, Any]:
        return {"mode": self.mode, "reject_non_finite": self.reject_non_finite,
                "max_update_norm": self.max_update_norm, "clip_norm": self.clip_norm}

    @classmethod
    def from_meta(cls, value: Any) -> FoldSpec:
        """The spec a request carries, checked (it comes over the wire)."""
        if not isinstance(value, dict) or value.get("mode") not in (FOLD_MEAN, FOLD_CLIPPED):
            raise SiteError("site_fit: fold.mode must be 'mean' or 'clipped'")
        reject = value.get("reject_non_finite", True)
        numbers = {k: value.get(k, 0.0) for k in ("max_update_norm", "clip_norm")}
        if not isinstance(reject, bool) or not all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                and v >= 0 for v in numbers.values()):
            raise SiteError("site_fit: fold.reject_non_finite must be a boolean, "
                            "max_update_norm and clip_norm finite numbers >= 0")
        if value["mode"] == FOLD_CLIPPED and not numbers["clip_norm"] > 0:
            raise SiteError("site_fit: a clipped fold needs clip_norm > 0")
        return cls(value["mode"], reject, float(numbers["max_update_norm"]),
                   float(numbers["clip_norm"]))


def fold_spec(strategy: object, max_update_norm: float) -> FoldSpec | None:
    """How a site folds for the coordinator's `strategy`; None: it cannot."""
    if isinstance(strategy, CentralDP):
        return FoldSpec(FOLD_CLIPPED, True, max_update_norm, strategy.clip_norm)
    if isinstance(strategy, FedAvg):
        return FoldSpec(FOLD_MEAN, strategy.reject_non_finite, max_update_norm)
    if isinstance(strategy, ServerOptStrategy):
        return FoldSpec(FOLD_MEAN, True, max_update_norm)   # its inner FedAvgRound checks
    return None


def member_record(status: str, reason: str | None = None, examples: int | None = None,
                  train_loss: float | None = None, fit_s: float | None = None) -> dict[str, Any]:
    return {"status": status, "reason": reason, "examples": examples,
            "train_loss": train_loss, "fit_s": fit_s}


class SiteFold:
    """One site's round at its aggregator: members' updates folded as they arrive."""

    def __init__(self, model: Sequence[np.ndarray], round_number: int, spec: FoldSpec,
                 sampled: Sequence[str]) -> None:
        self.model = list(model)
        self.spec = spec
        self.sampled = list(sampled)
        if spec.mode == FOLD_CLIPPED:
            # no noise here (noise_multiplier 0): the coordinator noises the total once
            strategy: Any = CentralDP(FedAvg(), spec.clip_norm, 0.0, len(self.sampled),
                                      noise_seed=0)
        else:
            strategy = FedAvg(spec.reject_non_finite)
        self._round = strategy.start_round(self.model, round_number)
        self.members: dict[str, dict[str, Any]] = {}
        self._losses: list[tuple[float, int]] = []

    def add(self, member: str, update: Sequence[Any], num_examples: Any, metrics: Any,
            fit_s: float) -> None:
        """Check and fold one member's update; a refused one raises (the caller drops it)."""
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) \
                or not 1 <= num_examples <= MAX_EXAMPLES:
            raise SiteError(f"update rejected: it claims {num_examples!r} examples")
        loss = metrics.get("train_loss") if isinstance(metrics, dict) else None
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))
                                 or not math.isfinite(loss)):
            raise SiteError(f"update rejected: train_loss {loss!r} is not a finite number")
        check_update(update, self.model, self.spec.max_update_norm)
        self._round.add(member, list(update), num_examples)
        self.members[member] = member_record(
            "answered", None, num_examples, None if loss is None else float(loss), fit_s)
        if loss is not None:
            self._losses.append((float(loss), num_examples))

    def drop(self, member: str, reason: str) -> None:
        self.members[member] = member_record("dropped", reason)

    def result(self) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """The site's one update, as its change from the model (float32 carries a
        change far more exactly than the weights it lands on), its total
        examples, and its metrics (train_loss: the members' example-weighted
        mean; members: what became of each)."""
        answered = {m: r for m, r in self.members.items() if r["status"] == "answered"}
        if not answered:
            why = "; ".join(f"{m}: {r['reason']}" for m, r in sorted(self.members.items()))
            raise SiteError(f"no member's update could be used ({why or 'none asked'})")
        total = sum(int(r["examples"]) for r in answered.values())
        delta = (self._round.clipped_mean_delta() if self.spec.mode == FOLD_CLIPPED
                 else self._round.result_delta())
        counted = sum(n for _, n in self._losses)
        loss = sum(v * n for v, n in self._losses) / counted if counted else None
        return delta, total, {"train_loss": loss, "members": dict(self.members)}
