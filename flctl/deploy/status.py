"""Per-host health for `flctl status`: host facts plus the agent's own answer.

Both answers are schema-checked before a row is built from them: a host
that answers nonsense gets a row saying so, the others are unaffected.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from flctl.core.inventory import Host
from flctl.core.layout import Endpoint, agent_endpoint, host_paths
from flctl.core.messages import INFO_SPEC
from flctl.core.schema import Field, MapOf, Maybe, SchemaError, check, count
from flctl.deploy.connector import HostUnreachable
from flctl.deploy.engine import connect_options
from flctl.deploy.host_deploy import ProgressFn
from flctl.deploy.install import VENV_PYTHON, installed
from flctl.deploy.overlay import Hub
from flctl.deploy.remote import ConnectOptions, call_helper, connect
from flctl.deploy.results import DONE
from flctl.errors import FlctlError
from flctl.workspace import Workspace

AgentInfoFn = Callable[[Endpoint], dict[str, Any]]
STATUS_SPEC = {
    "service": str,
    "service_pid": Maybe(count()),
    "agent_pid": Maybe(count()),
    "agent_uptime_s": Maybe(Field(float, 0)),
    "load": [Field(float, 0)],
    # cumulative CPU ticks since boot (core.facts.CpuTicks): two answers give the use between
    "cpu": Maybe({"busy_ticks": count(), "total_ticks": count(), "count": count(1 << 16)}),
    "mem_total_bytes": Maybe(count()),
    "mem_available_bytes": Maybe(count()),
    "disk_free_bytes": Maybe(count()),
    "gpus": [str],
    "gpu_usage": Maybe([{"index": count(1 << 16), "utilization_pct": Maybe(Field(float, 0, 100)),
                         "memory_used_bytes": Maybe(count()), "memory_total_bytes": Maybe(count()),
                         "name": str}]),
    "interfaces": [str],
    "environment": Maybe(MapOf(Any)),   # what the last deploy's task check found
}


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
        facts = call_helper(connector, "status", "--root",
                            str(host_paths(host, str(workspace.paths.state)).root), timeout=30,
                            spec=STATUS_SPEC)
        row["reachable"] = True
        row.update({k: facts.get(k) for k in STATUS_SPEC})
    except FlctlError as exc:
        row["error"] = exc.message
        return row
    finally:
        connector.close()
    if row.get("service_pid") is None:
        row["agent"] = "not deployed" if row.get("agent_pid") is None else "unsupervised"
        return row
    try:
        info = check(agent_info(endpoint), INFO_SPEC, "info")
    except SchemaError as exc:
        row["agent"] = "bad answer"
        row["error"] = exc.message
        return row
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
        "frozen": (info.get("frozen") or {}).get("sha256"),
        "frozen_error": info.get("frozen_error"),
        # why the agent before this one stopped ("out of memory (limit 512 MB)")
        "last_exit": info.get("last_exit") if isinstance(info.get("last_exit"), str) else None,
    })
    return row


# A WireGuard peer re-handshakes every 2 minutes while traffic or keepalives
# flow; a handshake older than this means the tunnel is down.
HANDSHAKE_STALE_S = 180


def tunnel_state(handshake: dict[str, int] | None,
                 host_interface_up: bool | None) -> dict[str, Any]:
    """Up only if the host still has its end and the hub saw a recent handshake
    (the hub alone cannot tell for up to HANDSHAKE_STALE_S after a tunnel dies)."""
    if host_interface_up is False:
        state: dict[str, Any] = {"tunnel": "down", "tunnel_reason": "no interface on the host"}
        return {**tunnel_state(handshake, None), **state}
    if handshake is None:
        return {"tunnel": "unknown"}
    age = None if handshake["handshake_age_s"] < 0 else handshake["handshake_age_s"]
    up = age is not None and age <= HANDSHAKE_STALE_S
    return {"tunnel": "up" if up else "down", "handshake_age_s": age,
            "tunnel_rx_bytes": handshake["rx_bytes"], "tunnel_tx_bytes": handshake["tx_bytes"]}


def gather_status(workspace: Workspace, hosts: list[Host], agent_info: AgentInfoFn,
                  forks: int = 16, progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """A row per host, `forks` hosts at a time; `progress(host, line)` hears
    when each starts and ends (hundreds of hosts take a while over SSH)."""
    order = {h.name: i for i, h in enumerate(workspace.inventory.hosts)}
    options = connect_options(workspace)
    overlay = workspace.settings.agent.listen == "overlay"
    handshakes: dict[str, dict[str, int]] = {}
    if overlay and any(h.connection == "ssh" for h in hosts):
        try:
            handshakes = Hub(workspace).handshakes()
        except FlctlError:
            handshakes = {}

    def one(host: Host) -> dict[str, Any]:
        if progress is not None:
            progress(host.name, "probing")
        row = host_status(workspace, host, order[host.name], agent_info, options)
        if progress is not None:
            progress(host.name, f"{DONE} (agent {row['agent']})")
        return row

    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts) or 1))) as pool:
        rows = list(pool.map(one, hosts))
    interface = Hub(workspace).interface
    for host, row in zip(hosts, rows):
        if overlay and host.connection == "ssh":
            interfaces = row.pop("interfaces", None)
            present = None if interfaces is None else interface in interfaces
            row.update(tunnel_state(handshakes.get(host.name), present))
        else:
            row.pop("interfaces", None)
    return rows
