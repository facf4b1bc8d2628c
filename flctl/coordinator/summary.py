"""What a run reports: one record per round (a metrics.jsonl line) and a
summary at the end. The round loop fills them; the CLI, records and status
read them back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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
    # Each sampled host's round (host_entries): how it ended, its bytes and,
    # unless secure aggregation hides single hosts, its loss, examples and time.
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The federation's members that round (sampled or not): hosts join and
    # leave a running federation (coordinator.membership).
    members: list[str] = field(default_factory=list)

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
                 "bytes_sent": 0, "bytes_received": 0, "hosts": {},
                 "members": []}
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


# A host that missed the round's deadline straggled; any other failure dropped it.
STRAGGLED_REASONS = ("deadline exceeded", "reply after the deadline")


def host_entries(answered: Mapping[str, Mapping[str, Any]], dropped: Mapping[str, str],
                 sent: Mapping[str, int], received: Mapping[str, int],
                 ) -> dict[str, dict[str, Any]]:
    """The per-host part of a round record (metrics.jsonl "hosts"): `answered`
    maps a host to what may be recorded of its reply (nothing under secure
    aggregation), `dropped` a host to its reason, `sent`/`received` a host to
    its bytes this round."""
    entries: dict[str, dict[str, Any]] = {}
    for name in sorted({*answered, *dropped}):
        if name in answered:
            entry: dict[str, Any] = {"status": "answered", **answered[name]}
        else:
            reason = dropped[name]
            straggled = any(reason.startswith(r) for r in STRAGGLED_REASONS)
            entry = {"status": "straggled" if straggled else "dropped", "reason": reason}
        entry["bytes_sent"] = int(sent.get(name, 0))
        entry["bytes_received"] = int(received.get(name, 0))
        entries[name] = entry
    return entries


HOST_NUMBERS = ("train_loss", "examples", "fit_s", "bytes_sent", "bytes_received")


def host_history(records: Sequence[Mapping[str, Any]], host: str) -> list[dict[str, Any]]:
    """One host over a run (`flctl runs show --host`): a row per round from the
    metrics lines' "hosts" part. A round that did not sample the host says so;
    a line from before per-host records, or a field of the wrong type (the
    file is on disk, anyone may have edited it), is shown as unknown rather
    than trusted or crashed on."""
    rows = []
    for record in records:
        hosts = record.get("hosts")
        row: dict[str, Any] = {"round": record.get("round")}
        entry = hosts.get(host) if isinstance(hosts, Mapping) else None
        if not isinstance(hosts, Mapping):
            row["status"] = "unknown"   # written before flctl kept per-host records
        elif not isinstance(entry, Mapping):
            row["status"] = "not sampled"
        else:
            status, reason = entry.get("status"), entry.get("reason")
            row["status"] = status if isinstance(status, str) else "unknown"
            if isinstance(reason, str):
                row["reason"] = reason
            for key in HOST_NUMBERS:
                value = entry.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = value
        rows.append(row)
    return rows


RoundCallback = Callable[[RoundRecord], None]
MessageCallback = Callable[[str], None]


def plain_settings(training: TrainingSettings) -> dict[str, Any]:
    """Training settings as plain JSON values (for the checkpoint and manifest)."""
    out = {f.name: getattr(training, f.name) for f in dataclasses.fields(training)}
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in out.items()}
