"""Deployed hosts keep their overlay addresses.

`flctl deploy` records every deployed host's overlay address in the
workspace (.flctl/overlay-addresses.json) and the inventory honours those
first, so adding a host, or dropping an explicit overlay_ip, never moves a
host that is already deployed (a move means new certificates, a tunnel
change and an agent restart). A workspace from before that record has the
addresses only in the hub's peer list (wg/peers.json); they are kept too.
Each test pins an address away from where the host's name would put it, so
only the record can explain where it stays.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from flctl.workspace import load_workspace

from helpers import local_workspace, run_cli


@pytest.fixture
def workspace(tmp_path: Path):
    yield from local_workspace(tmp_path / "ws", 2, 3)


def addresses(root: Path) -> dict[str, str]:
    return {h.name: str(h.overlay_ip) for h in load_workspace(root).inventory.hosts}


def recorded(root: Path) -> dict[str, str]:
    return json.loads(load_workspace(root).paths.overlay_addresses.read_text())


def unlikely_address(root: Path, avoid: set[str]) -> str:
    """An address in the overlay subnet that no host's name would pick here."""
    subnet = load_workspace(root).settings.overlay.subnet
    for offset in range(200, 2, -1):
        candidate = str(subnet.network_address + offset)
        if candidate not in avoid:
            return candidate
    raise AssertionError("overlay subnet too small for the test")


def set_hosts(root: Path, hosts: dict[str, str | None]) -> None:
    """Rewrite the inventory: each host with its data file and, if given, overlay_ip."""
    lines = ["all:", "  children:", "    local:", "      vars:", "        connection: local",
             "      hosts:"]
    for name, overlay_ip in hosts.items():
        data = root / "data" / f"{name}.npz"
        if not data.exists():
            data.write_bytes((root / "data" / "local1.npz").read_bytes())
        lines += [f"        {name}:", f"          data_path: data/{name}.npz"]
        if overlay_ip:
            lines.append(f"          overlay_ip: {overlay_ip}")
    (root / "inventory.yaml").write_text("\n".join(lines) + "\n")


def deploy(root: Path, *extra: str) -> None:
    done = run_cli("deploy", "-w", str(root), *extra, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_deploy_records_every_host_and_a_new_host_moves_none(workspace: Path) -> None:
    derived = addresses(workspace)
    pinned = unlikely_address(workspace, set(derived.values()))
    set_hosts(workspace, {"local1": pinned, "local2": None})
    deploy(workspace)
    first = recorded(workspace)
    assert first == {"local1": pinned, "local2": derived["local2"]}

    # a third host joins, and local1 loses its explicit overlay_ip: neither moves it
    set_hosts(workspace, {"local1": None, "local2": None, "local3": None})
    assert addresses(workspace)["local1"] == pinned
    deploy(workspace)
    second = recorded(workspace)
    assert {name: second[name] for name in first} == first
    assert set(second) == {"local1", "local2", "local3"}
    assert ipaddress.IPv4Address(second["local3"]) in load_workspace(workspace).settings \
        .overlay.subnet
    assert len(set(second.values())) == 3


def test_a_workspace_with_only_the_old_peer_list_keeps_its_addresses(
        workspace: Path) -> None:
    derived = addresses(workspace)
    old = {"local1": unlikely_address(workspace, set(derived.values()))}
    old["local2"] = unlikely_address(workspace, set(derived.values()) | set(old.values()))
    paths = load_workspace(workspace).paths
    peers = paths.state / "wg" / "peers.json"
    peers.parent.mkdir(parents=True, exist_ok=True)
    peers.write_text(json.dumps({name: {"overlay_ip": ip, "public_key": "x"}
                                 for name, ip in old.items()}))
    assert not paths.overlay_addresses.exists()
    assert addresses(workspace) == old

    deploy(workspace, "--limit", "local1")        # only one of the two hosts
    assert recorded(workspace) == old   # the other host's old address is not forgotten
    assert addresses(workspace) == old
    deploy(workspace)
    assert recorded(workspace) == old
