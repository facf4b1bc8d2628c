"""Hosts reachable over SSH only through a bastion: deployed and trained through ProxyJump.

lab2 and lab3 drop SSH (port 22) from anything but lab1, with an nftables
table inside their own namespaces (the root namespace's ruleset is never
touched). The workspace's `ssh_config:` (never the real ~/.ssh/config) says
`ProxyJump lab1` for them. Only SSH goes through the bastion: the agents'
traffic (WireGuard, then TLS over the overlay) goes from this machine to
each host directly, as in any lab.
"""

from __future__ import annotations

import subprocess

import pytest

from helpers import by_host, deploy_json, run_cli
from lab import Lab, lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]

BASTION = "lab1"
BEHIND = ("lab2", "lab3")
TABLE = "flctl_lab_bastion"


def ssh_only_from(lab: Lab, host: str, source: str) -> None:
    """Inside `host`'s namespace: TCP port 22 accepted from `source` only."""
    for command in (
        f"add table inet {TABLE}",
        f"add chain inet {TABLE} input {{ type filter hook input priority -10 ; "
        "policy accept ; }",
        f"add rule inet {TABLE} input tcp dport 22 ip saddr {source} accept",
        f"add rule inet {TABLE} input tcp dport 22 drop",
    ):
        lab.exec(host, "sh", "-c", f"nft '{command}'" if "{" in command else f"nft {command}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("bastionws")
    lab = lab_up(3, workspace)
    try:
        for host in BEHIND:
            ssh_only_from(lab, host, lab.addresses[BASTION])
        (workspace / "ssh_config").write_text("".join(
            [f"Host {BASTION}\n  HostName {lab.addresses[BASTION]}\n\n"]
            + [f"Host {host}\n  HostName {lab.addresses[host]}\n  ProxyJump {BASTION}\n\n"
               for host in BEHIND]
            + [f"Host *\n  User root\n  IdentityFile {lab.key}\n"]))
        settings = workspace / "flctl.yaml"
        settings.write_text(settings.read_text() + "ssh_config: ssh_config\n")
        inventory = workspace / "inventory.yaml"
        text = inventory.read_text()
        for host in BEHIND:  # reach them by their ssh_config alias
            text = text.replace(f"ssh_host: {lab.addresses[host]}", f"ssh_host: {host}")
        inventory.write_text(text)
        yield lab
    finally:
        run_cli("teardown", "-w", str(workspace), timeout=300)
        lab.down()


def test_ssh_to_the_hosts_behind_the_bastion_needs_the_bastion(lab: Lab) -> None:
    for host in BEHIND:
        direct = subprocess.run(lab.ssh_command(host, "true", connect_timeout=3),
                                capture_output=True, timeout=30)
        assert direct.returncode != 0
        assert lab.probe(BASTION, lab.addresses[host], 22) == "open"
    assert subprocess.run(lab.ssh_command(BASTION, "true"), capture_output=True,
                          timeout=30).returncode == 0


def test_deploy_and_train_through_proxyjump(lab: Lab) -> None:
    assert lab.workspace is not None
    first = deploy_json(lab.workspace)
    assert first["code"] == 0, first
    rows = by_host(first)
    assert {rows[h]["status"] for h in lab.hosts} == {"changed"}, first
    for host in BEHIND:  # the agents came up behind the bastion
        assert lab.exec(host, "sh", "-c", "test -x /opt/flctl/venv/bin/python && echo yes"
                        ).stdout.strip() == "yes"
    result = run_cli("train", "-w", str(lab.workspace), "--rounds", "2", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    history = result.json()["history"]
    assert len(history) == 2
    assert all(sorted(r["participants"]) == sorted(lab.hosts) for r in history), history
    again = deploy_json(lab.workspace)  # a second deploy through the bastion changes nothing
    assert again["code"] == 0 and all(h["changed"] == 0 for h in again["hosts"]), again
