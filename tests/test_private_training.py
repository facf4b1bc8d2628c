"""Compression, secure aggregation and differential privacy end to end:
real local agents (processes, mutual TLS) on the non-IID digits, through
`flctl train`, with bytes on the wire and epsilon read from its metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import deployed_local_workspace, run_cli

HOSTS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("private"), HOSTS)


def train(root: Path, *flags: str) -> dict:
    result = run_cli("train", "-w", str(root), "--json", *flags, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.json()


def upload_per_round(run: dict) -> float:
    """Bytes the coordinator received per round (fit replies and evaluation replies)."""
    history = run["history"]
    return sum(r["bytes_received"] for r in history) / len(history)


@pytest.fixture(scope="module")
def codecs(workspace) -> dict[str, dict]:
    runs = {name: train(workspace, "--compression", name)
            for name in ("float32", "float16", "int8", "topk")}
    print("\ncodec     bytes up/round  x float32  accuracy %")
    for name, run in runs.items():
        ratio = upload_per_round(run) / upload_per_round(runs["float32"])
        print(f"{name:9} {upload_per_round(run):14.0f} {ratio:10.3f} {100 * run['accuracy']:10.2f}")
    return runs


def test_compressed_updates_cost_fewer_bytes_and_little_accuracy(codecs) -> None:
    base = codecs["float32"]
    up = {name: upload_per_round(run) for name, run in codecs.items()}
    # the JSON frame headers and evaluation replies do not shrink: ratios sit above
    # the payload's 0.5 / 0.25 / 0.1
    assert up["float16"] < 0.75 * up["float32"]
    assert up["int8"] < up["float16"] and up["topk"] < up["int8"]
    for name, points in (("float16", 0.5), ("int8", 1.0), ("topk", 3.0)):
        assert codecs[name]["accuracy"] >= base["accuracy"] - points / 100, name


def test_secure_aggregation_trains_like_plain_fedavg(workspace, codecs) -> None:
    secure = train(workspace, "--secure-aggregation")
    assert secure["accuracy"] == pytest.approx(codecs["float32"]["accuracy"], abs=0.005)
    assert all(len(r["participants"]) == HOSTS for r in secure["history"])


def test_central_dp_reports_epsilon_every_round_and_stops_at_the_target(workspace) -> None:
    run = train(workspace, "--privacy", "central", "--noise-multiplier", "1.0",
                "--clip-norm", "1.0", "--target-epsilon", "20")
    epsilons = [r["epsilon"] for r in run["history"]]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))  # spent, never refunded
    assert epsilons[-1] <= 20.0 and len(epsilons) < 20  # stopped before the budget ran out
    status = run_cli("status", "-w", str(workspace), "--json").json()
    assert status["latest_run"]["epsilon"] == pytest.approx(epsilons[-1])
    assert status["latest_run"]["delta"] == run["history"][-1]["delta"] == 1e-5
    assert run_cli("status", "-w", str(workspace)).stdout.count("privacy spent epsilon") == 1
    # the run is over: its secret noise seed is gone from the run directory
    run_dir = Path(run["run_dir"])
    assert not list(run_dir.glob("secret-*"))
    for path in run_dir.glob("*.npz"):
        with np.load(path) as archive:
            assert not [name for name in archive.files if name.startswith("dp_noise_seed")]


def test_local_dp_with_secure_aggregation(workspace, codecs) -> None:
    run = train(workspace, "--privacy", "local", "--noise-multiplier", "0.1",
                "--clip-norm", "2.0", "--secure-aggregation", "--rounds", "10")
    assert run["history"][-1]["epsilon"] > 0
    assert run["epsilon"] == run["history"][-1]["epsilon"]
    assert run["accuracy"] > 0.5  # noised, yet learning
