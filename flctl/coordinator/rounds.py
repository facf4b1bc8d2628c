"""The round loop: sample hosts, fan out fits, stream-aggregate, evaluate,
checkpoint.

Updates are folded into the strategy's accumulator as each one arrives, and
at most `inflight_updates` received updates are held at once (a semaphore
taken before a reply's body is allocated), so coordinator memory is
O(model), not O(hosts x model).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flctl.coordinator.admission import HostAdmission
from flctl.coordinator.budget import MemoryBudget
from flctl.coordinator.membership import MembershipChanges, MemberWatch
from flctl.coordinator.openfiles import ensure_open_files
from flctl.coordinator.privacy import PrivacyLedger, hosts_per_round
from flctl.coordinator.progress import TransferProgress
from flctl.coordinator.records import Checkpoint, RunDir
from flctl.coordinator.replies import (
    HostProfile,
    check_evaluation,
    check_fit_counts,
    expect_encoded,
    expect_weights,
)
from flctl.coordinator.secure_round import SecureAggregation, check_secure_settings
from flctl.coordinator.sites import SiteJob, SitePlan, check_site_reply
from flctl.coordinator.summary import (
    MessageCallback,
    RoundCallback,
    RoundRecord,
    RunSummary,
    host_entries,
    plain_settings,
)
from flctl.core.data import Dataset
from flctl.core.divergence import divergence
from flctl.core.secagg import SecAggError
from flctl.core.settings import TrainingSettings
from flctl.core.sites import Site
from flctl.core.strategies import make_strategy
from flctl.core.tasks import BUILTIN_TASKS, Task
from flctl.core.updates import check_update
from flctl.core.uplink import UplinkSpec, unpack_update
from flctl.errors import TrainingError
from flctl.net.agent_client import AgentClient, EvalReply, FitReply, Transfer
from flctl.net.fanout import fan_out, worker_pool

# How much sooner than the round's deadline a site's aggregator gives up on its
# members, so its reply (with the late ones dropped) still reaches the coordinator.
SITE_MARGIN_S = 5.0

# The evaluation sample's stream beside the fit sample's ([seed, round] and,
# for re-runs, [seed, round, attempt] with attempt <= 101).
EVAL_DRAW = 1 << 20


class RoundShort(TrainingError):
    """Fewer than training.min_hosts updates arrived; the round may be re-run."""


class Coordinator(HostAdmission, MembershipChanges):
    def __init__(
        self,
        clients: Sequence[AgentClient],
        training: TrainingSettings,
        run: RunDir,
        *,
        tasks_dir: Path | None = None,
        inflight_updates: int = 2,
        on_round: RoundCallback = lambda record: None,
        on_message: MessageCallback = lambda text: None,
        resume_from: Checkpoint | None = None,
        eval_data: Dataset | None = None,
        ca_pem: bytes | None = None,
        revoked: frozenset[int] = frozenset(),
        initial: list[np.ndarray] | None = None,
        progress: TransferProgress | None = None,
        members: MemberWatch | None = None,
        sites: Mapping[str, Site] | None = None,
    ) -> None:
        self.members = members  # hosts joining and leaving mid-run (membership.py)
        self.former: list[str] = []  # members that left the run
        self.progress = progress or TransferProgress()  # the model's way out, for views
        self.initial = initial  # training.initial_weights, when given
        self.names: list[str] | None = None  # the arrays' names, when the task gives them
        # the frozen part every host loads itself ({"sha256", "bytes"}), if any
        self.frozen: dict[str, Any] | None = None
        self.resume_from = resume_from
        self.eval_data = eval_data
        self.task: Task | None = None  # loaded when the run starts
        # One strategy object for the whole run: server optimisers keep state.
        self.privacy = PrivacyLedger(training, len(clients))
        self.strategy = self.privacy.wrap(
            make_strategy(training.strategy, dict(training.strategy_params)))
        self.uplink = UplinkSpec.for_training(training)
        self.codec = self.uplink.codec()  # bad compression settings fail before round 1
        self.ca_pem = ca_pem
        self.revoked = revoked  # serials on the CA's revocation list
        self.secure: SecureAggregation | None = None  # set up once the hosts are known
        if training.secure_aggregation:
            check_secure_settings(training, self.strategy, ca_pem)
        self.clients = list(clients)
        # Sites (flctl.coordinator.sites): a setting no site can serve fails here.
        self.sites = SitePlan(sites or {}, self.clients)
        self.site_fold = self.sites.fold(training, self.strategy, self.uplink)
        self.training = training
        self.run = run
        self.tasks_dir = tasks_dir
        self.profiles: dict[str, HostProfile] = {}  # from discovery: what each host may claim
        self.refused: set[str] = set()  # hosts whose info could not be used
        self.budget = MemoryBudget(inflight_updates)
        self.on_round = on_round
        self.on_message = on_message
        self.task_params: dict[str, Any] = {}
        self._eval_failures_told: set[tuple[str, str]] = set()
        self._eval_sample_told = False
        self._pool = worker_pool(len(self.clients), self._round_size())
        # Set when the run ends, however it ends: workers stop resuming transfers
        # (the interpreter waits for them before an interrupted run can exit).
        self._stopping = threading.Event()

    # ------------------------------------------------------------ helpers
    def _parallel(self, clients: Sequence[Any], call: Callable[[Any], Any],
                  timeout: float | None) -> tuple[dict[str, Any], dict[str, str]]:
        """Run `call` on every client (fanout.fan_out on the run's pool)."""
        return fan_out(self._pool, clients, call, timeout)

    def _round_size(self) -> int:
        """How many hosts a round asks at once (its sample)."""
        return hosts_per_round(self.training, len(self.clients))

    def _sample(self, available: list[AgentClient], round_number: int,
                attempt: int = 1) -> list[AgentClient]:
        count = hosts_per_round(self.training, len(available))
        if count >= len(available):
            return list(available)
        # A re-run draws afresh (the first draw may hold the dead hosts); the
        # first attempt's draw stays what it always was, so resume is exact.
        key = [self.training.seed, round_number] + ([attempt] if attempt > 1 else [])
        rng = np.random.default_rng(key)
        chosen = sorted(rng.choice(len(available), size=count, replace=False))
        return [available[i] for i in chosen]

    def _eval_sample(self, available: list[AgentClient],
                     round_number: int) -> list[AgentClient]:
        """The hosts that evaluate round `round_number`'s model: all of them, or
        training.eval_hosts drawn from (seed, round) apart from the fit sample's
        draw, so a resumed run evaluates on the same hosts."""
        cap = self.training.eval_hosts
        if not cap or len(available) <= cap:
            return list(available)
        if not self._eval_sample_told:
            self._eval_sample_told = True
            self.on_message(f"evaluating on a sample of {cap} of the {len(available)} hosts "
                            f"(training.eval_hosts; 0: every host)")
        rng = np.random.default_rng([self.training.seed, round_number, EVAL_DRAW])
        chosen = sorted(rng.choice(len(available), size=cap, replace=False))
        return [available[i] for i in chosen]

    @contextmanager
    def _sending(self, phase: str, clients: Sequence[AgentClient],
                 weights: Sequence[np.ndarray]) -> Iterator[None]:
        """A phase that sends the model to `clients`, for progress views."""
        self.progress.begin(phase, clients, sum(int(w.nbytes) for w in weights))
        try:
            yield
        finally:
            self.progress.end()

    # ------------------------------------------------------------ phases
    def _fit_config(self, round_number: int) -> dict[str, Any]:
        t = self.training
        config = {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr,
                  "lr_bound": t.lr_bound, "seed": t.seed, "round": round_number,
                  **self.strategy.fit_config_extra()}
        if self.uplink.sends_delta:
            config["uplink"] = self.uplink.as_config()
        return config

    def secure_fit_round(self, weights: list[np.ndarray], round_number: int,
                         clients: Sequence[AgentClient], attempt: int = 1,
                         ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """Like fit_round, but the coordinator only ever learns the updates' sum."""
        assert self.secure is not None
        t = self.training
        config = self._fit_config(round_number)
        round_id = f"{self.run.run_id}/{round_number}/{attempt}"

        def secure_fit(client: AgentClient, shares: dict[str, Any],
                       allocate: Any) -> FitReply:
            return client.secure_fit(weights, t.task, self.task_params, config, round_id,
                                     shares, allocate, heartbeat_s=t.heartbeat_s or None)

        try:
            with self._sending(f"round {round_number}: model to hosts", clients, weights):
                outcome = self.secure.fit(weights, round_id, clients, secure_fit)
        except SecAggError as exc:
            raise RoundShort(f"round {round_number}: {exc.message}") from None
        if len(outcome.participants) < t.min_hosts:
            raise RoundShort(f"round {round_number}: {len(outcome.participants)} updates, "
                             f"training.min_hosts is {t.min_hosts}")
        for name, count in sorted(outcome.clipped.items()):
            self.on_message(f"{name}: {count} coordinates of its update exceeded the secure-"
                            f"aggregation range +-{self.secure.params.clip:g} and were clipped")
        aggregator = self.strategy.start_round(weights, round_number)
        aggregator.add("secure-sum", outcome.weights, outcome.examples)
        return aggregator.result(), {
            "participants": outcome.participants,
            "dropped": outcome.dropped,
            # that a host answered, and nothing of its own reply: only sums are learnt
            "answered": {name: {} for name in outcome.participants},
            "train_loss": outcome.train_loss,
            "max_compute_s": max(outcome.compute, default=0.0),
        }

    def fit_round(self, weights: list[np.ndarray], round_number: int,
                  clients: Sequence[AgentClient], attempt: int = 1,
                  ) -> tuple[list[np.ndarray], dict[str, Any]]:
        if self.secure is not None:
            return self.secure_fit_round(weights, round_number, clients, attempt)
        t = self.training
        aggregator = self.strategy.start_round(weights, round_number)
        lock = threading.Lock()
        closed = threading.Event()
        losses: list[tuple[float, int]] = []
        compute: list[float] = []
        answered: dict[str, dict[str, Any]] = {}  # what each host's reply says of it
        config = self._fit_config(round_number)

        until = time.monotonic() + t.deadline_s

        def fit_one(client: AgentClient) -> int:
            # Plain updates of a large model spool to disk as they arrive; an
            # encoded one is decoded whole, so it is received into memory.
            receiver = self.budget.receiver(
                expect_encoded(weights) if self.uplink.sends_delta else expect_weights(weights),
                None if self.uplink.sends_delta else self.run.spool_dir)
            try:
                transfer = Transfer(f"{self.run.run_id}/{round_number}/{attempt}/fit", until,
                                    stop=self._stopping)
                reply: FitReply = client.fit(weights, t.task, self.task_params, config,
                                             receive=receiver,
                                             heartbeat_s=t.heartbeat_s or None,
                                             transfer=transfer)
                self._tell_resumed(client.name, transfer)
                check_fit_counts(self._profile(client), reply.num_examples, reply.metrics)
                update = self._read_update(reply, weights)
                check_update(update, weights, t.max_update_norm)
                with lock:
                    if closed.is_set():
                        raise TrainingError("reply after the deadline")
                    aggregator.add(client.name, update, reply.num_examples)
                    loss = float(reply.metrics.get("train_loss", math.nan))
                    losses.append((loss, reply.num_examples))
                    compute.append(reply.compute_s)
                    answered[client.name] = {
                        "train_loss": loss if math.isfinite(loss) else None,
                        "examples": reply.num_examples, "fit_s": reply.compute_s}
                return reply.num_examples
            finally:
                receiver.release()

        def site_one(job: SiteJob) -> int:
            # the site's one update: its members' mean, as the model is laid out
            receiver = self.budget.receiver(expect_weights(weights), self.run.spool_dir)
            try:
                assert self.site_fold is not None
                left = until - time.monotonic()
                reply = job.client.site_fit(
                    weights, t.task, self.task_params, config, members=job.members,
                    fold=self.site_fold.as_meta(),
                    deadline_s=max(0.5, left - min(SITE_MARGIN_S, 0.1 * left)),
                    round_key=f"{self.run.run_id}/{round_number}/{attempt}/fit",
                    receive=receiver, heartbeat_s=t.heartbeat_s or None)
                members, lost = check_site_reply(job, reply.num_examples, reply.metrics,
                                                 lambda name: self._profile(
                                                     self.sites.clients[name]))
                update = reply.weights   # the site's mean change from `weights`
                check_update(update, weights, t.max_update_norm, delta=True)
                with lock:
                    if closed.is_set():
                        raise TrainingError("reply after the deadline")
                    aggregator.add_site(job.site.name, sorted(members), update,  # type: ignore[attr-defined]
                                        reply.num_examples, len(job.members))
                    for name, record in members.items():
                        loss = record["train_loss"]
                        losses.append((math.nan if loss is None else loss, record["examples"]))
                        compute.append(record["fit_s"])
                        answered[name] = record
                    site_dropped.update(lost)
                return int(reply.num_examples)
            finally:
                receiver.release()

        direct, jobs = self.sites.group(clients) if self.sites.active else (list(clients), [])
        site_dropped: dict[str, str] = {}
        targets: list[Any] = [*direct, *jobs]

        def one(target: Any) -> int:
            return site_one(target) if isinstance(target, SiteJob) else fit_one(target)

        with self._sending(f"round {round_number}: model to hosts",
                           [*direct, *(job.client for job in jobs)], weights):
            _, failures = self._parallel(targets, one, timeout=t.deadline_s)
        with lock:
            closed.set()
        for job in jobs:   # a site that failed as a whole drops each of its members
            if job.name in failures:
                reason = job.failed(failures.pop(job.name))
                failures.update({member: reason for member in job.members})
        failures.update(site_dropped)
        if aggregator.count < t.min_hosts:
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(failures.items()))
            close = getattr(aggregator, "close", None)   # held copies (robust strategies)
            if callable(close):
                close()
            raise RoundShort(
                f"round {round_number}: {aggregator.count} updates, training.min_hosts is "
                f"{t.min_hosts} ({detail or 'no hosts'})"
            )
        total = sum(n for _, n in losses)
        train_loss = sum(loss * n for loss, n in losses) / total if total else None
        return aggregator.result(), {
            "participants": sorted(answered),
            "dropped": failures,
            "answered": answered,
            "train_loss": train_loss,
            "max_compute_s": max(compute, default=0.0),
        }

    def _read_update(self, reply: FitReply, weights: list[np.ndarray]) -> list[np.ndarray]:
        """The host's new weights: as sent, or rebuilt from an encoded delta."""
        if not self.uplink.sends_delta:
            if reply.encoding is not None:
                raise TrainingError("update rejected: encoded, but this run sends weights")
            return reply.weights
        if reply.encoding is None:
            raise TrainingError(f"update rejected: not encoded with training.compression "
                                f"{self.uplink.compression} (an old agent?)")
        return unpack_update(self.codec, reply.encoding, reply.weights, weights)

    def _tell_resumed(self, name: str, transfer: Transfer) -> None:
        if not transfer.resumed:
            return
        again = (f" ({transfer.restarted} time(s) the agent had none of it, a restart or "
                 f"a cut before it arrived, and got it again in full)"
                 if transfer.restarted else "")
        self.on_message(f"{name}: the connection dropped {transfer.resumed} time(s); "
                        f"the transfer went on from where it stopped{again}")

    def evaluate(self, weights: list[np.ndarray], round_number: int,
                 clients: Sequence[AgentClient]) -> tuple[float | None, float | None]:
        config = {"round": round_number}
        until = time.monotonic() + self.training.deadline_s

        def evaluate_one(client: AgentClient) -> EvalReply:
            transfer = Transfer(f"{self.run.run_id}/{round_number}/eval", until,
                                stop=self._stopping)
            reply = client.evaluate(weights, self.training.task, self.task_params, config,
                                    heartbeat_s=self.training.heartbeat_s or None,
                                    transfer=transfer)
            self._tell_resumed(client.name, transfer)
            return reply

        with self._sending(f"round {round_number}: model to hosts to evaluate", clients,
                           weights):
            replies, failures = self._parallel(clients, evaluate_one,
                                               timeout=self.training.deadline_s)
        for name, reason in sorted(failures.items()):
            if (name, reason) not in self._eval_failures_told:   # once, not every round
                self._eval_failures_told.add((name, reason))
                self.on_message(f"{name}: evaluation failed: {reason}")
        by_name = {c.name: c for c in clients}
        for name in sorted(replies):
            reply = replies[name]
            try:
                check_evaluation(self._profile(by_name[name]),
                                 reply.loss, reply.num_examples, reply.metrics)
            except TrainingError as exc:
                self.on_message(f"{name}: {exc.message}")
                del replies[name]
        total = sum(r.num_examples for r in replies.values())
        if not total:
            return None, None
        loss = sum(r.loss * r.num_examples for r in replies.values()) / total
        accuracy = sum(float(r.metrics.get("accuracy", 0.0)) * r.num_examples
                       for r in replies.values()) / total
        return loss, accuracy

    # ------------------------------------------------------------ the run
    def train(self) -> RunSummary:
        t = self.training
        started = time.perf_counter()
        short = ensure_open_files(len(self.clients))
        if short is not None:
            self.on_message(short)
        try:
            infos = self.discover()
            # Every round asks every host but those whose info was refused: one that
            # was down at the start rejoins when it is back (its info checked then).
            available = [c for c in self.clients if c.name not in self.refused]
            if self.training.secure_aggregation:
                assert self.ca_pem is not None
                counts = [int(i["data"]["n_train"]) for i in infos if i.get("data")]
                self.secure = SecureAggregation(
                    self.training, self.ca_pem, self._parallel,
                    self.budget.allocator, self.budget.release, counts, self.revoked)
            if self.resume_from is None:   # a resumed run keeps its transform (task_params)
                self._federated_statistics(available)
                available = [c for c in available if c.name not in self.refused]
            # The coordinator runs a user's task itself only to evaluate on eval_file:
            # its framework (PyTorch) need not be installed here otherwise.
            if t.task in BUILTIN_TASKS or self.eval_data is not None:
                self.task = self._local_task()
            if self.resume_from is not None:
                weights = self.resume_from.weights
                self.strategy.load_state(self.resume_from.strategy_state)
                first = self.resume_from.round + 1
                for warning in self.run.truncate_metrics(self.resume_from.round):
                    self.on_message(warning)
                self.privacy.resume_after(self.resume_from.round)
                self.names = self.resume_from.state.get("names")
                self.on_message(f"resuming run {self.run.run_id} after round "
                                f"{self.resume_from.round}")
            else:
                weights = self._initial_weights(available)
                first = 1
            self._check_memory(weights)
            available = [c for c in available if c.name not in self.refused]
            history: list[RoundRecord] = []
            eval_loss = accuracy = None
            stopped_early: int | None = None
            for round_number in range(first, t.rounds + 1):
                if self.privacy.next_round_exceeds_target():
                    stopped_early = round_number - 1
                    self.on_message(f"stopping before round {round_number}: it would take "
                                    f"epsilon past training.target_epsilon {t.target_epsilon:g}")
                    break
                available = self.follow_members(available, round_number, weights)
                record, weights = self._one_round(weights, round_number, available)
                eval_loss, accuracy = (record.eval_loss, record.accuracy) if (
                    record.accuracy is not None) else (eval_loss, accuracy)
                history.append(record)
                self._stop_if_diverging(history)
                if (t.target_accuracy > 0 and record.accuracy is not None
                        and record.accuracy >= t.target_accuracy):
                    stopped_early = round_number
                    self.on_message(f"reached training.target_accuracy {t.target_accuracy:g} "
                                    f"after round {round_number}: stopping")
                    break
            manifest = {
                "run_id": self.run.run_id,
                "training": plain_settings(t),
                "task_params": self.task_params,
                "seed": t.seed,
                "hosts": [c.name for c in self.clients] + self.former,
                "rounds": history[-1].round if history else first - 1,
                "rounds_planned": t.rounds,
                "stopped_early_at": stopped_early,
                "accuracy": accuracy,
                "eval_loss": eval_loss,
                "privacy": t.privacy,
                "epsilon": self.privacy.epsilon(),
                "delta": t.dp_delta if self.privacy.enabled else None,
                "shapes": [list(w.shape) for w in weights],
                "names": self.names,
                "frozen": self.frozen,
            }
            digest = self.run.save_final(weights, manifest)
            return RunSummary(self.run.run_id, self.run.path, manifest["rounds"],
                              manifest["hosts"], self.run.path / "final.npz",
                              digest, accuracy, eval_loss, time.perf_counter() - started, history,
                              manifest["epsilon"], manifest["delta"])
        finally:
            # Wake any worker still blocked on a connection (an interrupt can
            # leave one mid-request) before the sockets close: a closed fd does
            # not wake a blocked recv, and its number could be reused under it.
            self._stopping.set()   # no transfer resumes after this
            for client in self.clients:
                client.abort()
            self._pool.shutdown(wait=False, cancel_futures=True)
            for client in self.clients:
                client.close()
            self.budget.close()

    def _stop_if_diverging(self, history: Sequence[RoundRecord]) -> None:
        """Stop a diverging run (flctl.core.divergence) with its fix, rather than
        train on to a poor model; its checkpoints stay."""
        losses = [(r.round, r.eval_loss) for r in history if r.eval_loss is not None]
        why = divergence(losses)
        if why is None:
            return
        t = self.training
        scaled = "transform" in self.task_params
        raise TrainingError(
            f"the run is diverging: {why}. Lower training.lr (now {t.lr:g}, try "
            f"{t.lr / 10:g})" + ("" if scaled or t.task not in BUILTIN_TASKS else
                                 ", or standardize the features (training.standardize: on; "
                                 "see `flctl stats`)") + "; the checkpoints are in "
            f"{self.run.path}")

    def _fit_with_retries(self, weights: list[np.ndarray], round_number: int,
                          available: list[AgentClient],
                          ) -> tuple[list[np.ndarray], dict[str, Any], int]:
        """Fit a round; re-run it while too few replies arrive and retries are left."""
        t = self.training
        attempt = 1
        while True:
            chosen = self._sample(available, round_number, attempt)
            try:
                new_weights, fit = self.fit_round(weights, round_number, chosen, attempt)
                return new_weights, fit, attempt
            except RoundShort as short:
                if attempt > t.round_retries:
                    last = (f"the run stops after round {round_number - 1}; continue it "
                            f"later with `flctl train --resume {self.run.run_id}`"
                            if round_number > 1 else "the run stops")
                    raise TrainingError(f"{short.message}; tried {attempt} time(s), "
                                        f"{last}") from None
                self.on_message(f"{short.message}; running it again in {t.retry_wait_s:g} s "
                                f"(retry {attempt} of {t.round_retries})")
                time.sleep(t.retry_wait_s)
            attempt += 1

    def _checkpoint(self, round_number: int, weights: list[np.ndarray]) -> None:
        self.run.save_checkpoint(round_number, weights, {
            "run_id": self.run.run_id, "training": plain_settings(self.training),
            "task_params": self.task_params, "hosts": [c.name for c in self.clients],
            "names": self.names, "frozen": self.frozen,
            "members_serial": self.members_serial()},
            self.strategy.state())

    def _one_round(self, weights: list[np.ndarray], round_number: int,
                   available: list[AgentClient]) -> tuple[RoundRecord, list[np.ndarray]]:
        t = self.training
        round_start = time.perf_counter()
        sent0 = {c.name: c.bytes_sent for c in self.clients}
        received0 = {c.name: c.bytes_received for c in self.clients}
        new_weights, fit, attempts = self._fit_with_retries(weights, round_number, available)
        fit_seconds = time.perf_counter() - round_start
        epsilon = self.privacy.spend_round()
        if self.privacy.enabled:
            # A noised model is checkpointed before anyone sees it: otherwise a
            # resume would redo the round with the same noise and other hosts.
            self._checkpoint(round_number, new_weights)
        eval_loss = accuracy = central_loss = central_accuracy = None
        eval_started = time.perf_counter()
        if round_number % t.eval_every == 0 or round_number == t.rounds:
            eval_loss, accuracy = self.evaluate(new_weights, round_number,
                                                self._eval_sample(available, round_number))
            if self.eval_data is not None and self.task is not None:
                central_loss, _, metrics = self.task.evaluate(new_weights, self.eval_data, {})
                central_accuracy = metrics.get("accuracy")
        eval_seconds = time.perf_counter() - eval_started
        sent = {c.name: c.bytes_sent - sent0[c.name] for c in self.clients}
        received = {c.name: c.bytes_received - received0[c.name] for c in self.clients}
        record = RoundRecord(
            round=round_number,
            participants=fit["participants"],
            dropped=fit["dropped"],
            train_loss=fit["train_loss"],
            eval_loss=eval_loss,
            accuracy=accuracy,
            seconds=time.perf_counter() - round_start,
            fit_seconds=fit_seconds,
            max_compute_s=fit["max_compute_s"],
            bytes_sent=sum(sent.values()),
            bytes_received=sum(received.values()),
            eval_seconds=eval_seconds,
            central_loss=None if central_loss is None else float(central_loss),
            central_accuracy=None if central_accuracy is None else float(central_accuracy),
            attempts=attempts,
            epsilon=epsilon,
            delta=t.dp_delta if self.privacy.enabled else None,
            hosts=host_entries(fit["answered"], fit["dropped"], sent, received),
            members=sorted(c.name for c in available),
        )
        # Metrics first: a crash in between leaves a metrics line past the
        # checkpoint, which resume drops, rather than a round with no line.
        self.run.append_metrics(record.as_dict())
        if not self.privacy.enabled:
            self._checkpoint(round_number, new_weights)
        self.on_round(record)
        return record, new_weights

