"""`flctl doctor`'s legwork: one SSH session per host, in parallel, running
core.doctor's script, and the host's clock read against this one's.

A host that cannot be reached still gets its row: the failed SSH check
(with what to do about an unknown host key or a refused login) and nothing
else, since nothing else could be asked.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from flctl.core.doctor import Check, Probe, diagnose, doctor_script
from flctl.core.facts import parse_key_values
from flctl.core.inventory import Host
from flctl.core.layout import agent_port, host_paths
from flctl.deploy.connector import HostUnreachable
from flctl.deploy.engine import connect_options
from flctl.deploy.install import INSTALL_DIR
from flctl.deploy.remote import connect
from flctl.errors import FlctlError
from flctl.workspace import Workspace

SCRIPT_TIMEOUT_S = 30.0


@dataclass
class HostReport:
    host: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "ok": not self.problems, "seconds": round(self.seconds, 3),
                "checks": [c.as_dict() for c in self.checks]}


def _unreachable_fix(reason: str) -> str:
    if "host key" in reason and "CHANGED" not in reason:
        return "check the key with the host's owner, then `flctl deploy --accept-new-host-keys`"
    if "CHANGED" in reason:
        return "if the host was reinstalled, remove its line from the workspace's known_hosts"
    if "auth" in reason.lower() or "key" in reason.lower():
        return "check ssh_user and ssh_key for this host, or load the key into ssh-agent"
    return "check ssh_host and ssh_port, and that sshd runs and is reachable from here"


def examine(workspace: Workspace, host: Host, index: int) -> HostReport:
    started = time.monotonic()
    report = HostReport(host.name)
    settings = workspace.settings
    remote = host.connection == "ssh"
    try:
        connector = connect(host, connect_options(workspace))
        try:
            overlay = remote and settings.agent.listen == "overlay"
            probe = Probe(
                python=host.python if remote else sys.executable,
                install_dir=INSTALL_DIR if remote else str(workspace.paths.state),
                state_dir=str(host_paths(host, str(workspace.paths.state)).root),
                data_path=host.data_path, tcp_port=agent_port(host, settings, index),
                udp_port=settings.overlay.port if overlay else None,
                mtu_target=connector.local_address() if overlay else None,
                gpus=host.gpus, become=host.become, remote=remote)
            sent = time.time()
            answer = connector.run_shell(doctor_script(probe), timeout=SCRIPT_TIMEOUT_S)
            back = time.time()
        finally:
            connector.close()
    except HostUnreachable as exc:
        report.checks.append(Check("ssh", False, exc.message, _unreachable_fix(exc.message)))
        report.seconds = time.monotonic() - started
        return report
    except FlctlError as exc:
        report.checks.append(Check("ssh", False, exc.message, "see the message"))
        report.seconds = time.monotonic() - started
        return report
    facts = parse_key_values(answer.stdout)
    try:
        skew: float | None = float(facts["clock"]) - (sent + back) / 2
    except (KeyError, ValueError):
        skew = None
    report.checks = diagnose(facts, probe, skew, (back - sent) / 2)
    report.seconds = time.monotonic() - started
    return report


def examine_hosts(workspace: Workspace, hosts: list[Host], forks: int = 32) -> list[HostReport]:
    """Every host at once (doctor on 8 hosts should take about one host's time)."""
    order = {h.name: i for i, h in enumerate(workspace.inventory.hosts)}
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts) or 1))) as pool:
        return list(pool.map(lambda h: examine(workspace, h, order[h.name]), hosts))
