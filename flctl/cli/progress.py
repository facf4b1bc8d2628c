"""Live views drawn on stderr: per host for deploy/teardown, per round for train.

The engine calls `update(host, message)` from its worker threads; the view
keeps the latest line per host and rich redraws it a few times a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from types import TracebackType

from rich.console import Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from flctl.cli.render import add_round_row, err, human_bytes
from flctl.coordinator.progress import TransferProgress
from flctl.coordinator.summary import RoundRecord
from flctl.deploy.results import DONE

WAITING = "waiting"   # a host's line before its first progress message


class HostProgress:
    """Deploy's and teardown's view: one line per host while they are few;
    past MAX_ROWS, only the hosts under way (the rest counted), so a frame
    stays small however many hosts there are."""

    MAX_ROWS = 20

    def __init__(self, hosts: Sequence[str], title: str, enabled: bool = True) -> None:
        self._lines = {host: WAITING for host in hosts}
        self._hosts = list(hosts)   # the hub and the coordinator may report lines too
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._title = title
        self._enabled = enabled and err.is_terminal
        self._live: Live | None = None

    def update(self, host: str, message: str) -> None:
        """Note the host's latest line; it is drawn at the next refresh (drawing
        here, on every line of every host, would cost O(hosts) each time)."""
        with self._lock:
            self._lines[host] = message

    def _render(self) -> Table:
        with self._lock:
            lines = dict(self._lines)
        done = sum(1 for host in self._hosts if lines[host].startswith(DONE))
        table = Table(title=f"{self._title}: {done} of {len(self._hosts)} hosts done "
                            f"({time.monotonic() - self._started:.1f}s)",
                      show_header=False, box=None)
        table.add_column(width=2)
        table.add_column(style="bold")
        table.add_column()
        shown = lines
        if len(lines) > self.MAX_ROWS:
            shown = {host: line for host, line in lines.items()
                     if line != WAITING and not line.startswith(DONE)}
            shown = dict(list(shown.items())[:self.MAX_ROWS])
        for host, line in shown.items():
            table.add_row(Spinner("dots"), host, line)
        if len(shown) < len(lines):
            waiting = sum(1 for line in lines.values() if line == WAITING)
            finished = sum(1 for line in lines.values() if line.startswith(DONE))
            table.add_row("", "", Text(f"and {len(lines) - len(shown)} more ({waiting} "
                                       f"waiting, {finished} done)", style="dim"))
        return table

    def __enter__(self) -> HostProgress:
        if self._enabled:
            self._live = Live(console=err, refresh_per_second=4, transient=True,
                              get_renderable=self._render)
            self._live.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(kind, value, traceback)


# Below this many bytes per phase a transfer is over before a line could help.
SHOW_TRANSFERS_FROM = 8 << 20


class TrainView:
    """`flctl train`'s live view on stderr: the rounds table, and under it how far
    the model has gone out to the hosts while a large one is on its way.

    The view appears with the first round, or earlier when a large model is
    being sent (round 1 of a big model can take minutes): a run that cannot
    start ends with its one error line, not an empty table above it.
    """

    def __init__(self, table: Table, transfers: TransferProgress) -> None:
        self._table = table
        self._transfers = transfers
        self._live: Live | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name="flctl-train-view")

    def __rich__(self) -> Group:
        return Group(self._table, self._transfer_line())

    def _transfer_line(self) -> Text:
        now = self._transfers.snapshot()
        if now is None or now.expected < SHOW_TRANSFERS_FROM:
            return Text("")
        return Text(f"{now.phase}: {human_bytes(now.sent)} of {human_bytes(now.expected)} "
                    f"({now.hosts_done} of {now.hosts} hosts have it)", style="dim")

    def _show(self) -> None:
        with self._lock:
            if self._live is None and not self._done.is_set():
                self._live = Live(self, console=err, refresh_per_second=4)
                self._live.start()

    def _watch(self) -> None:
        while not self._done.wait(0.25):
            now = self._transfers.snapshot()
            if now is not None and now.expected >= SHOW_TRANSFERS_FROM:
                self._show()
                return

    def round_done(self, record: RoundRecord) -> None:
        add_round_row(self._table, record)
        self._show()

    def __enter__(self) -> TrainView:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done.set()
            if self._live is not None:
                self._live.stop()
                err.print()
