"""A torn last line of metrics.jsonl (power cut, full disk) crashes nothing:
`runs`, `runs show`, `status` and `train --resume` skip it and say where it
was, and the resume drops it before it appends again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flctl.coordinator.records import RunDir, read_metrics

from helpers import deployed_local_workspace, run_cli

HOSTS = 2
TORN = '{"accuracy": 0.9, "round": 4, "partic'


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("torn"), HOSTS)


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_readers_skip_a_torn_line_and_name_it(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for number in (1, 2):
        run.append_metrics({"round": number, "accuracy": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write(TORN)
    read = read_metrics(run)
    assert [r["round"] for r in read.records] == [1, 2]
    assert read.warnings == [f"{tmp_path / 'metrics.jsonl'}:3: skipped an unreadable line "
                             f"(torn by a crash or a full disk?)"]
    # an append after the torn line does not glue itself onto it
    run.append_metrics({"round": 3, "accuracy": 0.6})
    assert [r["round"] for r in read_metrics(run).records] == [1, 2, 3]
    dropped = run.truncate_metrics(2)
    assert dropped == [f"{tmp_path / 'metrics.jsonl'}:3: dropped an unreadable line "
                       f"(torn by a crash or a full disk?)"]
    assert read_metrics(run).records == [{"round": 1, "accuracy": 0.5},
                                         {"round": 2, "accuracy": 0.5}]
    assert read_metrics(run).warnings == []


def test_append_metrics_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    RunDir(tmp_path).append_metrics({"round": 1})
    assert (tmp_path / "metrics.jsonl").stat().st_ino in synced


def test_every_command_survives_a_torn_metrics_line(workspace: Path) -> None:
    trained = run_cli("train", "-w", str(workspace), "--rounds", "3", "--run-id", "torn",
                      "--json")
    assert trained.returncode == 0, trained.stderr
    run_dir = workspace / "runs" / "torn"
    # what a coordinator killed while writing round 4's line leaves behind
    (run_dir / "final.npz").unlink()
    (run_dir / "manifest.json").unlink()
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(TORN)
    where = f"{run_dir / 'metrics.jsonl'}:4"

    listed = run_cli("runs", "-w", str(workspace), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [w for w in warning_lines(listed.stderr) if where in w and "skipped" in w]
    info = {r["run_id"]: r for r in listed.json()["runs"]}["torn"]
    assert info["state"] == "interrupted" and info["rounds_done"] == 3
    assert len(info["warnings"]) == 1 and where in info["warnings"][0]

    table = run_cli("runs", "-w", str(workspace))
    assert table.returncode == 0 and len(warning_lines(table.stderr)) == 1, table.stderr

    shown = run_cli("runs", "show", "torn", "-w", str(workspace), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [r["round"] for r in shown.json()["history"]] == [1, 2, 3]
    assert [w for w in warning_lines(shown.stderr) if where in w]
    assert run_cli("runs", "show", "torn", "-w", str(workspace)).returncode == 0

    status = run_cli("status", "-w", str(workspace))
    assert status.returncode == 0, status.stderr
    assert [w for w in warning_lines(status.stderr) if where in w]
    assert "latest run torn" in status.stdout

    resumed = run_cli("train", "--resume", "torn", "--rounds", "5", "-w", str(workspace),
                      "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert where in resumed.stderr and "dropped an unreadable line" in resumed.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3, 4, 5]
    again = run_cli("runs", "-w", str(workspace), "--json")
    assert not warning_lines(again.stderr)
    assert {r["run_id"]: r for r in again.json()["runs"]}["torn"]["state"] == "finished"


def test_runs_show_takes_lines_of_another_version_and_skips_garbage(tmp_path: Path) -> None:
    assert run_cli("init", str(tmp_path), "--local", "2").returncode == 0
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text(json.dumps(
        {"round": 2, "checkpoint": "checkpoint-000002.npz", "strategy_state": "x.npz"}))
    (run_dir / "metrics.jsonl").write_bytes(
        b'{"round": 1, "accuracy": 0.5, "a_future_field": 1}\n\x00\x00\x00\n'
        b'[1, 2]\n{"round": 2, "accuracy": 0.75}\n')
    shown = run_cli("runs", "show", "old", "-w", str(tmp_path))
    assert shown.returncode == 0, shown.stderr
    assert "75.00%" in shown.stdout and "Traceback" not in shown.stderr
    assert [w.split(": ")[1] for w in warning_lines(shown.stderr)] == [
        f"{run_dir / 'metrics.jsonl'}:2", f"{run_dir / 'metrics.jsonl'}:3"]


def test_one_hosts_history_copes_with_old_lines_and_edited_fields() -> None:
    from flctl.coordinator.summary import host_history

    records = [
        {"round": 1},   # written before per-host records
        {"round": 2, "hosts": {"a": {"status": "answered", "train_loss": 0.5, "examples": 9,
                                     "fit_s": 0.1, "bytes_sent": 10, "bytes_received": 20}}},
        {"round": 3, "hosts": {"b": {"status": "dropped", "reason": "gone"}}},
        {"round": 4, "hosts": {"a": {"status": 7, "train_loss": "NaN", "examples": True}}},
        {"round": 5, "hosts": ["a"]},
    ]
    assert host_history(records, "a") == [
        {"round": 1, "status": "unknown"},
        {"round": 2, "status": "answered", "train_loss": 0.5, "examples": 9, "fit_s": 0.1,
         "bytes_sent": 10, "bytes_received": 20},
        {"round": 3, "status": "not sampled"},
        {"round": 4, "status": "unknown"},
        {"round": 5, "status": "unknown"},
    ]
