"""One call on many hosts at once, each host's result or the reason it has none.

A host that misses the deadline is aborted (its worker wakes, its late
reply is discarded), so a round never waits on the slowest host past its
deadline and no worker outlives the round by more than a moment.

The workers are a bounded pool (worker_pool): a thousand hosts do not get
a thousand threads, only as many as a round asks at once. A call still
queued when the deadline passes is cancelled, and one whose turn comes
after it fails at once, so queued work keeps the deadline as running work
does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from typing import Any, Callable, Protocol, TypeVar

from flctl.errors import FlctlError, TrainingError

# Requests in flight at once (one thread each) when every host is asked
# (discovery, statistics, evaluation); more hosts queue.
MAX_WORKERS = 128
DEADLINE = "deadline exceeded"


def pool_size(hosts: int, at_once: int = 0, limit: int | None = None) -> int:
    """Workers for `hosts` hosts: one each up to `limit` (MAX_WORKERS), but
    never fewer than the `at_once` hosts a round asks together: a fit holds
    its worker for the host's whole training, so a queued host would start
    training only when another finished, doubling the round."""
    cap = MAX_WORKERS if limit is None else limit
    return max(1, min(hosts, cap), min(hosts, at_once))


def worker_pool(hosts: int, at_once: int = 0, limit: int | None = None) -> ThreadPoolExecutor:
    """A pool for fan_out over `hosts` hosts (pool_size)."""
    return ThreadPoolExecutor(max_workers=pool_size(hosts, at_once, limit),
                              thread_name_prefix="flctl-fanout")


class Callee(Protocol):
    """What fan_out calls: an AgentClient, or anything named that can be cut off
    (a site's job, flctl.coordinator.sites)."""

    @property
    def name(self) -> str: ...

    def abort(self) -> None: ...


C = TypeVar("C", bound=Callee)


def fan_out(pool: Executor, clients: Sequence[C], call: Callable[[C], Any],
            timeout: float | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Run `call` on every client; results and per-host failure reasons.

    Used by the coordinator (its hosts) and by a site's aggregator (its members)."""
    until = None if timeout is None else time.monotonic() + timeout

    def in_time(client: C) -> Any:
        if until is not None and time.monotonic() >= until:
            raise TrainingError(f"{DEADLINE} before its turn came")
        return call(client)

    futures = {pool.submit(in_time, client): client for client in clients}
    done, pending = wait(futures, timeout=timeout)
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for future in done:
        name = futures[future].name
        error = future.exception()
        if error is None:
            results[name] = future.result()
        else:
            failures[name] = reason(error)
    for future in pending:
        client = futures[future]
        failures[client.name] = DEADLINE
        if not future.cancel():   # queued ones never start; running ones are cut
            client.abort()  # unblocks the worker; its late reply is discarded
    wait(pending, timeout=5.0)
    return results, failures


def reason(error: BaseException) -> str:
    """One line for a host's failure: ours as written, anything else with its type."""
    if isinstance(error, FlctlError):
        return error.message
    return f"{type(error).__name__}: {error}"
