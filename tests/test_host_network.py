"""The host side of the overlay and the firewall, for real: WireGuard through
wg-quick (wireguard-go here) between two throwaway network namespaces, the
nftables table with its armed rollback in another, and, in the lab, the
agent port reachable through the tunnel only while SSH keeps working.

Throwaway namespaces are named flctl-t-<random>, use only 198.18.0.0/15
and are always removed; the root namespace's interfaces and nftables are
never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flctl.agent.proc import is_alive
from flctl.core.facts import normalise_nft_listing
from flctl.core.renderers import WgPeer, interface_name, render_nft_ruleset, render_wg_config

from lab import Lab, lab_available, lab_up

NEEDED = ("ip", "nsenter", "unshare", "nft", "wg", "wg-quick", "wireguard-go", "ping")


def _why_not() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs Linux and root"
    missing = [cmd for cmd in NEEDED if shutil.which(cmd) is None]
    return f"missing: {', '.join(missing)}" if missing else None


_REASON = _why_not()
pytestmark = [pytest.mark.lab, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

# Throwaway namespaces share this machine's files: they run the flctl this
# test run uses (installed in its venv). Lab hosts have a private /tmp (where
# a CI clone may live), so they get their own copy of flctl's package and run
# it with the host's python3, which has no flctl of its own.
HOST_HELPER = (sys.executable, "-m", "flctl.agent.host_helper")
LAB_SOURCE = "/opt/flctl-src"
LAB_HOST_HELPER = ("env", f"PYTHONPATH={LAB_SOURCE}", "python3", "-m", "flctl.agent.host_helper")
HUB_OVERLAY = "198.19.0.1"
HOST_OVERLAY = "198.19.0.11"
WG_PORT = 51820
CONNECT_TIMEOUT_S = 2.0
FOREIGN_TABLE = "table inet other {\n\tchain c {\n\t\ttype filter hook input priority 10;\n\t}\n}\n"


# ------------------------------------------------------------------ throwaway namespaces


class Netns:
    """A network namespace of our own; with `private_run`, also a holder
    process whose mount namespace has its own /run (wireguard-go's socket
    lives there), entered for every command."""

    def __init__(self, tmp: Path, private_run: bool = False) -> None:
        self.name = f"flctl-t-{secrets.token_hex(4)}"
        self.holder: int | None = None
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, timeout=10)
        if private_run:
            pidfile = tmp / f"{self.name}.holder"
            subprocess.Popen(
                ["ip", "netns", "exec", self.name, "unshare", "--mount", "--propagation",
                 "private", "sh", "-c",
                 'umount -n -l /run/netns 2>/dev/null; mount -n -t tmpfs flctl-t /run && '
                 'echo $$ > "$1" && exec sleep infinity', "holder", str(pidfile)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            deadline = time.monotonic() + 10
            while not (pidfile.exists() and pidfile.read_text().strip()):
                assert time.monotonic() < deadline, "namespace holder did not start"
                time.sleep(0.01)
            self.holder = int(pidfile.read_text())

    def prefix(self) -> list[str]:
        if self.holder is not None:
            return ["nsenter", "-t", str(self.holder), "-n", "-m", "--"]
        return ["ip", "netns", "exec", self.name]

    def run(self, *cmd: str, input_text: str | None = None, timeout: float = 30,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.prefix(), *cmd], capture_output=True, text=True,
                              input=input_text, timeout=timeout, cwd="/",
                              stdin=None if input_text is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"{cmd} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def host_helper(self, *args: str, input_text: str | None = None) -> dict[str, Any]:
        done = self.run(*HOST_HELPER, *args, input_text=input_text, check=False)
        assert done.returncode == 0, f"host_helper {args[0]}: {done.stdout}{done.stderr}"
        return dict(json.loads(done.stdout))

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True,
                             timeout=10).stdout
        return [int(p) for p in out.split()]

    def remove(self) -> None:
        """Every process inside goes (wireguard-go, rollback timers, the holder), then the namespace."""
        for sig in ("TERM", "KILL"):
            pids = [p for p in self.pids() if is_alive(p)]
            if not pids:
                break
            subprocess.run(["kill", f"-{sig}", *map(str, pids)], capture_output=True, timeout=10)
            deadline = time.monotonic() + 3
            while any(is_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.02)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Netns]:
    space = Netns(tmp_path)
    try:
        yield space
    finally:
        space.remove()


# ------------------------------------------------------------------ WireGuard


@dataclass
class Side:
    ns: Netns
    dir: Path
    underlay: str
    overlay: str
    public_key: str = ""

    @property
    def config(self) -> Path:
        return self.dir / f"{IFACE}.conf"


IFACE = interface_name("nettest")


def _hub_config(hub: Side, hosts: list[tuple[str, Side | str]]) -> str:
    """hosts: (name, side or just a public key for a peer that never shows up)."""
    peers = []
    for name, host in hosts:
        key = host.public_key if isinstance(host, Side) else host
        overlay = host.overlay if isinstance(host, Side) else "198.19.0.99"
        peers.append(WgPeer(public_key=key, allowed_ips=(f"{overlay}/32",),
                            preshared_key_file=str(hub.dir / f"{name}.psk"), comment=name))
    return render_wg_config(address=f"{hub.overlay}/24", listen_port=WG_PORT,
                            private_key_file=str(hub.dir / "private.key"), peers=peers,
                            comment="test hub")


def _host_config(host: Side, hub: Side, keepalive: int = 25, address: str | None = None) -> str:
    peer = WgPeer(public_key=hub.public_key, allowed_ips=(f"{hub.overlay}/32",),
                  preshared_key_file=str(host.dir / "hub.psk"),
                  endpoint=f"{hub.underlay}:{WG_PORT}", keepalive=keepalive, comment="hub")
    return render_wg_config(address=address or f"{host.overlay}/24", listen_port=WG_PORT,
                            private_key_file=str(host.dir / "private.key"), peers=[peer],
                            comment="test host")


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def _ping(ns: Netns, address: str, attempts: int = 3) -> bool:
    for _ in range(attempts):
        if ns.run("ping", "-c", "1", "-W", "2", address, check=False).returncode == 0:
            return True
    return False


@pytest.fixture(scope="class")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    """Hub and host namespaces joined by a veth (198.18.77.0/24), each with
    its own /run, keys made in place, one PSK, both ends up."""
    tmp = tmp_path_factory.mktemp("wg")
    hub_ns = Netns(tmp, private_run=True)
    host_ns = Netns(tmp, private_run=True)
    try:
        subprocess.run(["ip", "-n", hub_ns.name, "link", "add", "eth0", "type", "veth", "peer",
                        "name", "eth0", "netns", host_ns.name], check=True, timeout=10)
        hub = Side(hub_ns, tmp / "hub", "198.18.77.1", HUB_OVERLAY)
        host = Side(host_ns, tmp / "host", "198.18.77.2", HOST_OVERLAY)
        for side in (hub, host):
            side.ns.run("ip", "addr", "add", f"{side.underlay}/24", "dev", "eth0")
            side.ns.run("ip", "link", "set", "eth0", "up")
            side.public_key = side.ns.host_helper("wg-key", "--dir", str(side.dir))["public_key"]
        psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True,
                             check=True).stdout
        assert hub.ns.host_helper("wg-psk", "--path", str(hub.dir / "host.psk"),
                              input_text=psk) == {"changed": True}
        assert host.ns.host_helper("wg-psk", "--path", str(host.dir / "hub.psk"),
                               input_text=psk) == {"changed": True}
        _write(hub.config, _hub_config(hub, [("host", host)]))
        _write(host.config, _host_config(host, hub))
        for side in (hub, host):
            answer = side.ns.host_helper("wg-up", "--config", str(side.config))
            expected = "kernel" if Path("/sys/module/wireguard").exists() else "userspace"
            assert answer["result"] == "created" and answer["implementation"] == expected
        yield hub, host
    finally:
        host_ns.remove()
        hub_ns.remove()


class TestTunnel:
    def test_keys_are_made_in_place_private_and_kept(self, tunnel: tuple[Side, Side]) -> None:
        _, host = tunnel
        key = host.dir / "private.key"
        assert key.stat().st_mode & 0o777 == 0o600
        assert host.dir.stat().st_mode & 0o777 == 0o700
        assert (host.dir / "hub.psk").stat().st_mode & 0o777 == 0o600
        before = key.read_bytes()
        again = host.ns.host_helper("wg-key", "--dir", str(host.dir))
        assert again["public_key"] == host.public_key and key.read_bytes() == before
        derived = subprocess.run(["wg", "pubkey"], input=before.decode(), capture_output=True,
                                 text=True, check=True).stdout.strip()
        assert derived == host.public_key
        same = host.ns.host_helper("wg-psk", "--path", str(host.dir / "hub.psk"),
                               input_text=(host.dir / "hub.psk").read_text())
        assert same == {"changed": False}

    def test_handshake_and_ping_over_the_overlay(self, tunnel: tuple[Side, Side]) -> None:
        hub, host = tunnel
        assert _ping(host.ns, HUB_OVERLAY) and _ping(hub.ns, HOST_OVERLAY)
        shown = host.ns.host_helper("wg-show", "--interface", IFACE)
        assert shown["present"] is True and shown["implementation"] in ("kernel", "userspace")
        (peer,) = shown["peers"]
        assert peer["public_key"] == hub.public_key and peer["preshared_key"] is True
        assert peer["endpoint"] == f"{hub.underlay}:{WG_PORT}"
        assert peer["latest_handshake"] > 0 and 0 <= shown["now"] - peer["latest_handshake"] < 30
        assert peer["handshake_age_s"] == shown["now"] - peer["latest_handshake"]
        assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0 and peer["keepalive"] == 25
        on_hub = hub.ns.host_helper("wg-show", "--interface", IFACE)["peers"]
        assert [p["public_key"] for p in on_hub] == [host.public_key]
        assert on_hub[0]["endpoint"] == f"{host.underlay}:{WG_PORT}"   # learnt, not configured

    def test_same_config_is_unchanged_and_keeps_the_daemon(self, tunnel: tuple[Side, Side]) -> None:
        hub, host = tunnel
        for side in (hub, host):
            before = side.ns.host_helper("wg-show", "--interface", IFACE)
            answer = side.ns.host_helper("wg-up", "--config", str(side.config))
            assert answer["result"] == "unchanged"
            assert answer["pid"] == before["pid"]
            assert answer["pid"] is not None or answer["implementation"] == "kernel"

    def test_peer_changes_are_live_without_restart(self, tunnel: tuple[Side, Side]) -> None:
        hub, host = tunnel
        _ping(host.ns, HUB_OVERLAY)
        before = host.ns.host_helper("wg-show", "--interface", IFACE)
        handshake = before["peers"][0]["latest_handshake"]
        try:
            _write(host.config, _host_config(host, hub, keepalive=15))
            answer = host.ns.host_helper("wg-up", "--config", str(host.config))
            assert answer["result"] == "updated" and answer["pid"] == before["pid"]
            after = host.ns.host_helper("wg-show", "--interface", IFACE)
            assert after["peers"][0]["keepalive"] == 15
            # the session survived: same handshake, keys and PSK still in place
            assert after["peers"][0]["latest_handshake"] == handshake
            assert after["interface"]["public_key"] == host.public_key
            assert after["peers"][0]["preshared_key"] is True
            assert _ping(host.ns, HUB_OVERLAY, attempts=1)

            stranger = subprocess.run(["sh", "-c", "wg genkey | wg pubkey"], capture_output=True,
                                      text=True, check=True).stdout.strip()
            (hub.dir / "stranger.psk").write_text(
                subprocess.run(["wg", "genpsk"], capture_output=True, text=True).stdout)
            hub_pid = hub.ns.host_helper("wg-show", "--interface", IFACE)["pid"]
            _write(hub.config, _hub_config(hub, [("host", host), ("stranger", stranger)]))
            answer = hub.ns.host_helper("wg-up", "--config", str(hub.config))
            assert answer["result"] == "updated" and answer["pid"] == hub_pid
            peers = {p["public_key"]: p for p in
                     hub.ns.host_helper("wg-show", "--interface", IFACE)["peers"]}
            assert set(peers) == {host.public_key, stranger}
            assert peers[stranger]["preshared_key"] is True   # the new peer got its PSK live
            assert peers[stranger]["allowed_ips"] == ["198.19.0.99/32"]
            assert _ping(host.ns, HUB_OVERLAY, attempts=1)
        finally:
            _write(host.config, _host_config(host, hub))
            _write(hub.config, _hub_config(hub, [("host", host)]))
            assert host.ns.host_helper("wg-up", "--config", str(host.config))["result"] == "updated"
            assert hub.ns.host_helper("wg-up", "--config", str(hub.config))["result"] == "updated"
        assert {p["public_key"] for p in hub.ns.host_helper("wg-show", "--interface", IFACE)["peers"]
                } == {host.public_key}

    def test_new_address_restarts_the_interface(self, tunnel: tuple[Side, Side]) -> None:
        hub, host = tunnel
        before = host.ns.host_helper("wg-show", "--interface", IFACE)["pid"]
        try:
            _write(host.config, _host_config(host, hub, address="198.19.0.21/24"))
            answer = host.ns.host_helper("wg-up", "--config", str(host.config))
            assert answer["result"] == "updated"
            if answer["implementation"] == "userspace":
                assert answer["pid"] != before and not is_alive(before)
            shown = host.ns.run("ip", "-4", "-o", "addr", "show", "dev", IFACE).stdout
            assert "198.19.0.21/24" in shown and HOST_OVERLAY not in shown
        finally:
            _write(host.config, _host_config(host, hub))
            host.ns.host_helper("wg-up", "--config", str(host.config))
        assert _ping(host.ns, HUB_OVERLAY)

    def test_down_removes_interface_and_daemon(self, tunnel: tuple[Side, Side]) -> None:
        hub, host = tunnel
        pid = host.ns.host_helper("wg-show", "--interface", IFACE)["pid"]
        assert host.ns.host_helper("wg-down", "--config", str(host.config)) == {"changed": True}
        assert host.ns.run("ip", "link", "show", "dev", IFACE, check=False).returncode != 0
        assert pid is None or not is_alive(pid)
        gone = host.ns.host_helper("wg-show", "--interface", IFACE)
        assert gone["present"] is False and gone["peers"] == []
        assert host.ns.host_helper("wg-down", "--config", str(host.config)) == {"changed": False}
        assert host.ns.host_helper("wg-up", "--config", str(host.config))["result"] == "created"
        assert _ping(host.ns, HUB_OVERLAY)


# ------------------------------------------------------------------ nftables


def _ruleset(tmp: Path, agent_port: int = 7443, name: str = "flctl.nft") -> Path:
    path = tmp / name
    path.write_text(render_nft_ruleset(interface=IFACE, hub_overlay_ip=HUB_OVERLAY,
                                       agent_port=agent_port, wg_port=WG_PORT))
    return path


def _table(ns: Netns, name: str = "flctl") -> str | None:
    done = ns.run("nft", "list", "table", "inet", name, check=False)
    return normalise_nft_listing(done.stdout) if done.returncode == 0 else None


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


class TestFirewall:
    def test_foreign_table_survives_apply_and_remove(self, netns: Netns, tmp_path: Path) -> None:
        netns.run("nft", "-f", "-", input_text=FOREIGN_TABLE)
        foreign = netns.run("nft", "list", "table", "inet", "other").stdout
        state = str(tmp_path / "fw")
        applied = netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path)), "--state", state,
                                "--timeout", "60")
        assert applied["changed"] is True
        assert netns.run("nft", "list", "table", "inet", "other").stdout == foreign
        assert netns.host_helper("fw-confirm", "--state", state) == {"disarmed": True,
                                                                 "rolled_back": False}
        assert netns.host_helper("fw-remove", "--state", state) == {"changed": True}
        assert _table(netns) is None
        assert netns.run("nft", "list", "table", "inet", "other").stdout == foreign
        assert netns.host_helper("fw-remove") == {"changed": False}

    def test_apply_is_idempotent(self, netns: Netns, tmp_path: Path) -> None:
        state = str(tmp_path / "fw")
        ruleset = str(_ruleset(tmp_path))
        first = netns.host_helper("fw-apply", "--ruleset", ruleset, "--state", state, "--timeout", "60")
        assert first["changed"] is True and is_alive(first["armed"])
        netns.host_helper("fw-confirm", "--state", state)
        assert not is_alive(first["armed"])
        loaded = _table(netns)
        second = netns.host_helper("fw-apply", "--ruleset", ruleset, "--state", state, "--timeout", "60")
        assert second == {"changed": False, "armed": None}
        assert _table(netns) == loaded
        status = netns.host_helper("fw-status", "--state", state)
        assert status["present"] is True and status["as_applied"] is True
        assert status["armed"] is None and status["dropped_packets"] == 0
        # a table changed behind flctl's back is put right on the next apply
        netns.run("nft", "delete", "table", "inet", "flctl")
        third = netns.host_helper("fw-apply", "--ruleset", ruleset, "--state", state, "--timeout", "60")
        assert third["changed"] is True and _table(netns) == loaded
        netns.host_helper("fw-confirm", "--state", state)

    def test_unconfirmed_apply_rolls_back_for_real(self, netns: Netns, tmp_path: Path) -> None:
        state = str(tmp_path / "fw")
        netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path, 7443, "a.nft")),
                      "--state", state, "--timeout", "60")
        assert netns.host_helper("fw-confirm", "--state", state)["disarmed"] is True
        previous = _table(netns)
        started = time.monotonic()
        applied = netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path, 8443, "b.nft")),
                                "--state", state, "--timeout", "1.5")
        assert applied["changed"] is True
        assert "8443" in (_table(netns) or "")          # the new table is really loaded
        assert _wait_for(lambda: _table(netns) == previous, 8)
        assert time.monotonic() - started >= 1.4        # not before its time
        assert _wait_for(lambda: not is_alive(applied["armed"]), 3)
        status = netns.host_helper("fw-status", "--state", state)
        assert status["rolled_back_at"] is not None and status["armed"] is None
        assert netns.host_helper("fw-confirm", "--state", state) == {"disarmed": False,
                                                                 "rolled_back": True}

    def test_armed_before_the_tunnel_a_new_interface_is_undone_too(
            self, netns: Netns, tmp_path: Path) -> None:
        """Deploy arms the rollback before it touches the tunnel: unconfirmed, the
        host drops the interface that did not exist before, and restores the table.
        (A veth stands in for the tunnel: this kernel has no dummy or WireGuard module.)"""
        state = str(tmp_path / "fw")
        armed = netns.host_helper("fw-arm", "--state", state, "--timeout", "1.5",
                              "--new-interface", "fl-new")
        netns.run("ip", "link", "add", "fl-new", "type", "veth", "peer", "name", "fl-new-p")
        applied = netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path)),
                                "--state", state, "--timeout", "1.5")
        assert applied["changed"] is True and _table(netns) is not None
        assert _wait_for(lambda: netns.run("ip", "link", "show", "fl-new",
                                           check=False).returncode != 0, 8)
        assert _wait_for(lambda: _table(netns) is None, 8)          # no table before: none after
        assert not is_alive(armed["armed"])
        assert netns.host_helper("fw-status", "--state", state)["rolled_back_at"] is not None

    def test_a_confirmed_new_interface_stays(self, netns: Netns, tmp_path: Path) -> None:
        state = str(tmp_path / "fw")
        netns.host_helper("fw-arm", "--state", state, "--timeout", "1.5", "--new-interface", "fl-keep")
        netns.run("ip", "link", "add", "fl-keep", "type", "veth", "peer", "name", "fl-keep-p")
        assert netns.host_helper("fw-confirm", "--state", state)["disarmed"] is True
        time.sleep(2.0)
        assert netns.run("ip", "link", "show", "fl-keep", check=False).returncode == 0

    def test_confirm_disarms(self, netns: Netns, tmp_path: Path) -> None:
        state = str(tmp_path / "fw")
        # 5 s to confirm: two helper runs on a loaded machine can take 1.5 s
        applied = netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path)), "--state", state,
                                "--timeout", "5")
        loaded = _table(netns)
        assert loaded is not None
        assert netns.host_helper("fw-confirm", "--state", state) == {"disarmed": True,
                                                                 "rolled_back": False}
        assert not is_alive(applied["armed"])
        time.sleep(5.5)
        assert _table(netns) == loaded
        assert netns.host_helper("fw-status", "--state", state)["rolled_back_at"] is None

    def test_rollback_restores_absence(self, netns: Netns, tmp_path: Path) -> None:
        netns.run("nft", "-f", "-", input_text=FOREIGN_TABLE)
        foreign = netns.run("nft", "list", "table", "inet", "other").stdout
        state = str(tmp_path / "fw")
        netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path)), "--state", state,
                      "--timeout", "1.5")
        assert _table(netns) is not None
        assert _wait_for(lambda: _table(netns) is None, 8)
        assert netns.run("nft", "list", "table", "inet", "other").stdout == foreign

    def test_rollback_now_and_pending_rollback_keeps_the_confirmed_state(
            self, netns: Netns, tmp_path: Path) -> None:
        state = str(tmp_path / "fw")
        netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path, 7443, "a.nft")),
                      "--state", state, "--timeout", "60")
        netns.host_helper("fw-confirm", "--state", state)
        confirmed = _table(netns)
        first = netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path, 8443, "b.nft")),
                              "--state", state, "--timeout", "60")
        # a second apply while the first waits for its confirmation: one timer,
        # and going back still means going back to the last confirmed table
        second = netns.host_helper("fw-apply", "--ruleset", str(_ruleset(tmp_path, 9443, "c.nft")),
                               "--state", state, "--timeout", "60")
        assert second["changed"] is True and not is_alive(first["armed"]) and is_alive(second["armed"])
        assert "9443" in (_table(netns) or "")
        assert netns.host_helper("fw-rollback", "--state", state) == {"changed": True}
        assert _table(netns) == confirmed and not is_alive(second["armed"])
        assert netns.host_helper("fw-rollback", "--state", state) == {"changed": False}

    def test_bad_ruleset_is_refused_before_anything_changes(self, netns: Netns,
                                                            tmp_path: Path) -> None:
        bad = tmp_path / "bad.nft"
        bad.write_text(_ruleset(tmp_path).read_text().replace("tcp dport 7443 accept",
                                                              "tcp dport seven accept"))
        state = tmp_path / "fw"
        done = netns.run(*HOST_HELPER, "fw-apply", "--ruleset", str(bad), "--state", str(state),
                         "--timeout", "60", check=False)
        assert done.returncode == 1
        assert "rejected by nft -c" in json.loads(done.stdout)["error"]
        assert _table(netns) is None and not (state / "rollback.pid").exists()


# ------------------------------------------------------------------ in the lab


def _connects(lab: Lab, source: str | None, address: str, port: int) -> str:
    """"open", "timeout" or "refused": a connection attempt from a lab host (or
    the root namespace when `source` is None), bounded by CONNECT_TIMEOUT_S."""
    if source is None:
        try:
            socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S).close()
            return "open"
        except socket.timeout:
            return "timeout"
        except OSError as exc:
            return f"refused: {exc}"
    script = ("import socket, sys\n"
              "try:\n"
              f"    socket.create_connection(({address!r}, {port}), timeout={CONNECT_TIMEOUT_S})\n"
              "    print('open')\n"
              "except socket.timeout:\n"
              "    print('timeout')\n"
              "except OSError as exc:\n"
              "    print('refused:', exc)\n")
    return lab.exec(source, "python3", "-c", script, timeout=20).stdout.strip()


def _lab_host_helper(lab: Lab, host: str, *args: str, input_text: str = "") -> dict[str, Any]:
    """host_helper over a NEW SSH connection, as deploy runs it."""
    done = subprocess.run(lab.ssh_command(host, *LAB_HOST_HELPER, *args), input=input_text,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{host}: host_helper {args[0]}: {done.stdout}{done.stderr}"
    return dict(json.loads(done.stdout))


def _stage_source(lab: Lab, host: str) -> None:
    """Copy this checkout's flctl package into the host's private /opt."""
    package = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["tar", "-C", str(package), "--exclude=__pycache__", "-c", "flctl"],
                             capture_output=True, check=True).stdout
    done = subprocess.run(lab.ssh_command(host, f"mkdir -p {LAB_SOURCE} && "
                                                f"tar -x -C {LAB_SOURCE}"),
                          input=archive, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _put(lab: Lab, host: str, path: str, text: str) -> None:
    done = subprocess.run(lab.ssh_command(host, f"umask 077 && mkdir -p $(dirname {path}) && "
                                                f"cat > {path}"),
                          input=text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _ssh_works(lab: Lab, host: str) -> bool:
    return lab.ssh(host, "true", timeout=15, connect_timeout=2).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(lab_available() is not None, reason=lab_available() or "")
def test_agent_port_only_through_the_tunnel_and_ssh_never_lost() -> None:
    """lab2 plays the hub (so the root namespace keeps its interfaces), lab1 the host."""
    started = time.monotonic()
    lab = lab_up(3)
    try:
        for host in lab.hosts:
            _stage_source(lab, host)
        _run_lab_checks(lab)
    finally:
        lab.down()
    print(f"lab firewall test: {time.monotonic() - started:.1f} s")


def _run_lab_checks(lab: Lab) -> None:
    host, hub, other = "lab1", "lab2", "lab3"
    agent_port = 17443
    root = "/var/lib/flctl-nettest"
    config = f"{root}/{IFACE}.conf"
    host_ip, hub_ip = lab.addresses[host], lab.addresses[hub]

    # a stand-in for the agent, listening on every address of lab1
    lab.exec(host, "sh", "-c", f"setsid -f sh -c 'exec python3 -m http.server "
                               f"{agent_port} --bind 0.0.0.0' </dev/null >/tmp/agent.log 2>&1")
    assert _wait_for(lambda: _connects(lab, host, "127.0.0.1", agent_port) == "open", 10)

    keys = {name: _lab_host_helper(lab, name, "wg-key", "--dir", root)["public_key"]
            for name in (host, hub)}
    psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout
    for name in (host, hub):
        assert _lab_host_helper(lab, name, "wg-psk", "--path", f"{root}/pair.psk",
                            input_text=psk)["changed"] is True
    _put(lab, hub, config, render_wg_config(
        address=f"{HUB_OVERLAY}/24", listen_port=WG_PORT, private_key_file=f"{root}/private.key",
        peers=[WgPeer(public_key=keys[host], allowed_ips=(f"{HOST_OVERLAY}/32",),
                      preshared_key_file=f"{root}/pair.psk", comment=host)]))
    _put(lab, host, config, render_wg_config(
        address=f"{HOST_OVERLAY}/24", listen_port=WG_PORT, private_key_file=f"{root}/private.key",
        peers=[WgPeer(public_key=keys[hub], allowed_ips=(f"{HUB_OVERLAY}/32",),
                      preshared_key_file=f"{root}/pair.psk", endpoint=f"{hub_ip}:{WG_PORT}",
                      keepalive=25, comment="hub")]))
    for name in (hub, host):     # over SSH: wireguard-go must not hold the session open
        began = time.monotonic()
        assert _lab_host_helper(lab, name, "wg-up", "--config", config)["result"] == "created"
        print(f"{name}: wg-up over SSH {time.monotonic() - began:.2f} s")

    # before the firewall: open everywhere (so the checks below can fail)
    sources = {"hub-overlay": (hub, HOST_OVERLAY), "root-underlay": (None, host_ip),
               "hub-underlay": (hub, host_ip), "other-host": (other, host_ip),
               "stranger": ("labx", host_ip)}
    assert _wait_for(lambda: _connects(lab, hub, HOST_OVERLAY, agent_port) == "open", 10)
    with ThreadPoolExecutor(len(sources)) as pool:
        before = dict(zip(sources, pool.map(lambda s: _connects(lab, *s, agent_port),
                                            sources.values())))
    assert set(before.values()) == {"open"}, before

    _put(lab, host, f"{root}/foreign.nft", FOREIGN_TABLE)
    lab.exec(host, "nft", "-f", f"{root}/foreign.nft")
    foreign = lab.exec(host, "nft", "list", "table", "inet", "other").stdout

    _put(lab, host, f"{root}/firewall.nft", render_nft_ruleset(
        interface=IFACE, hub_overlay_ip=HUB_OVERLAY, agent_port=agent_port, wg_port=WG_PORT))
    began = time.monotonic()
    applied = _lab_host_helper(lab, host, "fw-apply", "--ruleset", f"{root}/firewall.nft",
                           "--state", f"{root}/fw", "--timeout", "60")
    assert applied["changed"] is True and applied["armed"]
    applied_at = time.monotonic()
    assert _lab_host_helper(lab, host, "fw-confirm", "--state", f"{root}/fw") == {
        "disarmed": True, "rolled_back": False}
    print(f"fw-apply {applied_at - began:.2f} s, then new SSH + fw-confirm "
          f"{time.monotonic() - applied_at:.2f} s")
    assert _ssh_works(lab, host)

    with ThreadPoolExecutor(len(sources)) as pool:
        after = dict(zip(sources, pool.map(lambda s: _connects(lab, *s, agent_port),
                                           sources.values())))
    assert after == {"hub-overlay": "open", "root-underlay": "timeout", "hub-underlay": "timeout",
                     "other-host": "timeout", "stranger": "timeout"}, after
    status = _lab_host_helper(lab, host, "fw-status", "--state", f"{root}/fw")
    assert status["dropped_packets"] >= 4 and status["as_applied"] is True
    assert lab.exec(host, "nft", "list", "table", "inet", "other").stdout == foreign

    # the confirmation fails for real: a table that refuses new SSH connections
    # (written by hand: flctl's own never does), applied and never confirmed
    lockout = ("table inet flctl {}\ndelete table inet flctl\ntable inet flctl {\n"
               "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
               "\t\ttcp dport 22 ct state new drop\n\t}\n}\n")
    _put(lab, host, f"{root}/lockout.nft", lockout)
    locked = _lab_host_helper(lab, host, "fw-apply", "--ruleset", f"{root}/lockout.nft",
                          "--state", f"{root}/fw", "--timeout", "4")
    assert locked["changed"] is True
    assert not _ssh_works(lab, host)              # a new connection cannot get in ...
    assert _wait_for(lambda: _ssh_works(lab, host), 15)   # ... until the rollback fires
    back = _lab_host_helper(lab, host, "fw-status", "--state", f"{root}/fw")
    assert back["sha256"] == status["sha256"] and back["rolled_back_at"] is not None
    assert _connects(lab, hub, HOST_OVERLAY, agent_port) == "open"
    assert _connects(lab, None, host_ip, agent_port) == "timeout"

    assert _lab_host_helper(lab, host, "fw-remove", "--state", f"{root}/fw") == {"changed": True}
    assert _ssh_works(lab, host)
    assert lab.exec(host, "nft", "list", "table", "inet", "other").stdout == foreign
    assert _connects(lab, other, host_ip, agent_port) == "open"
    for name in (host, hub):
        assert _lab_host_helper(lab, name, "wg-down", "--config", config) == {"changed": True}
