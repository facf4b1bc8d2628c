"""The rules client and server of a secure-aggregation round must agree on.

One round (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017; Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020):

  advertise  client -> server: signed X25519 public keys (c_pk, s_pk)
             server -> clients: the roster (all adverts, threshold, neighbour
             degree, params); both sides derive the graph from it (graph.py)
  share      client -> server -> neighbour: AES-GCM boxes with the
             neighbour's Shamir shares of the sender's s_sk and self-mask seed b
  masked     client -> server: y = encode(x) + PRG(b) + sum_{v>u} PRG(s_uv)
             - sum_{v<u} PRG(s_uv)   (mod 2^32; v over u's neighbours that
             shared; names order the pair)
  unmask     server -> survivors: who dropped; each survivor answers, for the
             hosts of its own neighbourhood only, with shares of s_sk for
             dropped ones and of b for surviving ones, never both for one
             host; the server removes the masks and decodes.

Neighbourhoods. Host u's neighbourhood is u and its neighbours: the hosts
holding shares of u's secrets. `complete_graph` (SecAgg) makes it the whole
roster; SecAgg+ uses a sparse k-regular graph (graph.py), so it is k + 1
hosts. Any symmetric `NeighbourFn` also plugs in on both sides.

Threshold t, per neighbourhood. A secret of u is rebuilt from t shares, all
from u's neighbourhood: the server can remove u's self mask (u survived) or
its pair masks (u dropped) only when t hosts of that neighbourhood answer,
and a round fails, learning nothing, as soon as one needed neighbourhood is
short (the error names the host). Every t must exceed half of every
neighbourhood (clients refuse a roster that does not): then no two disjoint
groups of u's neighbourhood both reach t, so a server that tells half of
them "u dropped" and the other half "u survived" cannot collect both s_sk_u
and b_u. `default_threshold(m)` = max(2, ceil(2m/3)) for neighbourhoods of m
hosts, Bonawitz et al.'s choice for an active server: t > (m + c) / 2 holds
for up to c < m/3 colluding neighbours. With the complete graph m = n and all
of this is plain SecAgg (a round tolerates n - t dropouts); with degree k a
round survives any k - t + 1 dropouts and many more when they are spread out.

What a sparse graph gives up: its guarantees are statistical. The
server learns the sum over each part of the graph that survivors and
removed masks leave connected, so privacy rests on the random ring keeping
the survivors connected (graph.py bounds that for the default degree), and
on no neighbourhood holding t colluders; with the complete graph both are
certain. Like the SecAgg core before it, this one has no consistency-check
round (Bonawitz et al. section 4.4, Bell et al. section 4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Callable

from flctl.core.secagg.keys import SecAggError

# (host, every host of the roster, sorted) -> the peers whose masks pair with it.
NeighbourFn = Callable[[str, Sequence[str]], list[str]]


def complete_graph(host: str, hosts: Sequence[str]) -> list[str]:
    return [h for h in hosts if h != host]


def default_threshold(neighbourhood_size: int) -> int:
    """Shares needed per secret for neighbourhoods of m hosts (n for SecAgg)."""
    return max(2, math.ceil(2 * neighbourhood_size / 3))


def validate_threshold(threshold: object, n_hosts: int,
                       neighbourhood_sizes: Iterable[int] | None = None) -> None:
    """2 <= t <= every neighbourhood, and 2t > every neighbourhood (module doc)."""
    if n_hosts < 2:
        raise SecAggError(f"secure aggregation needs at least 2 hosts, got {n_hosts}")
    sizes = sorted(set(neighbourhood_sizes or [n_hosts]))
    if sizes == [n_hosts]:
        group, part = f"{n_hosts} hosts", "them"
    else:
        span = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        group, part = f"neighbourhoods of {span} hosts (a host and its neighbours)", "one"
    if isinstance(threshold, bool) or not isinstance(threshold, int) \
            or not 2 <= threshold <= sizes[0] or 2 * threshold <= sizes[-1]:
        raise SecAggError(
            f"threshold {threshold} is unsafe for {group}: it must be more than half"
            f" of {part} and at most all of {part}")


def share_index(hosts: Sequence[str], host: str) -> int:
    """Shamir evaluation point of `host`: its 1-based position in the sorted roster."""
    return hosts.index(host) + 1


def mask_sign(own: str, peer: str) -> int:
    """+1 if `own` adds PRG(s_uv) for this pair, -1 if it subtracts it."""
    return 1 if peer > own else -1


def check_round(payload: dict, round_id: str, what: str) -> None:
    if payload.get("round") != round_id:
        raise SecAggError(f"{what} is for round {payload.get('round')!r}, not {round_id!r}")


def host_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise SecAggError(f"{what} must be a list of host names")
    if len(set(value)) != len(value):
        raise SecAggError(f"{what} names a host twice")
    return list(value)
