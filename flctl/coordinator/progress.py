"""How far the model has gone out to the hosts in this phase of a round.

Sending a large model to many hosts takes a while, and a terminal that shows
nothing meanwhile looks hung. The round loop says when a phase starts (which
hosts, how many bytes each); a view polls `snapshot()` whenever it redraws,
reading the clients' live byte counters, so the transfers pay nothing for
being watched and nothing here prints.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from flctl.net.agent_client import AgentClient


@dataclass(frozen=True)
class TransferSnapshot:
    phase: str          # e.g. "round 3: model to hosts"
    sent: int           # bytes gone out to the phase's hosts so far
    expected: int       # the model's bytes times the phase's hosts
    hosts_done: int     # hosts that have the whole model
    hosts: int


class TransferProgress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._clients: list[AgentClient] = []
        self._start: dict[str, int] = {}
        self._each = 0

    def begin(self, phase: str, clients: Sequence[AgentClient], bytes_each: int) -> None:
        with self._lock:
            self._phase = phase
            self._clients = list(clients)
            self._start = {c.name: c.bytes_out_now for c in self._clients}
            self._each = bytes_each

    def end(self) -> None:
        with self._lock:
            self._phase = None
            self._clients = []

    def snapshot(self) -> TransferSnapshot | None:
        """None between phases."""
        with self._lock:
            if self._phase is None:
                return None
            moved = [min(self._each, c.bytes_out_now - self._start[c.name])
                     for c in self._clients]
            return TransferSnapshot(self._phase, sum(moved), self._each * len(moved),
                                    sum(1 for m in moved if m >= self._each), len(moved))
