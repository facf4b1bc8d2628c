"""One secure sum over the hosts: the four fan-outs a SecAggServer needs.

Advertise signed keys, share them (Shamir shares, encrypted host to host),
collect the masked vectors (folded into the server's one running sum as they
arrive), unmask. What each host masks is the caller's: a training round's
update (secure_round.py) or a host's statistics (secure_stats.py). A host
that fails a step is dropped with its reason; the server recovers its masks
while enough of its neighbourhood answers, and fails the sum otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from flctl.core.secagg import PeerError, SecAggServer
from flctl.errors import TrainingError
from flctl.net.agent_client import AgentClient

# (clients, call, timeout) -> (results by host, failure reasons by host)
Parallel = Callable[[Sequence[AgentClient], Callable[[AgentClient], Any], float | None],
                    tuple[dict[str, Any], dict[str, str]]]
# (masked vector) -> None: hands a host's masked vector to the server
Deliver = Callable[[np.ndarray], None]
# (client, the key shares routed to it, deliver) -> None
Contribute = Callable[[AgentClient, dict[str, Any], Deliver], None]


class SecureSum:
    """Drives `server` through one round over `clients`; `dropped` names the hosts
    that failed a step, with the reason."""

    def __init__(self, server: SecAggServer, clients: Sequence[AgentClient],
                 parallel: Parallel, timeout: float | None) -> None:
        self.server = server
        self.clients = list(clients)
        self.parallel = parallel
        self.timeout = timeout
        self.dropped: dict[str, str] = {}

    def _among(self, names: Sequence[str]) -> list[AgentClient]:
        wanted = set(names)   # a set: a list would make this O(hosts^2)
        return [c for c in self.clients if c.name in wanted]

    def _collect(self, results: dict[str, Any], failures: dict[str, str],
                 take: Callable[[str, Any], None]) -> None:
        self.dropped.update(failures)
        for name, value in sorted(results.items()):
            try:
                take(name, value)
            except PeerError as exc:
                self.dropped[name] = exc.message

    def _step(self, kind: str, meta: dict[str, Any]) -> Callable[[AgentClient], dict[str, Any]]:
        round_id = self.server.round_id
        return lambda c: c.secagg_step(kind, {"round_id": round_id, **meta})

    def run(self, contribute: Contribute) -> None:
        """All four fan-outs; the caller then reads server.finish() or finish_raw()."""
        server = self.server
        adverts, failures = self.parallel(
            self.clients, self._step("secagg_advertise", server.advertise_request()),
            self.timeout)
        self._collect(adverts, failures, server.collect_advertisement)
        roster = server.roster()
        boxes, failures = self.parallel(
            self._among(server.roster_hosts), self._step("secagg_share", {"roster": roster}),
            self.timeout)
        self._collect(boxes, failures,
                      lambda name, reply: server.collect_shares(name, reply["boxes"]))
        routed = server.route_shares()

        lock = threading.Lock()
        closed = threading.Event()

        def one(client: AgentClient) -> None:
            def deliver(masked: np.ndarray) -> None:
                with lock:
                    if closed.is_set():
                        raise TrainingError("reply after the deadline")
                    server.collect_masked(client.name, masked)
            contribute(client, routed[client.name], deliver)

        _, failures = self.parallel(self._among(sorted(routed)), one, self.timeout)
        with lock:
            closed.set()
        self.dropped.update(failures)
        request = server.unmask_request()
        answers, failures = self.parallel(
            self._among(request["survivors"]),
            self._step("secagg_unmask", {"dropped": request["dropped"],
                                         "survivors": request["survivors"]}),
            self.timeout)
        self._collect(answers, failures, server.collect_unmask)

    def left_out(self, survivors: Sequence[str]) -> dict[str, str]:
        """Dropped hosts whose input is not in the sum (a survivor that missed only
        the unmask request still counts: others held its shares)."""
        return {k: v for k, v in self.dropped.items() if k not in survivors}
