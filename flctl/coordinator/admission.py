"""Before round 1: which hosts take part, what the run standardises with,
and the first model.

Every host's info is checked and fixes the bounds its replies must keep
(replies.HostProfile); hosts whose frozen part, memory or data do not fit
the run are left out with one line each, and the run refuses to start
below training.min_hosts_to_start. The data statistics (plain, or through
secure aggregation) give the built-in tasks their standardisation. The
Coordinator (rounds.py) inherits these steps; they read and set its state
(profiles, refused, task_params, frozen) and nothing else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flctl.coordinator.records import Checkpoint, RunDir
from flctl.coordinator.replies import (
    HostProfile,
    HostRefused,
    check_info,
    check_initial,
    check_names,
    deployed_task_mismatch,
    shape_params,
)
from flctl.coordinator.secure_stats import secure_federated_stats
from flctl.coordinator.stats import describe_findings, federated_stats
from flctl.coordinator.summary import MessageCallback
from flctl.core.fedstats import STANDARDIZE_FACTOR, scales_differ, standardize_transform
from flctl.core.frozen import FrozenDisagreement, reference_digest
from flctl.core.frozen import mismatch as frozen_mismatch
from flctl.core.memory import available_memory, coordinator_need, host_need, shortfall
from flctl.core.settings import TrainingSettings
from flctl.core.tasks import BUILTIN_TASKS, Task, TaskError, load_task
from flctl.errors import FlctlError, TrainingError
from flctl.net.agent_client import AgentClient, Transfer


class HostAdmission:
    """Discovery, statistics, frozen part, memory and the first model."""

    clients: list[AgentClient]
    training: TrainingSettings
    run: RunDir
    tasks_dir: Path | None
    resume_from: Checkpoint | None
    initial: list[np.ndarray] | None
    task: Task | None
    names: list[str] | None
    frozen: dict[str, Any] | None
    profiles: dict[str, HostProfile]
    refused: set[str]
    task_params: dict[str, Any]
    on_message: MessageCallback
    ca_pem: bytes | None
    revoked: frozenset[int]
    _stopping: threading.Event
    _parallel: Callable[..., tuple[dict[str, Any], dict[str, str]]]
    _tell_resumed: Callable[..., None]

    def discover(self) -> list[dict[str, Any]]:
        """Ask every host for its info; keep those whose answer checks out.

        Fixes, per host, the bounds its replies must keep (HostProfile).
        """
        infos, failures = self._parallel(self.clients, lambda c: c.info(), timeout=30.0)
        for name, reason in sorted(failures.items()):
            self.on_message(f"{name}: not answering ({reason})")
        mismatch = deployed_task_mismatch(infos, self.training)
        if mismatch is not None:
            raise TrainingError(mismatch)
        # the model's shape: the run's own on resume, else from the settings (one
        # clear line when they lack it)
        self.task_params = (dict(self.resume_from.state["task_params"]) if self.resume_from
                            else shape_params(self.training, list(infos.values())))
        for name in sorted(infos):
            try:
                self.profiles[name] = check_info(name, infos[name], self.training,
                                                 self.task_params)
            except HostRefused as exc:
                self._leave_out(name, exc.message)
        self._agree_on_frozen()
        self._enough_hosts()
        return [infos[c.name] for c in self.clients if c.name in self.profiles]

    def _federated_statistics(self, clients: Sequence[AgentClient]) -> None:
        """Before round 1 (flctl.core.fedstats): the statistics of the hosts' data,
        recorded with the run; for the built-in tasks the transform they
        standardise with (training.standardize), for a user's task the
        statistics themselves when it asks (training.task_stats). Hosts whose
        data fail the check (other columns, impossible numbers) sit the run out."""
        t = self.training
        standardize = t.task in BUILTIN_TASKS and t.standardize != "off"
        if not (standardize or t.task_stats):
            return
        if t.secure_aggregation and t.task_stats:
            raise TrainingError("training.task_stats gives a task per-feature min and max, "
                                "which secure_aggregation cannot compute: set task_stats: "
                                "false (training.standardize works: it needs only sums)")
        asked = [c for c in clients if c.name in self.profiles]
        if t.secure_aggregation:
            assert self.ca_pem is not None
            # only the federation's sums: mean and std, no min, max or per-host labels
            found = secure_federated_stats(
                asked, ca_pem=self.ca_pem, revoked=self.revoked, threshold=t.secagg_threshold,
                neighbours=t.secagg_neighbours, timeout=t.deadline_s, parallel=self._parallel,
                tell=self.on_message)
        else:
            found = federated_stats(asked, tell=self.on_message)
        took_part = {*found.hosts, *found.withheld}
        for client in asked:
            if client.name not in took_part:
                self.profiles.pop(client.name, None)
                self.refused.add(client.name)
        self._enough_hosts()
        for line in describe_findings(found):
            self.on_message(line)
        self.run.save_stats(found.as_dict())
        if t.task_stats:
            self.task_params["stats"] = found.as_dict()
        if not standardize:
            return
        width = self.task_params.get("n_features")
        if len(found.count) != width:
            raise TrainingError(f"the hosts' data have {len(found.count)} features; "
                                f"training.task_params.n_features is {width}")
        if t.standardize == "on" or scales_differ(found) or found.missing.sum() > 0:
            self.task_params["transform"] = standardize_transform(found).as_params()
            why = ("training.standardize: on" if t.standardize == "on" else
                   "values are missing" if found.missing.sum() > 0 else
                   "feature magnitudes differ by more than "
                   f"{STANDARDIZE_FACTOR:g}x")
            self.on_message(f"standardizing features with the federated mean and standard "
                            f"deviation ({why}); the transform is stored with the run")

    def _leave_out(self, name: str, reason: str) -> None:
        self.profiles.pop(name, None)
        self.refused.add(name)
        self.on_message(f"left out: {reason}")

    def _enough_hosts(self) -> None:
        t = self.training
        needed = max(t.min_hosts_to_start, t.min_hosts)
        if len(self.profiles) < needed:
            which = ("training.min_hosts_to_start" if t.min_hosts_to_start >= t.min_hosts
                     else "training.min_hosts")
            raise TrainingError(
                f"only {len(self.profiles)} of {len(self.clients)} hosts answer and can take "
                f"part; {which} is {needed}")

    def _agree_on_frozen(self) -> None:
        """The run's frozen part (flctl.core.frozen): a resumed run's own, the
        pinned training.frozen_sha256, else what most hosts have; hosts with
        another are left out, one line each."""
        saved = self.resume_from.state if self.resume_from is not None else {}
        if "frozen" in saved:
            part = saved["frozen"]
            self.frozen = part if isinstance(part, dict) else None
        else:
            reported = {name: p.frozen for name, p in self.profiles.items()}
            try:
                sha = reference_digest(reported, self.training.frozen_sha256 or None)
            except FrozenDisagreement as exc:
                raise TrainingError(str(exc)) from None
            size = max((p.frozen_bytes for p in self.profiles.values() if p.frozen == sha),
                       default=0)
            self.frozen = None if sha is None else {"sha256": sha, "bytes": size}
        for name in sorted(self.profiles):
            line = self._frozen_mismatch(self.profiles[name])
            if line is not None:
                self._leave_out(name, line)

    def _frozen_mismatch(self, profile: HostProfile) -> str | None:
        return frozen_mismatch(profile.name, profile.frozen,
                               self.frozen["sha256"] if self.frozen else None)

    def _check_memory(self, weights: Sequence[np.ndarray]) -> None:
        """Before round 1: refuse a model this machine cannot hold, and leave
        out the hosts that say they cannot (flctl.core.memory)."""
        model = sum(int(np.asarray(w).nbytes) for w in weights)
        line = shortfall("this machine (the coordinator)", coordinator_need(model),
                         available_memory(), model)
        if line is not None:
            raise TrainingError(line)
        for name in sorted(self.profiles):
            profile = self.profiles[name]
            line = shortfall(name, host_need(model, profile.frozen_bytes), profile.memory,
                             model)
            if line is not None:
                self._leave_out(name, line)
        self._enough_hosts()

    def _profile(self, client: AgentClient) -> HostProfile:
        """The host's profile; a host that missed discovery is asked now, once."""
        profile = self.profiles.get(client.name)
        if profile is None:
            profile = check_info(client.name, client.info(), self.training, self.task_params)
            line = self._frozen_mismatch(profile)
            if line is not None:
                raise HostRefused(line)
            self.profiles[client.name] = profile
        return profile

    def _local_task(self) -> Task:
        t = self.training
        try:
            return load_task(t.task, self.task_params, self.tasks_dir)
        except TaskError as exc:
            raise TrainingError(f"training.eval_file evaluates on this machine, and the task "
                                f"does not load here: {exc.message}") from None

    def _initial_weights(self, available: list[AgentClient]) -> list[np.ndarray]:
        """The first model: training.initial_weights, the built-in task's init(), or
        a user's task's init() run by one host (the first by name that can)."""
        t = self.training
        if self.initial is not None:
            return self.initial
        if t.task in BUILTIN_TASKS:
            assert self.task is not None
            return [np.asarray(w) for w in self.task.init(t.seed)]
        for client in sorted((c for c in available if c.name in self.profiles),
                             key=lambda c: c.name):
            try:
                transfer = Transfer(f"{self.run.run_id}/init", time.monotonic() + t.deadline_s,
                                    stop=self._stopping)
                weights, names = client.init_weights(t.task, self.task_params, t.seed,
                                                     transfer)
                self._tell_resumed(client.name, transfer)
                check_initial(weights)
                self.names = check_names(names, len(weights))
                self.on_message(f"initial weights from {client.name} "
                                f"({len(weights)} arrays)")
                return weights
            except FlctlError as exc:
                self.on_message(f"{client.name}: cannot make the initial weights "
                                f"({exc.message}); asking another host")
        raise TrainingError("no host could make the initial weights; give them as "
                            "training.initial_weights (an .npz file)")
