"""`flctl top`: the hosts, live and full screen, refreshed every few seconds.

The facts are `flctl status`'s own (deploy.status.gather_status: the host
helper's answer and the agent's info), gathered in a background thread so a
slow host never freezes the screen: the view is redrawn from the last facts
and says how long the gather under way has taken. CPU use is the share of
busy CPU ticks between two answers of a host (core.facts.cpu_percent), so it
shows from the second refresh on. Keys are read from the terminal in cbreak
mode, restored on every way out (Ctrl-C included): `q` quits.

Without a terminal there is nothing to draw on: top says so in one line and
points at `flctl status --json`, which is the snapshot for scripts.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from flctl.cli import render
from flctl.cli.common import ForksOpt, LimitOpt, WorkspaceOpt, selected
from flctl.coordinator.records import RunInfo
from flctl.coordinator.session import info_probe
from flctl.core.facts import CpuTicks, cpu_percent
from flctl.deploy.status import gather_status
from flctl.errors import ConfigError, FlctlError
from flctl.service.liveness import latest_live_run
from flctl.workspace import load_workspace

QUIT_KEYS = {"q", "Q"}
KEY_POLL_S = 0.25     # how often keys are read and the header's clock redrawn
AGENT_TIMEOUT_S = 5.0  # what `flctl status` gives an agent to answer

Gather = Callable[[], "tuple[list[dict[str, Any]], RunInfo | None]"]


@dataclass(frozen=True)
class Snapshot:
    """What the view draws: the last rows gathered and how fresh they are."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    latest: RunInfo | None = None
    refreshes: int = 0              # gathers completed
    at: float | None = None         # wall clock of the last one
    busy_s: float | None = None     # how long the gather under way has run
    error: str | None = None        # why the last gather failed, if it did


class Poller:
    """Gathers every `interval` seconds in a daemon thread; `snapshot()` is the
    last result, never waiting for a gather under way."""

    def __init__(self, gather: Gather, interval: float) -> None:
        self._gather = gather
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticks: dict[str, CpuTicks] = {}
        self._snapshot = Snapshot()
        self._since: float | None = None
        self._thread = threading.Thread(target=self._run, name="flctl-top", daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def busy(self) -> bool:
        return self._since is not None

    def snapshot(self) -> Snapshot:
        with self._lock:
            since = self._since
            return replace(self._snapshot,
                           busy_s=None if since is None else time.monotonic() - since)

    def _run(self) -> None:
        while not self._stop.is_set():
            begun = time.monotonic()
            self.refresh()
            self._stop.wait(max(0.0, self._interval - (time.monotonic() - begun)))

    def refresh(self) -> Snapshot:
        """One gather; a failed one keeps the last rows and says why."""
        self._since = time.monotonic()
        try:
            rows, latest = self._gather()
            self._add_cpu(rows)
            done = Snapshot(rows, latest, self._snapshot.refreshes + 1, time.time())
        except FlctlError as exc:
            done = replace(self._snapshot, error=exc.message)
        except Exception as exc:  # noqa: BLE001 - the view shows it and tries again
            done = replace(self._snapshot, error=f"unexpected error: {type(exc).__name__}: {exc}")
        with self._lock:
            self._snapshot, self._since = done, None
        return done

    def _add_cpu(self, rows: list[dict[str, Any]]) -> None:
        """Each row's CPU use since that host's previous answer, as "cpu_pct"."""
        for row in rows:
            cpu = row.get("cpu")
            now = CpuTicks(cpu["busy_ticks"], cpu["total_ticks"]) if cpu else None
            row["cpu_pct"] = cpu_percent(self._ticks.get(row["host"]), now)
            if now is not None:
                self._ticks[row["host"]] = now


def _cpu_cell(row: dict[str, Any]) -> str:
    pct, cpu = row.get("cpu_pct"), row.get("cpu") or {}
    if pct is None:
        return "-"
    return f"{pct:.0f}% of {cpu['count']}" if cpu.get("count") else f"{pct:.0f}%"


def _memory_cell(row: dict[str, Any]) -> str:
    total, available = row.get("mem_total_bytes"), row.get("mem_available_bytes")
    if total is None or available is None:
        return "-"
    return f"{render.human_bytes(max(0, total - available))} / {render.human_bytes(total)}"


def _gpu_cell(row: dict[str, Any]) -> Text:
    """ "0: 35% 1.1 GB/42.9 GB; 1: ..." per GPU, "-" without any."""
    parts = []
    for gpu in row.get("gpu_usage") or []:
        use = "?" if gpu["utilization_pct"] is None else f"{gpu['utilization_pct']:.0f}%"
        parts.append(f"{gpu['index']}: {use} {render.human_bytes(gpu['memory_used_bytes'])}"
                     f"/{render.human_bytes(gpu['memory_total_bytes'])}")
    return render.literal("; ".join(parts) or "-")


def top_table(rows: list[dict[str, Any]]) -> Table:
    tunnels = any("tunnel" in row for row in rows)
    table = Table()
    for column in ("host", "agent", "round", "cpu", "load", "memory", "gpu",
                   *(("tunnel",) if tunnels else ()), "note"):
        table.add_column(column, justify="right" if column in ("round", "cpu", "load") else "left")
    for row in rows:
        load = row.get("load")
        table.add_row(
            render.literal(row["host"]), render.agent_cell(row),
            "-" if row.get("last_round") is None else str(row["last_round"]),
            _cpu_cell(row), "-" if not load else f"{load[0]:.2f}", _memory_cell(row),
            _gpu_cell(row), *((render.tunnel_cell(row),) if tunnels else ()),
            render.literal(row.get("error") or row.get("data_error") or ""),
        )
    return table


def rows_that_fit(rows: list[dict[str, Any]], room: int | None
                  ) -> tuple[list[dict[str, Any]], str | None]:
    """At most `room` rows, the hosts needing attention first (each group in
    inventory order), and a line counting the rest; a full screen crops
    what does not fit, and at hundreds of hosts the ones in trouble would
    otherwise be the ones cropped."""
    if room is None or len(rows) <= room:
        return rows, None
    attention: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for row in rows:
        (attention if render.needs_attention(row) else rest).append(row)
    shown = (attention + rest)[:max(room, 1)]
    counts = ", ".join(f"{len(names)} {state}"
                       for state, names in render.hosts_by_agent_state(rows).items())
    return shown, (f"{len(rows) - len(shown)} more hosts not shown ({len(attention)} needing "
                   f"attention, listed first); all {len(rows)}: {counts}")


def top_view(snapshot: Snapshot, title: str, interval: float,
             room: int | None = None) -> Group:
    """The header, the latest run, and the hosts table (`room`: the table rows
    the screen has, None: all)."""
    header = Text.assemble(("flctl top", "bold"), "  ", render.literal(title), "  ")
    if snapshot.at is None:
        header.append(f"gathering for {snapshot.busy_s or 0:.0f}s...", "yellow")
    else:
        header.append(f"refresh {snapshot.refreshes} at "
                      f"{time.strftime('%H:%M:%S', time.localtime(snapshot.at))}, every {interval:g}s")
        if snapshot.busy_s is not None and snapshot.busy_s > max(interval, 2.0):
            header.append(f"  (a host is slow: gathering for {snapshot.busy_s:.0f}s)", "yellow")
    header.append("  q quits", "dim")
    parts: list[Any] = [header]
    if snapshot.error:
        parts.append(render.literal(f"last refresh failed: {snapshot.error}", "red"))
    if snapshot.latest is not None:
        parts.append(Text.from_markup(render.latest_run_line(snapshot.latest)))
    shown, rest = rows_that_fit(snapshot.rows, room)
    parts.append(top_table(shown))
    if rest:
        parts.append(Text(rest, style="dim"))
    return Group(*parts)


# screen lines besides the table's rows: the header, the error and run lines,
# the table's borders and heading, and the line counting hosts not shown
VIEW_LINES = 8


def _table_room() -> int:
    """Host rows the terminal has room for (read on every redraw: it may be resized)."""
    return max(1, render.out.size.height - VIEW_LINES)


@contextmanager
def cbreak_keys(stream: TextIO) -> Iterator[Callable[[float], str]]:
    """Keys from a terminal, one at a time, without echo; the terminal's mode
    is put back however the block ends."""
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)

        def read(timeout: float) -> str:
            ready, _, _ = select.select([fd], [], [], timeout)
            return os.read(fd, 64).decode("utf-8", "replace") if ready else ""

        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def top(
    workspace_dir: Path = WorkspaceOpt,
    limit: Optional[list[str]] = LimitOpt,
    interval: float = typer.Option(2.0, "--interval", "-i", min=0.5,
                                   help="Seconds between refreshes."),
    forks: int = ForksOpt,
) -> None:
    """A live full-screen view of the hosts; `q` quits.

    Agent state, current round, CPU, load, memory, GPU use and memory, tunnel
    handshake age: `flctl status`'s facts, refreshed every --interval seconds.
    Needs a terminal; for scripts use `flctl status --json`."""
    if not (sys.stdin.isatty() and render.out.is_terminal):
        raise ConfigError("flctl top needs a terminal (it draws full screen and reads keys); "
                          "for one snapshot use `flctl status` or `flctl status --json`")
    workspace = load_workspace(workspace_dir)
    hosts = selected(workspace, limit)
    probe = info_probe(workspace, AGENT_TIMEOUT_S)
    poller = Poller(lambda: (gather_status(workspace, hosts, probe, forks=forks),
                             latest_live_run(workspace.paths.runs)), interval).start()
    title = f"{workspace.settings.project} ({len(hosts)} hosts)"
    shown: tuple[int, int] | None = None
    try:
        with cbreak_keys(sys.stdin) as read_key, \
                Live(top_view(poller.snapshot(), title, interval, _table_room()),
                     console=render.out,
                     screen=True, auto_refresh=False) as live:
            while not set(read_key(KEY_POLL_S)) & QUIT_KEYS:
                snapshot = poller.snapshot()
                now = (snapshot.refreshes, int(time.monotonic()))  # new facts, or a second on
                if now != shown:
                    live.update(top_view(snapshot, title, interval, _table_room()),
                                refresh=True)
                    shown = now
    finally:
        poller.stop()
    if poller.busy:
        # A gather under way (a slow host's SSH) would hold the exit until its
        # timeout: its worker threads are joined at interpreter shutdown. The
        # terminal is already restored and top holds no lock or file.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
