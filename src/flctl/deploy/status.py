"""Per-host health for `flctl status`: host facts plus the agent's own answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from flctl.core.inventory import Host
from flctl.core.layout import Endpoint, agent_endpoint, host_paths
from flctl.deploy.connector import HostUnreachable
from flctl.deploy.engine import connect_options
from flctl.deploy.hostcmd import ConnectOptions, connect, hostctl
from flctl.deploy.install import VENV_PYTHON, installed
from flctl.errors import FlctlError
from flctl.workspace import Workspace

AgentInfoFn = Callable[[Endpoint], dict[str, Any]]


def host_status(workspace: Workspace, host: Host, index: int, agent_info: AgentInfoFn,
                options: ConnectOptions) -> dict[str, Any]:
    endpoint = agent_endpoint(host, workspace.settings, index)
    row: dict[str, Any] = {"host": host.name, "connection": host.connection,
                           "address": f"{endpoint.connect_address}:{endpoint.port}",
                           "reachable": False, "agent": "down", "error": None}
    try:
        connector = connect(host, options)
        if host.connection == "ssh":
            if not installed(connector):
                row["reachable"] = True
                row["agent"] = "not deployed"
                connector.close()
                return row
            connector.python = VENV_PYTHON
    except HostUnreachable as exc:
        row["error"] = exc.message
        return row
    try:
        facts = hostctl(connector, "status", "--root",
                        str(host_paths(host, str(workspace.paths.state)).root), timeout=30)
        row["reachable"] = True
        row.update({k: facts.get(k) for k in (
            "service", "service_pid", "agent_pid", "agent_uptime_s", "load", "mem_total_bytes",
            "mem_available_bytes", "disk_free_bytes", "gpus")})
    except FlctlError as exc:
        row["error"] = exc.message
        return row
    finally:
        connector.close()
    if row.get("service_pid") is None:
        row["agent"] = "not deployed" if row.get("agent_pid") is None else "unsupervised"
        return row
    try:
        info = agent_info(endpoint)
    except FlctlError as exc:
        row["agent"] = "not answering"
        row["error"] = exc.message
        return row
    data = info.get("data") or {}
    row.update({
        "agent": info.get("state", "up"),
        "version": info.get("version"),
        "n_train": data.get("n_train"),
        "n_test": data.get("n_test"),
        "data_error": info.get("data_error"),
        "last_round": info.get("last_round"),
        "rounds_served": info.get("rounds_served"),
    })
    return row


def gather_status(workspace: Workspace, hosts: list[Host], agent_info: AgentInfoFn,
                  forks: int = 16) -> list[dict[str, Any]]:
    order = {h.name: i for i, h in enumerate(workspace.inventory.hosts)}
    options = connect_options(workspace)
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts) or 1))) as pool:
        return list(pool.map(
            lambda h: host_status(workspace, h, order[h.name], agent_info, options), hosts))
