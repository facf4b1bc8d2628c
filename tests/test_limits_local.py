"""Resource limits on real local agents (root here, so cgroups are writable;
this machine has cgroup v1 controllers).

local1 gets 50% of a CPU, 300M and nice 5; the others nothing. Its
supervisor and agent run in cgroups holding exactly those limits, a busy
loop in its CPU cgroup gets about half a CPU, and a task that allocates
more than 300M gets the agent killed: the round names local1 "out of
memory (limit 300 MB)" and carries on with the other two. Without a
writable cgroup (forced with FLCTL_NO_CGROUP=1), deploy warns that the CPU
share cannot be bounded and memory is only an RLIMIT_AS, fails the host
with --strict, and the task's MemoryError is named the same way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (
    by_host,
    deploy_json,
    deployed_local_workspace,
    local_workspace,
    run_cli,
    set_training,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")

HOG_TASK = '''
import numpy as np
from flctl.core.tasks import LogRegTask


class Hog(LogRegTask):
    """The built-in model; every fit first fills `hog_mb` MB (test-only)."""

    def __init__(self, hog_mb=0, **params):
        super().__init__(**params)
        self.hog_mb = int(hog_mb)

    def fit(self, weights, data, config):
        block = np.ones(self.hog_mb << 17)   # float64: 8 bytes each
        del block
        return super().fit(weights, data, config)
'''


def limit_local1(root: Path, limits: str) -> None:
    """Ship the hog task and give local1 (only) its own limits in the inventory."""
    (root / "tasks" / "hog.py").write_text(HOG_TASK)
    set_training(root, task="hog:Hog")
    inventory = root / "inventory.yaml"
    text = inventory.read_text()
    line = "          data_path: data/local1.npz\n"
    assert line in text
    inventory.write_text(text.replace(line, line + limits))


LIMITS = ("          agent_cpu_quota: 50%\n          agent_memory_max: 300M\n"
          "          agent_nice: 5\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("limits"), 3,
                                        prepare=lambda root: limit_local1(root, LIMITS))


def host_dir(root: Path, name: str) -> Path:
    return root / ".flctl" / "hosts" / name


def agent_pid(root: Path, name: str) -> int:
    return int((host_dir(root, name) / "run" / "agent.pid").read_text())


def cgroups(root: Path, name: str) -> dict[str, str]:
    return json.loads((host_dir(root, name) / "cgroups.json").read_text())


def nice_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])   # field 19: nice


def test_deploy_names_the_mechanism_of_each_limit(workspace: Path) -> None:
    hosts = by_host(deploy_json(workspace))
    steps = {s["name"]: s for s in hosts["local1"]["steps"]}
    assert re.fullmatch(r"cpu_quota 50% by cgroup v[12]; memory_max 300 MB by cgroup v[12]; "
                        r"nice 5 by setpriority", steps["limits"]["detail"])
    assert hosts["local1"]["warnings"] == [] and hosts["local1"]["status"] == "ok"
    assert "limits" not in {s["name"] for s in hosts["local2"]["steps"]}


def test_the_agent_runs_in_cgroups_holding_its_limits(workspace: Path) -> None:
    pid = agent_pid(workspace, "local1")
    dirs = cgroups(workspace, "local1")
    cpu, memory = Path(dirs["cpu"]), Path(dirs["memory"])
    if (cpu / "cpu.max").exists():
        assert (cpu / "cpu.max").read_text().split() == ["50000", "100000"]
        assert int((memory / "memory.max").read_text()) == 300 << 20
    else:
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50000
        assert int((cpu / "cpu.cfs_period_us").read_text()) == 100000
        assert int((memory / "memory.limit_in_bytes").read_text()) == 300 << 20
    for group in (cpu, memory):
        assert str(pid) in (group / "cgroup.procs").read_text().split()
    assert nice_of(pid) == 5
    assert nice_of(agent_pid(workspace, "local2")) == os.getpriority(os.PRIO_PROCESS, 0)
    assert not (host_dir(workspace, "local2") / "cgroups.json").exists()


def test_a_busy_loop_in_the_cpu_cgroup_gets_about_half_a_cpu(workspace: Path) -> None:
    """Measured, not only read back: in 3 s a busy loop gets at most 1.5 s
    of CPU at a 50% quota, however idle the machine (a hard cap; unbounded it
    gets up to 3 s on an idle one). The margin is for start-up before it joins
    the cgroup; a loaded machine may give it less, never more."""
    procs = Path(cgroups(workspace, "local1")["cpu"]) / "cgroup.procs"
    loop = ("import os, time\n"
            f"open({str(procs)!r}, 'w').write(str(os.getpid()))\n"
            "end = time.monotonic() + 3\n"
            "while time.monotonic() < end: pass\n"
            "t = os.times(); print(t.user + t.system)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", loop], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    cpu_s = float(done.stdout)
    assert time.monotonic() - started >= 3
    assert 0.1 < cpu_s < 1.8, f"{cpu_s:.2f} s of CPU in 3 s at a 50% quota"


def test_a_task_over_its_memory_limit_is_named_out_of_memory(workspace: Path) -> None:
    set_training(workspace, rounds=1, min_hosts=2, round_retries=0, deadline_s=120.0,
                 task_params={"n_features": 64, "n_classes": 10, "hog_mb": 450})
    before = agent_pid(workspace, "local1")
    result = run_cli("train", "-w", str(workspace), "--run-id", "oom", timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((workspace / "runs" / "oom" / "metrics.jsonl").read_text()
                        .splitlines()[0])
    assert record["dropped"] == {"local1": "out of memory (limit 300 MB)"}
    assert record["participants"] == ["local2", "local3"]
    # the kernel killed it, the supervisor restarted it, the new agent says why
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (host_dir(workspace, "local1") / "run"
                                           / "agent.pid").read_text().strip() == str(before):
        time.sleep(0.1)
    assert agent_pid(workspace, "local1") != before
    log = (host_dir(workspace, "local1") / "run" / "agent.log").read_text()
    assert "the previous agent stopped: out of memory (limit 300 MB)" in log
    status = by_host(run_cli("status", "-w", str(workspace), "--json").json())
    assert status["local1"]["last_exit"] == "out of memory (limit 300 MB)"
    assert status["local2"]["last_exit"] is None
    shown = run_cli("status", "-w", str(workspace)).stdout
    assert "restarted: out of memory (limit 300 MB)" in " ".join(shown.split())


def test_teardown_removes_the_cgroups(workspace: Path) -> None:
    dirs = set(cgroups(workspace, "local1").values())
    assert dirs and all(Path(d).is_dir() for d in dirs)
    assert run_cli("teardown", "-w", str(workspace)).returncode == 0
    assert not any(Path(d).exists() for d in dirs)


def test_without_cgroups_rlimits_bound_memory_and_cpu_cannot_be_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLCTL_NO_CGROUP", "1")   # the host helper sees no cgroup
    for root in local_workspace(tmp_path / "w", 2):
        limit_local1(root, "          agent_cpu_quota: 50%\n          agent_memory_max: 600M\n")
        deployed = deploy_json(root)
        assert deployed["code"] == 0   # a warning, not a failure
        local1 = by_host(deployed)["local1"]
        assert local1["status"] == "changed" and len(local1["warnings"]) == 2
        assert "cpu_quota 50% cannot be enforced" in local1["warnings"][0]
        assert "rlimits cannot bound a CPU share" in local1["warnings"][0]
        assert "RLIMIT_AS" in local1["warnings"][1]
        limits = Path(f"/proc/{agent_pid(root, 'local1')}/limits").read_text()
        assert re.search(rf"Max address space\s+{600 << 20}\s+{600 << 20}", limits)
        assert not (host_dir(root, "local1") / "cgroups.json").exists()
        # the table shows the warnings too
        shown = run_cli("deploy", "-w", str(root))
        assert shown.returncode == 0 and "warning: local1: cpu_quota 50% cannot" in shown.stderr
        strict = deploy_json(root, "--strict")
        assert strict["code"] != 0
        failed = by_host(strict)["local1"]
        assert failed["status"] == "failed" and "--strict" in failed["error"]
        assert by_host(strict)["local2"]["status"] == "ok"
        # the task's allocation fails inside the agent, which lives on
        set_training(root, rounds=1, min_hosts=1, round_retries=0,
                     task_params={"n_features": 64, "n_classes": 10, "hog_mb": 450})
        pid = agent_pid(root, "local1")
        result = run_cli("train", "-w", str(root), "--run-id", "rl", timeout=300)
        assert result.returncode == 0, result.stderr
        record = json.loads((root / "runs" / "rl" / "metrics.jsonl").read_text()
                            .splitlines()[0])
        assert record["dropped"] == {"local1": "out of memory (limit 600 MB)"}
        assert agent_pid(root, "local1") == pid
