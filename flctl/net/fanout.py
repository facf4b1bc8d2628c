"""One call on many hosts at once, each host's result or the reason it has none.

A host that misses the deadline is aborted (its worker wakes, its late
reply is discarded), so a round never waits on the slowest host past its
deadline and no worker outlives the round by more than a moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, wait
from typing import Any, Callable, Protocol, TypeVar

from flctl.errors import FlctlError


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
    futures = {pool.submit(call, client): client for client in clients}
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
        failures[client.name] = "deadline exceeded"
        client.abort()  # unblocks the worker; its late reply is discarded
    wait(pending, timeout=5.0)
    return results, failures


def reason(error: BaseException) -> str:
    """One line for a host's failure: ours as written, anything else with its type."""
    if isinstance(error, FlctlError):
        return error.message
    return f"{type(error).__name__}: {error}"
