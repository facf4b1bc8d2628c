"""The overlay, for real: WireGuard (wireguard-go) between the hub (this
machine's root namespace) and lab hosts, and flctl's nftables table on each
host, so that agents are reachable only through the tunnel."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from flctl.core.renderers import interface_name
from flctl.deploy import engine
from flctl.errors import FlctlError
from flctl.workspace import load_workspace

from helpers import by_host, deploy_json, run_cli
from lab import Lab, lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]

HOSTS = 3
STRANGER = "labx"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("overlayws")
    lab = lab_up(HOSTS, workspace)
    # a table that is not ours, on one host: it must survive deploy and teardown
    lab.exec(lab.hosts[0], "sh", "-c", "nft 'add table inet other' && nft 'add chain inet other c "
             "{ type filter hook input priority 10; policy accept; }' && "
             "nft 'add rule inet other c udp dport 9999 counter'")
    try:
        first = deploy_json(workspace)
        assert first["code"] == 0, first
        yield lab
    finally:
        run_cli("teardown", "-w", str(workspace), timeout=300)
        lab.down()


def remote(lab: Lab, host: str, script: str) -> str:
    return lab.exec(host, "sh", "-c", script).stdout.strip()


def probe_from(lab: Lab, where: str | None, address: str, port: int) -> str:
    """Try a TCP connect to address:port from the hub (None) or a lab namespace."""
    if where is None:
        with socket.socket() as s:
            s.settimeout(2)
            try:
                s.connect((address, port))
                return "open"
            except OSError as exc:
                return f"closed {exc}"
    return lab.probe(where, address, port)


def ssh_works(lab: Lab, host: str) -> bool:
    done = subprocess.run(lab.ssh_command(host, "true"), capture_output=True, timeout=20)
    return done.returncode == 0


def agent_port(lab: Lab) -> int:
    return load_workspace(lab.workspace).settings.agent.port


def test_deploy_reports_the_hub_and_tunnels(lab: Lab) -> None:
    again = deploy_json(lab.workspace)
    assert again["code"] == 0
    rows = by_host(again)
    assert set(rows) == {*lab.hosts, "hub"}
    assert all(row["changed"] == 0 for row in rows.values()), rows
    interface = interface_name(load_workspace(lab.workspace).settings.project)
    assert Path(f"/sys/class/net/{interface}").exists()  # the hub's end, on this machine
    for host in lab.hosts:
        assert remote(lab, host, f"ip -brief addr show {interface}").split()[0] == interface
        assert remote(lab, host, f"stat -c %a /var/lib/flctl/{host}/wg/private.key") == "600"
    assert not list(lab.workspace.rglob("*/wg/private.key"))[1:]  # only the hub's own key here


def test_status_shows_handshakes(lab: Lab) -> None:
    rows = by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())
    for host in lab.hosts:
        assert rows[host]["tunnel"] == "up", rows[host]
        assert 0 <= rows[host]["handshake_age_s"] < 180
        assert rows[host]["tunnel_rx_bytes"] > 0
        assert rows[host]["address"].startswith("198.19.0.")


def test_training_runs_over_the_overlay(lab: Lab) -> None:
    result = run_cli("train", "-w", str(lab.workspace), "--rounds", "3", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert sorted(summary["hosts"]) == sorted(lab.hosts) and summary["rounds"] == 3
    assert all(len(r["participants"]) == HOSTS for r in summary["history"])


def test_secure_aggregation_over_the_overlay(lab: Lab) -> None:
    """The hosts sign their round keys with the keys deploy made on them and check
    each other's certificates; the coordinator only relays and sums."""
    plain = run_cli("train", "-w", str(lab.workspace), "--rounds", "3", "--json", timeout=300)
    secure = run_cli("train", "-w", str(lab.workspace), "--rounds", "3", "--json",
                     "--secure-aggregation", timeout=300)
    assert secure.returncode == 0, secure.stderr
    assert all(len(r["participants"]) == HOSTS for r in secure.json()["history"])
    assert secure.json()["accuracy"] == pytest.approx(plain.json()["accuracy"], abs=0.005)


def test_agent_port_is_closed_on_the_underlay(lab: Lab) -> None:
    port = agent_port(lab)
    target = lab.hosts[0]
    underlay = lab.addresses[target]
    overlay = str(load_workspace(lab.workspace).inventory.host(target).overlay_ip)
    assert probe_from(lab, None, overlay, port) == "open"  # the hub, through the tunnel
    assert probe_from(lab, None, underlay, port).startswith("closed")  # the hub, underlay
    assert probe_from(lab, lab.hosts[1], underlay, port).startswith("closed")  # another host
    assert probe_from(lab, STRANGER, underlay, port).startswith("closed")  # not in the inventory
    assert probe_from(lab, lab.hosts[1], overlay, port).startswith("closed")  # not the hub
    assert ssh_works(lab, target)


def test_foreign_table_is_untouched(lab: Lab) -> None:
    listing = remote(lab, lab.hosts[0], "nft list table inet other")
    assert "udp dport 9999" in listing
    assert "flctl" in remote(lab, lab.hosts[0], "nft list tables")


def test_unconfirmed_firewall_change_rolls_back(lab: Lab) -> None:
    """Make the confirmation fail for real: the host restores the old rules."""
    target = lab.hosts[1]
    # Someone changed the live rules: deploy will put its table back, and the
    # unconfirmed change must be undone, restoring what was there before.
    remote(lab, target, "nft flush chain inet flctl input")
    before = remote(lab, target, "nft list table inet flctl")
    workspace = load_workspace(lab.workspace)
    host = workspace.inventory.host(target)

    def refuse(*_: object) -> None:
        raise FlctlError("simulated: the new SSH connection was refused")

    results = engine.deploy(workspace, [host], confirm_new_connection=refuse,
                            rollback_after_s=2.0)
    row = next(r for r in results if r.host == target)
    assert row.status == "failed" and "restores its previous firewall table" in row.error
    assert remote(lab, target, "nft list table inet flctl") != before  # applied, unconfirmed
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if remote(lab, target, "nft list table inet flctl") == before:
            break
        time.sleep(0.2)
    assert remote(lab, target, "nft list table inet flctl") == before  # rolled back
    assert ssh_works(lab, target)
    assert deploy_json(lab.workspace)["code"] == 0
    assert ssh_works(lab, target)


def test_a_host_whose_tunnel_is_down_is_reported_and_training_goes_on(lab: Lab) -> None:
    interface = interface_name(load_workspace(lab.workspace).settings.project)
    down = lab.hosts[2]
    lab.exec(down, "ip", "link", "del", interface)
    try:
        rows = by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())
        assert rows[down]["tunnel"] == "down"
        assert rows[down]["agent"] != "idle"
        assert all(rows[h]["tunnel"] == "up" for h in lab.hosts if h != down)
        started = time.monotonic()
        result = run_cli("train", "-w", str(lab.workspace), "--rounds", "2", "--json",
                         timeout=300)
        assert result.returncode == 0, result.stderr
        summary = result.json()
        assert all(sorted(r["participants"]) == sorted(set(lab.hosts) - {down})
                   for r in summary["history"])
        assert time.monotonic() - started < 60
    finally:
        assert deploy_json(lab.workspace)["code"] == 0  # brings the tunnel back
    assert by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())[down][
        "tunnel"] == "up"


def test_teardown_removes_interface_table_and_keys(lab: Lab) -> None:
    interface = interface_name(load_workspace(lab.workspace).settings.project)
    result = run_cli("teardown", "-w", str(lab.workspace), "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    for host in lab.hosts:
        assert remote(lab, host, f"ip link show {interface} 2>/dev/null; true") == ""
        assert "flctl" not in remote(lab, host, "nft list tables")
        assert remote(lab, host, "ls /var/lib/flctl 2>/dev/null; true") == ""
        assert ssh_works(lab, host)
    assert "udp dport 9999" in remote(lab, lab.hosts[0], "nft list table inet other")
    assert not Path(f"/sys/class/net/{interface}").exists()
    assert not (lab.workspace / ".flctl" / "wg" / f"{interface}.conf").exists()
