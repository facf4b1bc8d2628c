"""What an agent does with each request.

The agent is stateless about training: the coordinator sends the task's
parameters, the global weights and the round config with every fit, so
changing training settings never needs a redeploy. Which task runs is not
the wire's to say: it is fixed in the agent config at deploy, and a request
naming another task is refused. The only state kept is what `status`
reports (last round served), persisted so it survives a restart by the
supervisor.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flctl import __version__
from flctl.agent import exits, gpu
from flctl.agent.secure import SecureRounds
from flctl.agent.site import SiteAggregator
from flctl.agent.task_data import load_host_data, stats_table, summary
from flctl.agent.transfers import RESUMABLE_KINDS, Transfers, transfer_key
from flctl.core.agentconfig import AgentConfig
from flctl.core.compression import ErrorFeedback
from flctl.core.fedstats import MAX_BINS, MAX_LABEL, MIN_COUNT, host_histograms, host_summary
from flctl.core.frozen import FrozenPart, digest, signature
from flctl.core.fsutil import atomic_write
from flctl.core.limits import oom_reason
from flctl.core.memory import available_memory
from flctl.core.messages import PROTOCOL_VERSION, Message
from flctl.core.securestats import (
    MAX_WIDTH,
    Layout,
    host_pass1,
    host_pass2,
    label_bound,
    round_tag,
)
from flctl.core.tasks import Task, attach_frozen, load_task
from flctl.core.text import clean_text
from flctl.core.uplink import UplinkSpec, host_rng, local_delta, pack_update
from flctl.errors import FlctlError
from flctl.net.server import error_reply

log = logging.getLogger("flctl.agent")

TaskKey = str  # the task's params as canonical JSON, and the frozen part's digest
# How long a `resend` waits for a fit still in progress (heartbeats flow meanwhile).
RESEND_WAIT_S = 24 * 3600.0
# What a fit sends back: the arrays, and the encoding header when they are an encoded delta.
SentUpdate = tuple[list[np.ndarray], dict[str, Any] | None]
Sender = Callable[[UplinkSpec, dict[str, Any], list[np.ndarray], list[np.ndarray], int,
                   dict[str, Any]], SentUpdate]


class RequestHandler:
    """Turns protocol messages into task calls on the host's local data."""

    def __init__(self, config: AgentConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.started_at = clock()
        self._train_lock = threading.Lock()
        self._tasks: dict[TaskKey, Task] = {}
        # Error feedback of compressed updates: per task and codec settings, in
        # memory only (a restart forgets what was not yet sent; see compression).
        self._feedback: dict[tuple[str, ...], ErrorFeedback | None] = {}
        self.secure = SecureRounds(config)
        self.site = SiteAggregator(config)
        self.transfers = Transfers()
        self._state_lock = threading.Lock()
        self.last_round: int | None = None
        self.rounds_served = 0
        self.state = "idle"
        self.data: Any = None
        self.data_error: str | None = None
        self._frozen: tuple[tuple, FrozenPart] | None = None   # (signature, digest)
        # why the agent before this one stopped (flctl.agent.exits), if it died
        self.last_exit = exits.take(exits.exit_file(config.state_file))
        if self.last_exit:
            log.warning("the previous agent stopped: %s", self.last_exit["reason"])
        self._load_state()
        self._load_data()

    def _load_data(self) -> None:
        try:
            self.data = load_host_data(self.config)
        except FlctlError as exc:
            self.data_error = exc.message
            self.state = "error"
            log.error("cannot load data: %s", exc.message)

    def _load_state(self) -> None:
        try:
            saved = json.loads(Path(self.config.state_file).read_text())
            self.last_round = saved.get("last_round")
            self.rounds_served = int(saved.get("rounds_served", 0))
        except (OSError, ValueError):
            pass

    def _save_state(self) -> None:
        payload = {"last_round": self.last_round, "rounds_served": self.rounds_served}
        try:
            atomic_write(self.config.state_file, json.dumps(payload))
        except OSError as exc:
            log.warning("cannot save state: %s", exc)

    def handle(self, request: Message, peer: Any) -> Message:
        key = transfer_key(request.meta) if request.kind in RESUMABLE_KINDS else None
        if key is None:
            return self._dispatch(request)
        # The reply waits in the outbox too, for a coordinator whose
        # connection drops before it has all of it (agent.transfers).
        self.transfers.start(key)
        try:
            reply = self._dispatch(request)
        except Exception as exc:
            text = exc.message if isinstance(exc, FlctlError) else str(exc) or type(exc).__name__
            self.transfers.finish(key, error_reply(text, type=type(exc).__name__))
            raise
        self.transfers.finish(key, reply)
        return reply

    def _dispatch(self, request: Message) -> Message:
        handler = {
            "info": self._info,
            "health": self._info,
            "init": self._init,
            "fit": self._fit,
            "site_fit": lambda r: self.site.fit(r),
            "evaluate": self._evaluate,
            "secagg_advertise": lambda r: Message("secagg_advert", self.secure.advertise(r.meta)),
            "secagg_share": lambda r: Message("secagg_boxes", self.secure.share(r.meta)),
            "secagg_fit": self._secure_fit,
            "secagg_unmask": lambda r: Message("secagg_shares", self.secure.unmask(r.meta)),
            "stats": self._stats,
            "stats_layout": self._stats_layout,
            "secagg_stats": self._secure_stats,
            "transfer_status": self._transfer_status,
            "resend": lambda r: self.transfers.resend(r.meta, RESEND_WAIT_S),
        }.get(request.kind)
        if handler is None:
            raise FlctlError(f"unknown request kind {request.kind!r}")
        return handler(request)

    def _transfer_status(self, request: Message) -> Message:
        """How far a transfer got; after a restart also why the last agent
        died, so a coordinator does not resend a fit that ran it out of memory."""
        reply = self.transfers.status(request.meta)
        if self.last_exit:
            reply.meta["last_exit"] = dict(self.last_exit)
            reply.meta["uptime_s"] = round(self._clock() - self.started_at, 3)
        return reply

    def frozen(self) -> FrozenPart | None:
        """The frozen part's digest, recomputed only when its files changed
        (a run's start asks: the coordinator runs with hosts that agree)."""
        if self.config.frozen_path is None:
            return None
        path = Path(self.config.frozen_path)
        try:
            now = signature(path)
            if self._frozen is None or self._frozen[0] != now:
                self._frozen = (now, digest(path))
        except OSError as exc:
            self._frozen = None
            raise FlctlError(f"cannot read the frozen part {path}: "
                             f"{exc.strerror or exc}") from None
        return self._frozen[1]

    def info(self) -> dict[str, Any]:
        data_info = summary(self.data) if self.data is not None else None
        try:
            part = self.frozen()
            frozen, frozen_error = (part.as_dict() if part else None), None
        except FlctlError as exc:
            frozen, frozen_error = None, exc.message
        return {
            "name": self.config.name,
            "project": self.config.project,
            "task": self.config.task,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": round(self._clock() - self.started_at, 3),
            "state": self.state,
            "data": data_info,
            "data_error": self.data_error,
            "last_round": self.last_round,
            "rounds_served": self.rounds_served,
            "frozen": frozen,
            "frozen_error": frozen_error,
            "memory": {"available_bytes": available_memory()},
            "last_exit": self.last_exit["reason"] if self.last_exit else None,
        }

    def _info(self, request: Message) -> Message:
        return Message("info", self.info())

    def _init(self, request: Message) -> Message:
        """The task's initial weights: the coordinator needs no PyTorch (or any
        framework) of its own, so a framework task's first model comes from a host."""
        seed = request.meta.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise FlctlError("init: seed must be a non-negative integer")
        task = self._task(request.meta)
        with self._train_lock:
            weights = [np.asarray(w) for w in task.init(seed)]
            names = task.names() if callable(getattr(task, "names", None)) else None
        return Message("init_result", {"names": names}, weights)

    def _stats(self, request: Message) -> Message:
        """This host's sums for flctl stats (flctl.core.fedstats), or with bin
        edges its histograms: never a row, and nothing below min_count rows."""
        min_count = _min_count(request.meta)
        x, y, data = self._table()
        meta = {"rows": int(x.shape[0]), "features": getattr(data, "feature_names", None),
                "file": str(self.config.data_path)}
        if request.arrays:
            edges = _edges(request.arrays[0], x.shape[1])
            return Message("stats_result", meta,
                           [host_histograms(x, edges, x.shape[0] >= min_count)])
        try:
            _, sums, labels = host_summary(x, y, min_count)
        except ValueError as exc:
            raise FlctlError(f"stats: {exc}") from None
        return Message("stats_result", meta, [sums, labels.astype(np.int64)])

    def _table(self) -> tuple[np.ndarray, Any, Any]:
        data = self._require_data()
        x, y = stats_table(self.config, data)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise FlctlError(f"stats: the features are {x.ndim}-D, not a table")
        return x, None if y is None else np.asarray(y), data

    def _stats_layout(self, request: Message) -> Message:
        """Before secure statistics: this host's columns and label space, so all
        hosts encode alike; no sums, and no label space below min_count rows."""
        min_count = _min_count(request.meta)
        x, y, data = self._table()
        labels = label_bound(y) if x.shape[0] >= min_count else 0
        return Message("stats_layout", {"features": getattr(data, "feature_names", None),
                                        "width": int(x.shape[1]), "labels": labels,
                                        "file": str(self.config.data_path)})

    def _secure_stats(self, request: Message) -> Message:
        """Secure statistics (flctl.core.securestats): this host's sums, or with bin
        edges its histograms, masked like a secure update; zeros below min_count
        rows. Nothing else goes back: no rows, no min or max, no labels."""
        meta = request.meta
        min_count = _min_count(meta)
        width, labels = meta.get("width"), meta.get("labels")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= bound
                   for v, bound in ((width, MAX_WIDTH), (labels, MAX_LABEL))):
            raise FlctlError("secure stats: width and labels must be small integers")
        x, y, _ = self._table()
        edges = _edges(request.arrays[0], x.shape[1]) if request.arrays else None
        if not str(meta.get("round_id")).endswith("/" + round_tag(min_count,
                                                                   Layout(width, labels), edges)):
            raise FlctlError("secure stats: this request's parameters are not the ones the "
                             "round's keys were made for (hosts asked different things?)")
        try:
            if edges is not None:
                encoded = host_pass2(host_histograms(x, edges, x.shape[0] >= min_count))
            else:
                encoded = host_pass1(x, y, Layout(width, labels), min_count)
        except ValueError as exc:
            raise FlctlError(f"secure stats: {exc}") from None
        client = self.secure.open_shares(meta)
        return Message("secagg_masked", {}, [client.masked_vector(encoded)])

    def _require_data(self) -> Any:
        if self.data is None:
            raise FlctlError(f"no data: {self.data_error}")
        return self.data

    def _task(self, meta: dict[str, Any]) -> Task:
        deployed = self.config.task
        if meta.get("task") != deployed:
            raise FlctlError(f"task {clean_text(meta.get('task'))!r} is not deployed on this "
                             f"host (it runs {deployed!r}): set training.task and run "
                             f"`flctl deploy`")
        params = meta.get("task_params") or {}
        if not isinstance(params, dict):
            raise FlctlError("task_params must be an object")
        # A changed frozen part is a new task: the old one holds the old part.
        part = self.frozen()
        key = json.dumps(params, sort_keys=True) + (part.sha256 if part else "")
        task = self._tasks.get(key)
        if task is None:
            tasks_dir = Path(self.config.tasks_dir) if self.config.tasks_dir else None
            task = load_task(deployed, params, tasks_dir)
            if self.config.frozen_path is not None:
                attach_frozen(task, deployed, self.config.frozen_path)
            self._tasks[key] = task
        return task

    def _task_config(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The coordinator's settings for this call, and the device this host
        gives the task (its own decision, from the GPUs deploy granted)."""
        config = meta.get("config") or {}
        if not isinstance(config, dict):
            raise FlctlError("config must be an object")
        return {**config, "device": gpu.device(self.config)}

    def _train(self, request: Message, send: Sender, *, secure: bool = False,
               ) -> tuple[SentUpdate, dict[str, Any]]:
        """Fit under the train lock, then turn the result into what goes back
        (`send`); returns that and the reply's metadata."""
        data = self._require_data()
        task = self._task(request.meta)
        config = self._task_config(request.meta)
        uplink = UplinkSpec.from_config(config.pop("uplink", {}))
        # the change a host made needs the model it started from (a task may train in place)
        start = [np.array(w) for w in request.arrays] if secure or uplink.sends_delta else []
        with self._train_lock:
            self.state = "training"
            started = time.perf_counter()
            try:
                weights, num_examples, metrics = task.fit(list(request.arrays), data, config)
                sent = send(uplink, config, start, weights, int(num_examples), metrics)
            except MemoryError:
                if self.config.memory_max is None:
                    raise
                # an address-space rlimit (no cgroup): the task failed, the agent lives
                log.error("the task ran out of memory (limit %s bytes)", self.config.memory_max)
                raise FlctlError(oom_reason(self.config.memory_max)) from None
            finally:
                self.state = "idle"
            compute_s = time.perf_counter() - started
        with self._state_lock:
            round_number = config.get("round")
            if isinstance(round_number, int):
                self.last_round = round_number
            self.rounds_served += 1
            self._save_state()
        return sent, {"num_examples": int(num_examples), "metrics": _plain(metrics),
                      "compute_s": compute_s}

    def _fit(self, request: Message) -> Message:
        def send(uplink: UplinkSpec, config: dict[str, Any], start: list[np.ndarray],
                 weights: list[np.ndarray], num_examples: int,
                 metrics: dict[str, Any]) -> SentUpdate:
            rng = host_rng(int(config.get("seed", 0)), int(config.get("round", 0)),
                           self.config.name)
            return pack_update(uplink, start, weights, rng,
                               self._feedback_state(request.meta, uplink))

        (arrays, encoding), meta = self._train(request, send)
        if encoding is not None:
            meta["encoding"] = encoding
        return Message("fit_result", meta, arrays)

    def _secure_fit(self, request: Message) -> Message:
        """Train, then send only the masked change, with the training loss riding
        in the same masked vector: the coordinator learns the sums, never this
        host's update or loss."""
        client = self.secure.open_shares(request.meta)

        def send(uplink: UplinkSpec, config: dict[str, Any], start: list[np.ndarray],
                 weights: list[np.ndarray], num_examples: int,
                 metrics: dict[str, Any]) -> SentUpdate:
            loss = np.array([float(metrics.get("train_loss", 0.0))], np.float32)
            delta = local_delta(uplink, start, weights)
            return [self.secure.mask(client, [*delta, loss], num_examples)], None

        (arrays, _), meta = self._train(request, send, secure=True)
        meta["metrics"] = {"secagg_clipped": client.clipped}  # per-host metrics stay here
        return Message("secagg_masked", meta, arrays)

    def _feedback_state(self, meta: dict[str, Any], uplink: UplinkSpec) -> ErrorFeedback | None:
        if not uplink.sends_delta:
            return None
        key = (str(meta.get("task")), json.dumps(meta.get("task_params") or {}, sort_keys=True),
               json.dumps(uplink.as_config(), sort_keys=True))
        if key not in self._feedback:
            self._feedback[key] = uplink.codec().new_state()
        return self._feedback[key]

    def _evaluate(self, request: Message) -> Message:
        data = self._require_data()
        task = self._task(request.meta)
        config = self._task_config(request.meta)
        started = time.perf_counter()
        with self._train_lock:
            loss, num_examples, metrics = task.evaluate(list(request.arrays), data, config)
        return Message(
            "eval_result",
            {
                "loss": float(loss),
                "num_examples": int(num_examples),
                "metrics": _plain(metrics),
                "compute_s": time.perf_counter() - started,
            },
        )


def _min_count(meta: dict[str, Any]) -> int:
    min_count = meta.get("min_count", MIN_COUNT)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise FlctlError("stats: min_count must be a positive integer")
    return min_count


def _edges(value: Any, width: int) -> np.ndarray:
    edges = np.asarray(value)
    if edges.dtype != np.float64 or edges.ndim != 2 or edges.shape[0] != width \
            or not 2 <= edges.shape[1] <= MAX_BINS + 1 or not np.isfinite(edges).all():
        raise FlctlError("stats: bad histogram edges")
    return edges


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics go into a JSON header: numpy scalars become Python numbers."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        out[str(key)] = value
    return out
