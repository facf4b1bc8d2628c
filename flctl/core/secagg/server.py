"""The coordinator's side of a secure-aggregation round (see protocol.py for the flow).

The server only relays and sums: it never sees an unmasked input, only the
masked modular sum, and it learns the plain sum only when, for every host
whose mask must go, at least `threshold` hosts of that host's neighbourhood
answer the unmask request (with the complete graph: `threshold` survivors).
Any failure (too few hosts at any stage, overall or in one neighbourhood,
a secret that cannot be reconstructed) wipes the running sum and leaves the
object in the "failed" stage, so there is never a partial result to read;
a short neighbourhood raises `NeighbourhoodError` naming its host(s), as
early as the shortage is known (route_shares or unmask_request when hosts
dropped, finish when answers are missing). Masked inputs are folded into one
uint32 sum as they arrive: server memory is one vector whatever the number
of hosts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flctl.core.secagg import keys, prg, shamir
from flctl.core.secagg.fixedpoint import FixedPointParams, decode_weighted
from flctl.core.secagg.graph import (
    CommunicationGraph,
    check_degree,
    effective_degree,
    graph_from_function,
    round_graph,
)
from flctl.core.secagg.keys import PeerError, SecAggError, b64decode
from flctl.core.secagg.protocol import (
    NeighbourFn,
    check_round,
    default_threshold,
    mask_sign,
    share_index,
    validate_threshold,
)


class NeighbourhoodError(SecAggError):
    """A needed secret cannot be rebuilt: too few of its owner's neighbourhood took part."""

    def __init__(self, message: str, hosts: Sequence[str]) -> None:
        super().__init__(message)
        self.hosts = list(hosts)  # every host whose neighbourhood fell short


@dataclass
class SecAggResult:
    """total = sum_k q_k * update_k and weight_total = sum_k q_k over the survivors."""

    total: np.ndarray
    weight_total: float
    survivors: list[str]
    dropped: list[str]
    params: FixedPointParams = field(default_factory=FixedPointParams)

    @property
    def examples_total(self) -> float:
        """sum of the survivors' weights (example counts), in the hosts' own units."""
        return self.weight_total * self.params.weight_bound

    def mean(self) -> np.ndarray:
        """The weighted (FedAvg) mean of the survivors' updates, float64."""
        return self.total / self.weight_total


class SecAggServer:
    """collect_advertisement* -> roster -> collect_shares* -> route_shares ->
    collect_masked* -> unmask_request -> collect_unmask* -> finish.

    `degree` is the neighbour degree k of the SecAgg+ graph (0: complete, as
    is any k >= n - 1; an odd k is raised to the next even one). `threshold`
    is per neighbourhood (the host and its k neighbours); None picks
    `default_threshold` of that size. Send `advertise_request()` with the
    advertise step so clients can hold the roster to it.
    """

    def __init__(self, hosts: Sequence[str], round_id: str | int, threshold: int | None = None,
                 params: FixedPointParams | None = None, *, ca_pem: bytes | None = None,
                 neighbours: NeighbourFn | None = None, degree: int = 0,
                 revoked: frozenset[int] = frozenset()) -> None:
        self.hosts = sorted(set(hosts))
        self.round_id = str(round_id)
        if neighbours is not None and degree:
            raise SecAggError("secure aggregation: give either a neighbour function or a"
                              " neighbour degree, not both")
        self.degree = check_degree(degree)
        self._neighbours = neighbours
        if neighbours is not None:
            planned = graph_from_function(self.hosts, neighbours).neighbourhood_sizes()
        else:
            planned = {effective_degree(self.degree, len(self.hosts)) + 1}
        self.threshold = default_threshold(max(planned)) if threshold is None else threshold
        validate_threshold(self.threshold, len(self.hosts), planned)
        self.params = params or FixedPointParams()
        self.params.check_capacity(len(self.hosts))
        self.stage = "advertise"
        self.graph: CommunicationGraph | None = None  # fixed by roster()
        self._ca_pem = ca_pem
        self._revoked = revoked
        self._adverts: dict[str, dict[str, Any]] = {}
        self._mask_keys: dict[str, tuple[bytes, bytes]] = {}  # host -> (s_pk, b_commit)
        self._graph_keys: dict[str, tuple[bytes, bytes, bytes]] = {}  # + c_pk: seeds the ring
        self._boxes: dict[str, dict[str, dict[str, Any]]] = {}  # recipient -> sender -> box
        self._sharers: set[str] = set()
        self._masked: set[str] = set()
        self._sum: np.ndarray | None = None
        # responder -> {"s_sk": {owner: share}, "b": {owner: share}}
        self._answers: dict[str, dict[str, dict[str, shamir.Share]]] = {}
        self._dropped: list[str] = []
        self._survivors: list[str] = []

    # -- helpers -----------------------------------------------------------------
    def _expect(self, stage: str, host: str | None = None,
                members: Sequence[str] | set[str] = ()) -> None:
        if self.stage != stage:
            raise SecAggError(f"secure aggregation: cannot do '{stage}' work in stage"
                              f" '{self.stage}'")
        if host is not None and host not in members:
            raise PeerError(host, f"is not a participant of the '{stage}' stage")

    def _fail(self, message: str, short: Sequence[str] = ()) -> SecAggError:
        self.stage = "failed"
        self._sum = None
        self._answers.clear()
        text = f"secure aggregation round {self.round_id} failed: {message}"
        return NeighbourhoodError(text, short) if short else SecAggError(text)

    def _need(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise self._fail(f"only {count} of {len(self.hosts)} hosts {what};"
                             f" the threshold is {self.threshold}")

    def _need_each(self, counts: dict[str, int], what: str) -> None:
        """Fail, naming them, if any of these hosts' secrets has fewer than t holders."""
        assert self.graph is not None
        short = sorted(h for h, count in counts.items() if count < self.threshold)
        if short:
            host = short[0]
            also = f" (also short: {', '.join(short[1:])})" if len(short) > 1 else ""
            raise self._fail(
                f"the neighbourhood of {host} fell short: only {counts[host]} of its"
                f" {len(self.graph.neighbourhood(host))} hosts {what}; the threshold is"
                f" {self.threshold}{also}", short)

    def _within(self, host: str, group: set[str], *, itself: bool) -> int:
        """How many of `host`'s neighbours (and itself, if `itself`) are in `group`."""
        assert self.graph is not None
        around = self.graph.adjacency[host] | ({host} if itself else set())
        return len(around & group)

    def _needed_dropped(self) -> list[str]:
        """Dropped hosts whose pair masks are in the sum: those with a masked neighbour."""
        return [h for h in self._dropped if self._within(h, self._masked, itself=False)]

    @property
    def roster_hosts(self) -> list[str]:
        return sorted(self._adverts)

    def advertise_request(self) -> dict[str, Any]:
        """What the advertise step tells clients, before any keys are known."""
        return {"round": self.round_id, "params": self.params.to_dict(),
                "degree": self.degree, "threshold": self.threshold}

    # -- advertise -----------------------------------------------------------------
    def collect_advertisement(self, host: str, advert: dict[str, Any]) -> None:
        self._expect("advertise", host, self.hosts)
        if host in self._adverts:
            raise PeerError(host, "advertised twice")
        if self._ca_pem is not None:
            keys.verify_advert(host, advert, self.round_id, self._ca_pem, self._revoked)
        elif not isinstance(advert, dict) or advert.get("host") != host:
            raise PeerError(host, "advertisement is not from this host")
        c_pk = b64decode(advert.get("c_pk"), host, "c_pk", keys.KEY_BYTES)
        s_pk = b64decode(advert.get("s_pk"), host, "s_pk", keys.KEY_BYTES)
        b_commit = b64decode(advert.get("b_commit"), host, "b_commit", keys.KEY_BYTES)
        self._mask_keys[host] = (s_pk, b_commit)
        self._graph_keys[host] = (c_pk, s_pk, b_commit)
        self._adverts[host] = advert

    def roster(self) -> dict[str, Any]:
        """Close the advertise stage; what every advertised host receives."""
        self._expect("advertise")
        self._need(len(self._adverts), "advertised keys")
        try:
            graph = round_graph(self.round_id, self._graph_keys, self.degree, self._neighbours)
            validate_threshold(self.threshold, len(graph.hosts), graph.neighbourhood_sizes())
        except SecAggError as exc:
            raise self._fail(exc.message) from exc
        self.graph = graph
        self.stage = "share"
        return {"round": self.round_id, "threshold": self.threshold, "degree": self.degree,
                "params": self.params.to_dict(), "hosts": dict(self._adverts)}

    # -- share ---------------------------------------------------------------------
    def collect_shares(self, host: str, boxes: dict[str, dict[str, Any]]) -> None:
        self._expect("share", host, self._adverts)
        if host in self._sharers:
            raise PeerError(host, "sent shares twice")
        assert self.graph is not None
        expected = set(self.graph.neighbours(host))
        if set(boxes) != expected:
            missing = sorted(expected - set(boxes)) or sorted(set(boxes) - expected)
            raise PeerError(host, f"share boxes do not match its neighbours ({missing[0]!r})")
        for peer, box in boxes.items():
            if peer not in self._adverts or not isinstance(box, dict) \
                    or box.get("from") != host or box.get("to") != peer:
                raise PeerError(host, f"sent a share box for {peer!r} that cannot be routed")
            check_round(box, self.round_id, f"share box from {host}")
        for peer, box in boxes.items():
            self._boxes.setdefault(peer, {})[host] = box
        self._sharers.add(host)

    def route_shares(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Close the share stage: recipient -> {sender: box}, for the hosts that shared."""
        self._expect("share")
        self._need(len(self._sharers), "sent key shares")
        self._need_each({h: self._within(h, self._sharers, itself=True) for h in self._sharers},
                        "sent key shares")
        self.stage = "masked"
        return {r: {s: b for s, b in self._boxes.get(r, {}).items() if s in self._sharers}
                for r in sorted(self._sharers)}

    # -- masked input --------------------------------------------------------------
    def collect_masked(self, host: str, masked: np.ndarray) -> None:
        self._expect("masked", host, self._sharers)
        if host in self._masked:
            raise PeerError(host, "sent its masked input twice")
        if not isinstance(masked, np.ndarray) or masked.dtype != np.uint32 or masked.ndim != 1:
            raise PeerError(host, "masked input must be a 1-D uint32 array")
        if self._sum is None:
            self._sum = masked.copy()
        elif masked.shape != self._sum.shape:
            raise PeerError(host, f"masked input has {masked.size} values, expected"
                                  f" {self._sum.size}")
        else:
            self._sum += masked
        self._masked.add(host)

    def unmask_request(self) -> dict[str, Any]:
        """Close the masked stage; what every survivor is asked."""
        self._expect("masked")
        self._need(len(self._masked), "sent masked input")
        self._survivors = sorted(self._masked)
        self._dropped = sorted(self._sharers - self._masked)
        holders = {h: self._within(h, self._masked, itself=True) for h in self._survivors}
        holders.update({h: self._within(h, self._masked, itself=False)
                        for h in self._needed_dropped()})
        self._need_each(holders, "sent masked input")
        self.stage = "unmask"
        return {"round": self.round_id, "dropped": list(self._dropped),
                "survivors": list(self._survivors)}

    # -- unmask --------------------------------------------------------------------
    def collect_unmask(self, host: str, answer: dict[str, Any]) -> None:
        self._expect("unmask", host, self._survivors)
        if host in self._answers:
            raise PeerError(host, "answered the unmask request twice")
        if not isinstance(answer, dict) or answer.get("host") != host:
            raise PeerError(host, "unmask answer is not from this host")
        check_round(answer, self.round_id, f"unmask answer from {host}")
        s_part, b_part = answer.get("s_sk_shares"), answer.get("b_shares")
        assert self.graph is not None
        mine = set(self.graph.neighbourhood(host))
        if not isinstance(s_part, dict) or not isinstance(b_part, dict) \
                or not set(s_part) <= set(self._dropped) & mine \
                or not set(b_part) <= set(self._survivors) & mine:
            raise PeerError(host, "unmask answer names hosts it was not asked about")
        x = share_index(self.roster_hosts, host)
        try:
            self._answers[host] = {
                kind: {owner: shamir.Share.from_bytes(
                    x, b64decode(text, host, f"share of {owner}"), self.threshold)
                    for owner, text in part.items()}
                for kind, part in (("s_sk", s_part), ("b", b_part))}
        except shamir.ShamirError as exc:
            raise PeerError(host, f"unmask answer holds a malformed share: {exc}") from exc

    def _reconstruct(self, owner: str, kind: str) -> bytes:
        what = "self-mask seed" if kind == "b" else "mask key"
        shares = [answer[kind][owner] for _, answer in sorted(self._answers.items())
                  if owner in answer[kind]]
        try:
            secret = shamir.reconstruct(shares, keys.KEY_BYTES)
        except shamir.ShamirError as exc:
            raise self._fail(f"cannot recover the {what} of {owner}: {exc}") from exc
        s_pk, b_commit = self._mask_keys[owner]
        if kind == "b":
            consistent = keys.commit_seed(self.round_id, owner, secret) == b_commit
        else:
            own_pk = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()
            consistent = own_pk == s_pk
        if not consistent:
            raise self._fail(f"the shares of {owner}'s {what} are inconsistent")
        return secret

    def finish(self) -> SecAggResult:
        """Remove every mask and decode; raises (and keeps nothing) below the threshold."""
        total = self.finish_raw()
        summed, weight_total = decode_weighted(total, self.params)
        return SecAggResult(summed, weight_total, list(self._survivors), list(self._dropped),
                            self.params)

    @property
    def survivors(self) -> list[str]:
        """The hosts whose inputs are in the sum (known once unmasking starts)."""
        return list(self._survivors)

    @property
    def dropped(self) -> list[str]:
        """Hosts that shared keys but sent no input (their pair masks removed)."""
        return list(self._dropped)

    def finish_raw(self) -> np.ndarray:
        """Remove every mask: the survivors' encodings added modulo 2^32, for a
        caller with its own encoding (exactsum.py); same checks as `finish`."""
        self._expect("unmask")
        self._need(len(self._answers), "answered the unmask request")
        shares = {h: sum(h in a["b"] for a in self._answers.values()) for h in self._survivors}
        shares.update({h: sum(h in a["s_sk"] for a in self._answers.values())
                       for h in self._needed_dropped()})
        self._need_each(shares, "answered the unmask request")
        try:
            return self._unmask()
        except Exception as exc:  # a bad share (or a bug) must not leave a sum behind
            if self.stage == "failed":
                raise
            raise self._fail(str(exc)) from exc

    def _unmask(self) -> np.ndarray:
        assert self._sum is not None
        total = self._sum
        for host in self._survivors:
            prg.add_mask(total, self._reconstruct(host, "b"), -1)
        assert self.graph is not None
        for gone in self._needed_dropped():
            s_sk = X25519PrivateKey.from_private_bytes(self._reconstruct(gone, "s_sk"))
            for host in self.graph.neighbours(gone):
                if host in self._masked:
                    seed = keys.mask_seed(s_sk, self._mask_keys[host][0], self.round_id,
                                          gone, host)
                    prg.add_mask(total, seed, -mask_sign(host, gone))
        self._sum = None
        self.stage = "done"
        return total
