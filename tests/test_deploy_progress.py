"""Deploy tells how far its uploads have gone and how many hosts are done.

The SSH hosts are played on this machine (tests/sandbox_host.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flctl.deploy import engine, host_deploy
from flctl.deploy.results import DONE
from flctl.workspace import load_workspace
from sandbox_host import sandbox, ssh_inventory

from helpers import run_cli, use_ports


def test_uploads_report_their_bytes_and_every_host_says_when_it_is_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "1").returncode == 0
    use_ports(root, 2)
    ssh_inventory(root, ["alpha", "beta"])
    frozen = root / "frozen"
    frozen.mkdir(exist_ok=True)
    (frozen / "a.bin").write_bytes(b"a" * 3_000_000)
    (frozen / "b.bin").write_bytes(b"b" * 1_000_000)
    sandbox(tmp_path, monkeypatch)
    monkeypatch.setattr(host_deploy, "ensure_agent_software",
                        lambda connector, host, bundles, **kw: {"agent_user": "yes"})
    lines: dict[str, list[str]] = {}
    workspace = load_workspace(root)
    results = engine.deploy(workspace, list(workspace.inventory.hosts),
                            progress=lambda host, line: lines.setdefault(host, []).append(line))
    assert all(r.status == "changed" for r in results), [r.error for r in results]
    for host in ("alpha", "beta"):
        uploads = [re.fullmatch(r"uploading frozen part \(2 files\): ([\d.]+) of 4\.0 MB", line)
                   for line in lines[host]]
        moved = [float(m.group(1)) for m in uploads if m]
        assert moved and moved == sorted(moved) and moved[-1] == 4.0, lines[host]
        assert lines[host][-1] == f"{DONE} (changed)", lines[host]
