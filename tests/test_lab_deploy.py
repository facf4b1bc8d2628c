"""`flctl deploy` over real SSH to real sshd servers in network namespaces.

Each lab host has its own address, sshd, hostname and private /opt,
/var/lib and /run; nothing here is mocked. The lab has no systemd, so the
supervisor path is what runs (the unit file is covered by a golden test).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from flctl.core.renderers import cron_file_name, interface_name
from flctl.core.settings import (
    LimitSettings,
    Settings,
    load_settings,
    render_settings,
)
from flctl.workspace import load_workspace

from helpers import by_host, deploy_json, run_cli, set_training
from lab import Lab, lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]

HOSTS = 3


def host_rows(document: dict) -> list[dict]:
    """Per-host rows, without the hub's (this machine's end of the overlay)."""
    return [h for h in document["hosts"] if h["host"] != "hub"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("labws")
    lab = lab_up(HOSTS, workspace)
    try:
        first = deploy_json(workspace)
        assert first["code"] == 0, first
        assert {h["status"] for h in first["hosts"]} == {"changed"}
        yield lab
    finally:
        run_cli("teardown", "-w", str(workspace), timeout=300)
        lab.down()


def namespace_commands(host: str) -> list[str]:
    """Command lines of every process in a lab host's network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", f"flctl-{host}"], capture_output=True,
                          text=True).stdout.split()
    commands = []
    for pid in pids:
        try:
            commands.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
        except OSError:
            pass
    return commands


def remote(lab: Lab, host: str, script: str) -> str:
    return lab.exec(host, "sh", "-c", script).stdout.strip()


def test_agent_runs_from_the_offline_venv_with_its_own_key(lab: Lab) -> None:
    for host in lab.hosts:
        assert remote(lab, host, "test -x /opt/flctl/venv/bin/python && echo yes") == "yes"
        mode = remote(lab, host, f"stat -c %a /var/lib/flctl/{host}/agent.key")
        assert mode == "600"
        # the key exists on the host only: the operator's workspace never saw it
    assert not list(lab.workspace.rglob("agent.key"))


def test_redeploy_changes_nothing_and_uploads_nothing(lab: Lab) -> None:
    pids = {h: remote(lab, h, f"cat /var/lib/flctl/{h}/run/supervisor.pid") for h in lab.hosts}
    started = time.monotonic()
    again = deploy_json(lab.workspace)
    elapsed = time.monotonic() - started
    assert again["code"] == 0
    assert [(h["status"], h["changed"]) for h in again["hosts"]] == [("ok", 0)] * (HOSTS + 1)
    assert {h: remote(lab, h, f"cat /var/lib/flctl/{h}/run/supervisor.pid") for h in lab.hosts} == pids
    assert elapsed < 15


def test_status_over_ssh(lab: Lab) -> None:
    result = run_cli("status", "-w", str(lab.workspace), "--json")
    assert result.returncode == 0, result.stderr
    rows = by_host(result.json())
    for host in lab.hosts:
        row = rows[host]
        assert row["reachable"] and row["agent"] == "idle"
        assert row["n_train"] > 0 and row["mem_total_bytes"] > 0 and len(row["load"]) == 3
        overlay = str(load_workspace(lab.workspace).inventory.host(host).overlay_ip)
        assert row["address"] == f"{overlay}:{load_workspace(lab.workspace).settings.agent.port}"


def test_train_three_rounds_over_ssh_deployed_agents(lab: Lab) -> None:
    result = run_cli("train", "-w", str(lab.workspace), "--rounds", "3", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["rounds"] == 3 and sorted(summary["hosts"]) == sorted(lab.hosts)
    final = Path(summary["final_weights"])
    assert final.is_relative_to(lab.workspace)  # the weights are on the operator's machine
    with np.load(final) as weights:
        assert all(np.isfinite(weights[name]).all() for name in weights.files)
    assert summary["accuracy"] > 0.5


def test_killed_agent_comes_back(lab: Lab) -> None:
    host = lab.hosts[1]
    old = remote(lab, host, f"cat /var/lib/flctl/{host}/run/agent.pid")
    lab.exec(host, "kill", "-9", old)
    deadline = time.monotonic() + 30
    new = old
    while time.monotonic() < deadline:
        new = remote(lab, host, f"cat /var/lib/flctl/{host}/run/agent.pid 2>/dev/null || true")
        if new and new != old:
            status = run_cli("status", "-w", str(lab.workspace), "--json", "--limit", host)
            if status.returncode == 0 and by_host(status.json())[host]["agent"] == "idle":
                break
        time.sleep(0.3)
    assert new != old
    row = by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())[host]
    assert row["agent"] == "idle" and str(row["agent_pid"]) == new


def test_the_agent_runs_unprivileged(lab: Lab) -> None:
    """Agent and supervisor run as the system user `flctl` with no capabilities; the
    agent reads its data and its key (it answers with its data's size over mutual
    TLS), and can write neither /etc nor what deploy configured it with."""
    rows = by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())
    for host in lab.hosts:
        assert rows[host]["agent"] == "idle" and rows[host]["n_train"] > 0
        for pidfile in ("agent.pid", "supervisor.pid"):
            pid = remote(lab, host, f"cat /var/lib/flctl/{host}/run/{pidfile}")
            uid = remote(lab, host, f"stat -c %u /proc/{pid}")
            assert uid != "0" and remote(lab, host, f"id -nu {uid}") == "flctl"
            capabilities = remote(lab, host, f"awk '/^CapEff/ {{print $2}}' /proc/{pid}/status")
            assert int(capabilities, 16) == 0
        assert remote(lab, host, f"stat -c '%U %a' /var/lib/flctl/{host}/agent.key") == \
            "flctl 600"
        for target in ("/etc/flctl-probe", f"/var/lib/flctl/{host}/agent.json",
                       f"/var/lib/flctl/{host}/planted"):
            denied = lab.exec(host, "runuser", "-u", "flctl", "--", "sh", "-c",
                              f"echo x >> {target}", check=False)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, target
        assert remote(lab, host, "ls /etc/flctl-probe 2>/dev/null; true") == ""


def test_data_only_root_can_read_fails_at_deploy_not_in_round_one(lab: Lab) -> None:
    """The deploy that sets an agent up checks, as the agent's user, that the task
    reads its data (a redeploy with nothing changed does not look again)."""
    host = lab.hosts[1]
    assert run_cli("teardown", "-w", str(lab.workspace), "--limit", host).returncode == 0
    lab.exec(host, "chmod", "600", "/var/lib/flctl-data/data.npz")
    try:
        refused = deploy_json(lab.workspace, "--limit", host)
        [row] = host_rows(refused)
        assert row["status"] == "failed"
        assert row["error"].startswith("task: ") and "Permission denied" in row["error"]
    finally:
        lab.exec(host, "chmod", "644", "/var/lib/flctl-data/data.npz")
    assert deploy_json(lab.workspace, "--limit", host)["code"] == 0


def test_after_a_reboot_table_tunnel_and_agent_come_back_in_order(lab: Lab) -> None:
    """Simulate a reboot: kill the host's flctl processes, delete its tunnel and
    its table, then run what boot runs (the @reboot line deploy installed, as the
    lab has no systemd): the agent answers again, through the tunnel, guarded."""
    host = lab.hosts[0]
    workspace = load_workspace(lab.workspace)
    interface = interface_name(workspace.settings.project)
    cron = f"/etc/cron.d/{cron_file_name(workspace.settings.project)}"
    boot_line = remote(lab, host, f"tail -n 1 {cron}")
    assert boot_line.startswith("@reboot root ")
    for pidfile in ("supervisor.pid", "agent.pid"):
        lab.exec(host, "sh", "-c", f"kill -9 $(cat /var/lib/flctl/{host}/run/{pidfile})")
    lab.exec(host, "ip", "link", "delete", "dev", interface)
    lab.exec(host, "nft", "delete", "table", "inet", "flctl")
    down = by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())[host]
    assert down["agent"] != "idle"
    lab.exec(host, "sh", "-c", boot_line.removeprefix("@reboot root "), timeout=120)
    assert "table inet flctl" in remote(lab, host, "nft list tables")
    assert remote(lab, host, f"ip -brief link show {interface}").startswith(interface)
    deadline = time.monotonic() + 60
    row = down
    while time.monotonic() < deadline:
        row = by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())[host]
        if row["agent"] == "idle":
            break
        time.sleep(0.5)
    assert row["agent"] == "idle", row
    boot_log = remote(lab, host, f"cat /var/lib/flctl/{host}/boot.log")
    order = json.loads(boot_log.strip().splitlines()[-1])
    assert list(order) == ["firewall", "tunnel", "agent"] and order["agent"] == "started"
    assert deploy_json(lab.workspace)["code"] == 0   # and deploy finds it all in place


def test_changing_one_setting_changes_only_what_depends_on_it(lab: Lab) -> None:
    path = lab.workspace / "flctl.yaml"
    original = path.read_text()
    s = load_settings(path)
    path.write_text(render_settings(Settings(project=s.project, overlay=s.overlay, agent=s.agent,
                                             training=s.training, limits=LimitSettings(512))))
    try:
        checked = deploy_json(lab.workspace, "--check")
        for host in host_rows(checked):
            assert {s["name"] for s in host["steps"] if s["changed"]} == {"agent config", "agent"}
        applied = deploy_json(lab.workspace)
        for host in host_rows(applied):
            assert {s["name"] for s in host["steps"] if s["changed"]} == {"agent config", "agent"}
        config = json.loads(remote(lab, lab.hosts[0], f"cat /var/lib/flctl/{lab.hosts[0]}/agent.json"))
        assert config["max_message_mb"] == 512
    finally:
        path.write_text(original)
        deploy_json(lab.workspace)


def test_logs_show_the_agent_log(lab: Lab) -> None:
    result = run_cli("logs", lab.hosts[0], "-w", str(lab.workspace), "-n", "20")
    assert result.returncode == 0, result.stderr
    assert "listening on" in result.stdout


def test_a_users_task_module_is_shipped_and_trained(lab: Lab) -> None:
    tasks = lab.workspace / "tasks"
    (tasks / "tiny_task.py").write_text(
        "import numpy as np\n"
        "from flctl.core.tasks import LogRegTask\n\n"
        "class Tiny(LogRegTask):\n"
        "    \"\"\"The built-in model, under the user's own module name.\"\"\"\n"
    )
    settings = lab.workspace / "flctl.yaml"
    original = settings.read_text()
    set_training(lab.workspace, task="tiny_task:Tiny")   # the task is fixed at deploy
    try:
        shipped = deploy_json(lab.workspace)
        for row in host_rows(shipped):
            changed = {s["name"] for s in row["steps"] if s["changed"]}
            assert changed == {"task code", "agent config", "agent"}, row
        for host in lab.hosts:
            assert "class Tiny" in remote(lab, host, f"cat /var/lib/flctl/{host}/tasks/tiny_task.py")
        trained = run_cli("train", "-w", str(lab.workspace), "--rounds", "1", "--json",
                          timeout=300)
        assert trained.returncode == 0, trained.stderr
        assert trained.json()["accuracy"] > 0.3
    finally:
        (tasks / "tiny_task.py").unlink()
        settings.write_text(original)
    removed = deploy_json(lab.workspace)
    for row in host_rows(removed):
        assert {s["name"] for s in row["steps"] if s["changed"]} == \
            {"task code", "agent config", "agent"}
    for host in lab.hosts:
        assert remote(lab, host, f"find /var/lib/flctl/{host}/tasks -name '*.py'") == ""


def test_become_deploys_through_sudo_as_a_plain_user(lab: Lab) -> None:
    host = lab.hosts[2]
    remote(lab, host, "id deployer >/dev/null 2>&1 || useradd -m -p '*' -s /bin/sh deployer; "
                      "echo 'deployer ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/deployer; "
                      "chmod 440 /etc/sudoers.d/deployer")
    inventory = lab.workspace / "inventory.yaml"
    saved = inventory.read_text()
    assert run_cli("teardown", "-w", str(lab.workspace), "--limit", host).returncode == 0
    inventory.write_text(saved.replace(
        f"        {host}:\n",
        f"        {host}:\n          ssh_user: deployer\n          become: true\n"))
    try:
        first = deploy_json(lab.workspace, "--limit", host)
        assert first["code"] == 0, first
        assert first["hosts"][0]["status"] == "changed"
        owner = remote(lab, host, f"stat -c '%U %a' /var/lib/flctl/{host}/agent.key /opt/flctl")
        assert owner.splitlines() == ["flctl 600", "root 755"]   # the agent's user owns its key
        again = deploy_json(lab.workspace, "--limit", host)
        assert again["code"] == 0 and again["hosts"][0]["changed"] == 0
        status = by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())[host]
        assert status["agent"] == "idle"
        gone = run_cli("teardown", "-w", str(lab.workspace), "--limit", host, "--json")
        assert gone.returncode == 0 and gone.json()["hosts"][0]["status"] == "changed"
        assert remote(lab, host, "ls -d /opt/flctl /var/lib/flctl 2>/dev/null; true") == ""
    finally:
        inventory.write_text(saved)
        assert deploy_json(lab.workspace, "--limit", host)["code"] == 0


def test_unknown_host_key_is_refused_unless_accepted(lab: Lab) -> None:
    known = lab.workspace / "known_hosts"
    saved = known.read_text()
    host = lab.hosts[2]
    address = lab.addresses[host]
    known.write_text("".join(line + "\n" for line in saved.splitlines()
                             if not line.startswith(address + " ")))
    try:
        refused = deploy_json(lab.workspace, "--limit", host)
        assert refused["code"] == 5
        [row] = host_rows(refused)
        assert row["status"] == "unreachable"
        assert "SHA256:" in row["error"] and "--accept-new-host-keys" in row["error"]
        accepted = deploy_json(lab.workspace, "--limit", host, "--accept-new-host-keys")
        assert accepted["code"] == 0 and host_rows(accepted)[0]["changed"] == 0
        assert any(line.startswith(address + " ") for line in known.read_text().splitlines())
    finally:
        known.write_text(saved)


def test_an_unreachable_host_is_reported_while_others_deploy(lab: Lab) -> None:
    down = lab.hosts[0]
    lab.stop_host(down)
    try:
        started = time.monotonic()
        result = deploy_json(lab.workspace)
        assert result["code"] == 5
        rows = by_host(result)
        assert rows[down]["status"] == "unreachable" and rows[down]["error"]
        assert all(rows[h]["status"] == "ok" for h in lab.hosts if h != down), rows
        assert time.monotonic() - started < 60
    finally:
        lab.start_host(down)


def test_teardown_leaves_nothing_on_the_hosts(lab: Lab) -> None:
    result = run_cli("teardown", "-w", str(lab.workspace), "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    assert {h["status"] for h in result.json()["hosts"]} == {"changed"}
    for host in lab.hosts:
        left = remote(lab, host, "for p in /opt/flctl /var/lib/flctl; do [ -e $p ] && echo $p; "
                                 "done; true")
        assert left == ""
        assert remote(lab, host, "ls /var/lib/flctl-data") == "data.npz"  # the user's data stays
        assert not [cmd for cmd in namespace_commands(host) if "flctl.agent" in cmd]
    again = run_cli("teardown", "-w", str(lab.workspace), "--json", timeout=300)
    assert again.returncode == 0
    assert {h["status"] for h in again.json()["hosts"]} == {"ok"}
    # and deploy works again from scratch (the module fixture tears down at the end)
    assert deploy_json(lab.workspace)["code"] == 0
