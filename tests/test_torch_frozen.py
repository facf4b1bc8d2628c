"""A PyTorch model with a frozen backbone: the backbone comes from each host's
own safetensors file, stops requiring gradients and never travels; only
the head is federated, named, and exported with the backbone's digest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator.export import export_run
from flctl.coordinator.records import RunDir, load_weights
from flctl.core.frozen import digest
from flctl.core.settings import TrainingSettings
from test_coordinator import Federation

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

BACKBONE_TASK = '''
import numpy as np
import torch
from flctl.torch import TorchData, TorchTask


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(3, 2048), torch.nn.ReLU())
        self.head = torch.nn.Linear(2048, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


class Headed(TorchTask):
    def model(self):
        return Net()

    @staticmethod
    def load_data(path, params):
        with np.load(path) as data:
            x = torch.tensor(data["x_train"])
            y = torch.tensor(data["y_train"])
        return TorchData([(x, y)], None, n_train=len(x))

    def train(self, model, data, config):
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)   # every parameter
        for x, y in data.train:
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimiser.step()
        return {"train_loss": float(loss.detach())}

    def test(self, model, data, config):
        return 0.5, {"accuracy": 1.0}
'''


def _backbone(path: Path, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    safetensors_torch.save_file({
        "backbone.0.weight": torch.randn(2048, 3, generator=generator),
        "backbone.0.bias": torch.randn(2048, generator=generator),
    }, str(path))
    return path


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchfrozen")
    part = _backbone(root / "backbone.safetensors")
    (root / "fed").mkdir()
    fed = Federation(root / "fed", [10, 30, 60], task="headed:Headed",
                     tasks={"headed": BACKBONE_TASK}, frozen_parts={0: part, 1: part, 2: part})
    try:
        summary = fed.coordinator(TrainingSettings(task="headed:Headed", rounds=2)).train()
        tasks = [next(iter(service._tasks.values())) for service in fed.services]
    finally:
        fed.close()
    return summary, part, tasks


def test_only_the_head_is_federated(frozen_run) -> None:
    summary, _, _ = frozen_run
    run = RunDir(summary.run_dir)
    assert [w.shape for w in load_weights(summary.final_weights)] == [(2, 2048), (2,)]
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["names"] == ["head.weight", "head.bias"]
    head_bytes = 4 * (2 * 2048 + 2)
    backbone_bytes = 4 * (2048 * 3 + 2048)
    for record in summary.history:
        # up: three heads and the headers of fit and evaluation replies; not a backbone
        assert 3 * head_bytes < record.bytes_received < 3 * head_bytes + backbone_bytes / 4


def test_the_backbone_stays_what_the_file_holds(frozen_run) -> None:
    _, part, tasks = frozen_run
    saved = safetensors_torch.load_file(str(part))
    for task in tasks:
        model = task._model
        assert not model.backbone[0].weight.requires_grad
        assert torch.equal(model.backbone[0].weight, saved["backbone.0.weight"])
        assert torch.equal(model.backbone[0].bias, saved["backbone.0.bias"])
        assert model.head.weight.requires_grad


def test_the_export_names_the_frozen_part(frozen_run, tmp_path: Path) -> None:
    summary, part, _ = frozen_run
    out = export_run(RunDir(summary.run_dir), "safetensors", tmp_path / "head.safetensors")
    from safetensors import safe_open
    with safe_open(str(out), "np") as handle:
        assert handle.metadata()["flctl_frozen_sha256"] == digest(part).sha256
        assert sorted(handle.keys()) == ["head.bias", "head.weight"]
        assert np.array_equal(handle.get_tensor("head.bias"),
                              load_weights(summary.final_weights)[1])


def test_a_frozen_file_that_does_not_fit_the_model_is_one_line(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.safetensors"
    safetensors_torch.save_file({"backbone.0.weight": torch.zeros(2048, 4)}, str(wrong))
    (tmp_path / "fed").mkdir()
    fed = Federation(tmp_path / "fed", [10, 30], task="headed:Headed",
                     tasks={"headed": BACKBONE_TASK}, frozen_parts={0: wrong, 1: wrong})
    told: list[str] = []
    try:
        with pytest.raises(Exception, match="no host could make the initial weights"):
            fed.coordinator(TrainingSettings(task="headed:Headed", rounds=1),
                            on_message=told.append).train()
    finally:
        fed.close()
    assert any("'backbone.0.weight' is (2048, 4)" in line for line in told), told
