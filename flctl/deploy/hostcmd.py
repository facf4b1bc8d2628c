"""Reaching a host: pick its connector, run flctl's host-side commands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flctl.core.inventory import Host
from flctl.deploy.connector import Connector
from flctl.deploy.local import LocalConnector
from flctl.errors import FlctlError

HOSTCTL = "flctl.agent.hostctl"


class StepFailed(FlctlError):
    """A deploy step failed on one host."""


@dataclass(frozen=True)
class ConnectOptions:
    known_hosts: Path
    accept_new_host_keys: bool = False
    connect_timeout: float = 10.0


def connect(host: Host, options: ConnectOptions) -> Connector:
    if host.connection == "local":
        return LocalConnector(host.name)
    from flctl.deploy.ssh import SSHConnector  # paramiko loads only when SSH is used

    return SSHConnector(host, options.known_hosts, accept_new=options.accept_new_host_keys,
                        connect_timeout=options.connect_timeout)


def hostctl(connector: Connector, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run one host-side command and decode its JSON answer."""
    result = connector.run([connector.python, "-m", HOSTCTL, *args], timeout=timeout)
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        answer = {}
    if result.returncode != 0 or "error" in answer:
        reason = answer.get("error") or (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepFailed(f"{args[0]}: {reason}")
    return answer
