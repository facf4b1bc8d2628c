"""Hosts joining and leaving a running federation.

`flctl deploy --limit NEW` and `flctl teardown --limit H` may run beside a
train (flctl.workspace_lock) and record the change in the workspace's
members file (flctl.core.members). Between rounds the coordinator looks at
the file (a stat, and a read only when it changed: cheap enough for every
round) and brings its hosts in line: a host deployed since the run noted the
file's serial is admitted like any host at the start (its info: the
deployed task, the model's shape, its data, its frozen part, its memory)
and trains from the next round; a host torn down is dropped. A host torn
down mid-round just fails that round, like any dropout.

Secure aggregation fixes its parameters from the hosts' example counts and
its key agreement from the start, and central DP's accountant counts a
sampling rate over a fixed number of hosts: under either, a joining host
is not used (one line says why) and a leaving one stays in the sampling
pool as a dropout, so no guarantee changes silently. Local DP accounts
every host at rate 1 whatever their number, so it takes both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flctl.coordinator.replies import HostProfile, HostRefused, check_info
from flctl.coordinator.summary import MessageCallback
from flctl.core.layout import Endpoint
from flctl.core.members import Members, read_members
from flctl.core.memory import host_need, shortfall
from flctl.core.settings import TrainingSettings
from flctl.errors import FlctlError
from flctl.net.agent_client import AgentClient
from flctl.net.fanout import pool_size, worker_pool

ClientFactory = Callable[[Endpoint], AgentClient]


@dataclass
class MemberWatch:
    """The members file as this run follows it: the serial up to which it
    has taken the changes in, and how to reach a newcomer."""

    path: Path
    serial: int
    make_client: ClientFactory
    _seen: tuple[int, int, int] | None = None

    @classmethod
    def start(cls, path: Path, make_client: ClientFactory, serial: int | None = None
              ) -> MemberWatch:
        """Follow `path` from `serial` (a resumed run's), else from now."""
        current = read_members(path)
        now = current.serial if current is not None else 0
        return cls(path, now if serial is None else serial, make_client)

    def changed(self) -> Members | None:
        """The file when it changed since the last look (by its stat), else None."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen == self._seen:
            return None
        self._seen = seen
        return read_members(self.path)


def refusal(training: TrainingSettings) -> str | None:
    """Why this run cannot take a host that joins mid-run, if it cannot."""
    if training.secure_aggregation:
        return ("training.secure_aggregation fixed its parameters and key agreement for the "
                "hosts the run started with")
    if training.privacy == "central":
        return ("central differential privacy accounts a sampling rate over the hosts the "
                "run started with")
    return None


class MembershipChanges:
    """Applies the members file's changes between rounds (the Coordinator's)."""

    clients: list[AgentClient]
    training: TrainingSettings
    profiles: dict[str, HostProfile]
    refused: set[str]
    task_params: dict[str, Any]
    on_message: MessageCallback
    members: MemberWatch | None
    former: list[str]
    _pool: ThreadPoolExecutor
    _frozen_mismatch: Callable[[HostProfile], str | None]
    _round_size: Callable[[], int]

    def members_serial(self) -> int | None:
        return None if self.members is None else self.members.serial

    def follow_members(self, available: list[AgentClient], round_number: int,
                       weights: Sequence[np.ndarray]) -> list[AgentClient]:
        """The hosts round `round_number` may ask, after any joins and leaves."""
        watch = self.members
        found = watch.changed() if watch is not None else None
        if watch is None or found is None or found.serial <= watch.serial:
            return available
        names = {c.name for c in self.clients}
        left = sorted(found.left_after(watch.serial) & names)
        joined = {n: e for n, e in sorted(found.joined_after(watch.serial).items())
                  if n not in names}
        watch.serial = found.serial
        why = refusal(self.training)
        for name in left:
            if why is not None:
                self.on_message(f"{name}: torn down; it stays in this run's sampling pool as a "
                                f"dropout, since {why}")
                continue
            client = next(c for c in self.clients if c.name == name)
            self.clients.remove(client)
            available = [c for c in available if c is not client]
            client.abort()
            client.close()
            self.former.append(name)
            self.on_message(f"{name}: left the federation (torn down); the run goes on "
                            f"without it from round {round_number}")
        for name, endpoint in joined.items():
            if why is not None:
                self.on_message(f"{name}: deployed during the run but not used by it: {why}")
                continue
            client = watch.make_client(endpoint)
            try:
                self.profiles[name] = self._admit(client, weights)
            except HostRefused as exc:
                client.close()
                self.on_message(f"deployed during the run but not admitted: {exc.message}")
                continue
            except FlctlError as exc:
                client.close()
                self.on_message(f"{name}: deployed during the run but not answering "
                                f"({exc.message}); not admitted")
                continue
            self.refused.discard(name)
            if name in self.former:
                self.former.remove(name)
            self.clients.append(client)
            available = [*available, client]
            self._one_worker_per_host()
            self.on_message(f"{name}: joined the federation; it trains from round "
                            f"{round_number}")
        return available

    def _one_worker_per_host(self) -> None:
        """A round asks its sample at once: the pool grows with the run
        (fanout.pool_size; a fresh pool, whose old workers finish what they
        hold, there is nothing else)."""
        if self._pool._max_workers < pool_size(len(self.clients), self._round_size()):
            old, self._pool = self._pool, worker_pool(len(self.clients), self._round_size())
            old.shutdown(wait=False)

    def _admit(self, client: AgentClient, weights: Sequence[np.ndarray]) -> HostProfile:
        """The checks every host passed before round 1, for one newcomer."""
        profile = check_info(client.name, client.info(), self.training, self.task_params)
        line = self._frozen_mismatch(profile)
        if line is None:
            model = sum(int(np.asarray(w).nbytes) for w in weights)
            line = shortfall(client.name, host_need(model, profile.frozen_bytes),
                             profile.memory, model)
        if line is not None:
            raise HostRefused(line)
        return profile
