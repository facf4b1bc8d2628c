"""A run's metrics.jsonl read for a report: per-round series, and who took
part in each round and why not.

Everything here comes from the run's own files, but those carry what hosts
sent (names, drop reasons, losses): numbers are kept only when they are
finite numbers, text is kept as text (the page escapes it, the figures show
it literally). Lines written before per-host records existed have no
"hosts" key; their `participants` and `dropped` say the same thing with
less detail (a drop whose reason is a missed deadline counts as straggled).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flctl.coordinator.records import MANIFEST, METRICS, RunDir, RunInfo, describe_run, read_metrics
from flctl.errors import FlctlError

ANSWERED, DROPPED, STRAGGLED, NOT_SAMPLED = "answered", "dropped", "straggled", "not sampled"
STATUSES = (ANSWERED, STRAGGLED, DROPPED, NOT_SAMPLED)
_DEADLINE = "deadline"  # what the coordinator's reason says when a host was too late


class ReportError(FlctlError):
    """A report cannot be made as asked (no metrics, no rounds, no matplotlib)."""

    exit_code = 2


def number(value: Any) -> float | None:
    """A finite number, else None (a missing, null, boolean or garbled value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class DropRow:
    """One host missing rounds for one reason."""

    host: str
    status: str
    reason: str
    rounds: tuple[int, ...]


@dataclass
class RunData:
    run_id: str
    path: Path
    info: RunInfo
    records: list[dict[str, Any]]   # one per round, in round order
    manifest: dict[str, Any]
    warnings: list[str]
    hosts: list[str]                # everyone seen: the manifest's order, then others
    participation: dict[str, list[str]] = field(default_factory=dict)  # host -> status per round
    reasons: dict[str, list[str | None]] = field(default_factory=dict)  # host -> reason per round

    @property
    def rounds(self) -> list[int]:
        return [r["round"] for r in self.records]

    def series(self, key: str) -> list[float | None]:
        return [number(r.get(key)) for r in self.records]

    def host_series(self, key: str) -> dict[str, list[float | None]]:
        """A per-host value (train_loss, fit_s) per round, for hosts that reported any."""
        out: dict[str, list[float | None]] = {}
        for index, record in enumerate(self.records):
            for host, entry in _host_entries(record).items():
                value = number(entry.get(key))
                if value is not None:
                    out.setdefault(host, [None] * len(self.records))[index] = value
        return {host: out[host] for host in self.hosts if host in out}

    @property
    def has_epsilon(self) -> bool:
        return any(v is not None for v in self.series("epsilon"))

    @property
    def has_host_records(self) -> bool:
        return any(_host_entries(r) for r in self.records)

    def drop_rows(self) -> list[DropRow]:
        """Every (host, status, reason) that kept a sampled host out of rounds."""
        found: dict[tuple[str, str, str], list[int]] = {}
        for host in self.hosts:
            for round_number, status, reason in zip(self.rounds, self.participation[host],
                                                    self.reasons[host]):
                if status in (DROPPED, STRAGGLED):
                    found.setdefault((host, status, reason or ""), []).append(round_number)
        return [DropRow(host, status, reason, tuple(rounds))
                for (host, status, reason), rounds in found.items()]


def _host_entries(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    hosts = record.get("hosts")
    if not isinstance(hosts, dict):
        return {}
    return {str(name): entry for name, entry in hosts.items() if isinstance(entry, dict)}


def round_statuses(record: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """host -> (status, reason) for the hosts sampled in this round."""
    entries = _host_entries(record)
    if entries:
        out = {}
        for name, entry in entries.items():
            status = entry.get("status")
            reason = entry.get("reason")
            reason = None if reason is None else str(reason)
            if status not in (ANSWERED, DROPPED, STRAGGLED):
                status, reason = DROPPED, f"unknown status {status!r}: {reason or ''}".strip()
            out[name] = (str(status), reason)
        return out
    out = {str(name): (ANSWERED, None) for name in record.get("participants") or []}
    dropped = record.get("dropped")
    for name, reason in (dropped.items() if isinstance(dropped, dict) else ()):
        reason = None if reason is None else str(reason)
        out[str(name)] = (STRAGGLED if _DEADLINE in (reason or "") else DROPPED, reason)
    return out


def _manifest(run: RunDir) -> dict[str, Any]:
    path = run.path / MANIFEST
    try:
        document = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def load_run(run: RunDir) -> RunData:
    """The run's rounds, or a ReportError saying in one line why there are none."""
    if not (run.path / METRICS).is_file():
        raise ReportError(f"run {run.run_id}: no {METRICS} in {run.path} (did the run "
                          f"finish a round?)")
    metrics = read_metrics(run)
    by_round = {r["round"]: r for r in metrics.records}  # a repeated round: its last line
    if not by_round:
        raise ReportError(f"run {run.run_id}: {run.path / METRICS} has no readable rounds")
    records = [by_round[n] for n in sorted(by_round)]
    info = describe_run(run)
    manifest = _manifest(run)
    statuses = [round_statuses(r) for r in records]
    hosts = [str(h) for h in manifest.get("hosts") or info.hosts]
    hosts += sorted({h for s in statuses for h in s} - set(hosts))
    data = RunData(run.run_id, run.path, info, records, manifest, list(metrics.warnings), hosts)
    for host in hosts:
        pairs = [s.get(host, (NOT_SAMPLED, None)) for s in statuses]
        data.participation[host] = [status for status, _ in pairs]
        data.reasons[host] = [reason for _, reason in pairs]
    return data


def round_ranges(rounds: tuple[int, ...]) -> str:
    """1, 2, 3, 7 -> "1-3, 7"."""
    parts: list[str] = []
    start = previous = None
    for n in sorted(rounds):
        if previous is not None and n == previous + 1:
            previous = n
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = n
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ", ".join(parts)
