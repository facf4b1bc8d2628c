"""Only the trainable part travels: a frozen part each host loads from its own
disk, checked by digest so all hosts agree, recorded with the weights; and
the memory check before round 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator import admission as admission_module
from flctl.coordinator.records import load_frozen_sha256, load_weights
from flctl.core.frozen import (
    FrozenDisagreement,
    digest,
    mismatch,
    reference_digest,
)
from flctl.core.memory import shortfall
from flctl.core.settings import TrainingSettings
from flctl.errors import ConfigError, TrainingError
from test_coordinator import Federation

HEAD = 25_000          # trainable float32 parameters
BACKBONE = 9 * HEAD    # frozen: 90% of the model

HEAD_TASK = '''
from pathlib import Path
import numpy as np

class HeadTask:
    """A head trained on top of a frozen backbone read from the host's disk."""
    def __init__(self, **params):
        self.backbone = None
    def load_frozen(self, path):
        p = Path(path)
        files = [p] if p.is_file() else sorted(p.glob("*.npy"))
        self.backbone = np.concatenate([np.load(f).ravel() for f in files])
    def init(self, seed):
        return [np.zeros(HEAD, np.float32)]
    def fit(self, weights, data, config):
        shift = np.float32(self.backbone[:4].sum()) + np.float32(data.x_train[:, 0].mean())
        return [weights[0] + np.float32(0.5) * shift], len(data.x_train), {"train_loss": 0.0}
    def evaluate(self, weights, data, config):
        return 0.0, len(data.x_train), {"accuracy": 0.5}
'''.replace("HEAD", str(HEAD))


def _backbone(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).standard_normal(BACKBONE).astype(np.float32))
    return path


def _federation(root: Path, parts: dict[int, Path]) -> Federation:
    root.mkdir(exist_ok=True)
    return Federation(root, [10, 30, 60], task="headtask:HeadTask",
                      tasks={"headtask": HEAD_TASK}, frozen_parts=parts)


TRAINING = TrainingSettings(task="headtask:HeadTask", rounds=2)


# ---------------------------------------------------------------- the digest

def test_a_file_and_the_same_file_in_a_folder_agree(tmp_path: Path) -> None:
    alone = _backbone(tmp_path / "a" / "backbone.npy")
    folder = tmp_path / "frozen"
    folder.mkdir()
    (folder / "backbone.npy").write_bytes(alone.read_bytes())
    assert digest(alone) == digest(folder)
    assert digest(alone).bytes == alone.stat().st_size and digest(folder).files == 1


def test_any_change_changes_the_digest(tmp_path: Path) -> None:
    folder = tmp_path / "frozen"
    _backbone(folder / "backbone.npy")
    before = digest(folder).sha256
    (folder / "backbone.npy").rename(folder / "renamed.npy")
    renamed = digest(folder).sha256
    data = bytearray((folder / "renamed.npy").read_bytes())
    data[-1] ^= 1
    (folder / "renamed.npy").write_bytes(bytes(data))
    flipped = digest(folder).sha256
    (folder / "extra.txt").write_text("x")
    extra = digest(folder).sha256
    assert len({before, renamed, flipped, extra}) == 4


def test_the_reference_is_pinned_or_what_most_hosts_have() -> None:
    a, b = "a" * 64, "b" * 64
    assert reference_digest({"h0": a, "h1": a, "h2": b}) == a
    assert reference_digest({"h0": a, "h1": b, "h2": b}, pinned=a) == a
    assert reference_digest({"h0": None, "h1": None, "h2": a}) is None
    with pytest.raises(FrozenDisagreement, match="hosts disagree on the frozen part"):
        reference_digest({"h0": a, "h1": b})
    assert "differs from the run's" in mismatch("h2", b, a)
    assert "has no frozen part" in mismatch("h2", None, a)
    assert mismatch("h2", a, a) is None


def test_a_pinned_digest_must_be_a_sha256() -> None:
    with pytest.raises(ConfigError, match="64 hex digits"):
        TrainingSettings(frozen_sha256="abc")
    assert TrainingSettings(frozen_sha256="A" * 64).frozen_sha256 == "a" * 64


# ---------------------------------------------------------------- a run

def test_only_the_trainable_part_travels(tmp_path: Path) -> None:
    part = _backbone(tmp_path / "backbone.npy")
    fed = _federation(tmp_path / "fed", {0: part, 1: part, 2: part})
    try:
        summary = fed.coordinator(TRAINING).train()
    finally:
        fed.close()
    head_bytes = 4 * HEAD
    for record in summary.history:
        assert record.participants == ["h0", "h1", "h2"]
        # up: one head per host; down: the head for fit and for evaluation
        assert 3 * head_bytes <= record.bytes_received <= 1.05 * 3 * head_bytes
        assert 6 * head_bytes <= record.bytes_sent <= 1.05 * 6 * head_bytes
    sha = digest(part).sha256
    assert load_frozen_sha256(summary.final_weights) == sha
    run = summary.final_weights.parent
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["frozen"] == {"sha256": sha, "bytes": part.stat().st_size}
    state = json.loads((run / "state.json").read_text())
    assert state["frozen"]["sha256"] == sha
    assert load_frozen_sha256(run / state["checkpoint"]) == sha
    weights = load_weights(summary.final_weights)
    assert [w.shape for w in weights] == [(HEAD,)]


def test_a_host_with_another_frozen_part_is_left_out_in_one_line(tmp_path: Path) -> None:
    part = _backbone(tmp_path / "backbone.npy")
    other = _backbone(tmp_path / "other" / "backbone.npy", seed=1)
    fed = _federation(tmp_path / "fed", {0: part, 1: part, 2: other})
    told: list[str] = []
    try:
        summary = fed.coordinator(TRAINING, on_message=told.append).train()
    finally:
        fed.close()
    assert all(r.participants == ["h0", "h1"] for r in summary.history)
    lines = [line for line in told if "h2" in line]
    assert len(lines) == 1 and "differs from the run's" in lines[0], told
    assert digest(other).sha256[:12] in lines[0] and "\n" not in lines[0]


def test_a_host_without_the_frozen_part_is_left_out(tmp_path: Path) -> None:
    part = _backbone(tmp_path / "backbone.npy")
    fed = _federation(tmp_path / "fed", {0: part, 2: part})
    told: list[str] = []
    try:
        summary = fed.coordinator(TRAINING, on_message=told.append).train()
    finally:
        fed.close()
    assert summary.history[-1].participants == ["h0", "h2"]
    assert any("h1: it has no frozen part" in line for line in told), told


def test_a_pinned_digest_decides(tmp_path: Path) -> None:
    part = _backbone(tmp_path / "backbone.npy")
    other = _backbone(tmp_path / "other" / "backbone.npy", seed=1)
    fed = _federation(tmp_path / "fed", {0: part, 1: other, 2: other})
    pinned = TrainingSettings(task="headtask:HeadTask", rounds=1, min_hosts=1,
                              frozen_sha256=digest(part).sha256)
    try:
        summary = fed.coordinator(pinned).train()
    finally:
        fed.close()
    assert summary.history[0].participants == ["h0"]


def test_a_tie_stops_the_run_in_one_line(tmp_path: Path) -> None:
    part = _backbone(tmp_path / "backbone.npy")
    other = _backbone(tmp_path / "other" / "backbone.npy", seed=1)
    (tmp_path / "fed").mkdir()
    fed = Federation(tmp_path / "fed", [10, 30], task="headtask:HeadTask",
                     tasks={"headtask": HEAD_TASK}, frozen_parts={0: part, 1: other})
    try:
        with pytest.raises(TrainingError, match="hosts disagree on the frozen part") as caught:
            fed.coordinator(TrainingSettings(task="headtask:HeadTask", rounds=1,
                                             min_hosts=1)).train()
    finally:
        fed.close()
    assert "h0" in str(caught.value) and "h1" in str(caught.value)


def test_a_frozen_part_changed_on_a_host_is_noticed_at_the_next_run(tmp_path: Path) -> None:
    parts = {i: _backbone(tmp_path / f"h{i}" / "backbone.npy") for i in range(3)}
    fed = _federation(tmp_path / "fed", parts)
    told: list[str] = []
    try:
        first = fed.coordinator(TRAINING).train()
        assert first.history[-1].participants == ["h0", "h1", "h2"]
        _backbone(parts[1], seed=7)   # the user replaced h1's copy
        second = fed.coordinator(TRAINING, on_message=told.append).train()
    finally:
        fed.close()
    assert second.history[-1].participants == ["h0", "h2"]
    assert any("h1: its frozen part" in line for line in told), told


def test_an_unreadable_frozen_part_is_one_line(tmp_path: Path) -> None:
    part = _backbone(tmp_path / "backbone.npy")
    fed = _federation(tmp_path / "fed", {0: part, 1: part, 2: tmp_path / "missing.npy"})
    told: list[str] = []
    try:
        summary = fed.coordinator(TRAINING, on_message=told.append).train()
    finally:
        fed.close()
    assert summary.history[-1].participants == ["h0", "h1"]
    line = next(line for line in told if "h2" in line)
    assert "cannot read the frozen part" in line and "missing.npy" in line


# ---------------------------------------------------------------- memory

def test_a_model_the_coordinator_cannot_hold_stops_before_round_one(tmp_path: Path,
                                                                     monkeypatch) -> None:
    part = _backbone(tmp_path / "backbone.npy")
    fed = _federation(tmp_path / "fed", {0: part, 1: part, 2: part})
    monkeypatch.setattr(admission_module, "available_memory", lambda: 150_000)
    try:
        with pytest.raises(TrainingError, match=r"this machine \(the coordinator\) needs about"):
            fed.coordinator(TRAINING).train()
    finally:
        fed.close()
    assert not list((tmp_path / "fed" / "runs").glob("*/checkpoint-*"))


def test_a_host_short_of_memory_is_left_out(tmp_path: Path) -> None:
    part = _backbone(tmp_path / "backbone.npy")
    fed = _federation(tmp_path / "fed", {0: part, 1: part, 2: part})
    service = fed.services[2]
    info = service.info
    # h2 has 1 MB: the head (100 kB) fits twice, but not with the 900 kB backbone
    service.info = lambda: {**info(), "memory": {"available_bytes": 1_000_000}}
    told: list[str] = []
    try:
        summary = fed.coordinator(TRAINING, on_message=told.append).train()
    finally:
        fed.close()
    assert summary.history[-1].participants == ["h0", "h1"]
    line = next(line for line in told if "h2" in line)
    assert "needs about" in line and "available" in line


def test_shortfall_only_refuses_what_clearly_does_not_fit() -> None:
    assert shortfall("h", 10, None, 5) is None      # unknown: not refused
    assert shortfall("h", 10, 10, 5) is None
    assert "h needs about" in shortfall("h", 11, 10, 5)


def test_a_resumed_run_keeps_its_own_frozen_part(tmp_path: Path) -> None:
    """Killed after round 1 and resumed after two hosts' parts were replaced:
    the run goes on with the part it started with (its checkpoint's), so the
    one host that still has it trains, and the replaced ones are left out."""
    import shutil

    from flctl.coordinator.records import RunDir, load_checkpoint
    from flctl.coordinator.rounds import Coordinator
    from flctl.net.agent_client import AgentClient

    parts = {i: _backbone(tmp_path / f"h{i}" / "backbone.npy") for i in range(3)}
    fed = _federation(tmp_path / "fed", parts)
    training = TrainingSettings(task="headtask:HeadTask", rounds=2, min_hosts=1)
    snapshot = tmp_path / "fed" / "runs" / "killed-after-1"
    told: list[str] = []

    def keep_round_one(record) -> None:
        if record.round == 1:
            shutil.copytree(coordinator.run.path, snapshot)   # what kill -9 would leave

    try:
        coordinator = fed.coordinator(training, on_round=keep_round_one)
        coordinator.train()
        for i in (0, 1):
            _backbone(parts[i], seed=5)          # most hosts now agree on another part
        run = RunDir(snapshot)
        clients = [AgentClient(e, fed.context, timeout=30) for e in fed.endpoints]
        resumed = Coordinator(clients, training, run, tasks_dir=fed.root / "tasks",
                              resume_from=load_checkpoint(run), on_message=told.append,
                              ca_pem=(fed.root / "ca.crt").read_bytes()).train()
    finally:
        fed.close()
    assert resumed.history[-1].participants == ["h2"]
    assert sum("differs from the run's" in line for line in told) == 2, told
    assert load_frozen_sha256(resumed.final_weights) == digest(parts[2]).sha256


def test_status_shows_each_hosts_frozen_part_and_the_odd_one_out() -> None:
    from rich.console import Console

    from flctl.cli.render import status_table

    a, b = "a" * 64, "b" * 64
    rows = [{"host": "h0", "agent": "idle", "frozen": a}, {"host": "h1", "agent": "idle",
                                                            "frozen": a},
            {"host": "h2", "agent": "idle", "frozen": b}]
    table = status_table(rows)
    column = next(c for c in table.columns if c.header == "frozen")
    cells = list(column.cells)
    assert [str(c) for c in cells] == [a[:12], a[:12], b[:12]]
    assert [c.style for c in cells] == ["green", "green", "red"]
    console = Console(width=200, record=True)
    console.print(table)
    assert b[:12] in console.export_text()
    assert not any(c.header == "frozen" for c in status_table(
        [{"host": "h0", "agent": "idle"}]).columns)
