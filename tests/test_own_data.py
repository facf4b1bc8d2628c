"""A task that reads its own data: any path (here a folder), with per-host
`data_params`, loaded by the task's `load_data` on the host; deploy checks it
there before the agent starts, and the first model comes from a host."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import numpy as np
import pytest

from flctl.core.data import make_federated_shards
from flctl.core.inventory import parse_inventory
from flctl.errors import ConfigError

from helpers import deploy_json, run_cli, set_training, use_ports

FOLDER_TASK = '''
from pathlib import Path

import numpy as np

from flctl.core.data import Dataset
from flctl.core.tasks import LogRegTask


class Folder(LogRegTask):
    """The built-in model, on data kept as x.npy and y.npy in a folder."""

    @staticmethod
    def load_data(path, params):
        folder = Path(path)
        if params.get("broken"):
            raise ValueError("this folder is not readable today")
        limit = int(params.get("limit", 10**9))
        x = np.load(folder / "x.npy")[:limit]
        y = np.load(folder / "y.npy")[:limit]
        return Dataset(x, y)

    @staticmethod
    def check_data(data):
        if data.n_train < 50:
            raise ValueError(f"only {data.n_train} examples; this model needs 50")
'''


def write_folders(root: Path, count: int) -> list[Path]:
    shards, _ = make_federated_shards(count, alpha=0.5, seed=0)
    folders = []
    for index, shard in enumerate(shards, start=1):
        folder = root / "data" / f"folder{index}"
        folder.mkdir(parents=True)
        np.save(folder / "x.npy", shard.x_train)
        np.save(folder / "y.npy", shard.y_train)
        folders.append(folder)
    return folders


def inventory(folders: list[Path], params: list[str]) -> str:
    lines = ["all:", "  vars:", "    connection: local", "  hosts:"]
    for index, (folder, extra) in enumerate(zip(folders, params), start=1):
        lines += [f"    local{index}:", f"      data_path: {folder}",
                  f"      data_params: {extra}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def workspace(tmp_path: Path):
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "2").returncode == 0
    use_ports(root, 2)
    (root / "tasks" / "folder_task.py").write_text(FOLDER_TASK)
    set_training(root, task="folder_task:Folder")
    folders = write_folders(root, 2)
    yield root, folders
    run_cli("teardown", "-w", str(root))


def test_a_task_reads_its_own_data_from_a_folder(workspace) -> None:
    root, folders = workspace
    (root / "inventory.yaml").write_text(inventory(folders, ["{limit: 100}", "{}"]))
    deployed = deploy_json(root)
    assert deployed["code"] == 0, deployed
    checks = {h["host"]: next(s for s in h["steps"] if s["name"] == "task check")
              for h in deployed["hosts"]}
    assert checks["local1"]["detail"] == "folder_task:Folder: 100 train / 0 test examples"
    trained = run_cli("train", "-w", str(root), "--rounds", "2", "--json")
    assert trained.returncode == 0, trained.stderr
    assert "initial weights from local1" in trained.stderr   # made by a host
    assert trained.json()["accuracy"] > 0.3
    status = {r["host"]: r for r in run_cli("status", "-w", str(root), "--json").json()["hosts"]}
    assert status["local1"]["n_train"] == 100


def test_a_loader_that_fails_fails_that_host_at_deploy(workspace) -> None:
    root, folders = workspace
    (root / "inventory.yaml").write_text(inventory(folders, ["{broken: true}", "{}"]))
    deployed = deploy_json(root)
    rows = {h["host"]: h for h in deployed["hosts"]}
    assert deployed["code"] == 5 and rows["local2"]["status"] == "changed"
    assert rows["local1"]["status"] == "failed"
    assert rows["local1"]["error"] == (
        f"task: folder_task:Folder.load_data('{folders[0]}'): ValueError: this folder is "
        f"not readable today")


def test_data_params_must_be_plain_values() -> None:
    text = "all:\n  hosts:\n    a:\n      ssh_host: h\n      data_path: /d\n" \
           "      data_params: {when: 2026-01-01}\n"
    with pytest.raises(ConfigError, match="hosts.a.data_params.when: must be plain values"):
        parse_inventory(text, "inventory.yaml", ipaddress.IPv4Network("10.0.0.0/24"))
    good = text.replace("2026-01-01", "'2026-01-01'")
    host = parse_inventory(good, "inventory.yaml", ipaddress.IPv4Network("10.0.0.0/24")).hosts[0]
    assert dict(host.data_params) == {"when": "2026-01-01"}


def test_the_tasks_own_check_refuses_unfit_data_at_deploy(workspace) -> None:
    root, folders = workspace
    (root / "inventory.yaml").write_text(inventory(folders, ["{limit: 20}", "{}"]))
    rows = {h["host"]: h for h in deploy_json(root)["hosts"]}
    assert rows["local1"]["status"] == "failed" and rows["local2"]["status"] == "changed"
    assert rows["local1"]["error"] == (
        "task: folder_task:Folder.check_data: ValueError: only 20 examples; this model needs 50")
