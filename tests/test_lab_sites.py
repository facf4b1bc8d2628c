"""Sites over the lab, for real (sshd, wireguard-go, nftables): a site
{lab1, lab2, lab3} whose aggregator is lab2, and lab4, lab5 loose. The
aggregator and its members are direct WireGuard peers; an agent port admits
the hub and, on a member, its own aggregator, and nothing else on the
overlay; a second deploy changes nothing."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from flctl.core.renderers import NFT_DROP_COUNTER, interface_name
from flctl.workspace import load_workspace

from helpers import by_host, deploy_json, run_cli
from lab import Lab, lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]

HOSTS = 5
SITE = ("lab1", "lab2", "lab3")
AGGREGATOR = "lab2"


def site_inventory(workspace: Path) -> None:
    """The lab's inventory, its first three hosts made the site `berlin`."""
    path = workspace / "inventory.yaml"
    lines = path.read_text().splitlines()
    cut = lines.index("      hosts:")
    head, hosts = lines[:cut], lines[cut + 1:]
    entries = {hosts[i].strip().rstrip(":"): hosts[i + 1].strip()
               for i in range(0, len(hosts), 2)}
    out = head + ["      children:", "        berlin:", f"          aggregator: {AGGREGATOR}",
                  "          hosts:"]
    out += [f"            {name}: {{{entries[name]}}}" for name in SITE]
    out += ["      hosts:"]
    out += [f"        {name}: {{{entries[name]}}}" for name in entries if name not in SITE]
    path.write_text("\n".join(out) + "\n")
    assert load_workspace(workspace).inventory.sites["berlin"].members == SITE


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("sitesws")
    lab = lab_up(HOSTS, workspace)
    try:
        site_inventory(workspace)
        first = deploy_json(workspace)
        assert first["code"] == 0, first
        yield lab
    finally:
        run_cli("teardown", "-w", str(workspace), timeout=300)
        lab.down()


def overlay_ip(lab: Lab, host: str) -> str:
    return str(load_workspace(lab.workspace).inventory.host(host).overlay_ip)


def agent_port(lab: Lab) -> int:
    return load_workspace(lab.workspace).settings.agent.port


def wg_peers(lab: Lab, host: str) -> set[str]:
    interface = interface_name(load_workspace(lab.workspace).settings.project)
    return set(lab.exec(host, "wg", "show", interface, "peers").stdout.split())


def wg_preshared_keys(lab: Lab, host: str) -> dict[str, str]:
    """Peer public key -> the preshared key the live interface uses for it."""
    interface = interface_name(load_workspace(lab.workspace).settings.project)
    out = lab.exec(host, "wg", "show", interface, "preshared-keys").stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def test_aggregator_and_members_are_direct_peers(lab: Lab) -> None:
    known = json.loads((lab.workspace / ".flctl" / "wg" / "peers.json").read_text())
    key = {name: peer["public_key"] for name, peer in known.items()}
    assert len(key) == HOSTS
    assert {key["lab1"], key["lab3"]} <= wg_peers(lab, AGGREGATOR)
    assert len(wg_peers(lab, AGGREGATOR)) == 3          # the hub, lab1, lab3
    for member in ("lab1", "lab3"):
        assert key[AGGREGATOR] in wg_peers(lab, member)
        assert len(wg_peers(lab, member)) == 2          # the hub, its aggregator
    for loose in ("lab4", "lab5"):
        assert len(wg_peers(lab, loose)) == 1           # the hub only
    # each aggregator-member pair is keyed with its own preshared key, the
    # same at both ends of the live tunnels
    at_aggregator = wg_preshared_keys(lab, AGGREGATOR)
    for member in ("lab1", "lab3"):
        psk = wg_preshared_keys(lab, member)[key[AGGREGATOR]]
        assert psk != "(none)" and psk == at_aggregator[key[member]]
    assert at_aggregator[key["lab1"]] != at_aggregator[key["lab3"]]


def test_agent_ports_admit_the_hub_and_the_members_own_aggregator_only(lab: Lab) -> None:
    port = agent_port(lab)
    ip = {host: overlay_ip(lab, host) for host in lab.hosts}
    assert lab.probe(AGGREGATOR, ip["lab1"], port) == "open"
    assert lab.probe(AGGREGATOR, ip["lab3"], port) == "open"
    assert lab.probe("lab4", ip["lab1"], port).startswith("closed")     # no route, no rule
    assert lab.probe(AGGREGATOR, ip["lab4"], port).startswith("closed")  # not its member
    assert lab.probe("lab1", ip["lab3"], port).startswith("closed")     # members don't peer
    # lab1 reaches lab2 through their tunnel (ping), but lab2's agent port
    # admits the hub only: the table drops it, and counts it
    assert lab.exec("lab1", "ping", "-c", "1", "-W", "2", ip[AGGREGATOR], check=False) \
        .returncode == 0
    before = dropped(lab, AGGREGATOR)
    assert lab.probe("lab1", ip[AGGREGATOR], port).startswith("closed")
    assert dropped(lab, AGGREGATOR) > before
    # the hub (this machine) reaches every agent, and SSH still works
    for host in lab.hosts:
        with socket.create_connection((ip[host], port), timeout=5):
            pass
    assert lab.ssh(AGGREGATOR, "true").returncode == 0


def dropped(lab: Lab, host: str) -> int:
    listing = lab.exec(host, "nft", "-j", "list", "counter", "inet", "flctl",
                       NFT_DROP_COUNTER).stdout
    counters = [item["counter"] for item in json.loads(listing)["nftables"] if "counter" in item]
    return int(counters[0]["packets"])


def test_training_goes_through_the_aggregator(lab: Lab) -> None:
    """Two rounds with every host sampled: each site member is a host of its
    own in the records, and lab2's agent folded the site's three members."""
    log = f"/var/lib/flctl/{AGGREGATOR}/run/agent.log"
    before = lab.exec(AGGREGATOR, "sh", "-c", f"cat {log} 2>/dev/null; true").stdout
    result = run_cli("train", "-w", str(lab.workspace), "--rounds", "2", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["rounds"] == 2
    for record in summary["history"]:
        assert sorted(record["participants"]) == sorted(lab.hosts), record
    after = lab.exec(AGGREGATOR, "sh", "-c", f"cat {log}").stdout[len(before):]
    for round_number in (1, 2):
        assert f"site berlin, round {round_number}: 3 of 3 members folded" in after, after[-2000:]


def test_a_second_deploy_changes_nothing(lab: Lab) -> None:
    again = deploy_json(lab.workspace)
    assert again["code"] == 0, again
    rows = by_host(again)
    assert set(rows) == {*lab.hosts, "hub"}
    assert {name: row["changed"] for name, row in rows.items()} == \
        {name: 0 for name in rows}, rows
    steps = {s["name"] for s in rows[AGGREGATOR]["steps"]}
    assert "site certificate" in steps and "site peers" not in steps
