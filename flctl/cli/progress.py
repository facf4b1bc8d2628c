"""A live per-host view of deploy/teardown, drawn on stderr.

The engine calls `update(host, message)` from its worker threads; the view
keeps the latest line per host and rich redraws it a few times a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from types import TracebackType

from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from flctl.cli.render import err


class HostProgress:
    def __init__(self, hosts: Sequence[str], title: str, enabled: bool = True) -> None:
        self._lines = {host: "waiting" for host in hosts}
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._title = title
        self._enabled = enabled and err.is_terminal
        self._live: Live | None = None

    def update(self, host: str, message: str) -> None:
        with self._lock:
            self._lines[host] = message
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Table:
        table = Table(title=f"{self._title} ({time.monotonic() - self._started:.1f}s)",
                      show_header=False, box=None)
        table.add_column(width=2)
        table.add_column(style="bold")
        table.add_column()
        with self._lock:
            for host, line in self._lines.items():
                table.add_row(Spinner("dots"), host, line)
        return table

    def __enter__(self) -> HostProgress:
        if self._enabled:
            self._live = Live(self._render(), console=err, refresh_per_second=8, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(kind, value, traceback)
