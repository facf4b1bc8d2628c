"""Run on a host by deploy, as the agent's user: can the deployed task start?

Imports the task from the shipped folder (so a missing requirement shows
here, not at round 1), reads the host's data with the task's own loader or
the built-in one, and reports the sizes and the versions the agent will
run with (Python, numpy, and torch, CUDA and cuDNN when the task uses
torch). Prints one JSON document; the host helper keeps it for `status`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from flctl.agent import gpu
from flctl.agent.task_data import check_host_data, load_host_data, summary
from flctl.core.agentconfig import parse_agent_config
from flctl.errors import FlctlError


def versions(device: str = "cpu") -> dict[str, Any]:
    """What the task runs on; torch's only if the task imported it. `device` is
    what the agent tells the task, with the GPUs it is given."""
    found: dict[str, Any] = {"python": platform.python_version(), "device": device,
                             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        found["numpy"] = numpy.__version__
    torch = sys.modules.get("torch")
    if torch is not None:
        found["torch"] = torch.__version__
        found["cuda"] = getattr(torch.version, "cuda", None)
        cudnn = getattr(torch.backends, "cudnn", None)
        found["cudnn"] = str(cudnn.version()) if cudnn is not None and cudnn.is_available() \
            else None
        found["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return found


def check(config_path: Path) -> dict[str, Any]:
    config = parse_agent_config(config_path.read_text(), str(config_path))
    device = gpu.apply(config)   # the agent's own GPU environment, before the task imports
    try:
        loaded = load_host_data(config)
        check_host_data(config, loaded)
        data = summary(loaded)
    except FlctlError as exc:
        return {"task": config.task, "error": exc.message, "versions": versions(device)}
    return {"task": config.task, "data": data, "versions": versions(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flctl-task-check", description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        result = check(args.config)
    except FlctlError as exc:
        result = {"error": exc.message}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
