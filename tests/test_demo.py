"""`flctl demo` end to end: real agents, real data, and the accuracy target:
after the default rounds the federated model is within 3 points of the same
model trained centrally on the pooled data."""

from __future__ import annotations

import json
from pathlib import Path

from flctl.coordinator.records import load_weights
from flctl.core.data import Dataset, load_dataset
from flctl.core.tasks import LogRegTask

from helpers import run_cli

CENTRAL_EPOCHS = 200
MAX_GAP = 0.03


def test_demo_trains_within_three_points_of_central(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()  # an empty directory is fine; a workspace is refused
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert len(summary["hosts"]) == 4 and summary["rounds"] == 20
    final = Path(summary["final_weights"])
    assert final.exists()
    manifest = json.loads((final.parent / "manifest.json").read_text())
    assert manifest["weights_sha256"] == summary["weights_sha256"]

    pooled = load_dataset(tmp_path / "demo" / "data" / "pooled.npz")
    task = LogRegTask(n_features=pooled.n_features, n_classes=pooled.n_classes)
    federated = task.evaluate(load_weights(final), pooled, {})[2]["accuracy"]
    # Federated evaluation (each host on its own test split, weighted) is the
    # pooled test accuracy, since the hosts' test splits partition it.
    assert abs(federated - summary["accuracy"]) < 1e-9
    central_weights, _, _ = task.fit(task.init(0), Dataset(pooled.x_train, pooled.y_train),
                                     {"epochs": CENTRAL_EPOCHS, "seed": 0})
    central = task.evaluate(central_weights, pooled, {})[2]["accuracy"]
    print(f"federated {federated:.4f} central {central:.4f}")
    assert central > 0.93
    assert federated >= central - MAX_GAP

    # the demo stops its agents: nothing is left running
    assert not list((tmp_path / "demo" / ".flctl" / "hosts").glob("*/run/supervisor.pid"))
