"""Secure aggregation core: exact sums, dropouts, masking quality, tampering, primitives."""

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

from flctl.core import pki
from flctl.core.aggregation import weighted_average
from flctl.core.secagg import (
    FixedPointError,
    FixedPointParams,
    PeerError,
    SecAggClient,
    SecAggError,
    SecAggResult,
    SecAggServer,
    decode,
    default_threshold,
    encode,
    encode_weighted,
    flatten,
    prg,
    shamir,
    unflatten,
)
from flctl.core.secagg.keys import advert_message
from flctl.errors import FlctlError

HOSTS = [f"host{i}" for i in range(8)]
ROUND = "round-7"
# weight_bound a power of two <= 2^frac_bits: integer example counts are exact weights.
PARAMS = FixedPointParams(frac_bits=20, clip=8.0, weight_bound=1024.0)


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.make_ca("flctl secagg test CA")


@pytest.fixture(scope="module")
def creds(ca: tuple[bytes, bytes]) -> dict[str, tuple[bytes, bytes]]:
    return {h: pki.issue_certificate(*ca, h) for h in HOSTS}


@pytest.fixture(scope="module")
def updates() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {h: rng.normal(0, 0.05, 20_000).astype(np.float32) for h in HOSTS}


WEIGHTS = {h: w for h, w in zip(HOSTS, [1000, 3, 517, 64, 999, 250, 1, 731])}


def run_round(creds: dict[str, tuple[bytes, bytes]], ca_pem: bytes,
              updates: dict[str, np.ndarray], *, gone_after_advertise: Iterable[str] = (),
              gone_before_masked: Iterable[str] = (), gone_before_unmask: Iterable[str] = (),
              server: SecAggServer | None = None) -> tuple[SecAggServer, SecAggResult]:
    """Drive one round in process; hosts in the gone_* sets stop answering at that stage."""
    names = sorted(updates)
    server = server or SecAggServer(names, ROUND, params=PARAMS, ca_pem=ca_pem)
    clients = {h: SecAggClient(h, ROUND, *creds[h], ca_pem, PARAMS) for h in names}
    for host, client in clients.items():
        server.collect_advertisement(host, client.advertise())
    roster = server.roster()
    for host, client in clients.items():
        if host not in gone_after_advertise:
            server.collect_shares(host, client.share(roster))
    for host, boxes in server.route_shares().items():
        clients[host].receive_shares(boxes)
    for host in sorted(clients):
        if host not in set(gone_after_advertise) | set(gone_before_masked):
            server.collect_masked(host, clients[host].masked_input(updates[host], WEIGHTS[host]))
    request = server.unmask_request()
    for host in request["survivors"]:
        if host not in gone_before_unmask:
            server.collect_unmask(host, clients[host].unmask(request["dropped"],
                                                             request["survivors"]))
    return server, server.finish()


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
    assert result.examples_total == sum(WEIGHTS.values())
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
    names = HOSTS[:3]
    server = SecAggServer(names, ROUND, params=PARAMS)
    clients = {h: SecAggClient(h, ROUND, *creds[h], ca[1], PARAMS) for h in names}
    for host, client in clients.items():
        server.collect_advertisement(host, client.advertise())
    roster = server.roster()
    for host, client in clients.items():
        server.collect_shares(host, client.share(roster))
    for host, boxes in server.route_shares().items():
        clients[host].receive_shares(boxes)
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
    for host, client in clients.items():
        server.collect_shares(host, client.share(roster))
    for host, boxes in server.route_shares().items():
        clients[host].receive_shares(boxes)
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


def test_prg_is_chacha20_deterministic_and_seed_sensitive() -> None:
    # RFC 8439 appendix A.1, test vector 1: all-zero key, nonce and counter.
    first = prg.expand(bytes(32), 4).astype("<u4").tobytes().hex()
    assert first == "76b8e0ada0f13d90405d6ae55386bd28"
    seed, other = bytes(range(32)), bytes(range(1, 33))
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
