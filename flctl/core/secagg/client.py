"""One host's side of a secure-aggregation round (see protocol.py for the flow).

A client object lives for exactly one round: its X25519 keys and self-mask
seed are drawn in the constructor and never reused, and each stage may run
once, in order. Its private material never leaves it except as Shamir shares
(encrypted to peers) and, at unmask time, the shares the rules allow.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flctl.core.secagg import keys, prg, shamir
from flctl.core.secagg.fixedpoint import FixedPointError, FixedPointParams, encode_weighted
from flctl.core.secagg.graph import CommunicationGraph, check_degree, round_graph
from flctl.core.secagg.keys import PeerError, PeerKeys, SecAggError, b64decode, b64encode
from flctl.core.secagg.protocol import (
    NeighbourFn,
    check_round,
    host_list,
    mask_sign,
    share_index,
    validate_threshold,
)

_STAGES = ("advertise", "share", "receive", "masked", "unmask", "done")


class SecAggClient:
    """Call advertise -> share -> receive_shares -> masked_input -> unmask.

    The graph comes from the roster: its neighbour `degree` (0: complete) and
    threshold travel there, and the client derives the ring itself (graph.py).
    `degree` and `threshold` given here are what the coordinator announced with
    the advertise request, before anyone's keys were known; the roster must then
    repeat them, so the server cannot pick them after seeing the keys (which
    decide the ring). Left as None they are taken from the roster unchecked.
    Either way the client refuses a threshold that is not more than half of
    every neighbourhood. `neighbours` replaces the derived graph with a fixed
    symmetric function (both sides must use the same one; degree must be 0).
    """

    def __init__(self, host: str, round_id: str | int, signing_key_pem: bytes, cert_pem: bytes,
                 ca_pem: bytes, params: FixedPointParams | None = None, *,
                 neighbours: NeighbourFn | None = None, degree: int | None = None,
                 threshold: int | None = None, revoked: frozenset[int] = frozenset()) -> None:
        self.host = host
        self.round_id = str(round_id)
        self.params = params or FixedPointParams()
        self.clipped = 0  # coordinates clipped by masked_input
        self.graph: CommunicationGraph | None = None  # known once the roster is in
        self._signing_key_pem = signing_key_pem
        self._cert_pem = cert_pem
        self._ca_pem = ca_pem
        self._revoked = revoked  # serials the CA's revocation list names
        if neighbours is not None and degree:
            raise SecAggError("secure aggregation: give either a neighbour function or a"
                              " neighbour degree, not both")
        self._neighbours = neighbours
        self._announced_degree = None if degree is None else check_degree(degree)
        self._announced_threshold = threshold
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b = os.urandom(prg.SEED_BYTES)
        self._stage = "advertise"
        self._hosts: list[str] = []
        self._threshold = 0
        self._peers: dict[str, PeerKeys] = {}
        # host -> (my share of its s_sk, my share of its b); includes myself.
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}

    def _enter(self, stage: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"secure aggregation: {self.host} cannot {stage} now"
                              f" (stage is {self._stage})")
        self._stage = _STAGES[_STAGES.index(stage) + 1]

    def _own_keys(self) -> tuple[bytes, bytes]:
        return self._c_sk.public_key().public_bytes_raw(), self._s_sk.public_key().public_bytes_raw()

    def advertise(self) -> dict[str, Any]:
        """The signed public keys for the server to relay."""
        self._enter("advertise")
        c_pk, s_pk = self._own_keys()
        b_commit = keys.commit_seed(self.round_id, self.host, self._b)
        signature = keys.sign(self._signing_key_pem,
                              keys.advert_message(self.round_id, self.host, c_pk, s_pk, b_commit))
        return {"host": self.host, "round": self.round_id, "c_pk": b64encode(c_pk),
                "s_pk": b64encode(s_pk), "b_commit": b64encode(b_commit),
                "cert": self._cert_pem.decode("ascii"), "signature": b64encode(signature)}

    def _graph_terms(self, roster: dict[str, Any]) -> tuple[int, int]:
        """(degree, threshold) from the roster, refused if they differ from the announced."""
        degree = check_degree(roster.get("degree"))
        threshold = roster.get("threshold")
        announced = ((self._announced_degree, degree, "neighbour degree"),
                     (self._announced_threshold, threshold, "threshold"))
        for expected, got, what in announced:
            if expected is not None and got != expected:
                raise SecAggError(f"secure aggregation: the roster's {what} {got!r} differs"
                                  f" from the {expected} announced for round {self.round_id}")
        return degree, threshold  # type: ignore[return-value]

    def share(self, roster: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Verify every peer, then one encrypted share box per neighbour (keyed by name)."""
        self._enter("share")
        check_round(roster, self.round_id, "roster")
        if FixedPointParams.from_dict(roster.get("params") or {}) != self.params:
            raise FixedPointError(f"roster fixed-point parameters {roster.get('params')} differ"
                                  f" from this host's {self.params.to_dict()}")
        adverts = roster.get("hosts")
        if not isinstance(adverts, dict) or self.host not in adverts:
            raise SecAggError(f"secure aggregation: the roster does not list {self.host}")
        degree, self._threshold = self._graph_terms(roster)
        self._hosts = sorted(adverts)
        # Every advert, not only the neighbours': their keys seed the ring, so an
        # unchecked one would let the server steer it.
        self._peers = {h: keys.verify_advert(h, adverts[h], self.round_id, self._ca_pem,
                                              self._revoked)
                       for h in self._hosts}
        if (self._peers[self.host].c_pk, self._peers[self.host].s_pk) != self._own_keys():
            raise PeerError(self.host, "the roster carries keys this host did not make")
        self.graph = round_graph(
            self.round_id, {h: (p.c_pk, p.s_pk, p.b_commit) for h, p in self._peers.items()},
            degree, self._neighbours)
        validate_threshold(self._threshold, len(self._hosts), self.graph.neighbourhood_sizes())
        group = self.graph.neighbours(self.host)
        xs = [share_index(self._hosts, h) for h in [self.host, *group]]
        s_shares = shamir.split(self._s_sk.private_bytes_raw(), self._threshold, xs)
        b_shares = shamir.split(self._b, self._threshold, xs)
        self._held[self.host] = (s_shares[0], b_shares[0])
        boxes = {}
        for peer, s_share, b_share in zip(group, s_shares[1:], b_shares[1:]):
            box = keys.seal_shares(self._c_sk, self._peers[peer].c_pk, self.round_id,
                                   self.host, peer, s_share.y_bytes() + b_share.y_bytes())
            boxes[peer] = {"round": self.round_id, "from": self.host, "to": peer,
                           "box": b64encode(box)}
        return boxes

    def receive_shares(self, incoming: dict[str, dict[str, Any]]) -> None:
        """Open the boxes the server routed; their senders are the peers masked with."""
        self._enter("receive")
        assert self.graph is not None
        group = set(self.graph.neighbours(self.host))
        x = share_index(self._hosts, self.host)
        size = shamir.SHARE_BYTES
        for sender, payload in incoming.items():
            if sender not in group:
                raise PeerError(sender, "sent shares but is not a neighbour in the roster")
            if not isinstance(payload, dict) or payload.get("from") != sender \
                    or payload.get("to") != self.host or payload.get("round") != self.round_id:
                raise PeerError(sender, "share box is addressed to another host or round")
            box = b64decode(payload.get("box"), sender, "share box")
            plain = keys.open_shares(self._c_sk, self._peers[sender].c_pk, self.round_id,
                                     sender, self.host, box)
            if len(plain) != 2 * size:
                raise PeerError(sender, "share box holds the wrong number of bytes")
            self._held[sender] = (shamir.Share.from_bytes(x, plain[:size], self._threshold),
                                  shamir.Share.from_bytes(x, plain[size:], self._threshold))
        if len(self._held) < self._threshold:
            raise SecAggError(f"secure aggregation: only {len(self._held)} hosts of"
                              f" {self.host}'s neighbourhood shared keys with it; the threshold"
                              f" is {self._threshold}")

    def masked_input(self, update: np.ndarray, weight: float) -> np.ndarray:
        """y = [encode(q*update), k] + PRG(b) +- PRG(s_uv) for every peer that shared."""
        y, self.clipped = encode_weighted(update, weight, self.params)
        return self.masked_vector(y)

    def masked_vector(self, y: np.ndarray) -> np.ndarray:
        """y + PRG(b) +- PRG(s_uv) for any uint32 encoding the caller made (a
        model update above, statistics in exactsum.py), masked in place."""
        self._enter("masked")
        if not isinstance(y, np.ndarray) or y.dtype != np.uint32 or y.ndim != 1:
            raise SecAggError("secure aggregation: the input to mask must be 1-D uint32")
        prg.add_mask(y, self._b, +1)
        for peer in sorted(self._held):
            if peer != self.host:
                seed = keys.mask_seed(self._s_sk, self._peers[peer].s_pk, self.round_id,
                                      self.host, peer)
                prg.add_mask(y, seed, mask_sign(self.host, peer))
        return y

    def unmask(self, dropped: list[str], survivors: list[str]) -> dict[str, Any]:
        """Shares of s_sk for `dropped`, of b for `survivors`, for the hosts of this
        host's neighbourhood (the lists name the whole round); answered once, never
        both for one host."""
        self._enter("unmask")
        assert self.graph is not None
        dropped = host_list(dropped, "dropped")
        survivors = host_list(survivors, "survivors")
        both = set(dropped) & set(survivors)
        if both:
            raise SecAggError(f"secure aggregation: refusing to unmask: {sorted(both)[0]} is"
                              f" listed as both dropped and surviving")
        if self.host not in survivors:
            raise SecAggError(f"secure aggregation: {self.host} sent its input but is not"
                              f" listed as a survivor")
        strangers = [h for h in dropped + survivors if h not in self.graph.adjacency]
        if strangers:
            raise SecAggError(f"secure aggregation: {strangers[0]} is not in the roster of"
                              f" round {self.round_id}")
        mine = self.graph.neighbourhood(self.host)
        unknown = [h for h in dropped + survivors if h in mine and h not in self._held]
        if unknown:
            raise SecAggError(f"secure aggregation: {unknown[0]} never shared keys with"
                              f" {self.host}")
        near = [h for h in survivors if h in self._held]
        if len(near) < self._threshold:
            where = "" if self.graph.complete else f" in {self.host}'s neighbourhood"
            raise SecAggError(f"secure aggregation: refusing to unmask with {len(near)}"
                              f" survivors{where}; the threshold is {self._threshold}")
        return {"host": self.host, "round": self.round_id,
                "s_sk_shares": {h: b64encode(self._held[h][0].y_bytes())
                                for h in dropped if h in self._held},
                "b_shares": {h: b64encode(self._held[h][1].y_bytes()) for h in near}}
