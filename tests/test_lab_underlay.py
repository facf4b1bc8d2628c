"""`agent.listen: underlay`: no tunnel, but the agent port still opens only to
the coordinator. Agents listen on their SSH address; flctl's nftables table
on each host accepts the agent port only from the address the coordinator
reaches the host from, so another host cannot even reach an agent."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from flctl.core.settings import AgentSettings, load_settings, render_settings
from flctl.workspace import load_workspace

from helpers import by_host, deploy_json, run_cli
from lab import Lab, lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]

@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    workspace = tmp_path_factory.mktemp("underlayws")
    lab = lab_up(2, workspace)
    path = workspace / "flctl.yaml"
    settings = load_settings(path)
    path.write_text(render_settings(dataclasses.replace(
        settings, agent=AgentSettings(port=settings.agent.port, listen="underlay"))))
    try:
        first = deploy_json(workspace)
        assert first["code"] == 0, first
        yield lab
    finally:
        run_cli("teardown", "-w", str(workspace), timeout=300)
        lab.down()


def test_the_agent_port_opens_only_to_the_coordinator(lab: Lab) -> None:
    port = load_workspace(lab.workspace).settings.agent.port
    target, other = lab.hosts
    listing = lab.exec(target, "nft", "list", "table", "inet", "flctl").stdout
    assert f"ip saddr 198.18.0.1 tcp dport {port} accept" in listing
    assert "udp dport" not in listing                  # no WireGuard port without the overlay
    assert lab.probe(other, lab.addresses[target], port).startswith("closed")
    assert lab.probe("labx", lab.addresses[target], port).startswith("closed")
    rows = by_host(run_cli("status", "-w", str(lab.workspace), "--json").json())
    assert rows[target]["agent"] == "idle"
    assert rows[target]["address"] == f"{lab.addresses[target]}:{port}"
    assert subprocess.run(lab.ssh_command(target, "true"), capture_output=True,
                          timeout=20).returncode == 0


def test_training_over_the_underlay(lab: Lab) -> None:
    result = run_cli("train", "-w", str(lab.workspace), "--rounds", "2", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    assert all(len(r["participants"]) == 2 for r in result.json()["history"])
    again = deploy_json(lab.workspace)
    assert again["code"] == 0 and all(h["changed"] == 0 for h in again["hosts"]), again
