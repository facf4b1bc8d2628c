"""`site_fit`: a site aggregator fits its sampled members and folds them into one update.

Only an agent whose config lists `site_members` serves it, and only to the
coordinator (flctl.agent.trust). It fans `fit` out to the members it is
asked for, itself included over its own port (one path for every member),
as the site's client identity (its ROLE_SITE certificate, which members
obey for `fit` only). Each update is checked and folded as it arrives with
the coordinator's own round objects (flctl.core.sitefold); a member that
fails or misses the deadline is left out with its reason. The reply is one
update: the site's partial, its total examples, and what became of each member.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flctl.core.agentconfig import AgentConfig, parse_endpoint
from flctl.core.layout import Endpoint
from flctl.core.messages import Limits, Message
from flctl.core.sitefold import FoldSpec, SiteError, SiteFold
from flctl.net.agent_client import AgentClient, FitReply, Transfer
from flctl.net.fanout import fan_out
from flctl.net.server import heartbeat_interval
from flctl.net.tls import client_context

log = logging.getLogger("flctl.agent.site")

MAX_DEADLINE_S = 7 * 24 * 3600.0
MAX_KEY_CHARS = 150          # the members' transfer ids add "/<member>" to it
SOCKET_GRACE_S = 5.0         # past the deadline, a backstop (the fan-out aborts late members)


def _deadline(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value <= MAX_DEADLINE_S or not math.isfinite(value):
        raise SiteError("site_fit: deadline_s must be a number of seconds > 0")
    return float(value)


class SiteAggregator:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._context: ssl.SSLContext | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(config.site_members)),
                                        thread_name_prefix="flctl-site")
        self._lock = threading.Lock()   # one site_fit at a time
        # one client per member, kept between rounds: a TLS handshake per member
        # per round would cost more than folding its update
        self._clients: dict[str, AgentClient] = {}

    def context(self) -> ssl.SSLContext:
        """The site certificate as client identity (loaded once; a redeploy restarts us)."""
        if self._context is None:
            c = self.config
            assert c.site_cert is not None and c.site_key is not None
            self._context = client_context(Path(c.ca_cert), Path(c.site_cert),
                                           Path(c.site_key), Path(c.crl) if c.crl else None)
        return self._context

    def members(self, value: Any) -> list[str]:
        """The sampled members a request names, each one of this site's."""
        if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value) \
                or len(set(value)) != len(value):
            raise SiteError("site_fit: members must be a non-empty list of distinct host names")
        for member in value:
            if member not in self.config.site_members:
                raise SiteError(f"site_fit: {member[:64]!r} is not a member of site "
                                f"{self.config.site} (its members: "
                                f"{', '.join(sorted(self.config.site_members))})")
        return list(value)

    def client(self, member: str, timeout: float) -> AgentClient:
        client = self._clients.get(member)
        if client is None:
            address = parse_endpoint(self.config.site_members[member])
            assert address is not None   # checked when the config was parsed
            host, port = address
            limits = Limits(max_body_bytes=self.config.max_message_mb << 20)
            client = self._clients[member] = AgentClient(
                Endpoint(member, host, host, port, member), self.context(), timeout=timeout,
                limits=limits)
        client.set_timeout(timeout)
        return client

    def fit(self, request: Message) -> Message:
        if not self.config.site_members:
            raise SiteError(f"site_fit: {self.config.name} is not a site aggregator (its "
                            f"config lists no site_members)")
        meta = request.meta
        members = self.members(meta.get("members"))
        spec = FoldSpec.from_meta(meta.get("fold"))
        deadline = _deadline(meta.get("deadline_s"))
        key = meta.get("round_key")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
            raise SiteError("site_fit: round_key must be a short string")
        config = meta.get("config") or {}
        if not isinstance(config, dict):
            raise SiteError("site_fit: config must be an object")
        round_number = config.get("round", 0)
        if isinstance(round_number, bool) or not isinstance(round_number, int):
            raise SiteError("site_fit: config.round must be an integer")
        task, task_params = meta.get("task"), meta.get("task_params") or {}
        if not isinstance(task, str) or not isinstance(task_params, dict):
            raise SiteError("site_fit: task must be a string and task_params an object")
        heartbeat_s = heartbeat_interval(meta)
        weights = list(request.arrays)
        with self._lock:
            return self._fit(weights, members, spec, deadline, key, task, task_params,
                             config, round_number, heartbeat_s)

    def _fit(self, weights: list[Any], members: list[str], spec: FoldSpec, deadline: float,
             key: str | None, task: str, task_params: dict[str, Any], config: dict[str, Any],
             round_number: int, heartbeat_s: float | None) -> Message:
        started = time.perf_counter()
        fold = SiteFold(weights, round_number, spec, members)
        lock = threading.Lock()
        closed = threading.Event()
        until = time.monotonic() + deadline
        clients = [self.client(m, deadline + SOCKET_GRACE_S) for m in members]

        def fit_one(client: AgentClient) -> None:
            transfer = Transfer(f"{key}/{client.name}", until) if key else None
            reply: FitReply = client.fit(weights, task, task_params, config,
                                         heartbeat_s=heartbeat_s, transfer=transfer)
            if reply.encoding is not None:
                raise SiteError("update rejected: encoded, but sites fold plain weights")
            with lock:
                if closed.is_set():
                    raise SiteError("reply after the deadline")
                fold.add(client.name, reply.weights, reply.num_examples, reply.metrics,
                         reply.compute_s)

        try:
            _, failures = fan_out(self._pool, clients, fit_one, deadline)
        finally:
            with lock:
                closed.set()
        for member in members:
            if member in failures:
                fold.drop(member, failures[member])
            elif member not in fold.members:
                fold.drop(member, "no reply")
        update, total, metrics = fold.result()
        log.info("site %s, round %s: %d of %d members folded", self.config.site, round_number,
                 sum(r["status"] == "answered" for r in metrics["members"].values()),
                 len(members))
        return Message("site_fit_result", {"num_examples": total, "metrics": metrics,
                                           "compute_s": time.perf_counter() - started},
                       update)
