"""A workspace deployed by the flctl before trust roles migrates with one deploy.

The previous release (the commit below, from this repository's history) is
installed into its own venv from a source tree, as it required, and
deploys two lab hosts: certificates good for client and server use, agents
running as root, no revocation list, no boot units. Then this flctl deploys
the same workspace once, and the result is what a fresh deploy gives:
host certificates with the host role, the coordinator's with its own,
agents running as `flctl`, and training works.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from flctl.core import pki

from helpers import by_host, deploy_json, run_cli
from lab import lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]

CHECKOUT = Path(__file__).resolve().parents[1]
PREVIOUS = "d57773e"   # main before trust roles, the top-level layout and wheels.lock


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous flctl's bin/ directory (editable install of its source tree)."""
    where = tmp_path_factory.mktemp("previous")
    archive = where / "src.tar"
    made = subprocess.run(["git", "-C", str(CHECKOUT), "archive", "-o", str(archive), PREVIOUS],
                          capture_output=True, text=True)
    assert made.returncode == 0, f"this test needs the repository's history: {made.stderr}"
    with tarfile.open(archive) as tar:
        tar.extractall(where / "src")
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True)
    done = subprocess.run([str(where / "venv" / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", "-e", str(where / "src")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return where / "venv" / "bin"


def old_cli(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / "flctl"), *args], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL, cwd="/",
                          env={**os.environ, "COLUMNS": "200"})


def test_one_deploy_migrates_a_workspace_of_the_previous_version(
        previous: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = tmp_path / "ws"
    monkeypatch.setenv("FLCTL_PYTHON", str(previous / "python"))   # lab.sh inits with it
    lab = lab_up(2, workspace)
    try:
        monkeypatch.delenv("FLCTL_PYTHON")
        old = old_cli(previous, "deploy", "-w", str(workspace), "--json")
        assert old.returncode == 0, old.stderr
        host = lab.hosts[0]
        legacy = (workspace / "pki" / "coordinator.crt").read_bytes()
        assert pki.certificate_role(legacy) is None            # client and server use
        pid = lab.exec(host, "cat", f"/var/lib/flctl/{host}/agent.pid").stdout.strip()
        assert lab.exec(host, "stat", "-c", "%u", f"/proc/{pid}").stdout.strip() == "0"

        migrated = deploy_json(workspace)
        assert migrated["code"] == 0, migrated
        rows = by_host(migrated)
        assert rows["coordinator"]["steps"][0]["detail"].startswith("renewed: made before")
        for name in lab.hosts:
            changed = {s["name"]: s["detail"] for s in rows[name]["steps"] if s["changed"]}
            assert changed["certificate"].startswith("issued: made before certificate roles")
            assert {"agent software", "agent user", "revocation list", "agent config",
                    "boot", "agent"} <= set(changed), changed
        assert pki.certificate_role((workspace / "pki" / "coordinator.crt").read_bytes()) == \
            pki.ROLE_COORDINATOR
        pid = lab.exec(host, "cat", f"/var/lib/flctl/{host}/run/agent.pid").stdout.strip()
        uid = lab.exec(host, "stat", "-c", "%u", f"/proc/{pid}").stdout.strip()
        assert lab.exec(host, "id", "-nu", uid).stdout.strip() == "flctl"
        assert not lab.exec(host, "sh", "-c", f"ls /var/lib/flctl/{host}/*.pid 2>/dev/null; "
                                              "true").stdout.strip()   # old pidfiles gone

        again = deploy_json(workspace)
        assert again["code"] == 0 and all(h["changed"] == 0 for h in again["hosts"]), again
        trained = run_cli("train", "-w", str(workspace), "--rounds", "2", "--json", timeout=300)
        assert trained.returncode == 0, trained.stderr
        assert sorted(trained.json()["hosts"]) == sorted(lab.hosts)
    finally:
        run_cli("teardown", "-w", str(workspace), timeout=300)
        lab.down()
