"""Renderers against golden files: a change to what lands on hosts is a
visible diff in review. Regenerate with FLCTL_UPDATE_GOLDEN=1.

The boot units are checked twice: as golden text, and for the ordering
that brings a rebooted host back (table, then tunnel, then the agent,
which is bound to the tunnel and runs as its own user)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from flctl.core.limits import AgentLimits
from flctl.core.renderers import (
    UnitSpec,
    cron_file_name,
    firewall_unit_name,
    render_boot_cron,
    render_firewall_unit,
    render_systemd_unit,
    render_tunnel_unit,
    tunnel_unit_name,
    unit_name,
)

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FLCTL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


SPEC = UnitSpec(project="demo", host="alpha", python="/opt/flctl/venv/bin/python",
                config="/var/lib/flctl/alpha/agent.json", state_dir="/var/lib/flctl/alpha",
                run_dir="/var/lib/flctl/alpha/run", log="/var/lib/flctl/alpha/agent.out",
                agent_log="/var/lib/flctl/alpha/run/agent.log",
                user="flctl", tunnel_config="/var/lib/flctl/alpha/wg/fl-demo.conf",
                firewall="/var/lib/flctl/alpha/firewall.nft", nft="/usr/sbin/nft")
UNDERLAY = dataclasses.replace(SPEC, tunnel_config=None)
LIMITED = dataclasses.replace(SPEC, limits=AgentLimits(cpu_percent=50, memory_bytes=512 << 20,
                                                        nice=10))


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_systemd_unit_golden() -> None:
    check_golden("flctl-agent.service", render_systemd_unit(SPEC))
    check_golden("flctl-agent-underlay.service", render_systemd_unit(UNDERLAY))
    check_golden("flctl-agent-limits.service", render_systemd_unit(LIMITED))


def test_boot_units_golden() -> None:
    check_golden("flctl-firewall.service", render_firewall_unit(SPEC))
    check_golden("flctl-tunnel.service", render_tunnel_unit(SPEC))
    check_golden("flctl-boot.cron", render_boot_cron(SPEC))


def test_systemd_unit_restarts_is_confined_and_unprivileged() -> None:
    unit = directives(render_systemd_unit(SPEC))
    assert unit["Restart"] == ["on-failure"]
    assert unit["ExecStart"] == [
        "/opt/flctl/venv/bin/python -m flctl.agent.main --config /var/lib/flctl/alpha/agent.json"
        " --log /var/lib/flctl/alpha/run/agent.log"]   # it rotates its log itself
    # only what comes before logging starts goes to systemd's append: file
    assert unit["StandardOutput"] == ["append:/var/lib/flctl/alpha/agent.out"]
    assert unit["User"] == ["flctl"] and unit["Group"] == ["flctl"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == ["/var/lib/flctl/alpha/run"]  # not its own config
    assert unit["NoNewPrivileges"] == ["yes"] and unit["CapabilityBoundingSet"] == [""]
    assert unit["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_limits_and_its_oom_note() -> None:
    plain = directives(render_systemd_unit(SPEC))
    assert not {"CPUQuota", "MemoryMax", "Nice", "ExecStopPost"} & set(plain)
    unit = directives(render_systemd_unit(LIMITED))
    assert unit["CPUQuota"] == ["50%"] and unit["MemoryMax"] == [str(512 << 20)]
    assert unit["MemorySwapMax"] == ["0"] and unit["Nice"] == ["10"]
    # systemd tells ExecStopPost= the result (oom-kill): noted for the next agent
    assert unit["ExecStopPost"] == ["/opt/flctl/venv/bin/python -m flctl.agent.exits "
                                    "--config /var/lib/flctl/alpha/agent.json"]


def test_boot_order_table_then_tunnel_then_agent() -> None:
    agent = directives(render_systemd_unit(SPEC))
    tunnel = directives(render_tunnel_unit(SPEC))
    firewall = directives(render_firewall_unit(SPEC))
    after_agent = agent["After"][0].split()
    # the agent binds to its overlay address: it needs the tunnel, and goes with it
    assert tunnel_unit_name("demo") in after_agent and firewall_unit_name("demo") in after_agent
    assert agent["BindsTo"] == [tunnel_unit_name("demo")]
    assert agent["Requires"] == [firewall_unit_name("demo")]
    # the tunnel comes after the table; the table before the network at all
    assert firewall_unit_name("demo") in tunnel["After"][0].split()
    assert tunnel["Requires"] == [firewall_unit_name("demo")]
    assert firewall["Before"] == ["network-pre.target"]
    assert firewall["DefaultDependencies"] == ["no"]
    # both are idempotent oneshots that stay "active" for BindsTo/Requires
    for unit in (tunnel, firewall):
        assert unit["Type"] == ["oneshot"] and unit["RemainAfterExit"] == ["yes"]
    assert tunnel["ExecStart"][0].endswith("host_helper wg-up --config "
                                            "/var/lib/flctl/alpha/wg/fl-demo.conf")
    assert firewall["ExecStart"] == ["/usr/sbin/nft -f /var/lib/flctl/alpha/firewall.nft"]


def test_underlay_agent_has_no_tunnel_but_keeps_its_table() -> None:
    agent = directives(render_systemd_unit(UNDERLAY))
    assert "BindsTo" not in agent and agent["Requires"] == [firewall_unit_name("demo")]


def test_boot_cron_runs_the_helper_boot_command_as_root() -> None:
    line = render_boot_cron(SPEC).splitlines()[-1]
    assert re.fullmatch(r"@reboot root /opt/flctl/venv/bin/python -m flctl\.agent\.host_helper "
                        r"boot --root /var/lib/flctl/alpha >> /var/lib/flctl/alpha/boot\.log 2>&1",
                        line)
    assert "." not in cron_file_name("my.project")   # cron skips names with dots


@pytest.mark.parametrize("project", ["demo", "lab-2"])
def test_unit_name(project: str) -> None:
    assert unit_name(project) == f"flctl-agent-{project}.service"
