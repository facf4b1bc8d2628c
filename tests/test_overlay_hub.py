"""The hub's end of the overlay, without bringing an interface up."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import pytest

from flctl.deploy.overlay import Hub, HubNotRoot
from flctl.workspace import init_workspace, load_workspace


def fake_key(seed: int) -> str:
    return base64.b64encode(bytes([seed]) * 32).decode()


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    init_workspace(tmp_path, local_hosts=2)
    hub = Hub(load_workspace(tmp_path))
    hub.paths.root.mkdir(parents=True, mode=0o700)
    hub.paths.private_key.write_text(fake_key(9) + "\n")
    return hub


PEERS = {"alpha": {"public_key": fake_key(1), "overlay_ip": "10.213.0.11",
                   "endpoint": "198.18.0.11:51820"},
         "beta": {"public_key": fake_key(2), "overlay_ip": "10.213.0.12",
                  "endpoint": "198.18.0.12:51820"}}


def test_not_root_says_exactly_what_to_run(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HubNotRoot) as caught:
        hub.apply(PEERS)
    message = caught.value.message
    assert f"sudo {sys.executable} -m flctl.agent.host_helper wg-up --config {hub.config_path}" \
        in message
    assert caught.value.exit_code != 0
    assert hub.config_path.stat().st_mode & 0o777 == 0o600  # ready for that command
    text = hub.config_path.read_text()
    assert "SaveConfig" not in text and fake_key(9) not in text  # the key stays in its file
    for name, peer in PEERS.items():
        assert peer["public_key"] in text and f"{peer['overlay_ip']}/32" in text
        assert f"Endpoint = {peer['endpoint']}" in text
        assert str(hub.paths.psk_dir / f"{name}.psk") in text


def test_peers_are_recorded_and_removed_with_their_psk(hub: Hub) -> None:
    for name in PEERS:
        (hub.paths.psk_dir).mkdir(exist_ok=True, mode=0o700)
        (hub.paths.psk_dir / f"{name}.psk").write_text("x")
    assert hub.record_peers(PEERS) == PEERS
    assert hub.paths.peers.stat().st_mode & 0o777 == 0o600
    left = hub.record_peers({}, removed={"alpha"})
    assert set(left) == {"beta"} and set(hub.known_peers()) == {"beta"}
    assert not (hub.paths.psk_dir / "alpha.psk").exists()
    assert (hub.paths.psk_dir / "beta.psk").exists()


def test_site_pair_psks_are_made_once_and_go_with_either_end(hub: Hub) -> None:
    first = hub.site_preshared_key("agg", "m1")
    assert first == hub.site_preshared_key("agg", "m1")           # made once
    assert first != hub.site_preshared_key("agg", "m2") != hub.preshared_key("agg")
    made = hub.paths.site_psk("agg", "m1")
    assert made.stat().st_mode & 0o777 == 0o600
    for directory in (hub.paths.psk_dir, made.parent.parent, made.parent):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    hub.record_peers({}, removed={"m1"})                           # a member leaves
    assert not made.exists() and hub.paths.site_psk("agg", "m2").exists()
    hub.record_peers({}, removed={"agg"})                          # the aggregator leaves
    assert not hub.paths.site_psk("agg", "m2").exists() and not made.parent.exists()


def test_no_peers_and_no_interface_is_nothing_to_do(hub: Hub) -> None:
    assert hub.apply({}) == "unchanged"


def test_the_cli_exits_7_with_the_hubs_message_when_it_needs_root() -> None:
    from flctl.cli.common import host_failures
    from flctl.deploy.results import HostResult

    rows = [HostResult("lab1", status="changed"),
            HostResult("hub", status="failed", error="the hub interface fl-demo needs root: run "
                       "`sudo python -m flctl.agent.host_helper wg-up --config X`", exit_code=7)]
    with pytest.raises(HubNotRoot) as caught:
        host_failures(rows, "deploy")
    assert caught.value.exit_code == 7 and "sudo" in caught.value.message
    other = [HostResult("lab1", status="failed", error="boom", exit_code=5)]
    with pytest.raises(Exception) as plain:
        host_failures(other, "deploy")
    assert plain.value.exit_code == 5  # type: ignore[attr-defined]
