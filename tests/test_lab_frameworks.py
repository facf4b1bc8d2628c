"""Frameworks on lab hosts: the PyTorch example on the hosts' own PyTorch,
and a Flower client run unchanged.

PyTorch comes from Debian's python3-torch (what an admin installs), used
through `python: /usr/bin/python3` in the inventory.

The agent's venv is layered on that interpreter: torch and numpy come from
Debian (nothing is shipped for them), what the interpreter lacks (ml_dtypes,
a compiled extension, and flctl's own newer dependencies) is shipped as
wheels. Three rounds run over the WireGuard overlay; `flctl status` shows
the torch each host trains with. A host left on a plain interpreter fails
its task check with one line, and the others train.

The Flower client (tests/fixtures/flower_digits/client.py: a NumPyClient
and a ClientApp as Flower's quickstarts write them) runs through
flctl.flower with `flwr` in tasks/requirements.txt: deploy resolves flwr
and its dependencies into wheels and installs them on hosts that never had
them.

A frozen backbone in the workspace's frozen/ is shipped once; rounds carry
only the trainable head; a host whose copy changed is left out with one line.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator.records import load_frozen_sha256
from flctl.core.frozen import digest
from flctl.core.settings import load_settings
from test_frozen import BACKBONE, HEAD, HEAD_TASK

from helpers import by_host, deploy_json, run_cli, set_training
from lab import Lab, lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pytorch-digits"
FLOWER_CLIENT = Path(__file__).resolve().parent / "fixtures" / "flower_digits"
HOSTS = 3
DEBIAN_PYTHON = "/usr/bin/python3"


def debian_torch() -> str:
    done = subprocess.run([DEBIAN_PYTHON, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail("Debian's python3-torch is not installed (scripts/test.sh installs it)")
    return done.stdout.strip()


def layered_inventory(text: str, hosts: list[str]) -> str:
    """`python: /usr/bin/python3` for `hosts` (the rest keep the default)."""
    for host in hosts:
        number = int(host[3:])
        text = text.replace(f"          ssh_host: 198.18.0.{10 + number}\n",
                            f"          ssh_host: 198.18.0.{10 + number}\n"
                            f"          python: {DEBIAN_PYTHON}\n")
    return text


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("labtorch")
    lab = lab_up(HOSTS, workspace)
    try:
        shutil.copytree(EXAMPLE / "tasks", workspace / "tasks", dirs_exist_ok=True)
        set_training(workspace, task="digits_cnn:DigitsCNN", task_params={"threads": 1},
                     epochs=1, lr=0.05)
        inventory = workspace / "inventory.yaml"
        inventory.write_text(layered_inventory(inventory.read_text(), lab.hosts))
        yield lab
    finally:
        run_cli("teardown", "-w", str(workspace), timeout=300)
        lab.down()


def remote(lab: Lab, host: str, script: str) -> str:
    return lab.exec(host, "sh", "-c", script).stdout.strip()


def test_the_example_trains_with_the_hosts_own_torch_over_the_overlay(lab: Lab) -> None:
    torch_version = debian_torch()
    deployed = deploy_json(lab.workspace)
    assert deployed["code"] == 0, deployed
    rows = by_host(deployed)
    for host in lab.hosts:
        steps = {s["name"]: s for s in rows[host]["steps"]}
        assert f"torch {torch_version}" in steps["agent software"]["detail"]   # from the host
        assert steps["task check"]["detail"].endswith(f"; torch {torch_version}")
        wheels = remote(lab, host, "ls /opt/flctl/wheels").split()
        assert not [w for w in wheels if w.startswith(("torch-", "numpy-"))], wheels
        shipped = [w for w in wheels if w.startswith("ml_dtypes-")]
        assert shipped and "manylinux" in shipped[0]              # compiled, not pure Python
        # the host's interpreter never had it: it is the venv's own
        assert remote(lab, host, f"{DEBIAN_PYTHON} -c 'import ml_dtypes' 2>&1 || true") \
            .endswith("No module named 'ml_dtypes'")
        where = remote(lab, host, "/opt/flctl/venv/bin/python -c "
                                  "'import ml_dtypes, torch; print(torch.__file__); "
                                  "print(ml_dtypes.__file__)'").splitlines()
        assert where[0].startswith("/usr/lib/python3/dist-packages/torch/")
        assert where[1].startswith("/opt/flctl/venv/")

    trained = run_cli("train", "-w", str(lab.workspace), "--rounds", "3", "--json", timeout=600)
    assert trained.returncode == 0, trained.stderr
    summary = trained.json()
    assert summary["rounds"] == 3 and sorted(summary["hosts"]) == lab.hosts
    assert summary["accuracy"] > 0.6
    overlay = load_settings(lab.workspace / "flctl.yaml").overlay.subnet
    for host in lab.hosts:        # the agents answer only on the overlay: rounds ran over it
        listening = remote(lab, host, "ss -Htln").split("\n")
        agent = [line.split()[3] for line in listening if ":7443" in line]
        assert agent and all(ipaddress.IPv4Address(a.rsplit(":", 1)[0]) in overlay
                             for a in agent), listening

    status = run_cli("status", "-w", str(lab.workspace), "--json").json()
    for row in status["hosts"]:
        assert row["environment"]["torch"] == torch_version
        assert row["environment"]["device"] == "cpu"              # lab hosts have no GPU
    table = run_cli("status", "-w", str(lab.workspace)).stdout
    assert table.count(f"{torch_version}, CPU") == HOSTS

    again = deploy_json(lab.workspace)                            # nothing changed: no upload
    for host in lab.hosts:
        steps = {s["name"]: s for s in by_host(again)[host]["steps"]}
        assert not any(s["changed"] for s in steps.values()), steps


def test_a_host_without_torch_fails_its_task_check_and_the_others_train(lab: Lab) -> None:
    """lab3 is left on the default interpreter (its venv sees no Debian torch) and
    the requirements file is gone: that host fails with one line; the rest train."""
    workspace = lab.workspace
    inventory = workspace / "inventory.yaml"
    layered = inventory.read_text()
    requirements = workspace / "tasks" / "requirements.txt"
    listed = requirements.read_text()
    plain = layered.replace(f"          python: {DEBIAN_PYTHON}\n", "")
    inventory.write_text(layered_inventory(plain, ["lab1", "lab2"]))
    requirements.unlink()
    try:
        deployed = deploy_json(workspace)
        rows = by_host(deployed)
        assert deployed["code"] == 5
        assert rows["lab3"]["status"] == "failed"
        assert rows["lab3"]["error"] == (
            "task: task 'digits_cnn:DigitsCNN': importing 'digits_cnn' failed: no module named "
            "'torch' (list it in tasks/requirements.txt, or set the host's python: to an "
            "interpreter that has it)")
        assert {rows["lab1"]["status"], rows["lab2"]["status"]} <= {"ok", "changed"}
        trained = run_cli("train", "-w", str(workspace), "--rounds", "1", "--json",
                          "-l", "lab1", "-l", "lab2", timeout=600)
        assert trained.returncode == 0, trained.stderr
        assert sorted(trained.json()["hosts"]) == ["lab1", "lab2"]
    finally:
        inventory.write_text(layered)
        requirements.write_text(listed)
    assert deploy_json(workspace)["code"] == 0


def test_a_flower_client_runs_unchanged(lab: Lab) -> None:
    workspace = lab.workspace
    saved = {p: p.read_text() for p in (workspace / "inventory.yaml", workspace / "flctl.yaml")}
    tasks = workspace / "tasks"
    shutil.move(tasks, workspace / "tasks.torch")
    shutil.copytree(FLOWER_CLIENT, tasks)
    inventory = workspace / "inventory.yaml"
    inventory.write_text(inventory.read_text().replace(f"          python: {DEBIAN_PYTHON}\n", ""))
    set_training(workspace, task="flower_task:Digits", task_params={}, epochs=1, lr=0.5)
    try:
        deployed = deploy_json(workspace)
        assert deployed["code"] == 0, deployed
        for host in lab.hosts:
            software = {s["name"]: s for s in by_host(deployed)[host]["steps"]}["agent software"]
            assert "flwr " in software["detail"], software
            assert remote(lab, host, f"{DEBIAN_PYTHON} -c 'import flwr' 2>&1 || true") \
                .endswith("No module named 'flwr'")                # not on the host before
        trained = run_cli("train", "-w", str(workspace), "--rounds", "3", "--json",
                          timeout=600)
        assert trained.returncode == 0, trained.stderr
        assert "evaluation failed" not in trained.stderr, trained.stderr
        assert trained.json()["accuracy"] > 0.7
    finally:
        shutil.rmtree(tasks)
        shutil.move(workspace / "tasks.torch", tasks)
        for path, text in saved.items():
            path.write_text(text)


def test_a_frozen_backbone_is_shipped_once_checked_and_never_sent(lab: Lab) -> None:
    """The workspace's frozen/ goes to every host once; rounds carry only the
    head (10% of the model); a host whose copy changes is left out of the
    next run with one line, and a redeploy puts the right copy back."""
    workspace = lab.workspace
    saved = {p: p.read_text() for p in (workspace / "flctl.yaml",)}
    tasks = workspace / "tasks"
    shutil.move(tasks, workspace / "tasks.torch")
    tasks.mkdir()
    (tasks / "headtask.py").write_text(HEAD_TASK)
    frozen = workspace / "frozen"
    frozen.mkdir()
    np.save(frozen / "backbone.npy",
            np.random.default_rng(0).standard_normal(BACKBONE).astype(np.float32))
    sha = digest(frozen).sha256
    set_training(workspace, task="headtask:HeadTask", task_params={})
    try:
        deployed = deploy_json(workspace)
        assert deployed["code"] == 0, deployed
        for host in lab.hosts:
            steps = {s["name"]: s for s in by_host(deployed)[host]["steps"]}
            assert steps["frozen part"]["changed"] and "uploaded 1" in \
                steps["frozen part"]["detail"], steps
            assert f"frozen part {sha[:12]}" in steps["verify"]["detail"], steps
        trained = run_cli("train", "-w", str(workspace), "--rounds", "2", "--json", timeout=600)
        assert trained.returncode == 0, trained.stderr
        summary = trained.json()
        head_bytes = 4 * HEAD
        for record in summary["history"]:
            assert sorted(record["participants"]) == lab.hosts
            # only the heads came up: the trainable share, headers within 5%
            assert 3 * head_bytes <= record["bytes_received"] <= 1.05 * 3 * head_bytes
        assert load_frozen_sha256(Path(summary["run_dir"]) / "final.npz") == sha

        again = deploy_json(workspace)
        for host in lab.hosts:
            steps = {s["name"]: s for s in by_host(again)[host]["steps"]}
            assert not steps["frozen part"]["changed"], steps

        # someone replaces lab3's copy by hand: the next run goes on without it
        remote(lab, "lab3", "/opt/flctl/venv/bin/python -c \"import numpy as np; "
                            "p='/var/lib/flctl/lab3/frozen/backbone.npy'; a=np.load(p); "
                            "a[0]+=1; np.save(p, a)\"")
        trained = run_cli("train", "-w", str(workspace), "--rounds", "1", "--json", timeout=600)
        assert trained.returncode == 0, trained.stderr
        assert sorted(trained.json()["hosts"]) == lab.hosts
        assert trained.json()["history"][0]["participants"] == ["lab1", "lab2"]
        told = [line for line in trained.stderr.splitlines() if "lab3" in line]
        assert len(told) == 1 and f"differs from the run's {sha[:12]}" in told[0], \
            trained.stderr
        repaired = deploy_json(workspace)
        assert repaired["code"] == 0, repaired
        steps = {s["name"]: s for s in by_host(repaired)["lab3"]["steps"]}
        assert steps["frozen part"]["changed"], steps
    finally:
        shutil.rmtree(tasks)
        shutil.rmtree(frozen)
        shutil.move(workspace / "tasks.torch", tasks)
        for path, text in saved.items():
            path.write_text(text)
