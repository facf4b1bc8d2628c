"""flctl stats through secure aggregation, with real agents: the same counts,
means, standard deviations and label totals as the plain statistics (and as
numpy on the pooled rows), no min, max or per-host labels, a small host adds
nothing, other columns are left out in one line, and bad totals are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import flctl.data
from flctl.coordinator.secure_stats import secure_federated_stats
from flctl.coordinator.stats import describe_findings, federated_stats
from flctl.core.fedstats import QUANTILES, check_summary, combine, host_summary, scales_differ
from flctl.core.messages import Message
from flctl.core.secagg.exactsum import COUNTS, REALS, decode, encode
from flctl.core.securestats import (
    UNAVAILABLE,
    Layout,
    host_pass1,
    mean_std,
    public_edges,
    read_pass1,
    secure_stats,
)
from flctl.errors import TrainingError
from flctl.net.agent_client import AgentClient
from test_coordinator import Federation
from test_stats import _clients, _table, make_csv_federation, rename_a_column_of_h0


@pytest.fixture
def csv_federation(tmp_path: Path):
    fed, tables = make_csv_federation(tmp_path)
    yield fed, tables
    fed.close()


def _secure(fed: Federation, told: list[str] | None = None, **kwargs):
    return secure_federated_stats(_clients(fed), ca_pem=(fed.root / "ca.crt").read_bytes(),
                                  tell=(told if told is not None else []).append, **kwargs)


def _pooled(tables, hosts=(0, 1, 3)) -> np.ndarray:
    used = [tables[i][0].astype(np.float32).astype(np.float64) for i in hosts]
    used[hosts.index(1)][2, 1] = np.nan      # the fixture's missing value on h1
    return np.vstack(used)


# ---------------------------------------------------------------- the math

def test_pass1_encodings_sum_to_the_pooled_totals() -> None:
    rng = np.random.default_rng(0)
    parts = [_table(rng, n) for n in (40, 100, 6)]
    parts[1][0][3, 1] = np.nan
    layout = Layout(width=3, labels=4)
    total = sum(host_pass1(x, y, layout, 10).astype(np.uint64) for x, y in parts)
    totals = read_pass1(total.astype(np.uint32), layout, 3)
    pooled = np.vstack([x for x, _ in parts[:2]])          # the 6-row host adds nothing
    assert totals.rows == 140 and totals.contributing == 2
    assert totals.count.tolist() == [140, 139, 140] and totals.missing.tolist() == [0, 1, 0]
    labels = np.concatenate([y for _, y in parts[:2]])
    assert totals.labels.tolist() == [int((labels == k).sum()) for k in range(4)]
    mean, std = mean_std(totals)
    assert np.allclose(mean, np.nanmean(pooled, axis=0), rtol=1e-12)
    assert np.allclose(std[:2], np.nanstd(pooled, axis=0)[:2], rtol=1e-9)
    assert std[2] == 0.0                                   # constant 7.0: exactly zero
    edges = public_edges(mean, std, 8)
    assert np.allclose(edges[0, [0, -1]], [mean[0] - 4 * std[0], mean[0] + 4 * std[0]])
    assert edges[2, 0] == 6.5 and edges[2, -1] == 7.5


def _both(parts, width: int, labels: int):
    """(plain, secure) statistics of the same hosts' tables."""
    plain = combine([check_summary(f"h{i}", *host_summary(x, y), width=width)
                     for i, (x, y) in enumerate(parts)])
    layout = Layout(width=width, labels=labels)
    total = sum(host_pass1(x, y, layout, 10).astype(np.uint64) for x, y in parts)
    secure = secure_stats(read_pass1(total.astype(np.uint32), layout, len(parts)),
                          [f"h{i}" for i in range(len(parts))], None, 10)
    return plain, secure


def test_standardize_auto_decides_as_the_plain_statistics_do() -> None:
    """Without min and max, E[x^2]/E[|x|] stands in for a feature's magnitude: the
    digits' sparse edge pixels (mean + 4 std ~ 0.1, max 1..16) still say 'similar'."""
    digits = np.load(Path(flctl.data.__file__).parent / "digits.npz")
    x, y = digits["x"].astype(np.float64), digits["y"]
    parts = [(x[i::3], y[i::3]) for i in range(3)]
    plain, secure = _both(parts, 64, 16)
    assert not scales_differ(plain) and not scales_differ(secure)
    naive = dataclasses.replace(secure, magnitude=np.abs(secure.mean) + 4 * secure.std)
    assert scales_differ(naive)                # what the obvious stand-in would decide
    rng = np.random.default_rng(3)
    parts = [_table(rng, 50), _table(rng, 40)]
    plain, secure = _both(parts, 3, 4)
    assert scales_differ(plain) and scales_differ(secure)
    pooled = np.vstack([x for x, _ in parts])
    expected = (pooled ** 2).sum(axis=0) / np.abs(pooled).sum(axis=0)
    assert np.allclose(secure.magnitude, expected, rtol=1e-12)
    assert 900 < secure.magnitude[0] < 1300 and secure.magnitude[2] == 7.0


def test_totals_that_cannot_be_true_are_refused() -> None:
    layout = Layout(width=1, labels=0)
    # rows 20, one contributor, count 20, missing 0; sum 100 but sum of squares 1
    forged = np.concatenate([encode(np.array([20, 1, 20, 0]), COUNTS),
                             encode(np.array([100.0, 1.0, 100.0]), REALS)])
    with pytest.raises(ValueError, match="sum of squares"):
        read_pass1(forged, layout, 2)
    forged[COUNTS.limbs * 2] += 1     # count 21 of 20 rows
    with pytest.raises(ValueError, match="do not add up"):
        read_pass1(forged, layout, 2)
    assert decode(forged[:COUNTS.limbs], COUNTS, 2).tolist() == [20]


# ---------------------------------------------------------------- through agents

def test_secure_stats_equal_the_plain_ones(csv_federation) -> None:
    fed, tables = csv_federation
    plain = federated_stats(_clients(fed))
    told: list[str] = []
    secure = _secure(fed, told)
    pooled = _pooled(tables)
    # h2 has 5 rows: it took part (its masks cancel) but added nothing
    assert secure.hosts == ["h0", "h1", "h2", "h3"] and secure.withheld == []
    assert secure.rows == plain.rows == 60 + 80 + 70
    assert np.array_equal(secure.count, plain.count)
    assert np.array_equal(secure.missing, plain.missing) and secure.missing.tolist() == [0, 1, 0]
    assert np.allclose(secure.mean, plain.mean, rtol=1e-9, atol=0)
    assert np.allclose(secure.std, plain.std, rtol=1e-9, atol=0)
    assert np.allclose(secure.mean, np.nanmean(pooled, axis=0), rtol=1e-12)
    assert np.allclose(secure.std, np.nanstd(pooled, axis=0), rtol=1e-9)
    assert secure.label_totals() == plain.label_totals()
    assert secure.constant == plain.constant == [2]
    assert np.isnan(secure.min).all() and np.isnan(secure.max).all() and secure.labels == {}
    # quantiles: within a bin of the public mean +- 4 std histograms
    edges = public_edges(secure.mean, secure.std, 32)
    for feature in (0, 1):
        exact = np.nanquantile(pooled[:, feature], QUANTILES)
        width = edges[feature, 1] - edges[feature, 0]
        assert np.all(np.abs(secure.quantiles[feature] - exact) <= width), feature
    assert not any(line.startswith("left out") for line in told), told
    findings = describe_findings(secure)
    assert UNAVAILABLE in findings
    assert any("1 of 4 hosts had fewer than 10 rows" in line for line in findings), findings
    assert not any(line.startswith("h3:") for line in findings)   # no shifted-host test


def test_the_json_says_what_is_unavailable(csv_federation) -> None:
    fed, _ = csv_federation
    document = json.loads(json.dumps(_secure(fed).as_dict()))
    assert document["secure_aggregation"] is True
    assert document["labels"] == {} and document["label_skew"] == {}
    assert sum(document["label_totals"].values()) == 210
    assert all(f["min"] is None and f["max"] is None for f in document["features"])
    assert document["features"][0]["quantiles"]["0.5"] is not None
    notes = " ".join(document["notes"])
    assert "min, max and per-host label counts are not computed" in notes
    assert "skew and shifted hosts cannot be computed" in notes
    assert "quantiles are read off histograms over mean +- 4 std" in notes


def test_a_small_host_adds_nothing_and_other_columns_are_left_out(csv_federation,
                                                                  tmp_path: Path) -> None:
    fed, tables = csv_federation
    rename_a_column_of_h0(fed, tables, tmp_path)
    told: list[str] = []
    stats = _secure(fed, told)
    assert stats.hosts == ["h1", "h2", "h3"] and stats.rows == 80 + 70
    pooled = _pooled(tables, (1, 3))
    assert np.allclose(stats.mean, np.nanmean(pooled, axis=0), rtol=1e-12)
    line = next(line for line in told if line.startswith("left out: h0"))
    assert "renamed.csv" in line and "'roughness'" in line and "'smoothness'" in line


def test_a_host_sending_a_bad_vector_spoils_the_whole_result(tmp_path: Path) -> None:
    def forge(request: Message, reply: Message) -> Message:
        if request.kind == "secagg_stats" and not request.arrays:
            bad = reply.arrays[0].copy()
            bad[COUNTS.limbs * 2] += 5          # five more values of feature 0 than rows
            return Message(reply.kind, reply.meta, [bad])
        return reply

    fed = Federation(tmp_path, [20, 30, 40], tamper={1: forge})
    try:
        with pytest.raises(TrainingError, match="cannot be true .* cannot say which"):
            _secure(fed)
    finally:
        fed.close()


def test_a_host_failing_its_masked_step_is_left_out_and_the_rest_summed(tmp_path: Path) -> None:
    def fail(request: Message, reply: Message) -> Message:
        if request.kind == "secagg_stats" and not request.arrays:
            raise TrainingError("disk on fire")
        return reply

    fed = Federation(tmp_path, [20, 30, 40, 50], tamper={2: fail})
    try:
        told: list[str] = []
        stats = _secure(fed, told)
        assert stats.rows == 20 + 30 + 50 and "h2" not in stats.hosts
        assert any(line.startswith("left out: h2") and "disk on fire" in line for line in told)
        expected = np.vstack([np.asarray(fed.means[i], np.float64)[None].repeat(n, 0)
                              for i, n in ((0, 20), (1, 30), (3, 50))])
        assert np.allclose(stats.mean, expected.mean(axis=0), rtol=1e-6)
    finally:
        fed.close()


def test_a_host_sending_a_vector_of_another_size_is_left_out(tmp_path: Path) -> None:
    def shorten(request: Message, reply: Message) -> Message:
        if request.kind == "secagg_stats" and not request.arrays:
            return Message(reply.kind, reply.meta, [reply.arrays[0][:-1].copy()])
        return reply

    fed = Federation(tmp_path, [20, 30, 40, 50], tamper={0: shorten})
    try:
        told: list[str] = []
        stats = _secure(fed, told)
        assert stats.rows == 30 + 40 + 50 and "h0" not in stats.hosts
        assert any(line.startswith("left out: h0") and "uint32 values" in line
                   for line in told), told
    finally:
        fed.close()


def test_an_unsafe_threshold_or_a_single_host_is_one_line(tmp_path: Path) -> None:
    fed = Federation(tmp_path, [20, 30, 40])
    try:
        with pytest.raises(TrainingError, match="secure statistics: threshold 1 is unsafe"):
            _secure(fed, threshold=1)
        with pytest.raises(TrainingError, match="need at least 2 hosts; 1 can take part"):
            secure_federated_stats(_clients(fed)[:1], ca_pem=(fed.root / "ca.crt").read_bytes())
    finally:
        fed.close()


class _Lying(AgentClient):
    """A coordinator that tells this host another min_count than the round was made for."""

    def secure_stats(self, meta, edges=None):
        return super().secure_stats({**meta, "min_count": 10 ** 9}, edges)


def test_hosts_told_other_parameters_refuse_instead_of_exposing_one_host(tmp_path: Path) -> None:
    """Every host but h0 told min_count 10^9 would send zeros, and the 'sum' would be
    h0's own sums: the parameters are bound into the signed round id, so they refuse."""
    fed = Federation(tmp_path, [20, 30, 40, 50])
    try:
        clients = [AgentClient(e, fed.context, timeout=30) if e.host == "h0" else
                   _Lying(e, fed.context, timeout=30) for e in fed.endpoints]
        told: list[str] = []
        with pytest.raises(TrainingError, match="secure statistics: .*only 1 of 4 hosts sent"):
            secure_federated_stats(clients, ca_pem=(fed.root / "ca.crt").read_bytes(),
                                   tell=told.append)
        assert sum("not the ones the round's keys were made for" in line
                   for line in told) == 3, told
    finally:
        fed.close()
