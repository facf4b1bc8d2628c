"""The agent's log on one host, read through its connector."""

from __future__ import annotations

import threading
from typing import Callable

from flctl.core.inventory import Host
from flctl.core.layout import host_paths
from flctl.deploy.remote import ConnectOptions, connect


def agent_log(host: Host, workspace_state: str, options: ConnectOptions, *, lines: int,
              follow: bool, on_line: Callable[[str], None],
              stop: threading.Event | None = None) -> int:
    """Send the last `lines` lines (then new ones, with `follow`) to `on_line`."""
    log = str(host_paths(host, workspace_state).log)
    argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), log]
    connector = connect(host, options)
    try:
        return connector.stream(argv, on_line, stop)
    finally:
        connector.close()
