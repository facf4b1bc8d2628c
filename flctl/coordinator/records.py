"""What a run leaves on disk: checkpoints, metrics, final weights, manifest.

Every write is atomic (temp + fsync + rename), so a coordinator killed at
any instant leaves either the previous checkpoint or the new one, never a
torn file; `--resume` depends on that.

Secret strategy state (the central-DP noise seed: whoever holds it can
subtract the noise from the published model) goes to a file of its own,
`secret-<round>.npz`, 0600 from its first byte. A resume needs it for
bit-exact noise, so it stays while the run is resumable and is deleted the
moment the run's final weights are saved.

metrics.jsonl is appended to, not replaced, so a crash or a full disk can
leave its last line torn. Readers skip a line that does not parse and
return a warning naming the file and line (this module never prints);
`--resume` drops it before appending again. Appends are fsynced, so a
round whose checkpoint exists has its metrics line on disk too.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from flctl.core.dtypes import from_storage, storage_array, storage_key
from flctl.core.fsutil import (
    append_line,
    atomic_write,
    file_sha256,
    fsync_dir,
    read_json_lines,
    write_secret,
)
from flctl.core.privacy import SECRET_STATE_KEYS
from flctl.errors import TrainingError

CHECKPOINT_PREFIX = "checkpoint-"
STRATEGY_PREFIX = "strategy-"
SECRET_PREFIX = "secret-"
STATE = "state.json"
METRICS = "metrics.jsonl"
FINAL = "final.npz"
MANIFEST = "manifest.json"
FROZEN_KEY = "frozen_sha256"
STATS = "stats.json"   # the federated statistics a run started from


def new_run_id(clock: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(clock))
    return f"{stamp}-{secrets.token_hex(2)}"


def npz_writer(arrays: dict[str, np.ndarray]) -> Callable[[BinaryIO], None]:
    """Writes `arrays` as an .npz into an open file, array by array in bounded
    pieces (numpy streams each into its zip entry): no copy of the model is
    made in memory, whatever its size."""
    def write(handle: BinaryIO) -> None:
        np.savez(handle, **arrays)
    return write


def weights_npz(weights: Sequence[np.ndarray], frozen: dict[str, Any] | None = None
                ) -> Callable[[BinaryIO], None]:
    """The model as .npz, arrays in order; bfloat16 ones keep their type
    (core.dtypes). With a frozen part (core.frozen), its sha256 rides along
    as FROZEN_KEY: the federated weights mean nothing without that part."""
    arrays = {storage_key(f"w{i:04d}", w.dtype): storage_array(np.asarray(w))
              for i, w in enumerate(weights)}
    if frozen is not None:
        arrays[FROZEN_KEY] = np.array(str(frozen["sha256"]))
    return npz_writer(arrays)


def _state_npz(state: dict[str, list[np.ndarray]]) -> Callable[[BinaryIO], None]:
    return npz_writer({f"{key}__{i:04d}": array for key, arrays in state.items()
                       for i, array in enumerate(arrays)})


def _state_from_npz(path: Path, into: dict[str, list[np.ndarray]]) -> None:
    with np.load(path, allow_pickle=False) as archive:
        for name in sorted(archive.files):
            key, _, _ = name.rpartition("__")
            into.setdefault(key, []).append(archive[name])


def load_weights(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        stored = [from_storage(key, archive[key]) for key in archive.files
                  if key != FROZEN_KEY]
    return [array for _, array in sorted(stored, key=lambda item: item[0])]


def load_frozen_sha256(path: Path) -> str | None:
    """The sha256 of the frozen part the weights in `path` go with, if any."""
    with np.load(path, allow_pickle=False) as archive:
        return str(archive[FROZEN_KEY]) if FROZEN_KEY in archive.files else None


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def spool_dir(self) -> Path:
        """Where large updates wait, in unlinked files, until they are folded in."""
        return self.path / "spool"

    def save_checkpoint(self, round_number: int, weights: Sequence[np.ndarray],
                        extra: dict[str, Any],
                        strategy_state: dict[str, list[np.ndarray]] | None = None) -> None:
        """Files named by round, then the state file that points at them.

        A crash at any instant leaves state.json naming a complete, matching
        set of files (the previous round's until the new state is written);
        older sets are removed only after that. Secret state keys go to
        their own 0600 file, never into the world-readable strategy file.
        """
        weights_name = f"{CHECKPOINT_PREFIX}{round_number:06d}.npz"
        strategy_name = f"{STRATEGY_PREFIX}{round_number:06d}.npz"
        public = dict(strategy_state or {})
        secret = {key: public.pop(key) for key in sorted(SECRET_STATE_KEYS) if key in public}
        secret_name = f"{SECRET_PREFIX}{round_number:06d}.npz" if secret else None
        atomic_write(self.path / weights_name, weights_npz(weights, extra.get("frozen")))
        atomic_write(self.path / strategy_name, _state_npz(public))
        if secret_name is not None:
            write_secret(self.path / secret_name, _state_npz(secret))
        atomic_write(self.path / STATE, json.dumps(
            {"round": round_number, "checkpoint": weights_name, "strategy_state": strategy_name,
             "secret_state": secret_name, **extra}, indent=2))
        current = (weights_name, strategy_name, secret_name)
        for old in self.path.glob("*.npz"):
            if old.name.startswith((CHECKPOINT_PREFIX, STRATEGY_PREFIX, SECRET_PREFIX)) and \
                    old.name not in current:
                old.unlink(missing_ok=True)

    def save_stats(self, document: dict[str, Any]) -> None:
        """The federated statistics the run started from (STATS)."""
        atomic_write(self.path / STATS, json.dumps(document, indent=2))

    def forget_secrets(self) -> None:
        """Delete the secret state: the run is over, nothing may resume it."""
        secrets_left = list(self.path.glob(f"{SECRET_PREFIX}*.npz"))
        for old in secrets_left:
            old.unlink(missing_ok=True)
        if secrets_left:
            fsync_dir(self.path)  # the deletion must outlive a crash, like the writes

    @property
    def checkpoint(self) -> Path:
        """The weights file the state file names (the latest complete round)."""
        return self.path / json.loads((self.path / STATE).read_text())["checkpoint"]

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's line and fsync it (a torn earlier line stays its own line)."""
        append_line(self.path / METRICS, json.dumps(record, sort_keys=True).encode() + b"\n")

    def truncate_metrics(self, last_round: int) -> list[str]:
        """Drop metric lines of rounds after `last_round` (not checkpointed) and
        unreadable ones; a warning for each unreadable line dropped."""
        path = self.path / METRICS
        if not path.exists():
            return []
        lines, bad = _parse_metrics(path)
        atomic_write(path, "".join(text + "\n" for _, text, record in lines
                                   if record["round"] <= last_round))
        return [f"{path}:{n}: dropped an unreadable line (torn by a crash or a full disk?)"
                for n in bad]

    def save_final(self, weights: Sequence[np.ndarray], manifest: dict[str, Any]) -> str:
        atomic_write(self.path / FINAL, weights_npz(weights, manifest.get("frozen")))
        digest = file_sha256(self.path / FINAL)
        atomic_write(self.path / MANIFEST,
                     json.dumps({**manifest, "weights_sha256": digest}, indent=2, sort_keys=True))
        self.forget_secrets()  # final.npz exists: the run can no longer be resumed
        return digest


@dataclass(frozen=True)
class Checkpoint:
    """Where an interrupted run stopped: enough to continue it exactly."""

    round: int
    weights: list[np.ndarray]
    state: dict[str, Any]
    strategy_state: dict[str, list[np.ndarray]]


def load_checkpoint(run: RunDir) -> Checkpoint:
    state = json.loads((run.path / STATE).read_text())
    strategy: dict[str, list[np.ndarray]] = {}
    path = run.path / state["strategy_state"]
    if path.exists():
        _state_from_npz(path, strategy)
    if state.get("secret_state"):
        secret = run.path / state["secret_state"]
        if not secret.exists():
            raise TrainingError(f"run {run.run_id}: its secret state {secret} is missing, so "
                                f"the run cannot be resumed exactly")
        _state_from_npz(secret, strategy)
    return Checkpoint(int(state["round"]), load_weights(run.path / state["checkpoint"]), state,
                      strategy)


def resumable_run(runs_root: Path, run_id: str | None) -> RunDir:
    """The named run, or the newest one with a checkpoint and no final weights."""
    if run_id is not None:
        run = RunDir(runs_root / run_id)
        if not (run.path / STATE).exists():
            raise TrainingError(f"run {run_id}: no checkpoint in {run.path}")
        if (run.path / FINAL).exists():
            raise TrainingError(f"run {run_id} already finished ({run.path / FINAL})")
        return run
    candidates = sorted((p for p in runs_root.glob("*") if (p / STATE).exists()
                         and not (p / FINAL).exists()), key=lambda p: (p / STATE).stat().st_mtime)
    if not candidates:
        raise TrainingError(f"no interrupted run to resume in {runs_root}")
    return RunDir(candidates[-1])


def create_run_dir(runs_root: Path, run_id: str | None = None) -> RunDir:
    """A new run's directory. One that exists is taken only while no round
    was recorded in it: `train --detach` makes it first, for the run's log,
    and a run that failed before its first round may be started again."""
    run = RunDir(runs_root / (run_id or new_run_id()))
    try:
        run.path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        if not run.path.is_dir() or has_rounds(run):
            raise TrainingError(f"run {run.run_id} already exists ({run.path}): choose another "
                                f"--run-id, or continue it with `flctl train --resume "
                                f"{run.run_id}`") from None
    return run


def has_rounds(run: RunDir) -> bool:
    """Whether the run recorded anything of a round (a metrics line, a checkpoint)."""
    return any((run.path / name).exists() for name in (STATE, METRICS, MANIFEST, FINAL))


@dataclass(frozen=True)
class RunInfo:
    """One run as `flctl runs` lists it."""

    run_id: str
    path: Path
    state: str  # finished | interrupted | empty
    rounds_done: int
    rounds_planned: int | None
    accuracy: float | None
    hosts: list[str]
    started: float
    epsilon: float | None = None  # DP runs: privacy spent so far, at `delta`
    delta: float | None = None
    warnings: tuple[str, ...] = ()  # metrics lines that could not be read, and where

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "path": str(self.path), "state": self.state,
                "rounds_done": self.rounds_done, "rounds_planned": self.rounds_planned,
                "accuracy": self.accuracy, "hosts": self.hosts, "started": self.started,
                "epsilon": self.epsilon, "delta": self.delta, "warnings": list(self.warnings)}


@dataclass(frozen=True)
class Metrics:
    """metrics.jsonl as read: one record per round, and a warning per line skipped."""

    records: list[dict[str, Any]]
    warnings: list[str]


def _parse_metrics(path: Path) -> tuple[list[tuple[int, str, dict[str, Any]]], list[int]]:
    """(line number, text, record) of every round's line; numbers of unreadable ones."""
    return read_json_lines(path, lambda record: isinstance(record, dict)
                           and isinstance(record.get("round"), int))


def read_metrics(run: RunDir) -> Metrics:
    path = run.path / METRICS
    if not path.exists():
        return Metrics([], [])
    lines, bad = _parse_metrics(path)
    return Metrics([record for _, _, record in lines],
                   [f"{path}:{n}: skipped an unreadable line (torn by a crash or a full disk?)"
                    for n in bad])


def describe_run(run: RunDir) -> RunInfo:
    manifest_path, state_path = run.path / MANIFEST, run.path / STATE
    metrics = read_metrics(run)
    history, warnings = metrics.records, tuple(metrics.warnings)
    accuracy = next((r["accuracy"] for r in reversed(history) if r.get("accuracy") is not None),
                    None)
    spent = next((r for r in reversed(history) if r.get("epsilon") is not None), {})
    epsilon, delta = spent.get("epsilon"), spent.get("delta")
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        return RunInfo(run.run_id, run.path, "finished", int(manifest["rounds"]),
                       int(manifest["rounds"]), manifest.get("accuracy", accuracy),
                       list(manifest.get("hosts", [])), run.path.stat().st_mtime,
                       manifest.get("epsilon", epsilon), manifest.get("delta", delta), warnings)
    if state_path.exists():
        state = json.loads(state_path.read_text())
        planned = (state.get("training") or {}).get("rounds")
        return RunInfo(run.run_id, run.path, "interrupted", int(state["round"]), planned,
                       accuracy, list(state.get("hosts", [])), run.path.stat().st_mtime,
                       epsilon, delta, warnings)
    return RunInfo(run.run_id, run.path, "empty", 0, None, None, [], run.path.stat().st_mtime,
                   warnings=warnings)


def list_runs(runs_root: Path) -> list[RunInfo]:
    if not runs_root.is_dir():
        return []
    return sorted((describe_run(RunDir(p)) for p in runs_root.iterdir() if p.is_dir()),
                  key=lambda info: info.started)


def latest_run(runs_root: Path) -> RunInfo | None:
    """The newest run, reading only its own files (status wants just this one)."""
    if not runs_root.is_dir():
        return None
    paths = [p for p in runs_root.iterdir() if p.is_dir()]
    return describe_run(RunDir(max(paths, key=lambda p: p.stat().st_mtime))) if paths else None
