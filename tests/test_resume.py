"""kill -9 the coordinator mid-run, `flctl train --resume`: the final weights
equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator.records import load_weights

from helpers import deployed_local_workspace, flctl_command, run_cli

HOSTS = 4
ROUNDS = 40


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("resume"), HOSTS)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kill_9_after(args: list[str], cut: Path, rounds: int) -> None:
    """Start `flctl ARGS --run-id CUT` and kill -9 it once `rounds` rounds are on disk."""
    process = subprocess.Popen([*flctl_command(), *args, "--run-id", cut.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(metrics(cut)) < rounds and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (cut / "final.npz").exists(), "the run finished before it could be killed"


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])  # fedadam: server moments resume too
def test_resume_after_kill_9_gives_identical_weights(workspace: Path, strategy: str) -> None:
    args = ["train", "-w", str(workspace), "--rounds", str(ROUNDS), "--seed", "7", "--json",
            "--strategy", strategy]
    full = run_cli(*args, "--run-id", f"uninterrupted-{strategy}", timeout=300)
    assert full.returncode == 0, full.stderr

    cut = workspace / "runs" / f"interrupted-{strategy}"
    kill_9_after(args, cut, 3)
    stopped_after = json.loads((cut / "state.json").read_text())["round"]
    assert 1 <= stopped_after < ROUNDS
    listed = {r["run_id"]: r for r in run_cli("runs", "-w", str(workspace), "--json").json()["runs"]}
    assert listed[cut.name]["state"] == "interrupted"
    assert listed[cut.name]["rounds_done"] == stopped_after
    assert listed[f"uninterrupted-{strategy}"]["state"] == "finished"

    resumed = run_cli("train", "--resume", cut.name, "-w", str(workspace), "--json",
                      timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["rounds"] == ROUNDS
    a = load_weights(workspace / "runs" / f"uninterrupted-{strategy}" / "final.npz")
    b = load_weights(cut / "final.npz")
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [m["round"] for m in metrics(cut)] == list(range(1, ROUNDS + 1))
    shown = run_cli("runs", "show", cut.name, "-w", str(workspace), "--json").json()
    assert shown["state"] == "finished" and shown["rounds_done"] == ROUNDS
    assert [r["round"] for r in shown["history"]] == list(range(1, ROUNDS + 1))


def test_resume_refuses_what_it_cannot_do(workspace: Path) -> None:
    nothing = run_cli("train", "--resume", "no-such-run", "-w", str(workspace))
    assert nothing.returncode == 6 and "no checkpoint" in nothing.stderr
    changed = run_cli("train", "--resume", "-w", str(workspace), "--lr", "0.1")
    assert changed.returncode == 2 and "only --rounds" in changed.stderr
    stray = run_cli("train", "some-run", "-w", str(workspace))
    assert stray.returncode == 2 and "only taken with --resume" in stray.stderr


def test_a_crash_between_checkpoint_writes_resumes_from_a_matching_pair(tmp_path: Path) -> None:
    """Killed after round 2's weights were written but before its state file:
    resume must see round 1 with round 1's weights, never a mix."""
    from flctl.coordinator.records import RunDir, load_checkpoint, weights_npz

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    round1 = [np.full(3, 1.0, np.float32)]
    run.save_checkpoint(1, round1, {"task_params": {}}, {"m": [np.full(3, 0.5, np.float32)]})
    with open(run.path / "checkpoint-000002.npz", "wb") as handle:
        weights_npz([np.full(3, 2.0, np.float32)])(handle)
    checkpoint = load_checkpoint(run)
    assert checkpoint.round == 1
    assert np.array_equal(checkpoint.weights[0], round1[0])
    assert np.array_equal(checkpoint.strategy_state["m"][0], np.full(3, 0.5, np.float32))
    run.save_checkpoint(2, [np.full(3, 2.0, np.float32)], {"task_params": {}}, {})
    assert sorted(p.name for p in run.path.glob("*.npz")) == [
        "checkpoint-000002.npz", "strategy-000002.npz"]


def test_an_upgrade_restarts_older_agents_and_the_run_resumes_exactly(workspace: Path) -> None:
    """flctl upgraded between a killed run and its resume: `flctl deploy`
    restarts every agent still running the older code (local hosts run this
    machine's flctl, so only the agent's own record tells), and the run goes
    on bit for bit."""
    from helpers import by_host, deploy_json

    args = ["train", "-w", str(workspace), "--rounds", "12", "--seed", "3", "--json"]
    assert run_cli(*args, "--run-id", "whole", timeout=300).returncode == 0
    cut = workspace / "runs" / "upgraded"
    kill_9_after(args, cut, 2)

    run_dir = workspace / ".flctl" / "hosts" / "local1" / "run"
    (run_dir / "agent.version").write_text("0.0.1")   # started by an older flctl
    old_pid = (run_dir / "agent.pid").read_text()
    hosts = by_host(deploy_json(workspace))
    steps = {s["name"]: s for s in hosts["local1"]["steps"]}
    assert steps["agent version"]["changed"] and "running 0.0.1" in steps["agent version"]["detail"]
    assert "restarted" in steps["agent"]["detail"]
    assert hosts["local2"]["changed"] == 0            # the current ones are left alone
    version = run_cli("version").stdout.strip()
    assert (run_dir / "agent.version").read_text() == version
    assert (run_dir / "agent.pid").read_text() != old_pid

    resumed = run_cli("train", "--resume", cut.name, "-w", str(workspace), "--json", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_weights(workspace / "runs" / "whole" / "final.npz")
    b = load_weights(cut / "final.npz")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    again = by_host(deploy_json(workspace))
    assert all(h["changed"] == 0 for h in again.values()), again
