"""`flctl doctor`: each check on the host's answer, and the script run for real."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from flctl.core.doctor import (
    OVERLAY_MTU,
    WG_OVERHEAD,
    Probe,
    diagnose,
    doctor_script,
)
from flctl.core.facts import parse_key_values
from flctl.deploy.local import LocalConnector

from helpers import run_cli, use_ports

HEALTHY = {"arch": "x86_64", "python": "3.11.2", "python_venv": "yes", "uid": "0",
           "disk_free_kb": str(10 << 20), "state_disk_free_kb": str(10 << 20),
           "tcp_listen": "0016 ", "udp_bound": "", "nft": "yes", "wg_tools": "yes",
           "wg_go": "yes", "data": "readable", "data_user": "flctl", "mtu": "ok",
           "gpu_count": "0"}
PROBE = Probe(python="python3", install_dir="/opt/flctl", state_dir="/var/lib/flctl/h",
              data_path="/data/h.npz", tcp_port=7443, udp_port=51820,
              mtu_target="198.18.0.1", gpus="all", become=False, remote=True)


def verdicts(facts: dict[str, str], probe: Probe = PROBE, skew: float = 0.0,
             uncertainty: float = 0.05) -> dict[str, bool | None]:
    return {c.name: c.ok for c in diagnose(facts, probe, skew, uncertainty)}


def problem(facts: dict[str, str], name: str, probe: Probe = PROBE, skew: float = 0.0):
    [check] = [c for c in diagnose(facts, probe, skew, 0.05) if c.name == name]
    assert check.ok is False, check
    assert check.fix, check     # every problem comes with what to do
    return check


def test_a_healthy_host_passes_every_check() -> None:
    assert verdicts(HEALTHY) == {name: True for name in (
        "ssh", "sudo", "python", "disk", "clock", "ports", "nftables", "wireguard", "mtu",
        "data", "gpus")}


@pytest.mark.parametrize("change, check, words", [
    ({"python": ""}, "python", "no Python"),
    ({"python": "3.8.10"}, "python", "too old"),
    ({"python_venv": "no"}, "python", "no venv"),
    ({"arch": "armv7l"}, "python", "armv7l"),
    ({"uid": "1000"}, "sudo", "become"),
    ({"disk_free_kb": "1024"}, "disk", "1 MB free for /opt/flctl"),
    ({"state_disk_free_kb": "2048"}, "disk", "2 MB free for /var/lib/flctl/h"),
    ({"tcp_listen": "0016 1D13"}, "ports", "TCP 7443"),
    ({"udp_bound": "CA6C"}, "ports", "UDP 51820"),
    ({"nft": "missing"}, "nftables", "not installed"),
    ({"nft": "unusable"}, "nftables", "fails"),
    ({"wg_tools": ""}, "wireguard", "wg tool"),
    ({"wg_go": ""}, "wireguard", "no WireGuard kernel module"),
    ({"mtu": "too_small"}, "mtu", f"{OVERLAY_MTU + WG_OVERHEAD}-byte"),
    ({"data": "missing"}, "data", "does not exist"),
    ({"data": "unreadable"}, "data", "not readable by flctl"),
])
def test_each_problem_is_named_with_its_fix(change, check, words) -> None:
    found = problem({**HEALTHY, **change}, check)
    assert words in found.detail
    others = {k: v for k, v in verdicts({**HEALTHY, **change}).items() if k != check}
    assert all(others.values()), others    # one fault, one problem


def test_flctls_own_agent_and_tunnel_on_their_ports_are_no_problem() -> None:
    ours = {**HEALTHY, "tcp_listen": "1D13", "udp_bound": "CA6C", "agent_running": "yes",
            "tunnel_deployed": "yes"}
    assert verdicts(ours)["ports"] is True


def test_sudo_needs_become_and_no_password() -> None:
    user = {**HEALTHY, "uid": "1000"}
    become = Probe(**{**PROBE.__dict__, "become": True})
    assert "password" in problem({**user, "sudo": "no"}, "sudo", become).detail
    assert verdicts({**user, "sudo": "yes"}, become)["sudo"] is True


def test_clock_skew_beyond_a_minute_is_a_problem_within_the_measurement() -> None:
    assert "+7200.0 s" in problem(HEALTHY, "clock", skew=7200.0).detail
    assert verdicts(HEALTHY, skew=-30.0)["clock"] is True
    # 61 s measured over a 4 s round trip might be 57 s: not proven
    assert verdicts(HEALTHY, skew=61.0, uncertainty=2.0)["clock"] is True


def test_unmeasurable_mtu_is_unknown_not_a_problem() -> None:
    assert verdicts({**HEALTHY, "mtu": "no_echo"})["mtu"] is None
    assert verdicts({**HEALTHY, "mtu": "no_ping"})["mtu"] is None


def test_gpus_asked_for_must_be_there() -> None:
    gpus = Probe(**{**PROBE.__dict__, "gpus": "0,1"})
    assert "no GPU 1" in problem({**HEALTHY, "gpu_count": "1"}, "gpus", gpus).detail
    assert verdicts({**HEALTHY, "gpu_count": "2"}, gpus)["gpus"] is True
    assert "gpus" not in verdicts(HEALTHY, Probe(**{**PROBE.__dict__, "gpus": "none"}))


def test_the_script_reports_this_machine_as_it_is(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    data.write_bytes(b"x")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    probe = Probe(python=sys.executable, install_dir=str(tmp_path / "opt"),
                  state_dir=str(tmp_path / "state" / "h"), data_path=str(data),
                  tcp_port=port, udp_port=None, mtu_target="127.0.0.1", remote=False)
    try:
        answer = LocalConnector("h").run_shell(doctor_script(probe), timeout=30)
    finally:
        taken.close()
    facts = parse_key_values(answer.stdout)
    assert port in {int(p, 16) for p in facts["tcp_listen"].split()}
    assert facts["data"] == "readable" and facts["mtu"] == "ok"
    assert int(facts["disk_free_kb"]) > 0 and int(facts["state_disk_free_kb"]) > 0
    assert facts["python"] == ".".join(map(str, sys.version_info[:3]))
    verdict = {c.name: c for c in diagnose(facts, probe, 0.0, 0.1)}
    assert verdict["ports"].ok is False and f"TCP {port}" in verdict["ports"].detail
    missing = Probe(**{**probe.__dict__, "data_path": str(tmp_path / "absent.npz")})
    facts = parse_key_values(LocalConnector("h").run_shell(doctor_script(missing)).stdout)
    assert facts["data"] == "missing"


def test_doctor_on_local_hosts_names_a_taken_port_and_exits_5(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "2").returncode == 0
    base = use_ports(root, 2)
    healthy = run_cli("doctor", "-w", str(root), "--json")
    assert healthy.returncode == 0, healthy.stderr
    assert all(h["ok"] for h in healthy.json()["hosts"])
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", base + 1))
    taken.listen()
    try:
        sick = run_cli("doctor", "-w", str(root))
        document = run_cli("doctor", "-w", str(root), "--json").json()
    finally:
        taken.close()
    assert sick.returncode == 5 and "Traceback" not in sick.stderr
    assert "local2" in sick.stderr and "ports" in sick.stdout and f"TCP {base + 1}" in sick.stdout
    hosts = {h["host"]: h for h in document["hosts"]}
    assert hosts["local1"]["ok"] and not hosts["local2"]["ok"] and not document["ok"]
