"""Secure aggregation core: exact sums, dropouts, masking quality, tampering, primitives;
SecAgg+ sparse graphs with per-neighbourhood thresholds."""

from __future__ import annotations

import base64
import itertools
import json
import math
from collections.abc import Iterable

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flctl.core import pki
from flctl.core.aggregation import weighted_average
from flctl.core.secagg import (
    FixedPointError,
    FixedPointParams,
    NeighbourhoodError,
    PeerError,
    SecAggClient,
    SecAggError,
    SecAggResult,
    SecAggServer,
    decode,
    default_neighbours,
    default_threshold,
    effective_degree,
    encode,
    encode_weighted,
    exactsum,
    flatten,
    prg,
    shamir,
    unflatten,
)
from flctl.core.secagg.graph import disconnection_bound, round_graph
from flctl.core.secagg.keys import advert_message
from flctl.errors import FlctlError

HOSTS = [f"host{i}" for i in range(8)]
SPARSE_HOSTS = [f"node{i:02d}" for i in range(16)]
DEGREE = 6  # neighbourhoods of 7; default threshold 5
ROUND = "round-7"
# weight_bound a power of two <= 2^frac_bits: integer example counts are exact weights.
PARAMS = FixedPointParams(frac_bits=20, clip=8.0, weight_bound=1024.0)


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.make_ca("flctl secagg test CA")


@pytest.fixture(scope="module")
def creds(ca: tuple[bytes, bytes]) -> dict[str, tuple[bytes, bytes]]:
    return {h: pki.issue_certificate(*ca, h) for h in HOSTS + SPARSE_HOSTS}


@pytest.fixture(scope="module")
def updates() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {h: rng.normal(0, 0.05, 20_000).astype(np.float32) for h in HOSTS}


@pytest.fixture(scope="module")
def sparse_updates() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {h: rng.normal(0, 0.05, 3_000).astype(np.float32) for h in SPARSE_HOSTS}


WEIGHTS = {h: w for h, w in zip(HOSTS, [1000, 3, 517, 64, 999, 250, 1, 731])}
WEIGHTS.update({h: 40 + 61 * i for i, h in enumerate(SPARSE_HOSTS)})


def start_round(creds: dict[str, tuple[bytes, bytes]], ca_pem: bytes, names: list[str], *,
                server: SecAggServer | None = None, degree: int = 0
                ) -> tuple[SecAggServer, dict[str, SecAggClient], dict]:
    """Advertise stage; clients are told the degree and threshold up front."""
    server = server or SecAggServer(names, ROUND, params=PARAMS, ca_pem=ca_pem, degree=degree)
    told = server.advertise_request()
    clients = {h: SecAggClient(h, ROUND, *creds[h], ca_pem, PARAMS, degree=told["degree"],
                               threshold=told["threshold"]) for h in names}
    for host, client in clients.items():
        server.collect_advertisement(host, client.advertise())
    return server, clients, server.roster()


def run_round(creds: dict[str, tuple[bytes, bytes]], ca_pem: bytes,
              updates: dict[str, np.ndarray], *, server: SecAggServer | None = None,
              degree: int = 0, **gone: Iterable[str]) -> tuple[SecAggServer, SecAggResult]:
    server, clients, roster = start_round(creds, ca_pem, sorted(updates), server=server,
                                          degree=degree)
    return server, finish_round(server, clients, roster, updates, **gone)


def share_keys(server: SecAggServer, clients: dict[str, SecAggClient], roster: dict,
               gone: Iterable[str] = ()) -> None:
    """The share stage: every client not `gone` shares, every box is routed."""
    for host, client in clients.items():
        if host not in gone:
            server.collect_shares(host, client.share(roster))
    for host, boxes in server.route_shares().items():
        clients[host].receive_shares(boxes)


def finish_round(server: SecAggServer, clients: dict[str, SecAggClient], roster: dict,
                 updates: dict[str, np.ndarray], *, gone_after_advertise: Iterable[str] = (),
                 gone_before_masked: Iterable[str] = (),
                 gone_before_unmask: Iterable[str] = ()) -> SecAggResult:
    """Drive the rest of a round; hosts in the gone_* sets stop answering at that stage."""
    share_keys(server, clients, roster, gone_after_advertise)
    for host in sorted(clients):
        if host not in set(gone_after_advertise) | set(gone_before_masked):
            server.collect_masked(host, clients[host].masked_input(updates[host], WEIGHTS[host]))
    request = server.unmask_request()
    for host in request["survivors"]:
        if host not in gone_before_unmask:
            server.collect_unmask(host, clients[host].unmask(request["dropped"],
                                                             request["survivors"]))
    return server.finish()


def weighted_reference(updates: dict[str, np.ndarray], hosts: Iterable[str]) -> np.ndarray:
    hosts = list(hosts)
    total = sum(WEIGHTS[h] * updates[h].astype(np.float64) for h in hosts)
    return total / sum(WEIGHTS[h] for h in hosts)


def mean_error_bound(n_hosts: int, hosts: Iterable[str]) -> float:
    """N * 2^-(f+1) on the sum of q_k * x_k, divided by W = sum q_k."""
    weight_total = sum(WEIGHTS[h] for h in hosts) / PARAMS.weight_bound
    return PARAMS.sum_error_bound(n_hosts) / weight_total


def holds_no_vector(server: SecAggServer) -> bool:
    return not any(isinstance(v, np.ndarray) for v in vars(server).values())


# -- correctness -----------------------------------------------------------------------


def test_weighted_fedavg_matches_the_plain_average_within_the_fixed_point_bound(
        creds, ca) -> None:
    rng = np.random.default_rng(1)
    big = {h: rng.normal(0, 0.05, 100_000).astype(np.float32) for h in HOSTS}
    _, result = run_round(creds, ca[1], big)
    reference = weighted_reference(big, HOSTS)
    bound = mean_error_bound(len(HOSTS), HOSTS)
    error = np.abs(result.mean() - reference).max()
    assert error <= bound
    assert bound < 1e-5  # the bound itself is small enough to be useful
    assert result.examples_total == sum(WEIGHTS[h] for h in HOSTS)
    # Same answer as the project's plain FedAvg (float32 output adds its own rounding).
    plain = weighted_average([[big[h]] for h in HOSTS], [WEIGHTS[h] for h in HOSTS])[0]
    assert np.abs(result.mean() - plain).max() <= bound + 2e-8


def test_full_weights_give_the_plain_float_sum(creds, ca, updates, monkeypatch) -> None:
    for host in HOSTS:
        monkeypatch.setitem(WEIGHTS, host, 1024)
    _, result = run_round(creds, ca[1], updates)
    plain = sum(updates[h].astype(np.float64) for h in HOSTS)
    assert result.weight_total == len(HOSTS)
    assert np.abs(result.total - plain).max() <= PARAMS.sum_error_bound(len(HOSTS))


@pytest.mark.parametrize("after_advertise,before_masked,before_unmask", [
    ((), ("host2", "host5"), ()),
    ((), (), ("host0", "host7")),
    ((), ("host1",), ("host6",)),
    (("host4",), ("host3",), ()),
])
def test_up_to_n_minus_t_dropouts_still_give_the_survivors_sum(
        creds, ca, updates, after_advertise, before_masked, before_unmask) -> None:
    assert default_threshold(len(HOSTS)) == 6
    server, result = run_round(creds, ca[1], updates, gone_after_advertise=after_advertise,
                               gone_before_masked=before_masked,
                               gone_before_unmask=before_unmask)
    senders = [h for h in HOSTS if h not in set(after_advertise) | set(before_masked)]
    assert result.survivors == senders
    assert result.dropped == sorted(before_masked)
    error = np.abs(result.mean() - weighted_reference(updates, senders)).max()
    assert error <= mean_error_bound(len(senders), senders)
    assert server.stage == "done" and holds_no_vector(server)


@pytest.mark.parametrize("after_advertise,before_masked,before_unmask,stage", [
    (("host0", "host1", "host2"), (), (), "sent key shares"),
    ((), ("host0", "host1", "host2"), (), "sent masked input"),
    ((), ("host0", "host1"), ("host2",), "answered the unmask request"),
])
def test_below_the_threshold_the_round_fails_and_keeps_no_sum(
        creds, ca, updates, after_advertise, before_masked, before_unmask, stage) -> None:
    server = SecAggServer(HOSTS, ROUND, params=PARAMS, ca_pem=ca[1])
    with pytest.raises(SecAggError, match=f"only 5 of 8 hosts {stage}; the threshold is 6"):
        run_round(creds, ca[1], updates, gone_after_advertise=after_advertise,
                  gone_before_masked=before_masked, gone_before_unmask=before_unmask,
                  server=server)
    assert server.stage == "failed"
    assert holds_no_vector(server)
    with pytest.raises(SecAggError):
        server.finish()


# -- masking quality -------------------------------------------------------------------


def ks_uniform_pvalue(samples: np.ndarray) -> float:
    """Two-sided KS test against U(0,1), asymptotic p-value with Stephens' small-n
    correction (Numerical Recipes 3rd ed., section 14.3.3)."""
    x = np.sort(samples)
    n = x.size
    ranks = np.arange(1, n + 1) / n
    d = max(float(np.max(ranks - x)), float(np.max(x - (ranks - 1 / n))))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:
        return 1.0
    return min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam)
                            for k in range(1, 101)))


def chi_square_uniform_pvalue(counts: np.ndarray) -> float:
    """Pearson chi-square against equal bins; p from the Wilson-Hilferty (1931) cube-root
    normal approximation, accurate for the 255 degrees of freedom used here."""
    expected = counts.sum() / counts.size
    stat = float(((counts - expected) ** 2).sum() / expected)
    k = counts.size - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_a_masked_vector_looks_uniform_and_the_bare_encoding_does_not(creds, ca) -> None:
    """At p > 1e-6 the two checks raise a false alarm on fresh masks about once in 250,000
    runs; the bare encoding fails them by ten orders of magnitude."""
    rng = np.random.default_rng(3)
    update = rng.normal(0, 0.05, 100_000).astype(np.float32)
    server, clients, roster = start_round(creds, ca[1], HOSTS[:3])
    share_keys(server, clients, roster)
    masked = clients["host0"].masked_input(update, 512)
    bare, _ = encode_weighted(update, 512, PARAMS)

    def pvalues(words: np.ndarray) -> tuple[float, float]:
        counts = np.bincount(words.view(np.uint8), minlength=256)
        return chi_square_uniform_pvalue(counts), ks_uniform_pvalue(words / 2.0 ** 32)

    assert min(pvalues(masked)) > 1e-6
    assert max(pvalues(bare)) < 1e-10


# -- tampering -------------------------------------------------------------------------


def roster_for(creds, ca_pem, names, *, cert_of=None, key_of=None, edit=None):
    """A roster from a server that relays without checking, and the clients."""
    cert_of, key_of = cert_of or {}, key_of or {}
    server = SecAggServer(names, ROUND, params=PARAMS)
    clients = {h: SecAggClient(h, ROUND, key_of.get(h, creds[h][0]),
                               cert_of.get(h, creds[h][1]), ca_pem, PARAMS) for h in names}
    for host, client in clients.items():
        advert = client.advertise()
        if edit and host in edit:
            edit[host](advert)
        server.collect_advertisement(host, advert)
    return server, clients, server.roster()


def forge_signature(advert: dict) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    message = advert_message(ROUND, advert["host"], base64.b64decode(advert["c_pk"]),
                             base64.b64decode(advert["s_pk"]),
                             base64.b64decode(advert["b_commit"]))
    advert["signature"] = base64.b64encode(
        impostor.sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def test_a_forged_signature_names_the_host(creds, ca) -> None:
    _, clients, roster = roster_for(creds, ca[1], HOSTS[:3], edit={"host1": forge_signature})
    with pytest.raises(PeerError, match="host 'host1'.*signature is invalid") as info:
        clients["host0"].share(roster)
    assert info.value.host == "host1"
    # A server given the CA certificate refuses it on arrival as well.
    checking = SecAggServer(HOSTS[:3], ROUND, params=PARAMS, ca_pem=ca[1])
    advert = SecAggClient("host1", ROUND, *creds["host1"], ca[1], PARAMS).advertise()
    forge_signature(advert)
    with pytest.raises(PeerError, match="host1"):
        checking.collect_advertisement("host1", advert)


def test_a_certificate_from_another_ca_names_the_host(creds, ca) -> None:
    foreign = pki.make_ca("flctl secagg test CA")  # same CN, different key
    key, cert = pki.issue_certificate(*foreign, "host2")
    _, clients, roster = roster_for(creds, ca[1], HOSTS[:3], cert_of={"host2": cert},
                                    key_of={"host2": key})
    with pytest.raises(PeerError, match="host 'host2'.*not issued by the project CA"):
        clients["host0"].share(roster)


def test_a_certificate_for_another_name_names_the_host(creds, ca) -> None:
    # host1 presents host2's (valid) certificate and key while claiming to be host1.
    _, clients, roster = roster_for(creds, ca[1], HOSTS[:3], cert_of={"host1": creds["host2"][1]},
                                    key_of={"host1": creds["host2"][0]})
    with pytest.raises(PeerError, match="host 'host1'.*certificate is for 'host2'"):
        clients["host0"].share(roster)


def test_a_revoked_or_non_host_certificate_is_refused(creds, ca) -> None:
    """Peers check the CA's revocation list, and that a certificate is a host's:
    the coordinator's own (client-only) one cannot sign a host's round keys."""
    serial = pki.certificate_info(creds["host1"][1])["serial"]
    names = HOSTS[:3]
    server = SecAggServer(names, ROUND, params=PARAMS)
    clients = {h: SecAggClient(h, ROUND, *creds[h], ca[1], PARAMS, revoked=frozenset({serial}))
               for h in names}
    for host, client in clients.items():
        server.collect_advertisement(host, client.advertise())
    with pytest.raises(PeerError, match="host 'host1'.*certificate is revoked"):
        clients["host0"].share(server.roster())
    checking = SecAggServer(names, ROUND, params=PARAMS, ca_pem=ca[1],
                            revoked=frozenset({serial}))
    with pytest.raises(PeerError, match="revoked"):
        checking.collect_advertisement(
            "host1", SecAggClient("host1", ROUND, *creds["host1"], ca[1], PARAMS).advertise())
    key, cert = pki.issue_certificate(*ca, "host2", role=pki.ROLE_COORDINATOR)
    _, clients, roster = roster_for(creds, ca[1], names, cert_of={"host2": cert},
                                    key_of={"host2": key})
    with pytest.raises(PeerError, match="host 'host2'.*not a host's"):
        clients["host0"].share(roster)


def test_an_advertisement_from_another_round_is_refused(creds, ca) -> None:
    old = SecAggClient("host1", "round-6", *creds["host1"], ca[1], PARAMS).advertise()
    _, clients, roster = roster_for(creds, ca[1], HOSTS[:3],
                                    edit={"host1": lambda a: a.update(old)})
    with pytest.raises(PeerError, match="host 'host1'.*round 'round-6'"):
        clients["host0"].share(roster)


def test_a_corrupted_share_box_names_the_sender(creds, ca) -> None:
    server, clients, roster = roster_for(creds, ca[1], HOSTS[:3])
    for host, client in clients.items():
        server.collect_shares(host, client.share(roster))
    routed = server.route_shares()
    box = bytearray(base64.b64decode(routed["host0"]["host2"]["box"]))
    box[20] ^= 1
    routed["host0"]["host2"]["box"] = base64.b64encode(bytes(box)).decode()
    with pytest.raises(PeerError, match="host 'host2'.*failed authentication"):
        clients["host0"].receive_shares(routed["host0"])


def test_a_wrong_unmask_share_fails_the_round_instead_of_corrupting_the_sum(
        creds, ca, updates) -> None:
    names = HOSTS[:4]
    server, clients, roster = roster_for(creds, ca[1], names)
    share_keys(server, clients, roster)
    for host in names:
        server.collect_masked(host, clients[host].masked_input(updates[host], WEIGHTS[host]))
    request = server.unmask_request()
    for host in names:
        answer = clients[host].unmask(request["dropped"], request["survivors"])
        if host == "host0":  # a lying (or broken) responder: its share of host3's seed
            share = bytearray(base64.b64decode(answer["b_shares"]["host3"]))
            share[-1] ^= 1
            answer["b_shares"]["host3"] = base64.b64encode(bytes(share)).decode()
        server.collect_unmask(host, answer)
    with pytest.raises(SecAggError, match="shares of host3's self-mask seed are inconsistent"):
        server.finish()
    assert server.stage == "failed" and holds_no_vector(server)


def test_a_host_that_withholds_a_share_box_is_refused(creds, ca) -> None:
    server, clients, roster = roster_for(creds, ca[1], HOSTS[:3])
    boxes = clients["host1"].share(roster)
    del boxes["host2"]  # host2 would never be able to remove host1's pair mask
    with pytest.raises(PeerError, match="host 'host1'.*do not match its neighbours"):
        server.collect_shares("host1", boxes)


def test_clients_refuse_unsafe_thresholds_and_revealing_unmask_requests(creds, ca) -> None:
    names = HOSTS[:4]
    server, clients, roster = roster_for(creds, ca[1], names)
    with pytest.raises(SecAggError, match="threshold 2 is unsafe for 4 hosts"):
        clients["host0"].share({**roster, "threshold": 2})
    with pytest.raises(SecAggError, match="unsafe"):
        SecAggServer(names, ROUND, threshold=2)
    for host in names[1:]:
        server.collect_shares(host, clients[host].share(roster))
    routed = server.route_shares()
    for host in names[1:]:
        clients[host].receive_shares(routed[host])
        clients[host].masked_input(np.zeros(10, np.float32), 1)
    client = clients["host1"]
    with pytest.raises(SecAggError, match="host2 is listed as both dropped and surviving"):
        client.unmask(["host2"], ["host1", "host2", "host3"])
    # The refusal uses up the client's one answer: no second try with split lists.
    with pytest.raises(SecAggError, match="cannot unmask now"):
        client.unmask(["host2"], ["host1", "host3"])
    with pytest.raises(SecAggError, match="refusing to unmask with 2 survivors"):
        clients["host2"].unmask(["host3"], ["host1", "host2"])


def test_params_that_could_overflow_are_refused() -> None:
    params = FixedPointParams(frac_bits=20, clip=8.0)
    assert params.max_hosts == 255
    params.check_capacity(255)
    with pytest.raises(FixedPointError, match="256 hosts could overflow"):
        SecAggServer([f"h{i}" for i in range(256)], ROUND, params=params)
    with pytest.raises(FixedPointError):
        FixedPointParams(frac_bits=30, clip=4.0)


# -- SecAgg+: a sparse k-regular graph --------------------------------------------------


def ring_offsets(server: SecAggServer, host: str) -> set[int]:
    """Ring distances (signed) from `host` to its neighbours."""
    assert server.graph is not None
    ring = server.graph.ring
    n, i = len(ring), ring.index(host)
    return {(ring.index(peer) - i + n // 2) % n - n // 2 for peer in server.graph.neighbours(host)}


def test_the_sparse_graph_is_k_regular_shared_and_fixed_by_the_round(creds, ca) -> None:
    server, clients, roster = start_round(creds, ca[1], SPARSE_HOSTS, degree=DEGREE)
    graph = server.graph
    assert graph is not None and roster["degree"] == DEGREE and roster["threshold"] == 5
    # A Harary graph on a shuffled ring: +-1..+-3 ring steps for everyone, 48 edges.
    assert all(len(graph.neighbours(h)) == DEGREE for h in SPARSE_HOSTS)
    assert all(ring_offsets(server, h) == {-3, -2, -1, 1, 2, 3} for h in SPARSE_HOSTS)
    assert len(graph.edges()) == 16 * DEGREE // 2
    assert all(a in graph.adjacency[b] for a, b in graph.edges())
    assert sorted(graph.ring) == SPARSE_HOSTS and list(graph.ring) != SPARSE_HOSTS
    # Every client derives the same graph from the roster, and shares with its neighbours only.
    for host, client in clients.items():
        boxes = client.share(roster)
        assert client.graph == graph
        assert sorted(boxes) == graph.neighbours(host)
    # The same round id and keys give the same ring; another round id another ring.
    keys_of = {h: tuple(base64.b64decode(roster["hosts"][h][field])
                        for field in ("c_pk", "s_pk", "b_commit")) for h in SPARSE_HOSTS}
    assert round_graph(ROUND, keys_of, DEGREE) == graph
    other = round_graph("round-8", keys_of, DEGREE)
    assert other.ring != graph.ring and other.edges() != graph.edges()
    # One host's fresh keys move the ring too: the server cannot know it before the adverts.
    changed = dict(keys_of, node03=(bytes(32), bytes(32), bytes(32)))
    assert round_graph(ROUND, changed, DEGREE).ring != graph.ring


def test_sparse_sum_is_exact_and_hosts_only_deal_with_their_neighbours(
        creds, ca, sparse_updates) -> None:
    server, clients, roster = start_round(creds, ca[1], SPARSE_HOSTS, degree=DEGREE)
    graph = server.graph
    for host, client in clients.items():
        server.collect_shares(host, client.share(roster))
    routed = server.route_shares()
    for host, boxes in routed.items():
        assert sorted(boxes) == graph.neighbours(host)
        clients[host].receive_shares(boxes)
    for host in SPARSE_HOSTS:
        server.collect_masked(host, clients[host].masked_input(sparse_updates[host],
                                                               WEIGHTS[host]))
    request = server.unmask_request()
    for host in SPARSE_HOSTS:
        answer = clients[host].unmask(request["dropped"], request["survivors"])
        # Asked about all 16, a host answers for its own neighbourhood of 7 only.
        assert sorted(answer["b_shares"]) == graph.neighbourhood(host)
        server.collect_unmask(host, answer)
    result = server.finish()
    reference = weighted_reference(sparse_updates, SPARSE_HOSTS)
    assert np.abs(result.mean() - reference).max() <= mean_error_bound(16, SPARSE_HOSTS)
    assert result.examples_total == sum(WEIGHTS[h] for h in SPARSE_HOSTS)
    assert server.stage == "done" and holds_no_vector(server)


def spread_dropouts(server: SecAggServer) -> dict[str, list[str]]:
    """Four of 16 hosts gone, a quarter of the ring apart: every neighbourhood keeps >= 5."""
    ring = server.graph.ring
    return {"gone_after_advertise": [ring[12]], "gone_before_masked": [ring[0], ring[8]],
            "gone_before_unmask": [ring[4]]}


def test_spread_out_dropouts_still_give_the_survivors_sum(creds, ca, sparse_updates) -> None:
    server, clients, roster = start_round(creds, ca[1], SPARSE_HOSTS, degree=DEGREE)
    gone = spread_dropouts(server)
    result = finish_round(server, clients, roster, sparse_updates, **gone)
    senders = sorted(set(SPARSE_HOSTS) - set(gone["gone_after_advertise"])
                     - set(gone["gone_before_masked"]))
    assert result.survivors == senders and result.dropped == sorted(gone["gone_before_masked"])
    error = np.abs(result.mean() - weighted_reference(sparse_updates, senders)).max()
    assert error <= mean_error_bound(len(senders), senders)
    # The pattern was tight: some neighbourhood answered with exactly the threshold.
    answered = set(senders) - set(gone["gone_before_unmask"])
    fewest = min(len(set(server.graph.neighbourhood(h)) & answered) for h in senders)
    assert fewest == server.threshold == 5


@pytest.mark.parametrize("stage,what", [
    ("gone_after_advertise", "sent key shares"),
    ("gone_before_masked", "sent masked input"),
    ("gone_before_unmask", "answered the unmask request"),
])
def test_one_short_neighbourhood_fails_the_round_and_names_its_host(
        creds, ca, sparse_updates, stage, what) -> None:
    server, clients, roster = start_round(creds, ca[1], SPARSE_HOSTS, degree=DEGREE)
    ring = server.graph.ring
    victim = ring[0]
    # Three of the victim's six neighbours go (ring steps -3, +1, +3); no other
    # neighbourhood loses more than two, and 13 of 16 hosts are still there.
    gone = [ring[13], ring[1], ring[3]]
    with pytest.raises(NeighbourhoodError) as info:
        finish_round(server, clients, roster, sparse_updates, **{stage: gone})
    assert info.value.hosts == [victim]
    assert f"the neighbourhood of {victim} fell short: only 4 of its 7 hosts {what};" \
           f" the threshold is 5" in info.value.message
    assert server.stage == "failed" and holds_no_vector(server)
    # The complete graph (threshold 11 of 16) rides out the very same dropouts.
    server, clients, roster = start_round(creds, ca[1], SPARSE_HOSTS)
    assert server.threshold == 11
    result = finish_round(server, clients, roster, sparse_updates, **{stage: gone})
    assert len(result.survivors) == (16 if stage == "gone_before_unmask" else 13)


def test_clients_refuse_a_threshold_at_most_half_a_neighbourhood(creds, ca) -> None:
    _, _, roster = start_round(creds, ca[1], SPARSE_HOSTS, degree=DEGREE)

    def share(edit: dict, **told: int) -> dict:
        """node00 (a fresh client, its advert swapped in) offered an edited roster."""
        me = SecAggClient("node00", ROUND, *creds["node00"], ca[1], PARAMS, **told)
        hosts = {**roster["hosts"], "node00": me.advertise()}
        return me.share({**roster, "hosts": hosts, **edit})

    assert len(share({})) == DEGREE
    with pytest.raises(SecAggError, match=r"threshold 3 is unsafe for neighbourhoods of 7"
                                          r" hosts .*more than half of one"):
        share({"threshold": 3})
    assert len(share({"threshold": 4})) == DEGREE  # 4 of 7 is a majority
    with pytest.raises(SecAggError, match="threshold 8 is unsafe"):  # above a neighbourhood
        share({"threshold": 8})
    # Told degree 6 and threshold 5 at advertise time, a client holds the roster to them.
    assert len(share({}, degree=6, threshold=5)) == DEGREE
    with pytest.raises(SecAggError, match="neighbour degree 8 differs from the 6 announced"):
        share({"degree": 8}, degree=6, threshold=5)
    with pytest.raises(SecAggError, match="threshold 6 differs from the 5 announced"):
        share({"threshold": 6}, degree=6, threshold=5)
    with pytest.raises(SecAggError, match="neighbour degree must be a whole number"):
        share({"degree": -2})
    with pytest.raises(SecAggError, match="threshold 3 is unsafe for neighbourhoods of 7"):
        SecAggServer(SPARSE_HOSTS, ROUND, threshold=3, degree=DEGREE)


def test_degree_rules_and_the_default_degree() -> None:
    assert [effective_degree(k, 16) for k in (0, 1, 5, 6, 14, 15, 99)] == [15, 2, 6, 6, 14, 15, 15]
    assert effective_degree(6, 7) == 6 and effective_degree(5, 6) == 5  # both complete
    assert [default_neighbours(n) for n in (2, 8, 13)] == [1, 7, 12]  # small: complete
    assert [default_neighbours(n) for n in (14, 16, 32, 100, 255, 1000)] == \
        [6, 6, 12, 26, 32, 36]
    # The default is the smallest even degree whose ring stays connected, up to 2^-40,
    # when a random third of the hosts is gone (and at least 6).
    for n in (32, 100, 255):
        k = default_neighbours(n)
        assert disconnection_bound(n, k, n // 3) <= 2.0 ** -40 < \
            disconnection_bound(n, k - 2, n // 3)
    # The default threshold is a 2/3 majority of each neighbourhood; 16 hosts, degree 6:
    server = SecAggServer(SPARSE_HOSTS, ROUND, degree=6)
    assert server.threshold == default_threshold(7) == 5
    assert server.advertise_request() == {"round": ROUND, "degree": 6, "threshold": 5,
                                          "params": FixedPointParams().to_dict()}


# -- primitives ------------------------------------------------------------------------


def test_any_t_shares_reconstruct_and_t_minus_1_raise() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 4, [1, 2, 3, 4, 5, 6])
    for size in (4, 5, 6):
        for subset in itertools.combinations(shares, size):
            assert shamir.reconstruct(subset) == secret
    for subset in itertools.combinations(shares, 3):
        with pytest.raises(shamir.ShamirError, match="3 shares cannot reconstruct"):
            shamir.reconstruct(subset)
    assert isinstance(shamir.ShamirError("x"), FlctlError)
    # Fresh randomness: the same secret splits into different shares each time.
    assert shamir.split(secret, 4, [1, 2, 3, 4])[0].y != shares[0].y
    round_trip = shamir.Share.from_bytes(2, shares[1].y_bytes(), 4)
    assert round_trip == shares[1]


def test_fixed_point_round_trip_clipping_and_modular_sum() -> None:
    rng = np.random.default_rng(5)
    values = rng.uniform(-7.9, 7.9, 10_000).astype(np.float32)
    decoded = decode(encode(values, PARAMS), PARAMS)
    assert np.abs(decoded - values).max() <= 2.0 ** -(PARAMS.frac_bits + 1)
    assert np.abs(decoded - values).max() > 0  # rounding really happens
    clipped = decode(encode(np.array([100.0, -100.0], np.float32), PARAMS), PARAMS)
    assert clipped.tolist() == [PARAMS.limit / PARAMS.scale, -PARAMS.limit / PARAMS.scale]
    # The worst case the bound allows: max_hosts vectors at +-clip sum without wrapping.
    extremes = np.array([8.0, -8.0], np.float32)
    total = np.zeros(2, np.uint32)
    for _ in range(PARAMS.max_hosts):
        total += encode(extremes, PARAMS)
    assert decode(total, PARAMS).tolist() == [8.0 * PARAMS.max_hosts, -8.0 * PARAMS.max_hosts]
    with pytest.raises(FixedPointError, match="NaN"):
        encode(np.array([1.0, np.nan], np.float32), PARAMS)
    with pytest.raises(FixedPointError, match="outside"):
        encode_weighted(values, 2048, PARAMS)
    weighted, _ = encode_weighted(values, 256, PARAMS)
    assert int(weighted[-1]) == 2 ** PARAMS.frac_bits // 4  # q = 256/1024 exactly


def test_flatten_unflatten_round_trip() -> None:
    template = [np.ones((3, 4), np.float32), np.zeros(5, np.float32), np.ones((2, 2, 2))]
    vector = flatten([a * i for i, a in enumerate(template, 1)])
    assert vector.dtype == np.float32 and vector.size == 12 + 5 + 8
    arrays = unflatten(vector, template)
    assert [a.shape for a in arrays] == [(3, 4), (5,), (2, 2, 2)]
    assert arrays[2].dtype == np.float64 and float(arrays[2].sum()) == 24.0
    with pytest.raises(FixedPointError):
        unflatten(vector[:-1], template)


def test_prg_is_aes128_ctr_deterministic_and_seed_sensitive() -> None:
    # NIST SP 800-38A appendix F.5.1, CTR-AES128.Encrypt: keystream XOR plaintext.
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plaintext = bytes.fromhex(
        "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
        "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
    stream = np.zeros(16, np.uint32)
    prg.add_keystream(stream, key, counter, +1)
    ciphertext = bytes(a ^ b for a, b in zip(stream.astype("<u4").tobytes(), plaintext))
    assert ciphertext.hex() == (
        "874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff"
        "5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee")
    # A 32-byte seed becomes key and counter through HKDF-SHA256, as documented.
    seed, other = bytes(range(32)), bytes(range(1, 33))
    material = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"flctl-secagg/v1 prg aes-128-ctr").derive(seed)
    reference = Cipher(algorithms.AES(material[:16]), modes.CTR(material[16:])).encryptor()
    assert prg.expand(seed, 8).astype("<u4").tobytes() == reference.update(bytes(32))
    long = prg.expand(seed, 70_000)  # crosses an internal chunk boundary
    assert np.array_equal(long, prg.expand(seed, 70_000))
    assert np.array_equal(long[:100], prg.expand(seed, 100))
    differing_bits = np.unpackbits((long ^ prg.expand(other, 70_000)).view(np.uint8)).mean()
    assert abs(differing_bits - 0.5) < 0.01
    acc = np.arange(70_000, dtype=np.uint32)
    prg.add_mask(acc, seed, +1)
    assert not np.array_equal(acc, np.arange(70_000, dtype=np.uint32))
    prg.add_mask(acc, seed, -1)
    assert np.array_equal(acc, np.arange(70_000, dtype=np.uint32))
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(bytes(16), 4)


def test_every_payload_survives_a_json_round_trip(creds, ca, updates) -> None:
    """What the agent and coordinator will frame: dicts go through JSON unchanged."""
    names = HOSTS[:3]
    wire = lambda payload: json.loads(json.dumps(payload))  # noqa: E731
    server = SecAggServer(names, ROUND, params=PARAMS, ca_pem=ca[1])
    clients = {h: SecAggClient(h, ROUND, *creds[h], ca[1], PARAMS) for h in names}
    for host, client in clients.items():
        server.collect_advertisement(host, wire(client.advertise()))
    roster = wire(server.roster())
    for host, client in clients.items():
        server.collect_shares(host, wire(client.share(roster)))
    for host, boxes in wire(server.route_shares()).items():
        clients[host].receive_shares(boxes)
    for host in names:
        server.collect_masked(host, clients[host].masked_input(updates[host], WEIGHTS[host]))
    request = wire(server.unmask_request())
    for host in names:
        server.collect_unmask(host, wire(clients[host].unmask(request["dropped"],
                                                              request["survivors"])))
    result = server.finish()
    assert np.abs(result.mean() - weighted_reference(updates, names)).max() \
        <= mean_error_bound(3, names)


@pytest.mark.parametrize("gone", [(), ("host2",)])
def test_the_raw_sum_is_the_sum_of_the_encodings_even_with_a_dropped_host(
        creds, ca, gone) -> None:
    """finish_raw: the caller's own encodings (exact sums) come back added mod 2^32."""
    rng = np.random.default_rng(21)
    values = {h: rng.normal(0, 1e6, 50) for h in HOSTS}
    encoded = {h: exactsum.encode(v, exactsum.REALS) for h, v in values.items()}
    server, clients, roster = start_round(creds, ca[1], HOSTS)
    share_keys(server, clients, roster)
    for host in HOSTS:
        if host not in gone:
            masked = clients[host].masked_vector(encoded[host].copy())
            assert not np.array_equal(masked, encoded[host])
            server.collect_masked(host, masked)
    request = server.unmask_request()
    for host in request["survivors"]:
        server.collect_unmask(host, clients[host].unmask(request["dropped"],
                                                         request["survivors"]))
    total = server.finish_raw()
    senders = [h for h in HOSTS if h not in gone]
    assert server.survivors == senders and server.dropped == sorted(gone)
    assert np.array_equal(total, exactsum.word_sum([encoded[h] for h in senders]))
    summed = exactsum.decode(total, exactsum.REALS, len(senders))
    assert np.allclose(summed, [math.fsum(c) for c in zip(*(values[h] for h in senders))],
                       rtol=1e-12, atol=1e-12)
    assert server.stage == "done" and holds_no_vector(server)
    with pytest.raises(SecAggError, match="cannot masked now"):
        clients[senders[0]].masked_vector(encoded[senders[0]].copy())


def test_a_certificate_checked_once_is_still_refused_when_revoked_or_expired(
        creds, ca, monkeypatch) -> None:
    """The CA signature check is remembered per (certificate, CA); revocation and
    validity are not: they are checked on every advertisement."""
    from flctl.core.secagg import keys

    advert = SecAggClient("host3", ROUND, *creds["host3"], ca[1], PARAMS).advertise()
    keys.verify_advert("host3", advert, ROUND, ca[1])          # checked, and remembered
    serial = pki.certificate_info(creds["host3"][1])["serial"]
    with pytest.raises(PeerError, match="revoked"):
        keys.verify_advert("host3", advert, ROUND, ca[1], frozenset({serial}))
    other_ca = pki.make_ca("another CA")[1]
    with pytest.raises(PeerError, match="not issued by the project CA"):
        keys.verify_advert("host3", advert, ROUND, other_ca)

    class Later(keys.datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return keys.datetime.datetime(2200, 1, 1, tzinfo=tz)

    monkeypatch.setattr(keys.datetime, "datetime", Later)
    with pytest.raises(PeerError, match="expired"):
        keys.verify_advert("host3", advert, ROUND, ca[1])
