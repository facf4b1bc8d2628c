"""examples/pytorch-digits through real agents: a CNN on the digits as 1x8x8
images over 8 local hosts (Dirichlet 0.5), FedAvg, 30 rounds, three seeds.

The agents are layered on this test's own interpreter (`python:` in the
inventory), which has torch: the requirement is met there and nothing is
shipped for it. The central baseline is the example's plain script, run as
a user runs it; the numpy MLP baseline is the same split through
flctl.core.simulation with flctl's defaults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")   # test.sh installs it; a skip here fails CI (test_ci_rules)

from flctl.coordinator.records import load_weights
from flctl.core.data import make_federated_shards
from flctl.core.settings import TrainingSettings
from flctl.core.simulation import simulate
from flctl.core.tasks import MLPTask

from helpers import flctl_command, run_cli, set_training, use_ports

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pytorch-digits"
HOSTS = 8
ROUNDS = 30
SEEDS = (0, 1, 2)
ALPHA = 0.5   # flctl init's split


def cnn_workspace(root: Path, hosts: int, seed: int, rounds: int) -> Path:
    assert run_cli("init", str(root), "--local", str(hosts), "--seed", str(seed)).returncode == 0
    use_ports(root, hosts)
    shutil.copytree(EXAMPLE / "tasks", root / "tasks", dirs_exist_ok=True)
    # eight agents share this machine's cores: one torch thread each
    set_training(root, task="digits_cnn:DigitsCNN", task_params={"threads": 1},
                 epochs=1, lr=0.05, batch_size=32, rounds=rounds, seed=seed)
    inventory = root / "inventory.yaml"
    inventory.write_text(inventory.read_text().replace(
        "        connection: local\n",
        f"        connection: local\n        python: {sys.executable}\n"))
    deployed = run_cli("deploy", "-w", str(root), "--json", timeout=600)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    return root


def central_accuracy(root: Path, seed: int) -> float:
    """The example's plain script on the pooled data, as a user runs it."""
    done = subprocess.run([sys.executable, str(EXAMPLE / "tasks" / "train_central.py"),
                           str(root / "data" / "pooled.npz"), "--epochs", str(ROUNDS),
                           "--seed", str(seed)],
                          capture_output=True, text=True, timeout=600, check=True,
                          stdin=subprocess.DEVNULL)
    return float(re.search(r"accuracy ([0-9.]+)%", done.stdout).group(1))


def mlp_accuracy(seed: int) -> float:
    shards, pooled = make_federated_shards(HOSTS, alpha=ALPHA, seed=seed)
    task = MLPTask()
    weights = simulate(shards, training=TrainingSettings(rounds=ROUNDS), task=task, seed=seed)
    return 100.0 * task.evaluate(weights, pooled, {})[2]["accuracy"]


def test_the_example_cnn_federated_is_within_2_points_of_central(tmp_path: Path) -> None:
    federated, central, mlp = [], [], []
    for seed in SEEDS:
        root = cnn_workspace(tmp_path / f"seed{seed}", HOSTS, seed, ROUNDS)
        try:
            trained = run_cli("train", "-w", str(root), "--json", timeout=900)
            assert trained.returncode == 0, trained.stderr
            summary = trained.json()
            assert summary["rounds"] == ROUNDS
            # the hosts' test sets partition the pooled one: their weighted
            # accuracy is the pooled test accuracy the baselines report
            federated.append(100.0 * summary["accuracy"])
            status = run_cli("status", "-w", str(root), "--json").json()["hosts"]
            assert {h["environment"]["torch"] for h in status} == {_torch_version()}
        finally:
            run_cli("teardown", "-w", str(root))
        central.append(central_accuracy(root, seed))
        mlp.append(mlp_accuracy(seed))
    print(f"CNN federated {federated}, central {central}, numpy MLP federated {mlp}")
    assert np.mean(central) > 95.0                      # the baseline itself is sound
    assert np.mean(federated) >= np.mean(central) - 2.0
    assert np.mean(federated) > np.mean(mlp)


def _torch_version() -> str:
    import torch

    return torch.__version__


def test_a_torch_run_resumed_after_kill_9_is_bit_exact(tmp_path: Path) -> None:
    rounds = 8
    root = cnn_workspace(tmp_path / "resume", 3, 0, rounds)
    try:
        full = run_cli("train", "-w", str(root), "--json", "--run-id", "whole", timeout=600)
        assert full.returncode == 0, full.stderr
        cut = root / "runs" / "cut"
        process = subprocess.Popen([*flctl_command(), "train", "-w", str(root), "--json",
                                    "--run-id", cut.name],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            state = cut / "state.json"
            if state.exists() and json.loads(state.read_text() or "{}").get("round", 0) >= 2:
                break
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not (cut / "final.npz").exists(), "the run finished before it could be killed"
        resumed = run_cli("train", "--resume", cut.name, "-w", str(root), "--json",
                          timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        whole = load_weights(root / "runs" / "whole" / "final.npz")
        again = load_weights(cut / "final.npz")
        assert [w.dtype for w in whole] == [w.dtype for w in again]
        assert any(w.dtype == np.int64 for w in whole)     # BatchNorm's counter travels
        assert all(np.array_equal(a, b) for a, b in zip(whole, again))
    finally:
        run_cli("teardown", "-w", str(root))
