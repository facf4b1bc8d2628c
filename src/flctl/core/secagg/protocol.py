"""The rules client and server of a secure-aggregation round must agree on.

One round (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017; Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020):

  advertise  client -> server: signed X25519 public keys (c_pk, s_pk)
             server -> clients: the roster (all adverts, threshold, params)
  share      client -> server -> peer: AES-GCM boxes with the peer's Shamir
             shares of the sender's s_sk and self-mask seed b
  masked     client -> server: y = encode(x) + PRG(b) + sum_{v>u} PRG(s_uv)
             - sum_{v<u} PRG(s_uv)   (mod 2^32; names order the pair)
  unmask     server -> survivors: who dropped; survivors answer with shares
             of s_sk for dropped hosts and of b for surviving hosts, never
             both for one host; the server removes the masks and decodes.

Threshold. `default_threshold(n)` = max(2, ceil(2n/3)), Bonawitz et al.'s
choice for an active server; every threshold must exceed n/2 (clients
refuse a roster that does not): then no two disjoint groups of survivors can
both reach it, so a server that tells half the hosts "u dropped" and the
other half "u survived" cannot collect both s_sk_u and b_u. A round
tolerates n - t dropouts.

Neighbours. `complete_graph` pairs every host with every other (SecAgg).
SecAgg+ replaces it with a sparse k-regular graph: any symmetric
`NeighbourFn` plugs into client and server; shares then go only to a host's
neighbours. A sparse graph also wants a per-neighbourhood threshold (t of k,
Bell et al. section 3), which this module does not derive yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

from flctl.core.secagg.keys import SecAggError

# (host, every host of the roster, sorted) -> the peers whose masks pair with it.
NeighbourFn = Callable[[str, Sequence[str]], list[str]]


def complete_graph(host: str, hosts: Sequence[str]) -> list[str]:
    return [h for h in hosts if h != host]


def default_threshold(n_hosts: int) -> int:
    return max(2, math.ceil(2 * n_hosts / 3))


def validate_threshold(threshold: int, n_hosts: int) -> None:
    if n_hosts < 2:
        raise SecAggError(f"secure aggregation needs at least 2 hosts, got {n_hosts}")
    if not (isinstance(threshold, int) and 2 <= threshold <= n_hosts and 2 * threshold > n_hosts):
        raise SecAggError(
            f"threshold {threshold} is unsafe for {n_hosts} hosts: it must be more than half"
            f" of them and at most all of them")


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
