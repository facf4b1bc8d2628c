"""Error feedback: a host's memory of what its lossy codec has not sent yet.

Top-k sends a few coordinates per round; dropping the rest for good biases
training towards the coordinates that happen to be large. Error feedback
(Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018;
Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient
Compression Schemes", ICML 2019) keeps the unsent part as a residual and
adds it to the next round's delta before selecting, so every coordinate's
mass is sent eventually: over any number of rounds, what was sent plus the
current residual is exactly the sum of the deltas.

Where it lives: in the agent's memory, one ErrorFeedback per task (per
model), never on disk and never on the wire. An agent restart loses it.
That costs the unsent mass of one residual (what plain top-k drops every
round) and nothing else: later local training still pushes those
coordinates the same way, and the run goes on without any coordination.
If the coordinator discards a host's encoded update (deadline, rejection),
the sent part is lost the same way, like any lost uncompressed update.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ErrorFeedback:
    """The residual of one host's compressed updates for one model (float32, model-sized)."""

    def __init__(self) -> None:
        self._residual: list[np.ndarray] | None = None

    @property
    def residual(self) -> list[np.ndarray] | None:
        """What has been encoded in past rounds but not sent (None before the first round)."""
        return self._residual

    def add_to(self, delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        """New arrays delta + residual, which the codec may overwrite with the next residual.

        A residual of another layout (the task's model changed) means nothing
        for this model and is dropped.
        """
        residual = self._residual
        if residual is None or [r.shape for r in residual] != [d.shape for d in delta]:
            self._residual = None
            return [np.array(d, dtype=np.float32) for d in delta]
        return [np.add(d, r, dtype=np.float32) for d, r in zip(delta, residual)]

    def keep(self, residual: list[np.ndarray]) -> None:
        """Remember what this round's encoding did not send (all arrays at once, so a
        failed encode leaves the previous residual in place)."""
        self._residual = residual

    def reset(self) -> None:
        self._residual = None
