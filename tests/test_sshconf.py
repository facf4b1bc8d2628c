"""flctl.core.sshconf: precedence and ProxyJump chains, from lookups given as dicts;
and the address deploy takes for a host behind an alias."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flctl.core.inventory import Host, Inventory
from flctl.core.settings import AgentSettings, Settings
from flctl.core.sshconf import SSHConfigText, plan_route
from flctl.deploy.engine import _endpoint
from flctl.deploy.host_deploy import HostDeploy
from flctl.deploy.remote import StepFailed
from flctl.errors import ConfigError

from helpers import run_cli

CONFIG = """\
Host bastion
  HostName 198.18.0.1
  User jumper
  Port 2222
  IdentityFile /keys/bastion

Host inner
  HostName 198.18.0.2
  ProxyJump bastion

Host lab2
  HostName 198.18.0.12
  User deploy
  Port 2200
  IdentityFile /keys/lab
  ProxyJump inner,edge:2022

Host selfish
  ProxyJump selfish

Host ping
  ProxyJump pong
Host pong
  ProxyJump ping

Host badport
  Port ssh
"""

LOOKUPS: dict[str, dict[str, Any]] = {
    "bastion": {"hostname": "198.18.0.1", "user": "jumper", "port": "2222",
                "identityfile": ["/keys/bastion"]},
    "inner": {"hostname": "198.18.0.2", "proxyjump": "bastion"},
    "lab2": {"hostname": "198.18.0.12", "user": "deploy", "port": "2200",
             "identityfile": ["/keys/lab"], "proxyjump": "inner,edge:2022"},
    "selfish": {"hostname": "selfish", "proxyjump": "selfish"},
    "ping": {"hostname": "ping", "proxyjump": "pong"},
    "pong": {"hostname": "pong", "proxyjump": "ping"},
}


def lookup(alias: str) -> Mapping[str, Any]:
    return LOOKUPS.get(alias, {"hostname": alias})


SOURCE = SSHConfigText("/cfg/ssh_config", CONFIG)


def route(alias: str, explicit: tuple[str, ...] = (), **host: Any):
    values = {"user": "root", "port": 22, "key_files": (), **host}
    return plan_route(alias, lookup, SOURCE, explicit=explicit, local_user="me", **values)


def test_ssh_config_fills_what_the_inventory_leaves_to_defaults() -> None:
    target = route("lab2").target
    assert (target.hostname, target.port, target.user, target.key_files) == \
        ("198.18.0.12", 2200, "deploy", ("/keys/lab",))


def test_what_the_inventory_sets_wins_over_ssh_config() -> None:
    target = route("lab2", ("ssh_user", "ssh_port", "ssh_key"), user="ops", port=22,
                   key_files=("/mine",)).target
    assert (target.hostname, target.port, target.user, target.key_files) == \
        ("198.18.0.12", 22, "ops", ("/mine",))


def test_a_name_the_config_does_not_know_is_used_as_it_is() -> None:
    found = route("198.18.0.40", user="root", port=2022)
    assert found.hops == ()
    assert (found.target.hostname, found.target.port, found.target.user) == \
        ("198.18.0.40", 2022, "root")


def test_proxyjump_chains_hops_first_hop_s_own_jump_first() -> None:
    hops = route("lab2").hops
    # lab2 -> ProxyJump inner,edge:2022 ; inner -> ProxyJump bastion
    assert [(h.alias, h.hostname, h.port, h.user) for h in hops] == [
        ("bastion", "198.18.0.1", 2222, "jumper"),
        ("inner", "198.18.0.2", 22, "me"),      # no User: the local user, as OpenSSH
        ("edge", "edge", 2022, "me"),           # port from the jump spec
    ]
    assert hops[0].key_files == ("/keys/bastion",)
    assert hops[1].key_files == ("/keys/lab",)  # no IdentityFile: the target's key


def test_user_at_host_in_a_jump_spec() -> None:
    LOOKUPS["spec"] = {"hostname": "spec", "proxyjump": "alice@198.18.0.9:2200"}
    try:
        (hop,) = route("spec").hops
    finally:
        del LOOKUPS["spec"]
    assert (hop.user, hop.hostname, hop.port) == ("alice", "198.18.0.9", 2200)


@pytest.mark.parametrize("alias,loop,line", [
    ("selfish", "selfish -> selfish", 19),
    ("ping", "ping -> pong -> ping", 24),
])
def test_a_proxyjump_loop_is_refused_with_file_line_and_field(alias: str, loop: str,
                                                              line: int) -> None:
    with pytest.raises(ConfigError) as caught:
        route(alias)
    assert str(caught.value) == f"/cfg/ssh_config:{line}: ProxyJump: ProxyJump loop: {loop}"


def test_a_bad_port_in_the_config_names_its_line() -> None:
    LOOKUPS["badport"] = {"hostname": "x", "port": "ssh"}
    try:
        with pytest.raises(ConfigError) as caught:
            route("badport")
    finally:
        del LOOKUPS["badport"]
    assert caught.value.field == "Port" and "not a port: 'ssh'" in str(caught.value)
    assert caught.value.line == 27


# ---------------------------------------------- deploy: the address behind an alias


def host_deploy(listen: str, ssh_host: str = "lab2"):
    host = Host(name="lab2", connection="ssh", ssh_host=ssh_host, ssh_port=22, ssh_user="root",
                ssh_key=None, host_key=None, become=False,
                overlay_ip=ipaddress.IPv4Address("10.213.0.12"), data_path="/d", labels={},
                groups=(), agent_port=None, python="python3", line=1)
    settings = Settings(agent=AgentSettings(listen=listen))
    inventory = Inventory(source="inventory.yaml", hosts=(host,), groups={"all": ("lab2",)})
    workspace = SimpleNamespace(settings=settings, inventory=inventory,
                                paths=SimpleNamespace(state="/tmp/x"))
    return HostDeploy(SimpleNamespace(workspace=workspace), host, 0, lambda *a: None)


def test_deploy_takes_the_address_ssh_config_resolved() -> None:
    job = host_deploy("overlay")
    job._resolved_address(SimpleNamespace(address="198.18.0.12"))
    assert job.address == "198.18.0.12"
    assert _endpoint(job.address, 51820) == "198.18.0.12:51820"   # the hub's peer endpoint
    assert _endpoint("fd00::7", 51820) == "[fd00::7]:51820"


def test_an_alias_with_underlay_listening_is_one_line() -> None:
    with pytest.raises(StepFailed) as caught:
        host_deploy("underlay")._resolved_address(SimpleNamespace(address="198.18.0.12"))
    assert str(caught.value) == (
        "agent.listen: underlay reaches the agent at ssh_host, which is the ssh_config alias "
        "'lab2' (HostName 198.18.0.12): write ssh_host: 198.18.0.12 (a 'Host 198.18.0.12' "
        "entry in ssh_config still applies to it)")
    job = host_deploy("underlay", ssh_host="198.18.0.12")   # the address itself: fine
    job._resolved_address(SimpleNamespace(address="198.18.0.12"))
    assert job.address == "198.18.0.12"


# ------------------------------------------------------------ bad input, end to end


def workspace_with_ssh_config(root: Path, config: str) -> Path:
    assert run_cli("init", str(root)).returncode == 0
    (root / "inventory.yaml").write_text(
        "all:\n  hosts:\n    gpu1:\n      ssh_host: gpu1\n      data_path: /d\n")
    (root / "ssh_config").write_text(config)
    with open(root / "flctl.yaml", "a") as settings:
        settings.write("ssh_config: ssh_config\n")
    return root


def test_deploy_refuses_a_proxyjump_loop_before_any_host(tmp_path: Path) -> None:
    root = workspace_with_ssh_config(tmp_path, "Host gpu1\n  ProxyJump bastion\n"
                                               "Host bastion\n  ProxyJump gpu1\n")
    for command in ("deploy", "teardown"):
        done = run_cli(command, "-w", str(root))
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"error: {root / 'ssh_config'}:4: ProxyJump: ProxyJump loop: gpu1 -> bastion -> gpu1"]


def test_deploy_to_an_unknown_alias_is_one_line(tmp_path: Path) -> None:
    root = workspace_with_ssh_config(tmp_path, "Host other\n  HostName 127.0.0.1\n")
    inventory = root / "inventory.yaml"
    inventory.write_text(inventory.read_text().replace("ssh_host: gpu1",
                                                       "ssh_host: gpu1.invalid"))
    done = run_cli("deploy", "-w", str(root), "--json")
    assert done.returncode == 5
    (row,) = [h for h in done.json()["hosts"] if h["host"] == "gpu1"]
    assert row["status"] == "unreachable"
    assert row["error"] == ("gpu1 (gpu1.invalid:22): cannot resolve host name 'gpu1.invalid' "
                            f"(and it is not a Host in {root / 'ssh_config'})")
