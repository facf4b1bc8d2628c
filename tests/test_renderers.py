"""Renderers against golden files: a change to what lands on hosts is a
visible diff in review. Regenerate with FLCTL_UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flctl.core.renderers import UnitSpec, render_systemd_unit, unit_name

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FLCTL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


SPEC = UnitSpec(project="demo", host="alpha", python="/opt/flctl/venv/bin/python",
                config="/var/lib/flctl/alpha/agent.json", state_dir="/var/lib/flctl/alpha",
                log="/var/lib/flctl/alpha/agent.log")


def test_systemd_unit_golden() -> None:
    check_golden("flctl-agent.service", render_systemd_unit(SPEC))


def test_systemd_unit_restarts_and_is_confined() -> None:
    unit = render_systemd_unit(SPEC)
    directives = dict(line.split("=", 1) for line in unit.splitlines()
                      if "=" in line and not line.startswith("#"))
    assert directives["Restart"] == "on-failure"
    assert directives["ExecStart"] == (
        "/opt/flctl/venv/bin/python -m flctl.agent.main --config /var/lib/flctl/alpha/agent.json")
    assert directives["ProtectSystem"] == "strict"
    assert directives["ReadWritePaths"] == "/var/lib/flctl/alpha"
    assert directives["NoNewPrivileges"] == "yes"
    assert "[Install]" in unit and directives["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("project", ["demo", "lab-2"])
def test_unit_name(project: str) -> None:
    assert unit_name(project) == f"flctl-agent-{project}.service"
