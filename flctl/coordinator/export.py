"""A finished run's weights in the formats other tools read.

    npz           numpy's archive, one entry per array under its name (bfloat16
                  as its 16-bit patterns, the name suffixed __bfloat16)
    safetensors   Hugging Face's format (pip install 'flctl[safetensors]')
    torch         a PyTorch state dict for torch.load / load_state_dict
                  (pip install 'flctl[torch]')

Arrays are named as the task names them (a TorchTask: its state-dict keys,
recorded when the run took its first model from a host), else w0000, w0001,
... in order. final.npz is checked against the sha256 its manifest recorded
before anything is exported, and the export is written atomically. The run's
id and that sha256 go into the file's metadata where the format has some.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flctl.coordinator.records import FINAL, MANIFEST, RunDir, load_weights, npz_writer
from flctl.core.dtypes import is_bfloat16, storage_array, storage_key
from flctl.core.fsutil import atomic_write, file_sha256
from flctl.errors import FlctlError

FORMATS = {"npz": ".npz", "safetensors": ".safetensors", "torch": ".pt"}


class ExportError(FlctlError):
    """The run cannot be exported as asked."""


def default_output(run: RunDir, fmt: str) -> Path:
    return run.path / "export" / f"final{FORMATS[fmt]}"


def named_weights(run: RunDir) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The final weights by name, and the manifest, after checking the file's sha256."""
    final, manifest_path = run.path / FINAL, run.path / MANIFEST
    if not final.exists() or not manifest_path.exists():
        raise ExportError(f"run {run.run_id} has no final weights (interrupted? continue it "
                          f"with `flctl train --resume {run.run_id}`)")
    manifest = json.loads(manifest_path.read_text())
    if file_sha256(final) != manifest.get("weights_sha256"):
        raise ExportError(f"{final} does not match the sha256 its manifest recorded; "
                          f"it was changed after the run")
    weights = load_weights(final)
    names = manifest.get("names") or [f"w{i:04d}" for i in range(len(weights))]
    if len(names) != len(weights):
        raise ExportError(f"{manifest_path}: {len(names)} names for {len(weights)} arrays")
    return dict(zip(names, weights)), manifest


def export_run(run: RunDir, fmt: str, output: Path | None = None) -> Path:
    """Write the run's final weights as `fmt` to `output` (default: the run's export/)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    arrays, manifest = named_weights(run)
    target = output or default_output(run, fmt)
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"flctl_run": run.run_id, "flctl_weights_sha256": manifest["weights_sha256"]}
    if manifest.get("frozen"):   # the part these weights go with (core.frozen)
        metadata["flctl_frozen_sha256"] = str(manifest["frozen"]["sha256"])
    if fmt == "npz":
        atomic_write(target, npz_writer({storage_key(name, a.dtype): storage_array(a)
                                         for name, a in arrays.items()}))
    elif fmt == "safetensors":
        _write_safetensors(arrays, metadata, target)
    else:
        _write_torch(arrays, metadata, target)
    return target


def _write_safetensors(arrays: dict[str, np.ndarray], metadata: dict[str, str],
                       target: Path) -> None:
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ExportError("exporting safetensors needs the safetensors package: "
                          "pip install 'flctl[safetensors]'") from None
    _atomically(target, lambda path: save_file(
        {name: np.ascontiguousarray(a) for name, a in arrays.items()}, path, metadata))


def _write_torch(arrays: dict[str, np.ndarray], metadata: dict[str, str],
                 target: Path) -> None:
    try:
        import torch
    except ImportError:
        raise ExportError("exporting a PyTorch state dict needs torch: "
                          "pip install 'flctl[torch]'") from None

    def tensor(array: np.ndarray) -> Any:
        if is_bfloat16(array.dtype):   # numpy has no bfloat16: carry its bits over
            return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(array))

    state = {name: tensor(a) for name, a in arrays.items()}
    _atomically(target, lambda path: torch.save(state, path))


def _atomically(target: Path, write: Any) -> None:
    """Let a library write to a temporary name beside `target`, then rename it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
