"""Sites on SSH hosts, deploy side: the aggregator's site certificate (made
from a CSR on the host), the site fields of the agent config, the direct
WireGuard peers (brought in line once every key is known), the members'
firewall, the aggregator's reach check, and the refusal of sites off the
overlay. The SSH hosts are played on this machine (tests/sandbox_host.py)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from flctl.core import pki
from flctl.core.agentconfig import parse_agent_config
from flctl.core.facts import parse_wg_quick_config
from flctl.core.layout import host_paths
from flctl.core.sites import refuse_sites_off_the_overlay
from flctl.deploy import engine, host_deploy, site_network
from flctl.deploy.certificates import CertificateStore
from flctl.deploy.connector import CommandResult
from flctl.errors import ConfigError
from flctl.workspace import load_workspace
from sandbox_host import HELPER, SandboxHost, sandbox

from helpers import run_cli, use_ports

NAMES = ("b1", "b2", "b3", "solo")


def wg_key(name: str) -> str:
    return base64.b64encode(name.encode().ljust(32, b"k")).decode()


def new_wg_key(name: str) -> str:
    return base64.b64encode(name.encode().ljust(32, b"n")).decode()


class SiteHost(SandboxHost):
    """A sandbox host with its own WireGuard key, and a scripted reach check."""

    unreachable: dict[str, str] = {}
    rekeyed: set[str] = set()        # hosts whose key is made anew

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> CommandResult:
        argv = list(argv)
        if HELPER in argv:
            command = argv[argv.index(HELPER) + 1]
            if command == "wg-key":
                self.log.append(("helper", command))
                key = (new_wg_key if self.host_name in self.rekeyed else wg_key)(self.host_name)
                return CommandResult(0, json.dumps({"public_key": key}), "")
            if command == "reach":
                self.log.append(("helper", f"reach from {self.host_name}"))
                asked = {t.split("=", 1)[0] for t in argv[argv.index("--to"):] if "=" in t}
                answer = {m: e for m, e in self.unreachable.items() if m in asked}
                return CommandResult(0, json.dumps({"unreachable": answer}), "")
        return super().run(argv, timeout)


@pytest.fixture
def site_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "1").returncode == 0
    use_ports(root, 1)
    data = (root / "data" / "local1.npz").resolve()
    lines = ["all:", "  vars:", f"    data_path: {data}", "  children:",
             "    berlin:", "      aggregator: b2", "      hosts:"]
    lines += [f"        b{i}: {{ssh_host: 192.0.2.{10 + i}}}" for i in (1, 2, 3)]
    lines += ["  hosts:", "    solo: {ssh_host: 192.0.2.20}"]
    (root / "inventory.yaml").write_text("\n".join(lines) + "\n")
    log = sandbox(tmp_path, monkeypatch)
    SiteHost.unreachable, SiteHost.rekeyed = {}, set()
    connect = lambda host, options: SiteHost(host.name, log)  # noqa: E731
    for module in (host_deploy, engine, site_network):
        monkeypatch.setattr(module, "connect", connect)
    monkeypatch.setattr(host_deploy, "ensure_agent_software",
                        lambda connector, host, bundles, **kw: {"agent_user": "yes"})
    return root, log


def deploy(root: Path):
    workspace = load_workspace(root)
    results = {r.host: r for r in engine.deploy(workspace, list(workspace.inventory.hosts))}
    return workspace, results


def host_file(workspace, name: str, relative: str) -> Path:
    host = workspace.inventory.host(name)
    return Path(str(host_paths(host, str(workspace.paths.state)).root / relative))


def site_peer_keys(workspace, name: str) -> dict[str, tuple]:
    config = host_file(workspace, name, f"wg/fl-{workspace.settings.project}.conf")
    peers = parse_wg_quick_config(config.read_text()).peers
    return {p["public_key"]: (tuple(p["allowed_ips"]), p["endpoint"]) for p in peers}


def test_fresh_deploy_then_nothing_changes(site_ws) -> None:
    root, log = site_ws
    workspace, results = deploy(root)
    assert all(r.status in ("ok", "changed") for r in results.values()), \
        {h: r.error for h, r in results.items()}
    port = workspace.settings.overlay.port
    ip = {h.name: str(h.overlay_ip) for h in workspace.inventory.hosts}

    # the aggregator lists each member, each member the aggregator, solo none
    agg = site_peer_keys(workspace, "b2")
    for member in ("b1", "b3"):
        assert agg[wg_key(member)] == ((f"{ip[member]}/32",), f"192.0.2.{10 + int(member[1])}:"
                                                               f"{port}")
        assert site_peer_keys(workspace, member)[wg_key("b2")] == \
            ((f"{ip['b2']}/32",), f"192.0.2.12:{port}")
        assert wg_key("b1" if member == "b3" else "b3") not in site_peer_keys(workspace, member)
    assert len(agg) == 3 and len(site_peer_keys(workspace, "solo")) == 1

    # each aggregator-member pair has its own preshared key: the same at both
    # ends, 0600, made by the hub (kept 0700 there), not the hub pair's
    def psk_of(name: str, peer: str) -> str:
        config = parse_wg_quick_config(host_file(
            workspace, name, f"wg/fl-{workspace.settings.project}.conf").read_text())
        path = Path(config.preshared_key_files[wg_key(peer)])
        assert path.stat().st_mode & 0o777 == 0o600
        return path.read_text()

    pair = {m: psk_of("b2", m) for m in ("b1", "b3")}
    for member in ("b1", "b3"):
        assert psk_of(member, "b2") == pair[member]
        assert pair[member] != host_file(workspace, member, "wg/hub.psk").read_text()
        made = workspace.paths.state / "wg" / "psk" / "site" / "b2" / f"{member}.psk"
        assert made.read_text() == pair[member]
        assert made.parent.stat().st_mode & 0o777 == 0o700
    assert pair["b1"] != pair["b3"]
    assert len(parse_wg_quick_config(host_file(
        workspace, "solo", f"wg/fl-{workspace.settings.project}.conf").read_text()
    ).preshared_key_files) == 1                                      # the hub pair's only

    # members admit their aggregator; the aggregator and solo the hub only
    for name in NAMES:
        ruleset = host_file(workspace, name, "firewall.nft").read_text()
        assert (f"saddr {ip['b2']} tcp dport" in ruleset) == (name in ("b1", "b3")), name
        assert (f'iifname "lo" ip daddr {ip["b2"]}' in ruleset) == (name == "b2"), name
        assert f"saddr {workspace.settings.overlay.hub_ip} tcp dport" in ruleset

    # agent configs: members name site and aggregator; the aggregator lists them
    configs = {name: parse_agent_config(host_file(workspace, name, "agent.json").read_text(),
                                        name) for name in NAMES}
    assert (configs["b1"].site, configs["b1"].site_aggregator) == ("berlin", "b2")
    assert configs["b1"].site_members == {} and configs["solo"].site is None
    agent_port = configs["b1"].port
    assert configs["b2"].site_members == {n: f"{ip[n]}:{agent_port}" for n in ("b1", "b2", "b3")}

    # the site certificate: key made on the host, CN b2, site berlin, client auth only
    assert configs["b2"].site_key == str(host_file(workspace, "b2", "site.key"))
    cert = Path(configs["b2"].site_cert).read_bytes()
    assert pki.site_identity(cert) == ("berlin", "b2")
    assert pki.verify_issued_by(cert, workspace.paths.ca_cert.read_bytes())
    assert Path(configs["b2"].site_key).stat().st_mode & 0o777 == 0o600
    assert not host_file(workspace, "b1", "site.crt").exists()
    assert any(e["role"] == pki.ROLE_SITE and e["cn"] == "b2"
               for e in CertificateStore(workspace.paths).certificates())

    # the reach check ran once, from the aggregator
    helper = [c for kind, c in log if kind == "helper"]
    assert helper.count("reach from b2") == 1 and not any(
        c.startswith("reach from") and c != "reach from b2" for c in helper)

    # a second deploy: no tunnel config, agent config or certificate uploaded
    # again, no CSR, no site-peer pass (the sandbox has no live tunnel, table or
    # service, so those steps redo their part; the lab test sees 0 changed)
    log.clear()
    workspace, again = deploy(root)
    puts = [p for kind, p in log if kind == "put"]
    assert not [p for p in puts if p.endswith((".conf", "agent.json", ".crt", ".psk"))], puts
    assert ("helper", "csr") not in log
    assert not any(s.name == "site peers" for r in again.values() for s in r.steps)
    assert [s.changed for s in again["b2"].steps if s.name == "site certificate"] == [False]
    assert site_peer_keys(workspace, "b2") == agg


def test_a_fresh_deploy_adds_site_peers_once_every_key_is_known(site_ws) -> None:
    """Keys are made on the hosts in parallel: each site host's tunnel is
    rendered before its site mates' keys are recorded, and gets them in one
    more pass after the hub step, armed and confirmed like any network change."""
    root, log = site_ws
    workspace, results = deploy(root)
    for name in ("b1", "b2", "b3"):
        assert [s.changed for s in results[name].steps if s.name == "site peers"] == [True]
    assert not any(s.name == "site peers" for s in results["solo"].steps)
    helper = [c for kind, c in log if kind == "helper"]
    # 4 hosts' own network changes, then 3 site passes: each armed, then confirmed
    assert helper.count("fw-arm") == helper.count("fw-confirm") == 7, helper
    last_wg_up = max(i for i, c in enumerate(helper) if c == "wg-up")
    assert helper[last_wg_up + 1:].count("fw-confirm") >= 1


def test_a_member_rekeyed_without_its_aggregator_is_warned(site_ws) -> None:
    root, _ = site_ws
    deploy(root)
    SiteHost.rekeyed = {"b1"}
    workspace = load_workspace(root)
    results = {r.host: r for r in engine.deploy(workspace, [workspace.inventory.host("b1")])}
    assert results["b1"].warnings == [
        "site berlin: deploy b2 too, so its tunnel learns b1's new WireGuard key or address"]
    assert wg_key("b2") in site_peer_keys(workspace, "b1")   # b1 itself is current


def test_an_aggregator_that_cannot_reach_a_member_fails_both(site_ws) -> None:
    root, _ = site_ws
    SiteHost.unreachable = {"b1": "Connection refused"}
    workspace, results = deploy(root)
    b1 = workspace.inventory.host("b1")
    port = parse_agent_config(host_file(workspace, "b1", "agent.json").read_text(), "b1").port
    line = (f"berlin: aggregator b2 cannot reach b1 ({b1.overlay_ip}:{port}) over the "
            f"overlay: Connection refused")
    assert (results["b1"].status, results["b1"].error) == ("failed", line)
    assert (results["b2"].status, results["b2"].error) == ("failed", line)
    assert results["b3"].status in ("ok", "changed") and results["solo"].status in \
        ("ok", "changed")


def test_sites_of_ssh_hosts_need_the_overlay(site_ws) -> None:
    root, _ = site_ws
    yaml = (root / "flctl.yaml").read_text()
    assert "listen: overlay" in yaml
    (root / "flctl.yaml").write_text(yaml.replace("listen: overlay", "listen: underlay"))
    with pytest.raises(ConfigError) as caught:
        load_workspace(root)
    error = caught.value
    assert (Path(error.file or "").name, error.line, error.field) == \
        ("inventory.yaml", 6, "groups.berlin.aggregator")
    assert "agent.listen: underlay" in error.message and "'berlin'" in error.message
    # a site of local hosts lives on loopback: no matter where SSH agents listen
    refuse_sites_off_the_overlay("inv.yaml", {}, frozenset(), "underlay")


def test_site_certificate_reissue_reasons(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "1").returncode == 0
    store = CertificateStore(load_workspace(root).paths)
    key = pki.make_private_key()
    cert = store.sign_site("b2", "berlin", pki.make_csr(key, "b2"))
    assert store.site_reissue("b2", "berlin", cert, True) is None
    assert store.site_reissue("b2", "berlin", cert, False) is not None      # no key
    assert store.site_reissue("b2", "berlin", None, True) is not None       # no certificate
    assert store.site_reissue("b2", "paris", cert, True) is not None        # another site
    assert store.site_reissue("b1", "berlin", cert, True) is not None       # another host
    with pytest.raises(pki.PKIError):
        store.sign_site("b2", "berlin", pki.make_csr(key, "b1"))   # CN is not the host
    store.request_rotation()
    rotated = store.site_reissue("b2", "berlin", cert, True)
    assert rotated is not None and rotated.new_key


def test_the_reach_helper_connects_and_names_what_it_cannot_reach() -> None:
    """The host side of the reach check, on loopback: one port listens, one
    refuses, one target is malformed."""
    import socket
    import subprocess
    import sys

    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))            # bound, not listening: refused
        open_port, closed_port = listening.getsockname()[1], closed.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", HELPER, "reach", "--timeout", "2",
             "--to", f"up=127.0.0.1:{open_port}", "--to", f"down=127.0.0.1:{closed_port}",
             "--to", "odd=nowhere"], capture_output=True, text=True, timeout=30)
    answer = json.loads(done.stdout)
    assert set(answer["unreachable"]) == {"down", "odd"}
    assert "refused" in answer["unreachable"]["down"].lower()
    assert "NAME=ADDRESS:PORT" in answer["unreachable"]["odd"]
