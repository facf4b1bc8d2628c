"""A round under secure aggregation: the coordinator relays keys and learns
only the sum of the hosts' updates.

Four fan-outs over the round's hosts (secure_sum.py): advertise signed keys,
share them (Shamir shares, encrypted host to host), fit and send masked
updates (summed modulo 2^32 as they arrive, one vector held), unmask. Hosts that
drop after sharing keys are recovered as long as `threshold` hosts answer
the unmask request; below that the round fails with nothing learnt, and
the caller may run it again with fresh keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from flctl.coordinator.replies import expect_vector
from flctl.coordinator.secure_sum import Deliver, Parallel, SecureSum
from flctl.core.dtypes import cast_back
from flctl.core.messages import ArraySpec
from flctl.core.secagg import (
    FixedPointParams,
    SecAggServer,
    default_neighbours,
    unflatten,
)
from flctl.core.settings import TrainingSettings
from flctl.core.strategies import needs_only_the_mean
from flctl.errors import TrainingError
from flctl.net.agent_client import AgentClient, FitReply
from flctl.net.framing import Allocator

# (client, shares for it, allocate) -> the masked update
SecureFit = Callable[[AgentClient, dict[str, Any], Allocator], FitReply]
AllocatorFactory = Callable[[list[bool], Callable[[list[ArraySpec]], None]], Allocator]
Release = Callable[[list[bool]], None]

MAX_WEIGHT_BOUND = 2 ** 20


def weight_bound(example_counts: Sequence[int]) -> float:
    """The power of two at or above the largest host's example count: weights
    n / bound are then exact in fixed point (see core.secagg.fixedpoint)."""
    largest = max([1, *example_counts])
    return float(min(MAX_WEIGHT_BOUND, 2 ** math.ceil(math.log2(largest))))


@dataclass
class SecureOutcome:
    weights: list[np.ndarray]  # global + the survivors' weighted mean update
    examples: int
    participants: list[str]
    dropped: dict[str, str] = field(default_factory=dict)
    train_loss: float | None = None  # the survivors' example-weighted mean, from the secure sum
    compute: list[float] = field(default_factory=list)
    clipped: dict[str, int] = field(default_factory=dict)  # coordinates cut to the clip


class SecureAggregation:
    """Runs secure rounds for one training run; fixed-point settings are chosen once
    from the hosts' example counts, keys are fresh every round (and every retry)."""

    def __init__(self, training: TrainingSettings, ca_pem: bytes, parallel: Parallel,
                 allocator: AllocatorFactory, release: Release,
                 example_counts: Sequence[int], revoked: frozenset[int] = frozenset()) -> None:
        self.training = training
        self.ca_pem = ca_pem
        self.revoked = revoked
        self.parallel = parallel
        self.allocator = allocator
        self.release = release
        self.params = FixedPointParams(weight_bound=weight_bound(example_counts))

    def fit(self, weights: list[np.ndarray], round_id: str, clients: Sequence[AgentClient],
            secure_fit: SecureFit) -> SecureOutcome:
        t = self.training
        # SecAgg+: each host masks with and shares among its k graph neighbours
        degree = t.secagg_neighbours or default_neighbours(len(clients))
        server = SecAggServer([c.name for c in clients], round_id, t.secagg_threshold or None,
                              self.params, ca_pem=self.ca_pem, degree=degree,
                              revoked=self.revoked)
        outcome = SecureOutcome(weights, 0, [])
        # the update, the host's training loss, then its weight
        size = sum(int(w.size) for w in weights) + 2

        def fit_one(client: AgentClient, shares: dict[str, Any], deliver: Deliver) -> None:
            held: list[bool] = []
            try:
                reply = secure_fit(client, shares, self.allocator(held, expect_vector(size)))
                deliver(reply.weights[0])
                outcome.compute.append(reply.compute_s)
                clipped = reply.metrics.get("secagg_clipped")
                if isinstance(clipped, int) and clipped > 0:
                    outcome.clipped[client.name] = clipped
            finally:
                self.release(held)

        rounds = SecureSum(server, clients, self.parallel, t.deadline_s)
        rounds.run(fit_one)
        result = server.finish()
        mean = result.mean()
        outcome.train_loss = float(mean[-1])
        mean = unflatten(mean[:-1].astype(np.float32), weights)
        outcome.weights = [cast_back(g + d, g.dtype) for g, d in zip(weights, mean)]
        outcome.examples = int(round(result.examples_total))
        outcome.participants = sorted(result.survivors)
        outcome.dropped = rounds.left_out(result.survivors)
        return outcome


def check_secure_settings(training: TrainingSettings, strategy: object,
                          ca_pem: bytes | None) -> None:
    """Refuse settings that would need to see single updates."""
    problems = []
    if not needs_only_the_mean(strategy):
        problems.append(f"strategy {training.strategy} needs every single update")
    if training.privacy == "central":
        problems.append("central DP clips single updates (use privacy: local)")
    if training.compression != "float32":
        problems.append("masked updates cannot be compressed (use compression: float32)")
    if training.max_update_norm > 0:
        problems.append("max_update_norm bounds single updates (set it to 0)")
    if ca_pem is None:
        problems.append("hosts' keys cannot be checked without the project CA")
    if problems:
        raise TrainingError("training.secure_aggregation: " + "; ".join(problems))
