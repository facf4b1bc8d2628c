"""The coordinator's view of one agent: typed calls over a FrameClient.

Deploy (verify, status) and the coordinator (rounds) both talk to agents
through this one class, so the request shapes live in one place.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flctl.core.layout import Endpoint
from flctl.core.messages import (
    DEFAULT_LIMITS,
    ArraySpec,
    Limits,
    Message,
    Position,
    check_position,
)
from flctl.core.text import clean_text
from flctl.errors import HostError, ProtocolError
from flctl.net.client import FrameClient, TransportError, TransportTimeout
from flctl.net.framing import KeptReceiver, Receive
from flctl.net.tls import client_context

# Pauses between attempts to resume a dropped transfer.
RETRY_PAUSE_S = 0.2
MAX_RETRY_PAUSE_S = 2.0
# How long after a drop the agent may take to answer again (within the round's
# deadline); an agent that cannot be reached by then, or that no longer holds
# the transfer (it restarted), fails the round as any dropped host does.
RESUME_WINDOW_S = 15.0


@dataclass
class Transfer:
    """One request the coordinator may resume: its id (unique per run, round,
    attempt and kind), when to give up (time.monotonic), and how often it
    was resumed."""

    key: str
    until: float
    resumed: int = 0
    restarted: int = 0   # of those, times the agent had none of it (sent again in full)
    # set by the coordinator when the run ends: no more attempts
    stop: threading.Event | None = None

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


def _raise_if_killed_by_it(status: dict[str, Any], elapsed_s: float) -> None:
    """An agent restarted while this request was on it, because it ran out of
    memory: sending the request again would only do that again, so the host
    fails with that reason (flctl.agent.exits)."""
    last_exit, uptime = status.get("last_exit"), status.get("uptime_s")
    if not isinstance(last_exit, dict) or last_exit.get("oom") is not True \
            or not isinstance(last_exit.get("reason"), str) \
            or isinstance(uptime, bool) or not isinstance(uptime, (int, float)) \
            or not 0 <= uptime <= elapsed_s:
        return
    raise HostError(clean_text(last_exit["reason"])[:200])


def _specs(arrays: Sequence[np.ndarray]) -> list[ArraySpec]:
    return [ArraySpec(a.dtype, tuple(a.shape), a.nbytes) for a in map(np.asarray, arrays)]


@dataclass(frozen=True)
class FitReply:
    """A fit's reply as the host sent it: counts and metrics are the host's
    claims (Any), for the coordinator to check (flctl.coordinator.replies)."""

    weights: list[np.ndarray]
    num_examples: Any
    metrics: dict[str, Any]
    compute_s: float
    encoding: dict[str, Any] | None = None  # set when `weights` are an encoded delta


@dataclass(frozen=True)
class EvalReply:
    loss: Any
    num_examples: Any
    metrics: dict[str, Any]
    compute_s: float


def _seconds(meta: dict[str, Any]) -> float:
    """A host's reported compute time, shown and summed but never trusted: junk is 0."""
    value = meta.get("compute_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value < 1e9:
        return 0.0
    return float(value)


def _metrics(meta: dict[str, Any]) -> dict[str, Any]:
    metrics = meta.get("metrics")
    return dict(metrics) if isinstance(metrics, dict) else {}


def coordinator_context(ca_cert: Path, cert: Path, key: Path,
                        crl: Path | None = None) -> ssl.SSLContext:
    return client_context(ca_cert, cert, key, crl)


class AgentClient:
    def __init__(self, endpoint: Endpoint, context: ssl.SSLContext,
                 timeout: float | None = 30.0, limits: Limits = DEFAULT_LIMITS) -> None:
        self.endpoint = endpoint
        self._client = FrameClient(endpoint.connect_address, endpoint.port, context,
                                   endpoint.server_hostname, timeout=timeout, limits=limits)

    @property
    def name(self) -> str:
        return self.endpoint.host

    @property
    def bytes_sent(self) -> int:
        return self._client.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._client.bytes_received

    @property
    def bytes_out_now(self) -> int:
        """bytes_sent plus what of the message going out has left (progress views)."""
        return self._client.bytes_sent + self._client.sending

    def set_timeout(self, timeout: float | None) -> None:
        self._client.set_timeout(timeout)

    def info(self) -> dict[str, Any]:
        return self._client.request(Message("info")).meta

    def stats(self, min_count: int, edges: np.ndarray | None = None) -> Message:
        """The host's sums for flctl stats, or with `edges` its histograms
        (the reply as sent: the caller checks it, flctl.core.fedstats)."""
        return self._client.request(Message("stats", {"min_count": min_count},
                                            [] if edges is None else [edges]))

    def stats_layout(self, min_count: int) -> dict[str, Any]:
        """The host's columns and label space, before secure statistics (its claim)."""
        return self._client.request(Message("stats_layout", {"min_count": min_count})).meta

    def secure_stats(self, meta: dict[str, Any], edges: np.ndarray | None = None) -> np.ndarray:
        """The host's masked statistics (sums, or with `edges` histograms): one vector,
        unchecked (the caller knows its size)."""
        reply = self._client.request(Message("secagg_stats", dict(meta),
                                             [] if edges is None else [edges]))
        if len(reply.arrays) != 1:
            raise ProtocolError(f"secure stats: expected one masked vector, got "
                                f"{len(reply.arrays)} arrays")
        return reply.arrays[0]

    def init_weights(self, task: str, task_params: dict[str, Any], seed: int,
                     transfer: Transfer | None = None) -> tuple[list[np.ndarray], Any]:
        """The task's initial weights, made by the agent (its host has the framework),
        and the names the task gives them (the host's claim: Any, None if none)."""
        request = Message("init", {"task": task, "task_params": dict(task_params), "seed": seed})
        reply = self._request(request, KeptReceiver() if transfer else None, None, transfer)
        return reply.arrays, reply.meta.get("names")

    def fit(self, weights: Sequence[np.ndarray], task: str, task_params: dict[str, Any],
            config: dict[str, Any], receive: Receive = None,
            heartbeat_s: float | None = None, transfer: Transfer | None = None) -> FitReply:
        request = Message("fit", {"task": task, "task_params": dict(task_params),
                                  "config": dict(config)}, list(weights))
        reply = self._request(request, receive, heartbeat_s, transfer)
        encoding = reply.meta.get("encoding")
        return FitReply(reply.arrays, reply.meta.get("num_examples"), _metrics(reply.meta),
                        _seconds(reply.meta), encoding if isinstance(encoding, dict) else None)

    def site_fit(self, weights: Sequence[np.ndarray], task: str, task_params: dict[str, Any],
                 config: dict[str, Any], *, members: Sequence[str], fold: dict[str, Any],
                 deadline_s: float, round_key: str | None = None, receive: Receive = None,
                 heartbeat_s: float | None = None) -> FitReply:
        """Ask a site's aggregator to fit `members` and fold them (flctl.agent.site):
        one update back, whose metrics say what became of each member (its claim)."""
        request = Message("site_fit", {"task": task, "task_params": dict(task_params),
                                       "config": dict(config), "members": list(members),
                                       "fold": dict(fold), "deadline_s": deadline_s,
                                       "round_key": round_key}, list(weights))
        reply = self._client.request(request, receive, heartbeat_s=heartbeat_s)
        return FitReply(reply.arrays, reply.meta.get("num_examples"), _metrics(reply.meta),
                        _seconds(reply.meta))

    def evaluate(self, weights: Sequence[np.ndarray], task: str, task_params: dict[str, Any],
                 config: dict[str, Any], heartbeat_s: float | None = None,
                 transfer: Transfer | None = None) -> EvalReply:
        request = Message("evaluate", {"task": task, "task_params": dict(task_params),
                                       "config": dict(config)}, list(weights))
        reply = self._request(request, None, heartbeat_s, transfer)
        return EvalReply(reply.meta.get("loss"), reply.meta.get("num_examples"),
                         _metrics(reply.meta), _seconds(reply.meta))

    def secagg_step(self, kind: str, meta: dict[str, Any]) -> dict[str, Any]:
        """One key-exchange step of a secure-aggregation round (advertise, share, unmask)."""
        return self._client.request(Message(kind, dict(meta))).meta

    def secure_fit(self, weights: Sequence[np.ndarray], task: str, task_params: dict[str, Any],
                   config: dict[str, Any], round_id: str, shares: dict[str, Any],
                   receive: Receive = None,
                   heartbeat_s: float | None = None) -> FitReply:
        """Fit and get back only the masked update (one uint32 vector)."""
        request = Message("secagg_fit", {"task": task, "task_params": dict(task_params),
                                         "config": dict(config), "round_id": round_id,
                                         "shares": shares}, list(weights))
        reply = self._client.request(request, receive, heartbeat_s=heartbeat_s)
        return FitReply(reply.arrays, reply.meta.get("num_examples"), _metrics(reply.meta),
                        _seconds(reply.meta))

    def _request(self, request: Message, receive: Receive, heartbeat_s: float | None,
                 transfer: Transfer | None) -> Message:
        """request(), and with a `transfer`, resumed across dropped connections
        until the transfer's deadline: only the bytes not yet moved move again.

        After a drop, the agent is asked how far the request got
        (agent.transfers): part of the model (send the rest as a resumed
        stream), all of it (ask for the reply); a reply cut part way is asked
        for again from where `receive` holds it; none of it (it never arrived,
        or the agent restarted), all of it again. An agent that lost a reply
        it had begun to send (it restarted) or stays unreachable for
        RESUME_WINDOW_S fails, and a timeout is not retried: a host silent
        past its heartbeats is down.
        """
        if transfer is None:
            return self._client.request(request, receive, heartbeat_s=heartbeat_s)
        request = Message(request.kind, {**request.meta, "transfer": transfer.key},
                          request.arrays)
        began = time.monotonic()
        pause = RETRY_PAUSE_S
        send_from: Position | None = None
        ask_reply = False
        give_up: float | None = None
        progress: tuple[Any, ...] | None = None   # how far it got when the window opened
        while True:
            try:
                if ask_reply or getattr(receive, "started", False):
                    position = getattr(receive, "position", (0, 0))
                    return self._client.request(
                        Message("resend", {"transfer": transfer.key, "from": list(position)}),
                        receive, heartbeat_s=heartbeat_s)
                return self._client.request(
                    Message(request.kind, request.meta, request.arrays, send_from),
                    receive, heartbeat_s=heartbeat_s)
            except TransportTimeout:
                raise   # silence (no heartbeats) is a dead or frozen host, not a cut
            except TransportError as exc:
                cut = exc
                # the window opens at a drop, and again after every drop that
                # followed progress: only a host unreachable that long fails
                now = (getattr(receive, "position", None), send_from, ask_reply)
                if give_up is None or now != progress:
                    give_up = min(transfer.until, time.monotonic() + RESUME_WINDOW_S)
                    progress = now
                    pause = RETRY_PAUSE_S   # it moves: reconnect quickly
                if time.monotonic() + pause >= give_up or transfer.stopped():
                    raise
            if transfer.stop is not None:
                if transfer.stop.wait(pause):
                    raise cut
            else:
                time.sleep(pause)
            pause = min(2 * pause, MAX_RETRY_PAUSE_S)
            if getattr(receive, "started", False):
                transfer.resumed += 1
                continue
            try:
                status = self._client.request(Message("transfer_status",
                                                      {"transfer": transfer.key})).meta
            except TransportError:
                continue
            have = status.get("have")
            if have not in ("none", "partial", "request", "result"):
                raise cut
            if have == "none":
                _raise_if_killed_by_it(status, time.monotonic() - began)
            # none: the request never reached it (a cut before its first chunk,
            # or on an idle connection), or it restarted: all of it goes again
            transfer.resumed += 1
            transfer.restarted += have == "none"
            ask_reply = have in ("request", "result")
            send_from = (check_position(status.get("position"), _specs(request.arrays))
                         if have == "partial" else None)

    def abort(self) -> None:
        """Cut the connection from another thread (a blocked recv wakes up)."""
        self._client.abort()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
