"""`flctl stats` under secure aggregation: the coordinator learns the
federation's sums and nothing about any one host (flctl.core.securestats).

First the hosts' layouts in the clear (column names and count, a label
space; no sums), so every host encodes alike; a host whose columns differ
is left out naming its file and column, as in the plain path. Then two
secure sums, each with fresh keys and its own round id: pass 1 (counts,
missing values, sums, squares, label totals -> mean and std), pass 2
(histograms over public edges from pass 1 -> approximate quantiles). A host
that fails a step is left out with one line; a result whose totals cannot
be true is refused whole (which host sent the bad vector cannot be known).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flctl.coordinator.secure_sum import Parallel, SecureSum
from flctl.coordinator.stats import Tell, column_difference, names_of, where_of
from flctl.core.fedstats import (
    DEFAULT_BINS,
    EDGE_SIGMAS,
    MAX_LABEL,
    MIN_COUNT,
    FederatedStats,
    quantiles,
)
from flctl.core.secagg import FixedPointParams, SecAggError, SecAggServer, default_neighbours
from flctl.core.securestats import (
    MAX_WIDTH,
    Layout,
    public_edges,
    read_pass1,
    read_pass2,
    round_tag,
    secure_stats,
)
from flctl.errors import ProtocolError, TrainingError
from flctl.net.agent_client import AgentClient
from flctl.net.fanout import fan_out, worker_pool

QUANTILE_NOTE = (f"quantiles are read off histograms over mean +- {EDGE_SIGMAS:g} std (values "
                 f"beyond are counted in the end bins): approximate, more so in the tails")


def _layout(meta: Any) -> tuple[tuple[str, ...] | None, int, int]:
    """(names, width, label space) a host claims; ValueError if it cannot be."""
    if not isinstance(meta, dict):
        raise ValueError("not an object")
    width, labels = meta.get("width"), meta.get("labels")
    for value, what, bound in ((width, "width", MAX_WIDTH), (labels, "labels", MAX_LABEL)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= bound:
            raise ValueError(f"{what} is not a small count")
    names = names_of(meta)
    if names is not None and len(names) != width:
        raise ValueError(f"{len(names)} column names for {width} columns")
    return names, width, labels


def _agree(replies: dict[str, Any], failures: dict[str, str], bins: int, tell: Tell
           ) -> tuple[tuple[str, ...] | None, Layout, list[str]]:
    """(column names, layout, hosts) most hosts share; the others left out, one
    line each naming the file and the column (as the plain statistics do)."""
    for name, reason in sorted(failures.items()):
        tell(f"left out: {name}: {reason}")
    claims = {}
    for name, meta in sorted(replies.items()):
        try:
            claims[name] = _layout(meta)
        except ValueError as exc:
            tell(f"left out: {name}: bad layout from {where_of(meta)} ({exc})")
    if not claims:
        raise TrainingError("no host answered with its layout")
    want_names, width = Counter(c[:2] for c in claims.values()).most_common(1)[0][0]
    used = []
    for name, (names, got, _) in sorted(claims.items()):
        if (names, got) == (want_names, width):
            used.append(name)
        elif want_names is not None and names is not None:
            tell(f"left out: {name}: {where_of(replies[name])}: "
                 f"{column_difference(names, want_names)}")
        else:
            tell(f"left out: {name}: {where_of(replies[name])}: {got} columns where the "
                 f"other hosts have {width}")
    return want_names, Layout(width, max(claims[n][2] for n in used), bins), used


def secure_federated_stats(clients: Sequence[AgentClient], *, ca_pem: bytes,
                           revoked: frozenset[int] = frozenset(), min_count: int = MIN_COUNT,
                           bins: int = DEFAULT_BINS, threshold: int = 0, neighbours: int = 0,
                           timeout: float | None = None, parallel: Parallel | None = None,
                           tell: Tell = lambda line: None) -> FederatedStats:
    """The federation's statistics over `clients` through secure aggregation
    (threshold and neighbours as training.secagg_threshold/_neighbours)."""
    with worker_pool(len(clients)) as pool:
        run = parallel or (lambda hosts, call, timeout: fan_out(pool, hosts, call, timeout))
        replies, failures = run(clients, lambda c: c.stats_layout(min_count), timeout)
        want_names, layout, used = _agree(replies, failures, bins, tell)
        tag = secrets.token_hex(6)

        def secure_sum(hosts: Sequence[str], part: int, edges: np.ndarray | None,
                       gone: str) -> tuple[np.ndarray, list[str]]:
            asked = set(hosts)
            members = [c for c in clients if c.name in asked]
            if len(members) < 2:
                raise TrainingError(f"secure statistics need at least 2 hosts; "
                                    f"{len(members)} can take part")
            try:
                # the pass's parameters end its round id: hosts told others refuse
                round_id = f"stats/{tag}/{part}/{round_tag(min_count, layout, edges)}"
                server = SecAggServer(
                    [c.name for c in members], round_id, threshold or None,
                    FixedPointParams(), ca_pem=ca_pem, revoked=revoked,
                    degree=neighbours or default_neighbours(len(members)))
            except SecAggError as exc:
                raise TrainingError(f"secure statistics: {exc.message}") from None
            meta = {"round_id": server.round_id, "min_count": min_count,
                    "width": layout.width, "labels": layout.labels}
            words = layout.pass1_words() if edges is None else layout.pass2_words()

            def contribute(client: AgentClient, shares: dict[str, Any],
                           deliver: Callable[[np.ndarray], None]) -> None:
                masked = client.secure_stats({**meta, "shares": shares}, edges)
                if not isinstance(masked, np.ndarray) or masked.dtype != np.uint32 \
                        or masked.shape != (words,):
                    # refused before the sum: a wrong size must not set the sum's size
                    raise ProtocolError(f"secure stats: expected {words} uint32 values")
                deliver(masked)

            rounds = SecureSum(server, members, run, timeout)
            try:
                rounds.run(contribute)
                total = server.finish_raw()
            except SecAggError as exc:
                raise TrainingError(f"secure statistics: {exc.message}") from None
            finally:
                for name, reason in sorted(rounds.left_out(server.survivors).items()):
                    tell(f"{gone}: {name}: {reason}")
            return total, server.survivors

        total, hosts = secure_sum(used, 1, None, "left out")
        try:
            stats = secure_stats(read_pass1(total, layout, len(hosts)), hosts,
                                 list(want_names) if want_names else None, min_count)
        except ValueError as exc:
            raise TrainingError(f"secure statistics cannot be true ({exc}): a host sent a bad "
                                f"vector, and secure aggregation cannot say which") from None
        edges = public_edges(stats.mean, stats.std, bins)
        try:
            total, again = secure_sum(hosts, 2, edges, "no histograms")
        except TrainingError as exc:
            tell(f"no quantiles: {exc.message}")
            return stats
        if again != hosts:
            tell("no quantiles: not every host of the first pass sent its histograms")
            return stats
        try:
            histograms = read_pass2(total, layout, stats.count, len(hosts))
        except ValueError as exc:
            tell(f"no quantiles: {exc}")
            return stats
        stats.quantiles = quantiles(histograms, edges)
        stats.notes.append(QUANTILE_NOTE)
        return stats
