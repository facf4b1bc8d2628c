"""Federate a PyTorch model: its state dict as flctl's weights, and a task base.

flctl's agents and coordinator move lists of numpy arrays; this module maps
a `torch.nn.Module`'s state dict to such a list and back, by name, keeping
every dtype (float32, float16, bfloat16 through ml_dtypes, integer buffers
such as BatchNorm's `num_batches_tracked`). A CPU tensor becomes an array
that shares its memory (no copy); only a GPU tensor is copied to the host.

`TorchTask` turns a training script into a flctl task with a few lines:

    from flctl.torch import TorchData, TorchTask

    class Digits(TorchTask):
        def model(self):
            return Net()
        @staticmethod
        def load_data(path, params):
            return TorchData(train_loader(path), test_loader(path))
        def train(self, model, data, config):
            return train_epochs(model, data.train, config["epochs"], config["lr"], self.device)
        def test(self, model, data, config):
            return test(model, data.test, self.device)   # (loss, {"accuracy": ...})

It seeds torch from the run's seed and round (a seeded CPU run repeats bit
for bit, so `flctl train --resume` does too), picks the device the agent
was given (`config["device"]`: "cuda" when the host has GPUs for flctl),
and counts the examples FedAvg weighs from the data it trained on.

Needs torch (`pip install 'flctl[torch]'`, or the host's own); imported
only by tasks that use it, never by flctl itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flctl.core.dtypes import bfloat16, is_bfloat16

__all__ = ["TorchData", "TorchTask", "federated_keys", "from_arrays", "load_state_files",
           "to_arrays"]


def federated_keys(module: torch.nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """The state-dict names that travel, in the module's own order: every
    parameter and buffer but those named in `exclude` (a frozen backbone,
    or a counter differential privacy cannot noise)."""
    skipped = set(exclude)
    unknown = skipped - set(module.state_dict())
    if unknown:
        raise KeyError(f"not in the model's state dict: {', '.join(sorted(unknown))}")
    return [name for name in module.state_dict() if name not in skipped]


def _to_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16: the same 16 bits, seen as ml_dtypes' bfloat16
        return tensor.view(torch.int16).numpy().view(bfloat16())
    return tensor.numpy()


def to_arrays(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> list[np.ndarray]:
    """The tensors named `keys`, in that order, as numpy arrays of the same dtype
    (sharing memory with CPU tensors)."""
    return [_to_array(state[name]) for name in keys]


def _to_tensor(array: np.ndarray, like: torch.Tensor, name: str) -> torch.Tensor:
    array = np.asarray(array)
    if tuple(array.shape) != tuple(like.shape):
        raise ValueError(f"{name}: shape {tuple(array.shape)} does not match the model's "
                         f"{tuple(like.shape)}")
    if is_bfloat16(array.dtype):
        if like.dtype != torch.bfloat16:
            raise ValueError(f"{name}: bfloat16 does not match the model's {like.dtype}")
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype != like.dtype:
        raise ValueError(f"{name}: {tensor.dtype} does not match the model's {like.dtype}")
    return tensor


def from_arrays(module: torch.nn.Module, arrays: Sequence[np.ndarray],
                keys: Sequence[str]) -> None:
    """Load `arrays` (in `keys` order) into `module`, checking each name's shape and
    dtype; names not in `keys` keep their values."""
    state = module.state_dict()
    if len(arrays) != len(keys):
        raise ValueError(f"{len(arrays)} arrays for {len(keys)} model tensors")
    update = {name: _to_tensor(array, state[name], name) for name, array in zip(keys, arrays)}
    module.load_state_dict(update, strict=False)


STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def load_state_files(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a `.safetensors` or torch file (`torch.save` of a
    state dict, loaded with weights_only), or from every such file in a folder."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in STATE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no {'/'.join(STATE_SUFFIXES)} files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file  # the extra flctl[safetensors]
            part = load_file(str(file), device="cpu")
        else:
            part = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(part, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()):
            raise ValueError(f"{file}: not a state dict (names to tensors)")
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise ValueError(f"{file}: {twice[0]!r} is in another frozen file too")
        tensors.update(part)
    return tensors


@dataclass
class TorchData:
    """What `load_data` returns: data loaders (or anything iterable) for training
    and, optionally, testing. The sizes are what the coordinator holds a host's
    claims to (FedAvg's weights); taken from the loaders' datasets when not given."""

    train: Any
    test: Any = None
    n_train: int = -1
    n_test: int = -1

    def __post_init__(self) -> None:
        if self.n_train < 0:
            self.n_train = _size(self.train)
        if self.n_test < 0:
            self.n_test = _size(self.test) if self.test is not None else 0


def _seed(config: dict[str, Any]) -> None:
    """torch's RNG (dropout, DataLoader shuffles) from the run's seed and round."""
    seed = [int(config.get("seed", 0)), int(config.get("round", 0))]
    torch.manual_seed(int(np.random.default_rng(seed).integers(2**62)))


def _size(loader: Any) -> int:
    dataset = getattr(loader, "dataset", loader)
    try:
        return len(dataset)
    except TypeError:
        raise ValueError("cannot count the examples of this data: give n_train/n_test "
                         "to TorchData") from None


class TorchTask:
    """A flctl task around a PyTorch model. Subclass and write `model`,
    `load_data` (a staticmethod), `train` and `test`; the rest is done here.

    `exclude` lists state-dict names that do not travel (they keep the values
    each host's model starts with). A frozen part (a pretrained backbone: a
    `.safetensors` or torch file of tensors by state-dict name, or a folder
    of them, at the host's frozen_path or the workspace's frozen/) is
    loaded into every model built, its parameters stop requiring gradients,
    and its names never travel: only the rest is federated. The task's
    params (training.task_params) may set `threads`: torch's CPU threads per
    agent (default: torch's own, one per core), for several agents sharing
    one machine's cores.
    """

    exclude: Sequence[str] = ()

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.device = torch.device("cpu")
        self._model: torch.nn.Module | None = None
        self._keys: list[str] = []
        self._frozen_path: Path | None = None

    def load_frozen(self, path: str) -> None:
        """Use the frozen part at `path` (flctl calls this on hosts that have one)."""
        self._frozen_path = Path(path)
        load_state_files(self._frozen_path)   # fail now, not in round 1
        self._model = None

    # ------------------------------------------------------------ to write

    def model(self) -> torch.nn.Module:
        raise NotImplementedError("TorchTask.model() must return the torch.nn.Module")

    @staticmethod
    def load_data(path: str, params: dict[str, Any]) -> TorchData:
        raise NotImplementedError("TorchTask.load_data(path, params) must return TorchData")

    def train(self, model: torch.nn.Module, data: TorchData,
              config: dict[str, Any]) -> dict[str, float]:
        """Train `model` in place on data.train; return metrics ({"train_loss": ...})."""
        raise NotImplementedError

    def test(self, model: torch.nn.Module, data: TorchData,
             config: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """(loss, metrics such as {"accuracy": ...}) of `model` on data.test."""
        raise NotImplementedError

    # ------------------------------------------------------------ flctl's contract

    def _prepared(self, config: dict[str, Any]) -> torch.nn.Module:
        device = str(config.get("device") or "cpu")
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available()
                                   else "cpu")
        threads = int(self.params.get("threads") or 0)
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if self._model is None:
            self._model = self.model()
            frozen = self._load_frozen_into(self._model)
            self._keys = federated_keys(self._model, [*self.exclude, *frozen])
        # Seeded after the model exists: whether this agent built it in an
        # earlier call must not change the shuffles (or --resume would differ).
        _seed(config)
        return self._model.to(self.device)

    def _load_frozen_into(self, model: torch.nn.Module) -> list[str]:
        """Load the frozen part into `model`; its names (none without one)."""
        if self._frozen_path is None:
            return []
        frozen = load_state_files(self._frozen_path)
        state = model.state_dict()
        for name, tensor in frozen.items():
            if name not in state:
                raise ValueError(f"frozen part: {name!r} is not in the model's state dict")
            if tuple(tensor.shape) != tuple(state[name].shape) or \
                    tensor.dtype != state[name].dtype:
                raise ValueError(f"frozen part: {name!r} is {tuple(tensor.shape)} "
                                 f"{tensor.dtype}, the model's {tuple(state[name].shape)} "
                                 f"{state[name].dtype}")
        model.load_state_dict(frozen, strict=False)
        for name, parameter in model.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)
        return list(frozen)

    def names(self) -> list[str]:
        """The state-dict names of the arrays this task federates, in order
        (the run records them: `flctl runs export` writes a state dict by name)."""
        if self._model is None:
            self._prepared({"seed": 0, "round": 0})
        return list(self._keys)

    def init(self, seed: int) -> list[np.ndarray]:
        self._model = None
        _seed({"seed": seed, "round": 0})    # the first model comes from this seed
        model = self._prepared({"seed": seed, "round": 0})
        return [a.copy() for a in to_arrays(model.state_dict(), self._keys)]

    def fit(self, weights: list[np.ndarray], data: TorchData,
            config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, float]]:
        model = self._prepared(config)
        from_arrays(model, weights, self._keys)
        model.train()
        metrics = self.train(model, data, config) or {}
        return to_arrays(model.state_dict(), self._keys), int(data.n_train), dict(metrics)

    def evaluate(self, weights: list[np.ndarray], data: TorchData,
                 config: dict[str, Any]) -> tuple[float, int, dict[str, float]]:
        model = self._prepared(config)
        from_arrays(model, weights, self._keys)
        model.eval()
        with torch.no_grad():
            loss, metrics = self.test(model, data, config)
        count = data.n_test if data.test is not None and data.n_test else data.n_train
        return float(loss), int(count), dict(metrics)
