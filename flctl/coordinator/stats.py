"""`flctl stats`, and the statistics a run standardises with: ask every host
for its sums, check them, combine them (flctl.core.fedstats).

Two passes: the sums (counts, sums, squares, min, max, labels), then
histograms in bins between the federation's min and max, for quantiles. A
host whose answer cannot be true, whose columns differ from the others'
(by name, for CSV files), or that does not answer is left out with one
line naming it (and its file and the column); the statistics never include
a host whose data failed a check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flctl.core.fedstats import (
    DEFAULT_BINS,
    MIN_COUNT,
    FederatedStats,
    HostSummary,
    check_summary,
    combine,
    histogram_edges,
    quantiles,
)
from flctl.core.messages import Message
from flctl.core.text import clean_text
from flctl.errors import FlctlError, TrainingError
from flctl.net.agent_client import AgentClient
from flctl.net.fanout import worker_pool

Tell = Callable[[str], None]


def _ask(clients: Sequence[AgentClient], min_count: int, edges: np.ndarray | None = None
         ) -> dict[str, Message | str]:
    """Each client's stats reply, or the reason it has none."""
    def one(client: AgentClient) -> Message | str:
        try:
            return client.stats(min_count, edges)
        except FlctlError as exc:
            return exc.message
    with worker_pool(len(clients)) as pool:
        return dict(zip([c.name for c in clients], pool.map(one, clients)))


def where_of(meta: dict[str, Any]) -> str:
    """The host's data file, as it names it (cleaned, for one line)."""
    return clean_text(meta.get("file") or "its data")[:200]


def names_of(meta: dict[str, Any]) -> tuple[str, ...] | None:
    """The host's column names (CSV), if it sent a list of strings."""
    names = meta.get("features")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def column_difference(names: tuple[str, ...], want: tuple[str, ...]) -> str:
    for i, (got, expected) in enumerate(zip(names, want)):
        if got != expected:
            return (f"column {i + 1} is {clean_text(got)[:60]!r} where the other hosts have "
                    f"{clean_text(expected)[:60]!r}")
    if len(names) > len(want):
        return f"it has an extra column {clean_text(names[len(want)])[:60]!r}"
    return f"it lacks the column {clean_text(want[len(names)])[:60]!r}"


def federated_stats(clients: Sequence[AgentClient], *, min_count: int = MIN_COUNT,
                    bins: int = DEFAULT_BINS, tell: Tell = lambda line: None
                    ) -> FederatedStats:
    """The federation's statistics over `clients`; `tell` gets one line per
    host left out or warned about."""
    replies = _ask(clients, min_count)
    good: dict[str, Message] = {}
    for name, reply in sorted(replies.items()):
        if isinstance(reply, str):
            tell(f"left out: {name}: {reply}")
        else:
            good[name] = reply
    # the columns most hosts have, by name (CSV) or by count
    layouts = Counter((names_of(r.meta), len(r.arrays[0][0]) if r.arrays and np.ndim(r.arrays[0]) == 2
                       else -1) for r in good.values())
    if not layouts:
        raise TrainingError("no host answered with statistics")
    (want_names, width), _ = layouts.most_common(1)[0]
    summaries: list[HostSummary] = []
    for name, reply in sorted(good.items()):
        names = names_of(reply.meta)
        if want_names is not None and names is not None and names != want_names:
            tell(f"left out: {name}: {where_of(reply.meta)}: {column_difference(names, want_names)}")
            continue
        try:
            if len(reply.arrays) != 2:
                raise ValueError(f"expected 2 arrays, got {len(reply.arrays)}")
            summaries.append(check_summary(name, reply.meta.get("rows"), reply.arrays[0],
                                           reply.arrays[1], width))
        except ValueError as exc:
            tell(f"left out: {name}: bad statistics from {where_of(reply.meta)} ({exc})")
    try:
        stats = combine(summaries, list(want_names) if want_names else None, min_count)
    except ValueError as exc:
        raise TrainingError(f"no statistics: {exc}") from None
    for name in stats.withheld:
        tell(f"{name}: fewer than {min_count} rows: it contributes nothing (min_count)")
    edges = histogram_edges(stats, bins)
    counted = set(stats.hosts)
    used = [c for c in clients if c.name in counted]
    histograms = np.zeros((edges.shape[0], bins), np.int64)
    for name, reply in sorted(_ask(used, min_count, edges).items()):
        counts = None if isinstance(reply, str) or len(reply.arrays) != 1 else \
            np.asarray(reply.arrays[0])
        if counts is None or counts.shape != histograms.shape or counts.dtype != np.int64 or \
                counts.min(initial=0) < 0:
            tell(f"{name}: no usable histogram; the quantiles leave it out")
            continue
        histograms += counts
    stats.quantiles = quantiles(histograms, edges)
    return stats


def describe_findings(stats: FederatedStats) -> list[str]:
    """Warnings worth a line: constant features, hosts whose features look
    unlike the federation's, what secure aggregation left unknown."""
    names = stats.feature_names or [f"x{i}" for i in range(len(stats.count))]
    lines = []
    if stats.constant:
        shown = ", ".join(names[i] for i in stats.constant[:10])
        more = f" and {len(stats.constant) - 10} more" if len(stats.constant) > 10 else ""
        lines.append(f"{len(stats.constant)} feature(s) constant on every host ({shown}{more}): "
                     f"they carry nothing and are left at 0")
    lines += stats.notes
    for host, index, sigmas in stats.shifted[:20]:
        lines.append(f"{host}: feature {names[index]!r} averages {sigmas:+.1f} standard "
                     f"deviations from the other hosts' mean (other units or data?)")
    return lines
