"""Default training on raw tabular data: the built-in task standardises with
the federated statistics (auto: the scales differ), stores the transform
with the run, and the coordinator's own evaluation applies it too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator.records import RunDir
from flctl.core.data import Dataset, save_dataset
from flctl.core.settings import TrainingSettings
from flctl.errors import TrainingError
from test_coordinator import Federation
from test_stats import _write_csv

TASK_PARAMS = {"n_features": 3, "n_classes": 2}


def _data(rng: np.random.Generator, rows: int, bias: float) -> tuple[np.ndarray, np.ndarray]:
    area = rng.normal(1000, 300, rows)
    smooth = rng.uniform(0.05, 0.15, rows)
    x = np.column_stack([area, smooth, np.full(rows, 7.0)])
    # a linear rule over both scales: each feature matters, in its own units
    y = ((area - 1000 - bias) / 300 + (smooth - 0.1) / 0.03 > 0).astype(int)
    return x, y


@pytest.fixture
def raw(tmp_path: Path):
    rng = np.random.default_rng(0)
    fed = Federation(tmp_path, [10, 10, 10], task="logreg")
    for i, service in enumerate(fed.services):
        x, y = _data(rng, 150, bias=0.0)
        if i == 2:
            x[5, 0] = np.nan                   # a missing value on one host
        path = _write_csv(tmp_path / f"h{i}.csv", np.nan_to_num(x, nan=0.0), y,
                          missing=(5, 0) if i == 2 else None)
        service.config = dataclasses.replace(service.config, data_path=str(path))
        service._load_data()
    x, y = _data(rng, 300, bias=0.0)
    save_dataset(Dataset(x.astype(np.float32), y), tmp_path / "test.npz")
    yield fed, tmp_path / "test.npz"
    fed.close()


def _train(fed: Federation, test: Path, **settings):
    from flctl.core.data import load_dataset
    told: list[str] = []
    training = TrainingSettings(task="logreg", task_params=TASK_PARAMS,
                                **{"rounds": 15, **settings})
    records: list = []
    summary = fed.coordinator(training, on_message=told.append, on_round=records.append,
                              eval_data=load_dataset(test)).train()
    return summary, records, told


def test_raw_scales_are_standardised_and_the_transform_is_kept(raw) -> None:
    fed, test = raw
    summary, records, told = _train(fed, test)
    assert any(line.startswith("standardizing features with the federated mean") and
               "values are missing" in line for line in told), told
    assert any("1 feature(s) constant on every host (count)" in line for line in told), told
    assert records[-1].central_accuracy >= 0.9, [r.central_accuracy for r in records]
    run = RunDir(summary.run_dir)
    manifest = json.loads((run.path / "manifest.json").read_text())
    transform = manifest["task_params"]["transform"]
    stats = json.loads((run.path / "stats.json").read_text())
    assert transform["mean"][0] == pytest.approx(stats["features"][0]["mean"], rel=1e-6)
    assert transform["scale"][0] == pytest.approx(stats["features"][0]["std"], rel=1e-6)
    assert transform["scale"][2] == 1.0                        # constant: centred, not scaled
    state = json.loads((run.path / "state.json").read_text())
    assert state["task_params"]["transform"] == transform      # --resume keeps it


def test_without_standardising_the_same_run_is_worse_or_refused(raw) -> None:
    fed, test = raw
    _, records, _ = _train(fed, test, standardize="off")   # a missing value: h2 sits out
    assert all("h2" in r.dropped and "missing values" in r.dropped["h2"] for r in records)
    service = fed.services[2]            # without it, the raw scales alone
    x, y = _data(np.random.default_rng(9), 150, 0.0)
    path = _write_csv(Path(service.config.data_path).with_name("full.csv"), x, y)
    service.config = dataclasses.replace(service.config, data_path=str(path))
    service._load_data()
    try:
        _, records, _ = _train(fed, test, standardize="off")
        accuracy = records[-1].central_accuracy
    except TrainingError as exc:          # diverged: said so, with the fix
        assert "diverg" in str(exc)
        return
    _, standardised, _ = _train(fed, test)
    assert standardised[-1].central_accuracy > accuracy + 0.1, (accuracy, standardised)


@pytest.mark.parametrize("standardize, why", [("auto", "values are missing"),
                                               ("on", "training.standardize: on")])
def test_secure_aggregation_standardises_with_secure_sums(raw, standardize, why) -> None:
    """Mean and std from secure sums: the same transform as the plain statistics
    give, and stats.json without min, max or per-host labels."""
    fed, test = raw
    summary, records, told = _train(fed, test, standardize=standardize,
                                    secure_aggregation=True)
    assert any(line.startswith("standardizing features") and why in line for line in told), told
    assert records[-1].central_accuracy >= 0.9, [r.central_accuracy for r in records]
    run = RunDir(summary.run_dir)
    transform = json.loads((run.path / "manifest.json").read_text())["task_params"]["transform"]
    stats = json.loads((run.path / "stats.json").read_text())
    assert stats["secure_aggregation"] is True and stats["labels"] == {}
    assert stats["features"][0]["min"] is None and stats["features"][0]["max"] is None
    plain, _, _ = _train(fed, test, standardize=standardize, rounds=1)
    reference = json.loads((RunDir(plain.run_dir).path / "manifest.json").read_text())
    expected = reference["task_params"]["transform"]
    assert np.allclose(transform["mean"], expected["mean"], rtol=1e-6)
    assert np.allclose(transform["scale"], expected["scale"], rtol=1e-6)
    assert transform["scale"][2] == 1.0                        # constant: centred, not scaled
    assert records[0].participants == ["h0", "h1", "h2"]


def test_task_stats_is_refused_with_secure_aggregation(tmp_path: Path) -> None:
    fed = Federation(tmp_path, [10, 30, 60], task="usesstats:UsesStats",
                     tasks={"usesstats": STATS_TASK})
    try:
        with pytest.raises(TrainingError, match="task_stats .* secure_aggregation"):
            fed.coordinator(TrainingSettings(task="usesstats:UsesStats", rounds=1,
                                             task_stats=True, secure_aggregation=True)).train()
    finally:
        fed.close()


STATS_TASK = '''
import numpy as np

class UsesStats:
    """A user's task that asks for the federated statistics (training.task_stats)."""
    def __init__(self, stats=None, **params):
        self.stats = stats
    def init(self, seed):
        return [np.zeros(1, np.float32)]
    def fit(self, weights, data, config):
        mean = self.stats["features"][0]["mean"]
        return [np.array([mean], np.float32)], len(data.x_train), {"train_loss": 0.0}
    def evaluate(self, weights, data, config):
        return 0.0, len(data.x_train), {"accuracy": 1.0}
'''


def test_a_users_task_gets_the_statistics_when_it_asks(tmp_path: Path) -> None:
    from flctl.coordinator.records import load_weights

    fed = Federation(tmp_path, [10, 30, 60], task="usesstats:UsesStats",
                     tasks={"usesstats": STATS_TASK}, spread=2.0)
    try:
        summary = fed.coordinator(TrainingSettings(task="usesstats:UsesStats", rounds=1,
                                                   task_stats=True)).train()
    finally:
        fed.close()
    pooled_mean = sum(m[0] * n for m, n in zip(fed.means, (10, 30, 60))) / 100
    assert load_weights(summary.final_weights)[0][0] == pytest.approx(pooled_mean, rel=1e-5)
    assert (Path(summary.run_dir) / "stats.json").exists()
