"""When is a run diverging? Said early, with the fix, not found at the end.

A run diverges when its federated evaluation loss is not finite, or has
risen at each of the last RISING_EVALUATIONS evaluations and now stands
more than RISE_FACTOR times its best: a learning rate too large for the
data (or unscaled features) shows exactly this, while the noise of a
healthy run does not rise that steadily that far.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

RISING_EVALUATIONS = 3
RISE_FACTOR = 1.5


def divergence(losses: Sequence[tuple[int, float]]) -> str | None:
    """One line saying why the run diverges, given (round, eval loss) so far;
    None while it does not."""
    if not losses:
        return None
    last_round, last = losses[-1]
    if not math.isfinite(last):
        return f"the federated evaluation loss is {last} after round {last_round}"
    if len(losses) <= RISING_EVALUATIONS:
        return None
    recent = [loss for _, loss in losses[-RISING_EVALUATIONS - 1:]]
    best_round, best = min(losses, key=lambda item: item[1])
    if all(b > a for a, b in zip(recent, recent[1:])) and last > RISE_FACTOR * best:
        return (f"the federated evaluation loss rose at each of the last {RISING_EVALUATIONS} "
                f"evaluations, to {last:.4g} after round {last_round} from {best:.4g} after "
                f"round {best_round}")
    return None
