"""An SSH host played on this machine, for deploy tests that need no lab.

Deploy runs in-process against it: its state root (/var/lib/flctl) and
install dir (/opt/flctl) are temp folders, and the host helper really runs
there (facts, CSR, task check), except for the commands that would change
this machine itself (users, tunnel, firewall, boot units, the service) and
the offline install script: those are answered as a host answers them. Every
helper command, upload and install is recorded, in order, in one log shared
with the fresh connection that confirms a network change.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pytest

from flctl.core import layout
from flctl.deploy import engine, host_deploy, install, overlay
from flctl.deploy.connector import CommandResult
from flctl.deploy.local import LocalConnector

HELPER = "flctl.agent.host_helper"
PID = 4242
# what a host answers to the commands that would change this machine
ANSWERS = {
    "ensure-user": {"changed": True, "user": "flctl", "uid": 990, "gid": 990},
    "wg-key": {"public_key": base64.b64encode(b"k" * 32).decode()},
    "fw-arm": {"armed": PID},
    "wg-up": {"result": "created", "implementation": None},
    "fw-apply": {"changed": True, "armed": PID},
    "fw-confirm": {"disarmed": True, "rolled_back": False},
    "install-boot": {"result": "changed", "service": "systemd"},
    "start": {"changed": True, "service": "systemd", "service_pid": PID},
    "restart": {"changed": True, "service": "systemd", "service_pid": PID},
}


class SandboxHost(LocalConnector):
    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        super().__init__(name)
        self.log = log

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> CommandResult:
        argv = list(argv)
        if HELPER in argv:
            command = argv[argv.index(HELPER) + 1]
            self.log.append(("helper", command))
            if command in ANSWERS:
                return CommandResult(0, json.dumps(ANSWERS[command]) + "\n", "")
            argv[0] = sys.executable       # the host's venv python is this one
        elif argv[:1] == ["sh"] and argv[-1].endswith("/install.sh"):
            self.log.append(("install", argv[-1]))
            return CommandResult(0, "flctl bundle installed\n", "")
        return super().run(argv, timeout)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.log.append(("put", path))
        super().put(path, data, mode)

    def put_file(self, local: Path, path: str, mode: int = 0o644,
                 on_bytes=None) -> None:
        self.log.append(("put", path))
        super().put_file(local, path, mode, on_bytes)


def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Point deploy's remote paths into `tmp_path` and its SSH connections at a
    SandboxHost; returns the shared log."""
    log: list[tuple[str, str]] = []
    opt = tmp_path / "opt-flctl"
    monkeypatch.setattr(layout, "REMOTE_STATE_ROOT", PurePosixPath(tmp_path / "var-lib-flctl"))
    # the agent runs as this test's user (a host would get a system user "flctl")
    monkeypatch.setattr(host_deploy, "AGENT_USER", pwd.getpwuid(os.getuid()).pw_name)
    monkeypatch.setattr(install, "INSTALL_DIR", str(opt))
    monkeypatch.setattr(install, "WHEEL_DIR", f"{opt}/wheels")
    monkeypatch.setattr(install, "VENV_PYTHON", sys.executable)
    monkeypatch.setattr(engine, "VENV_PYTHON", sys.executable)
    connect = lambda host, options: SandboxHost(host.name, log)  # noqa: E731
    monkeypatch.setattr(host_deploy, "connect", connect)
    monkeypatch.setattr(engine, "connect", connect)    # the confirming connection
    monkeypatch.setattr(overlay.Hub, "apply", lambda self, peers: "created")
    return log


def ssh_inventory(root: Path, names: Sequence[str]) -> None:
    """Make the workspace's hosts SSH hosts (nobody connects: see sandbox())."""
    data = (root / "data" / "local1.npz").resolve()
    lines = ["all:", "  hosts:"]
    for index, name in enumerate(names):
        lines += [f"    {name}:", f"      ssh_host: 192.0.2.{10 + index}",
                  f"      data_path: {data}"]
    (root / "inventory.yaml").write_text("\n".join(lines) + "\n")
