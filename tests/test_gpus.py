"""GPUs for agents, tested up to the environment the agent receives (this
machine has no GPU: a stand-in `nvidia-smi` lists two, and the device nodes
are files in a temporary folder).

The inventory's `gpus` (all, none, or indices) is checked at deploy against
the GPUs nvidia-smi lists on the host; the agent gets CUDA_VISIBLE_DEVICES
(with nvidia-smi's numbering), the task is told its device, the unit keeps
PrivateDevices unless the agent has GPUs and then adds the device groups.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest

from flctl.agent import gpu
from flctl.core.agentconfig import AgentConfig
from flctl.core.facts import parse_nvidia_smi_list, resolve_gpus
from flctl.core.inventory import parse_inventory
from flctl.core.renderers import render_systemd_unit
from flctl.errors import ConfigError
from test_renderers import SPEC, directives

from helpers import by_host, deploy_json, run_cli, set_training, use_ports

NVIDIA_SMI_L = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5a6b7c8d-0000-1111-2222-333344445555)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-5a6b7c8d-0000-1111-2222-333344446666)
"""

DEVICE_TASK = '''
import json
import os

from flctl.core.data import load_dataset
from flctl.core.tasks import LogRegTask


class Device(LogRegTask):
    """The built-in model; notes beside its data what the agent gave it."""

    @staticmethod
    def load_data(path, params):
        data = load_dataset(path)
        data.seen = path + ".seen.json"
        return data

    def fit(self, weights, data, config):
        with open(data.seen, "w") as out:
            json.dump({"device": config.get("device"),
                       "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}, out)
        return super().fit(weights, data, config)
'''


def host(gpus_line: str):
    text = f"all:\n  hosts:\n    a:\n      ssh_host: h\n      data_path: /d\n{gpus_line}"
    return parse_inventory(text, "inventory.yaml", ipaddress.IPv4Network("10.0.0.0/24")).hosts[0]


def test_the_inventory_takes_all_none_or_indices() -> None:
    assert host("").gpus == "all"
    assert host("      gpus: none\n").gpus == "none"
    assert host("      gpus: [2, 0]\n").gpus == "0,2"
    for line, message in [("      gpus: [0, 0]\n", "a GPU is listed twice"),
                          ("      gpus: some\n", "expected all, none or a list of GPU indices such as "
                                                "\\[0, 1\\], got string 'some'"),
                          ("      gpus: [-1]\n", "hosts.a.gpus"),
                          ("      gpus: []\n", "a list of GPU indices")]:
        with pytest.raises(ConfigError, match=message) as caught:
            host(line)
        assert "inventory.yaml:6" in str(caught.value) and "gpus" in str(caught.value)


def test_indices_are_checked_against_the_gpus_the_host_has() -> None:
    assert parse_nvidia_smi_list(NVIDIA_SMI_L) == 2
    assert parse_nvidia_smi_list("No devices were found\n") == 0
    assert resolve_gpus("all", 2) == "all" and resolve_gpus("0,1", 2) == "0,1"
    assert resolve_gpus("all", 0) is None and resolve_gpus("none", 2) is None
    with pytest.raises(ValueError, match=r"no GPU 2 on this host \(nvidia-smi lists 2: 0..1\)"):
        resolve_gpus("1,2", 2)
    with pytest.raises(ValueError, match="nvidia-smi lists no GPU on this host"):
        resolve_gpus("0", 0)


def test_the_agent_environment_follows_the_config() -> None:
    base = AgentConfig(name="a", project="p", bind_address="127.0.0.1", port=7443, ca_cert="c",
                       cert="c", key="k", data_path="/d", state_file="s")
    for gpus, visible, device in [(None, "", "cpu"), ("0,2", "0,2", "cuda"), ("all", None, "cuda")]:
        environ = {"CUDA_VISIBLE_DEVICES": "7"}
        assert gpu.apply(dataclasses.replace(base, gpus=gpus), environ) == device
        assert environ.get("CUDA_VISIBLE_DEVICES") == visible
        assert environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"   # index N is nvidia-smi's GPU N


def test_the_unit_opens_devices_only_for_an_agent_with_gpus() -> None:
    assert directives(render_systemd_unit(SPEC))["PrivateDevices"] == ["yes"]
    unit = directives(render_systemd_unit(dataclasses.replace(
        SPEC, gpus=True, gpu_groups=("render", "video"))))
    assert "PrivateDevices" not in unit and unit["SupplementaryGroups"] == ["render video"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["User"] == ["flctl"]


def test_device_groups_are_the_owners_of_the_device_nodes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to give the stand-in device nodes a group (CI runs as root)")
    video = grp.getgrnam("video").gr_gid
    (tmp_path / "dev" / "dri").mkdir(parents=True)
    for name, gid in [("nvidia0", video), ("nvidiactl", 0), ("dri/renderD128", video),
                      ("null", video)]:
        node = tmp_path / "dev" / name
        node.write_text("")
        os.chown(node, 0, gid)
    assert gpu.device_groups(tmp_path) == ("video",)        # not root, not /dev/null's
    assert gpu.device_groups(tmp_path / "nothing") == ()


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 0\ncat <<'EOF'\n" + NVIDIA_SMI_L +
                      "EOF\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def test_agents_get_their_gpus_and_a_missing_index_fails_that_host(
        tmp_path: Path, fake_nvidia_smi: Path) -> None:
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "3").returncode == 0
    use_ports(root, 3)
    (root / "tasks" / "device_task.py").write_text(DEVICE_TASK)
    set_training(root, task="device_task:Device")
    inventory = root / "inventory.yaml"
    text = inventory.read_text()
    for name, line in [("local1", "gpus: [1]"), ("local2", "gpus: none"), ("local3", "gpus: [2]")]:
        text = text.replace(f"data_path: data/{name}.npz\n",
                            f"data_path: data/{name}.npz\n          {line}\n")
    inventory.write_text(text)
    try:
        deployed = by_host(deploy_json(root))
        assert deployed["local3"]["status"] == "failed"
        assert deployed["local3"]["error"] == \
            "gpus: no GPU 2 on this host (nvidia-smi lists 2: 0..1)"
        assert deployed["local1"]["status"] == deployed["local2"]["status"] == "changed", deployed

        status = by_host(run_cli("status", "-w", str(root), "--json").json())
        assert status["local1"]["environment"]["cuda_visible_devices"] == "1"
        assert status["local1"]["environment"]["device"] == "cuda"
        assert status["local2"]["environment"]["cuda_visible_devices"] == ""
        assert status["local2"]["environment"]["device"] == "cpu"

        trained = run_cli("train", "-w", str(root), "--rounds", "1", "--json", "-l", "local1",
                          "-l", "local2")
        assert trained.returncode == 0, trained.stderr
        seen = {name: json.loads((root / "data" / f"{name}.npz.seen.json").read_text())
                for name in ("local1", "local2")}
        assert seen == {"local1": {"device": "cuda", "visible": "1"},
                        "local2": {"device": "cpu", "visible": ""}}
    finally:
        run_cli("teardown", "-w", str(root))


def test_status_shows_where_each_agent_trains() -> None:
    from rich.console import Console

    from flctl.cli.render import status_table

    base = {"agent": "idle", "n_train": 10, "n_test": 2}
    rows = [{**base, "host": "gpu-box", "environment": {
                "torch": "2.3.1", "cuda": "12.1", "device": "cuda", "gpus": 2,
                "cuda_visible_devices": "0,1"}},
            {**base, "host": "laptop", "environment": {"torch": "1.13.1", "device": "cpu",
                                                       "gpus": 0}},
            {**base, "host": "numpy-only", "environment": {"python": "3.11.2"}}]
    console = Console(width=200, record=True)
    console.print(status_table(rows))
    lines = {line.split("│")[1].strip(): line for line in console.export_text().splitlines()
             if line.count("│") > 3 and "host" not in line}
    assert "2.3.1, CUDA 12.1, GPU 0,1" in lines["gpu-box"]
    assert "1.13.1, CPU" in lines["laptop"]
    assert "│ -" in lines["numpy-only"]
