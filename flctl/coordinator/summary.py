"""What a run reports: one record per round (a metrics.jsonl line) and a
summary at the end. The round loop fills them; the CLI, records and status
read them back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flctl.core.settings import TrainingSettings


@dataclass
class RoundRecord:
    round: int
    participants: list[str]
    dropped: dict[str, str]
    train_loss: float | None
    eval_loss: float | None
    accuracy: float | None
    seconds: float
    fit_seconds: float
    max_compute_s: float
    bytes_sent: int
    bytes_received: int
    eval_seconds: float = 0.0
    central_loss: float | None = None
    central_accuracy: float | None = None
    attempts: int = 1  # > 1 when the round was re-run for lack of replies
    epsilon: float | None = None  # DP: privacy spent so far, at `delta`
    delta: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RoundRecord:
        """A metrics.jsonl line read back. Keys this version does not know are
        ignored and missing ones left empty, so a line written by an older or
        newer flctl is still shown rather than crashing `flctl runs show`."""
        known = {f.name for f in dataclasses.fields(cls)}
        empty = {"participants": [], "dropped": {}, "train_loss": None, "eval_loss": None,
                 "accuracy": None, "seconds": 0.0, "fit_seconds": 0.0, "max_compute_s": 0.0,
                 "bytes_sent": 0, "bytes_received": 0}
        return cls(**{**empty, **{k: v for k, v in record.items() if k in known}})


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    rounds: int
    hosts: list[str]
    final_weights: Path
    weights_sha256: str
    accuracy: float | None
    eval_loss: float | None
    seconds: float
    history: list[RoundRecord] = field(default_factory=list)
    epsilon: float | None = None  # DP runs: (epsilon, delta) spent
    delta: float | None = None


RoundCallback = Callable[[RoundRecord], None]
MessageCallback = Callable[[str], None]


def plain_settings(training: TrainingSettings) -> dict[str, Any]:
    """Training settings as plain JSON values (for the checkpoint and manifest)."""
    out = {f.name: getattr(training, f.name) for f in dataclasses.fields(training)}
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in out.items()}
