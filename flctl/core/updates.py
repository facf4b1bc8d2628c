"""The checks one host's update passes before it is folded, wherever it is folded.

The coordinator folds the updates of hosts in no site; a site's aggregator
folds its members' (flctl.core.sitefold). Both call `check_update`, so an
update a flat run would refuse is refused at a site too. Non-finite values
are the strategy's to refuse (FedAvgRound's require_finite), as it reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flctl.core.aggregation import UpdateArray, norm, update_distance
from flctl.core.tasks import check_weights
from flctl.errors import TrainingError


def check_update(update: Sequence[UpdateArray], model: Sequence[np.ndarray],
                 max_update_norm: float, *, delta: bool = False) -> None:
    """The model's layout, and (max_update_norm > 0) no farther from it than that.
    With `delta`, `update` is a change from the model (a site's mean change,
    which is within the bound when each member's is)."""
    check_weights(update, model)   # type: ignore[arg-type]
    if max_update_norm > 0:
        distance = norm(update) if delta else update_distance(update, model)
        if not distance <= max_update_norm:  # NaN fails too
            raise TrainingError(f"update rejected: its distance from the model, "
                                f"{distance:.4g}, exceeds training.max_update_norm "
                                f"{max_update_norm:g}")
