"""Who masks with whom: the communication graph of one round (SecAgg+).

Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead" (CCS 2020) replace SecAgg's
complete graph with a sparse k-regular one: a host shares its secrets with,
and masks against, only its k neighbours, so its work grows with k instead
of n. The graph here is a Harary graph H(k, n) (the circulant that joins
each host to the k/2 hosts on either side of it on a ring), laid on a
pseudo-random ring order of the roster, as in Google's SecAgg+
implementation (federated-compute, fcp/secagg/server/graph_parameter_finder.cc,
read for its parameter reasoning only). A Harary graph is k-connected: cutting
it takes k/2 consecutive ring positions removed in two places.

Nobody picks the ring. Client and server each compute it from the roster:
the ring orders hosts by SHA-256(seed || host) with seed = SHA-256 over the
round id and every roster host's name and advertised keys (c_pk, s_pk and
the self-mask commitment; `graph_seed`). The keys are fresh random values,
signed by their hosts and verified by every client, so the server cannot
aim the graph by choosing the round id offline, and it sees the ring only
once the advertisements are in. Left to it: leaving hosts out of the roster
(each try costs a visible non-advertiser; the thresholds bound how many), and
a host colluding with it could grind its own keys after seeing the others'
(a commit-then-reveal round would close that; not done).

Degree. k = 0 or k >= n - 1 means the complete graph (SecAgg). An odd k is
raised to the next even one, so H(k, n) is always the plain circulant and
exists for every n (`effective_degree`). `default_neighbours(n)` is the
O(log n) choice described there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flctl.core.secagg.keys import SecAggError, canonical
from flctl.core.secagg.protocol import NeighbourFn

# default_neighbours: the share of hosts that may be dropped or colluding at once (what
# default_threshold tolerates), the statistical security of the connectivity bound, and
# the smallest sparse degree worth having (see there).
ASSUMED_BAD_FRACTION = 1 / 3
SECURITY_BITS = 40
MIN_SPARSE_DEGREE = 6


def check_degree(degree: object) -> int:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise SecAggError(f"secure aggregation: neighbour degree must be a whole number >= 0"
                          f" (0: complete graph), got {degree!r}")
    return degree


def effective_degree(degree: int, n_hosts: int) -> int:
    """The degree actually used among n hosts: n - 1 (complete) for 0 or >= n - 1,
    an odd degree raised to the next even one."""
    degree = check_degree(degree)
    complete = max(n_hosts - 1, 0)
    if degree == 0:
        return complete
    return min(degree + degree % 2, complete)


def disconnection_bound(n_hosts: int, degree: int, bad_hosts: int) -> float:
    """Union bound on P[removing `bad_hosts` uniformly random hosts disconnects a
    Harary graph H(degree, n) on a random ring]: a cut needs degree/2 consecutive
    hosts gone in two places, n (n - degree - 1) / 2 placements, each all-bad with
    probability C(bad, degree) / C(n, degree)."""
    if degree >= n_hosts - 1:
        return 0.0
    placements = n_hosts * (n_hosts - degree - 1) / 2
    return placements * math.comb(bad_hosts, degree) / math.comb(n_hosts, degree)


def default_neighbours(n_hosts: int) -> int:
    """Sensible neighbour degree for n hosts; n - 1 (the complete graph) when small.

    The smallest even k >= MIN_SPARSE_DEGREE whose permuted Harary graph stays
    connected, except with probability 2^-SECURITY_BITS, when a uniformly random
    third of the hosts drop out or collude (`disconnection_bound`; a disconnected
    survivor graph would reveal the sums of its parts). This grows as
    (SECURITY_BITS ln 2 + 2 ln n) / ln 3 = O(log n), Bell et al.'s regime:
    6 at n = 16, 12 at 32, 26 at 100, 32 at 255, 36 at 1000. Degree 6 is the
    floor because with the default per-neighbourhood threshold any two dropouts
    anywhere are then survivable (degree 4 survives only one). When k would join
    a host to at least half of the others the sparse graph saves little and is
    less tolerant of dropouts than the complete one, so the complete graph it is
    (every n below 14).
    """
    if n_hosts < 2:
        return 0
    bad = math.floor(n_hosts * ASSUMED_BAD_FRACTION)
    degree = MIN_SPARSE_DEGREE
    while 2 * degree < n_hosts - 1 and \
            disconnection_bound(n_hosts, degree, bad) > 2.0 ** -SECURITY_BITS:
        degree += 2
    return degree if 2 * degree < n_hosts - 1 else n_hosts - 1


def graph_seed(round_id: str, advertised: Mapping[str, Sequence[bytes]]) -> bytes:
    """SHA-256 over the round id and every host's name and advertised keys."""
    parts: list[bytes | str] = [b"graph", round_id]
    for host in sorted(advertised):
        parts += [host, *advertised[host]]
    return hashlib.sha256(canonical(*parts)).digest()


def ring_order(hosts: Iterable[str], seed: bytes) -> tuple[str, ...]:
    """A pseudo-random permutation: hosts sorted by SHA-256(seed || host)."""
    return tuple(sorted(hosts, key=lambda h: hashlib.sha256(seed + canonical(h)).digest()))


@dataclass(frozen=True)
class CommunicationGraph:
    """A symmetric graph over the roster; `ring` is the order a Harary graph is
    laid on (the sorted roster for other graphs)."""

    hosts: tuple[str, ...]
    ring: tuple[str, ...]
    adjacency: Mapping[str, frozenset[str]]

    def neighbours(self, host: str) -> list[str]:
        return sorted(self.adjacency[host])

    def neighbourhood(self, host: str) -> list[str]:
        """The host and its neighbours: everyone holding a share of its secrets."""
        return sorted(self.adjacency[host] | {host})

    def neighbourhood_sizes(self) -> set[int]:
        return {len(peers) + 1 for peers in self.adjacency.values()}

    @property
    def degree(self) -> int:
        return max((len(p) for p in self.adjacency.values()), default=0)

    @property
    def complete(self) -> bool:
        return all(len(p) == len(self.hosts) - 1 for p in self.adjacency.values())

    def edges(self) -> set[tuple[str, str]]:
        return {(a, b) for a, peers in self.adjacency.items() for b in peers if a < b}


def complete_graph_of(hosts: Iterable[str]) -> CommunicationGraph:
    names = tuple(sorted(set(hosts)))
    return CommunicationGraph(names, names, {h: frozenset(names) - {h} for h in names})


def harary_graph(hosts: Iterable[str], degree: int, seed: bytes) -> CommunicationGraph:
    """H(degree, n) on the ring `ring_order(hosts, seed)`; degree as in `effective_degree`."""
    names = tuple(sorted(set(hosts)))
    k = effective_degree(degree, len(names))
    if k >= len(names) - 1:
        return complete_graph_of(names)
    ring = ring_order(names, seed)
    n = len(ring)
    adjacency = {host: frozenset(ring[(i + step) % n] for offset in range(1, k // 2 + 1)
                                 for step in (offset, -offset))
                 for i, host in enumerate(ring)}
    return CommunicationGraph(names, ring, adjacency)


def graph_from_function(hosts: Iterable[str], neighbours: NeighbourFn) -> CommunicationGraph:
    """A caller's own NeighbourFn as a graph, refused unless it is symmetric and
    names only other roster hosts (both sides must agree who masks with whom)."""
    names = tuple(sorted(set(hosts)))
    adjacency = {h: frozenset(neighbours(h, list(names))) for h in names}
    for host, peers in adjacency.items():
        strange = sorted(p for p in peers if p == host or p not in adjacency)
        if strange:
            raise SecAggError(f"secure aggregation: the neighbour function gives {host}"
                              f" the neighbour {strange[0]!r}, which is not another host")
        one_way = sorted(p for p in peers if host not in adjacency[p])
        if one_way:
            raise SecAggError(f"secure aggregation: the neighbour function is not symmetric"
                              f" ({host} -> {one_way[0]})")
    return CommunicationGraph(names, names, adjacency)


def round_graph(round_id: str, advertised: Mapping[str, Sequence[bytes]], degree: int,
                neighbours: NeighbourFn | None = None) -> CommunicationGraph:
    """The graph client and server both derive from the roster (see the module doc)."""
    if neighbours is not None:
        return graph_from_function(advertised, neighbours)
    return harary_graph(advertised, degree, graph_seed(round_id, advertised))
