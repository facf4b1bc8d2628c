"""The GPUs of a host, as its agent sees them.

Deploy resolves the inventory's `gpus` (all, none, or indices as nvidia-smi
numbers them) against what `count()` finds here and writes the result into
the agent's config. Before any task code runs, the agent and the task check
set CUDA_VISIBLE_DEVICES from it (`apply`), with CUDA_DEVICE_ORDER=PCI_BUS_ID
because CUDA otherwise numbers devices fastest first, not as nvidia-smi
does. An agent given GPUs runs with the groups that own the device nodes
(`device_groups`), since it is not root.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
from collections.abc import MutableMapping
from pathlib import Path

from flctl.core.agentconfig import AgentConfig
from flctl.core.facts import parse_nvidia_smi_list

DEVICE_NODES = ("/dev/nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm*", "/dev/dri/renderD*",
                "/dev/kfd")


def count() -> int:
    """GPUs nvidia-smi lists on this host (0 without the NVIDIA driver)."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return 0
    return parse_nvidia_smi_list(listed.stdout) if listed.returncode == 0 else 0


def device_groups(dev: Path = Path("/")) -> tuple[str, ...]:
    """The groups (other than root) owning the GPU device nodes, such as video
    and render: the agent's user needs them to open the devices."""
    names = set()
    for pattern in DEVICE_NODES:
        for node in dev.glob(pattern.lstrip("/")):
            try:
                gid = node.stat().st_gid
                if gid != 0:
                    names.add(grp.getgrgid(gid).gr_name)
            except (OSError, KeyError):
                continue
    return tuple(sorted(names))


def device(config: AgentConfig) -> str:
    """What the task is told to train on: "cuda" with GPUs granted, else "cpu"."""
    return "cpu" if config.gpus is None else "cuda"


def apply(config: AgentConfig, environ: MutableMapping[str, str] = os.environ) -> str:
    """Set the CUDA environment the config gives; return the device the task
    is told to use ("cuda" or "cpu")."""
    environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if config.gpus is None:
        environ["CUDA_VISIBLE_DEVICES"] = ""
    elif config.gpus == "all":
        environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        environ["CUDA_VISIBLE_DEVICES"] = config.gpus
    return device(config)
