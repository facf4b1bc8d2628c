"""Where systemd runs, a host's agent, tunnel and firewall table come back
after a reboot through three units flctl writes and enables.

There is no systemd here, so `systemctl` is a script on PATH that records
its arguments, and the unit directory is a temp folder; the units must be
exactly what the renderers make of this host's state, and enabled table
first, then tunnel, then agent.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from flctl.agent import launcher
from flctl.core.agentconfig import AgentConfig, render_agent_config
from flctl.core.renderers import (
    firewall_unit_name,
    render_firewall_unit,
    render_systemd_unit,
    render_tunnel_unit,
    tunnel_unit_name,
    unit_name,
)

PROJECT = "boot"


@pytest.fixture
def systemctl_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `systemctl` that appends its argv to a file (MainPID: none running)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "systemctl.log"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                      '[ "$1" = show ] && echo 0\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(launcher, "SYSTEMD_DIR", tmp_path / "units")
    return log


def deployed_root(root: Path, port: int) -> Path:
    """What deploy leaves under a host's state root: config, table and tunnel."""
    (root / "wg").mkdir(parents=True)
    config = AgentConfig(name="alpha", project=PROJECT, bind_address="127.0.0.1", port=port,
                         ca_cert=str(root / "ca.crt"), cert=str(root / "agent.crt"),
                         key=str(root / "agent.key"), data_path="/srv/data.npz",
                         state_file=str(root / "run" / "state.json"))
    (root / "agent.json").write_text(render_agent_config(config))
    (root / "firewall.nft").write_text("table inet flctl {}\n")
    (root / "wg" / "flctl-boot.conf").write_text("[Interface]\n")
    return root


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_the_three_units_are_written_as_rendered_and_enabled_in_order(
        tmp_path: Path, systemctl_log: Path) -> None:
    with socket.socket() as agent:          # the agent "listening" once enabled
        agent.bind(("127.0.0.1", 0))
        agent.listen()
        port = agent.getsockname()[1]
        root = deployed_root(tmp_path / "state", port)
        service = launcher.SystemdService(root)
        spec = launcher.unit_spec(root, launcher.read_config(root))
        assert spec.firewall and spec.tunnel_config   # the host has both
        expected = {unit_name(PROJECT): render_systemd_unit(spec),
                    firewall_unit_name(PROJECT): render_firewall_unit(spec),
                    tunnel_unit_name(PROJECT): render_tunnel_unit(spec)}

        assert not service.boot_current()
        assert service.install_boot() == "changed"
        units = tmp_path / "units"
        assert {p.name: p.read_text() for p in units.iterdir()} == expected
        assert service.boot_current()
        assert calls(systemctl_log) == ["daemon-reload"]
        assert service.install_boot() == "unchanged"          # nothing rewritten...
        assert calls(systemctl_log) == ["daemon-reload"]      # ...nor reloaded

        assert service.start(port, 5.0) is True
    enabled = [line.split()[-1] for line in calls(systemctl_log)
               if line.startswith("enable --now ")]
    assert enabled == [firewall_unit_name(PROJECT), tunnel_unit_name(PROJECT),
                       unit_name(PROJECT)]
    # the agent's unit pulls in the other two, so enabling it alone would still
    # bring the table and the tunnel up first at boot
    agent_unit = expected[unit_name(PROJECT)]
    assert f"Requires={firewall_unit_name(PROJECT)}" in agent_unit
    assert f"BindsTo={tunnel_unit_name(PROJECT)}" in agent_unit


def test_a_changed_unit_is_rewritten_and_systemd_reloaded(
        tmp_path: Path, systemctl_log: Path) -> None:
    root = deployed_root(tmp_path / "state", 1)
    service = launcher.SystemdService(root)
    service.install_boot()
    (root / "firewall.nft").unlink()     # the host no longer has a table of its own
    service = launcher.SystemdService(root)
    assert not service.boot_current()
    assert service.install_boot() == "changed"
    agent_unit = (tmp_path / "units" / unit_name(PROJECT)).read_text()
    assert agent_unit == render_systemd_unit(launcher.unit_spec(root, service.config))
    assert "Requires=" not in agent_unit
    assert calls(systemctl_log) == ["daemon-reload", "daemon-reload"]
