"""A deploy arms the host's firewall rollback before it touches the network.

A new tunnel can cut SSH as surely as a bad table, so the rollback timer
(`fw-arm`) must be armed before the tunnel comes up (`wg-up`) and before
the table is loaded (`fw-apply`), and before any network file is uploaded;
only a fresh connection confirms (`fw-confirm`), after both. The SSH host
is played on this machine (tests/sandbox_host.py): the real order of a real
deploy, without changing this machine's network.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flctl.deploy import engine, host_deploy
from flctl.workspace import load_workspace
from sandbox_host import sandbox, ssh_inventory

from helpers import run_cli, use_ports


def test_the_rollback_is_armed_before_the_tunnel_and_table_and_confirmed_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "1").returncode == 0
    use_ports(root, 1)
    ssh_inventory(root, ["alpha"])
    log = sandbox(tmp_path, monkeypatch)
    monkeypatch.setattr(host_deploy, "ensure_agent_software",
                        lambda connector, host, bundles, **kw: {"agent_user": "yes"})
    workspace = load_workspace(root)
    results = engine.deploy(workspace, list(workspace.inventory.hosts))

    assert [r.status for r in results] == ["changed", "changed"], [r.error for r in results]
    helper = [command for kind, command in log if kind == "helper"]
    for command in ("fw-arm", "wg-up", "fw-apply", "fw-confirm"):
        assert helper.count(command) == 1, helper
    arm, up, apply, confirm = (helper.index(c) for c in ("fw-arm", "wg-up", "fw-apply",
                                                         "fw-confirm"))
    assert arm < up < apply < confirm, helper
    network_files = [i for i, (kind, path) in enumerate(log) if kind == "put"
                     and (path.endswith(".nft") or "/wg/" in path)]
    armed_at = log.index(("helper", "fw-arm"))
    assert network_files and min(network_files) > armed_at, log
    assert log.index(("helper", "fw-confirm")) > max(network_files)


@pytest.mark.parametrize("software_changed, action", [(True, "restart"), (False, None)])
def test_new_agent_software_alone_restarts_a_running_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, software_changed: bool,
        action: str | None) -> None:
    """An upgrade of flctl on a host whose agent runs and whose config,
    certificates and task are unchanged: the old code must not keep serving."""
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "1").returncode == 0
    use_ports(root, 1)
    ssh_inventory(root, ["alpha"])
    log = sandbox(tmp_path, monkeypatch)

    def software(connector, host, bundles, step, **kw):
        step("agent software", software_changed, "flctl bundle")
        return {"agent_user": "yes"}

    monkeypatch.setattr(host_deploy, "ensure_agent_software",
                        lambda connector, host, bundles, **kw: {"agent_user": "yes"})
    workspace = load_workspace(root)
    engine.deploy(workspace, list(workspace.inventory.hosts))   # first deploy: all new
    log.clear()
    real_facts = host_deploy.HostDeploy.gather_facts

    def running(self, connector):   # the agent runs, as it would after the first deploy
        facts = real_facts(self, connector)
        return {**facts, "service_pid": 4242, "agent_version": facts["flctl_version"]}

    monkeypatch.setattr(host_deploy.HostDeploy, "gather_facts", running)
    monkeypatch.setattr(host_deploy, "ensure_agent_software", software)
    workspace = load_workspace(root)
    results = engine.deploy(workspace, list(workspace.inventory.hosts))
    assert all(r.status in ("ok", "changed") for r in results), [r.error for r in results]
    helper = [command for kind, command in log if kind == "helper"]
    assert "start" not in helper
    assert ("restart" in helper) == (action == "restart"), helper
