"""`flctl runs export`: a run's final weights as safetensors, a PyTorch state
dict or a named .npz, read back with each format's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator.export import ExportError, export_run
from flctl.coordinator.records import RunDir, load_weights
from flctl.coordinator.replies import check_names
from flctl.core.dtypes import bfloat16
from flctl.core.settings import TrainingSettings
from flctl.errors import TrainingError
from test_coordinator import Federation

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

NAMED_TASK = '''
import torch
from flctl.torch import TorchData, TorchTask


class Tiny(TorchTask):
    """A linear layer and a BatchNorm (whose counter is an int64 buffer), in bfloat16."""

    def model(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(
            torch.bfloat16)

    @staticmethod
    def load_data(path, params):
        import numpy as np
        with np.load(path) as data:
            x = torch.tensor(data["x_train"], dtype=torch.bfloat16)
        return TorchData([x], None, n_train=len(x))

    def train(self, model, data, config):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.125)
        model(data.train[0])   # updates BatchNorm's running stats and counter
        return {"train_loss": 0.5}

    def test(self, model, data, config):
        return 0.5, {"accuracy": 1.0}
'''


@pytest.fixture(scope="module")
def named_run(tmp_path_factory) -> RunDir:
    root = tmp_path_factory.mktemp("export")
    fed = Federation(root, [10, 30], task="tiny:Tiny", tasks={"tiny": NAMED_TASK})
    try:
        summary = fed.coordinator(TrainingSettings(task="tiny:Tiny", rounds=2)).train()
    finally:
        fed.close()
    return RunDir(summary.run_dir)


def test_the_run_records_the_state_dict_names(named_run: RunDir) -> None:
    manifest = json.loads((named_run.path / "manifest.json").read_text())
    assert manifest["names"] == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                 "1.running_var", "1.num_batches_tracked"]
    assert json.loads((named_run.path / "state.json").read_text())["names"] == manifest["names"]


def test_torch_export_loads_into_the_model(named_run: RunDir) -> None:
    path = export_run(named_run, "torch")
    assert path == named_run.path / "export" / "final.pt"
    state = torch.load(path, weights_only=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(
        torch.bfloat16)
    model.load_state_dict(state)   # strict: every key, shape and dtype fits
    final = load_weights(named_run.path / "final.npz")
    assert state["0.weight"].dtype == torch.bfloat16
    assert state["0.weight"].view(torch.int16).numpy().tobytes() == final[0].tobytes()
    assert int(state["1.num_batches_tracked"]) == int(final[6]) == 2


def test_safetensors_export_keeps_names_dtypes_and_bits(named_run: RunDir,
                                                        tmp_path: Path) -> None:
    path = export_run(named_run, "safetensors", tmp_path / "model.safetensors")
    from safetensors import safe_open
    final = load_weights(named_run.path / "final.npz")
    manifest = json.loads((named_run.path / "manifest.json").read_text())
    with safe_open(str(path), "np") as handle:
        assert list(handle.keys()) == sorted(manifest["names"])
        assert handle.metadata() == {"flctl_run": named_run.run_id,
                                     "flctl_weights_sha256": manifest["weights_sha256"]}
        for name, array in zip(manifest["names"], final):
            got = handle.get_tensor(name)
            assert got.dtype == array.dtype and got.tobytes() == array.tobytes()
    assert final[0].dtype == bfloat16()


def test_npz_export_is_named(named_run: RunDir) -> None:
    path = export_run(named_run, "npz")
    with np.load(path) as archive:
        assert sorted(archive.files) == sorted(
            ["0.weight__bfloat16", "0.bias__bfloat16", "1.weight__bfloat16",
             "1.bias__bfloat16", "1.running_mean__bfloat16", "1.running_var__bfloat16",
             "1.num_batches_tracked"])


def test_a_changed_final_file_is_not_exported(named_run: RunDir, tmp_path: Path) -> None:
    copy = RunDir(tmp_path / named_run.run_id)
    copy.path.mkdir()
    for name in ("final.npz", "manifest.json"):
        (copy.path / name).write_bytes((named_run.path / name).read_bytes())
    with open(copy.path / "final.npz", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportError, match="does not match the sha256"):
        export_run(copy, "safetensors")
    (copy.path / "final.npz").unlink()
    with pytest.raises(ExportError, match="no final weights .* --resume"):
        export_run(copy, "npz")


@pytest.mark.parametrize("names", [
    "abc", ["a"], ["a", "a"], ["a", 3], ["a", "b\x1b[2J"], ["a", "x" * 300], ["a", ""]])
def test_names_from_a_host_are_checked(names) -> None:
    with pytest.raises(TrainingError, match="names are not 2 distinct printable"):
        check_names(names, 2)
    assert check_names(None, 2) is None and check_names(["a", "b"], 2) == ["a", "b"]
