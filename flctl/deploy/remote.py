"""Reaching a host: pick its connector, call flctl's helper on it.

The host helper (flctl.agent.host_helper) answers each command with one
JSON document. Nothing in it is trusted: an answer that is not an object,
or lacks what the caller needs in the shape it needs, fails that host's
step with a line naming the field, and the other hosts carry on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flctl.core.inventory import Host
from flctl.core.schema import SchemaError, check
from flctl.deploy.connector import CommandResult, Connector
from flctl.deploy.local import LocalConnector
from flctl.errors import FlctlError

HELPER_MODULE = "flctl.agent.host_helper"


class StepFailed(FlctlError):
    """A deploy step failed on one host."""


@dataclass(frozen=True)
class ConnectOptions:
    known_hosts: Path
    accept_new_host_keys: bool = False
    connect_timeout: float = 10.0
    ssh_config: Path | None = None     # OpenSSH client config (aliases, ProxyJump)


def connect(host: Host, options: ConnectOptions) -> Connector:
    if host.connection == "local":
        return LocalConnector(host.name)
    from flctl.deploy.ssh import SSHConnector  # paramiko loads only when SSH is used
    from flctl.deploy.ssh_jump import load_ssh_config

    config = load_ssh_config(options.ssh_config) if options.ssh_config else None
    return SSHConnector(host, options.known_hosts, accept_new=options.accept_new_host_keys,
                        connect_timeout=options.connect_timeout, ssh_config=config)


def check_routes(hosts: list[Host], options: ConnectOptions) -> None:
    """Refuse a bad ssh_config (a ProxyJump loop, a bad Port) before any host is
    touched: it is the same mistake for every host, one ConfigError line."""
    if options.ssh_config is None or all(host.connection == "local" for host in hosts):
        return
    from flctl.deploy.ssh_jump import load_ssh_config, route_for

    config = load_ssh_config(options.ssh_config)
    for host in hosts:
        if host.connection == "ssh" and host.ssh_host:
            route_for(host, config)


def helper_argv(python: str, *args: str) -> list[str]:
    """The host helper's command line for `args`, run with `python`."""
    return [python, "-m", HELPER_MODULE, *args]


def call_helper(connector: Connector, *args: str, timeout: float = 120.0,
                spec: Any = None) -> dict[str, Any]:
    """Run one host-side command and decode its JSON answer, checked against
    `spec` (flctl.core.schema) when given."""
    result = connector.run(helper_argv(connector.python, *args), timeout=timeout)
    return helper_answer(args[0], result, spec)


def helper_answer(command: str, result: CommandResult, spec: Any = None) -> dict[str, Any]:
    """The JSON answer of the helper's `command` (its last line of output),
    checked; a failure, an error answer or a bad shape is one StepFailed."""
    lines = result.stdout.strip().splitlines()
    try:
        answer: Any = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        answer = None
    error = answer.get("error") if isinstance(answer, dict) else None
    if result.returncode != 0 or error is not None:
        reason = error if isinstance(error, str) else \
            (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepFailed(f"{command}: {reason}")
    if not isinstance(answer, dict):
        raise StepFailed(f"{command}: the host's answer is not a JSON object")
    if spec is not None:
        try:
            answer = check(answer, spec, command)
        except SchemaError as exc:
            raise StepFailed(f"unexpected answer from the host: {exc.message}") from None
    return answer
