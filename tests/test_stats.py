"""Federated statistics: the hosts' sums combine to the pooled data's
statistics exactly (quantiles to a bin), a host's impossible numbers or
other columns leave it out in one line, and small hosts reveal nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator.stats import describe_findings, federated_stats
from flctl.core.fedstats import (
    QUANTILES,
    check_summary,
    combine,
    histogram_edges,
    host_histograms,
    host_summary,
    quantiles,
    scales_differ,
    standardize_transform,
)
from flctl.errors import TrainingError
from flctl.net.agent_client import AgentClient
from test_coordinator import Federation

HEADER = ["area", "smoothness", "count", "label"]


def _table(rng: np.random.Generator, rows: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    x = np.column_stack([rng.normal(1000 + shift, 300, rows),     # thousands
                         rng.uniform(0.05, 0.15, rows),           # below one
                         np.full(rows, 7.0)])                     # constant everywhere
    return x, rng.integers(0, 3, rows)


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, header=HEADER,
               missing: tuple[int, int] | None = None) -> Path:
    lines = [",".join(header)]
    for i, (row, label) in enumerate(zip(x, y)):
        cells = [repr(float(v)) for v in row]
        if missing is not None and i == missing[0]:
            cells[missing[1]] = ""
        lines.append(",".join(cells + [str(int(label))]))
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- the math

def test_sums_combine_to_the_pooled_statistics() -> None:
    rng = np.random.default_rng(0)
    parts = [_table(rng, n) for n in (40, 100, 25)]
    parts[1][0][3, 1] = np.nan                       # a missing value
    summaries = [check_summary(f"h{i}", *host_summary(x, y), width=3)
                 for i, (x, y) in enumerate(parts)]
    stats = combine(summaries)
    pooled = np.vstack([x for x, _ in parts])
    assert stats.rows == 165
    assert stats.count.tolist() == [165, 164, 165] and stats.missing.tolist() == [0, 1, 0]
    assert np.allclose(stats.mean, np.nanmean(pooled, axis=0), rtol=1e-12)
    assert np.allclose(stats.std, np.nanstd(pooled, axis=0), rtol=1e-9, atol=1e-12)
    assert np.array_equal(stats.min, np.nanmin(pooled, axis=0))
    assert np.array_equal(stats.max, np.nanmax(pooled, axis=0))
    assert stats.constant == [2]
    labels = np.concatenate([y for _, y in parts])
    assert stats.label_totals() == {k: int((labels == k).sum()) for k in range(3)}
    edges = histogram_edges(stats, 64)
    histograms = sum(host_histograms(x, edges) for x, _ in parts)
    found = quantiles(histograms, edges)
    for feature in (0, 1):
        width = edges[feature, 1] - edges[feature, 0]
        exact = np.nanquantile(pooled[:, feature], QUANTILES)
        assert np.all(np.abs(found[feature] - exact) <= width + 1e-12), (found, exact)


def test_a_small_host_reveals_nothing() -> None:
    rng = np.random.default_rng(1)
    x, y = _table(rng, 9)
    rows, sums, labels = host_summary(x, y, min_count=10)
    assert rows == 9 and not sums.any() and labels.size == 0
    summary = check_summary("tiny", rows, sums, labels, 3)
    assert summary.withheld
    big = check_summary("big", *host_summary(*_table(rng, 50)), width=3)
    stats = combine([summary, big])
    assert stats.hosts == ["big"] and stats.withheld == ["tiny"] and stats.rows == 50
    assert not host_histograms(x, histogram_edges(stats), rows_ok=False).any()


@pytest.mark.parametrize("break_it, message", [
    (lambda s, lab: s.__setitem__((0, 0), s[0, 0] + 1), "do not add up"),
    (lambda s, lab: s.__setitem__((3, 0), 1.0), "sum of squares"),
    (lambda s, lab: s.__setitem__((4, 1), 99.0), "min > max"),
    (lambda s, lab: lab.__setitem__(0, lab[0] + 5), "label counts add up"),
    (lambda s, lab: s.__setitem__((2, 0), np.inf), "do not add up"),
    (lambda s, lab: s.__setitem__((2, 0), 1e300), "outside its min and max"),
])
def test_impossible_sums_are_refused(break_it, message) -> None:
    rows, sums, labels = host_summary(*_table(np.random.default_rng(2), 30))
    break_it(sums, labels)
    with pytest.raises(ValueError, match=message):
        check_summary("h", rows, sums, labels, 3)


def test_standardizing_is_decided_by_the_scales() -> None:
    rng = np.random.default_rng(3)
    stats = combine([check_summary("h", *host_summary(*_table(rng, 50)), width=3)])
    assert scales_differ(stats)                      # ~1000 against ~0.1
    transform = standardize_transform(stats)
    x, _ = _table(rng, 200)
    x[0, 1] = np.nan
    out = transform.apply(x)
    assert out[0, 1] == 0 and not np.isnan(out).any()      # missing -> the mean
    assert np.all(out[:, 2] == 0)                          # constant -> 0
    assert abs(out[1:, 0].mean()) < 0.3 and 0.7 < out[1:, 0].std() < 1.3
    digits_like = combine([check_summary("h", *host_summary(
        rng.integers(0, 17, (50, 4)).astype(float), rng.integers(0, 3, 50)), width=4)])
    assert not scales_differ(digits_like)


# ---------------------------------------------------------------- through agents

def make_csv_federation(tmp_path: Path) -> tuple[Federation, list]:
    """Four CSV hosts: h1 misses a value, h2 has 5 rows, h3's area is in other units."""
    rng = np.random.default_rng(4)
    fed = Federation(tmp_path, [10, 10, 10, 10])
    tables = [_table(rng, n) for n in (60, 80, 5, 70)]
    tables[3] = _table(rng, 70, shift=5000.0)       # h3's "area" is in other units
    for i, (service, (x, y)) in enumerate(zip(fed.services, tables)):
        missing = (2, 1) if i == 1 else None
        path = _write_csv(tmp_path / f"h{i}.csv", x, y, missing=missing)
        service.config = dataclasses.replace(service.config, data_path=str(path))
        service._load_data()
    return fed, tables


@pytest.fixture
def csv_federation(tmp_path: Path):
    fed, tables = make_csv_federation(tmp_path)
    yield fed, tables
    fed.close()


def _clients(fed: Federation) -> list[AgentClient]:
    return [AgentClient(e, fed.context, timeout=30) for e in fed.endpoints]


def test_stats_through_agents(csv_federation) -> None:
    fed, tables = csv_federation
    told: list[str] = []
    stats = federated_stats(_clients(fed), tell=told.append)
    used = [tables[i][0] for i in (0, 1, 3)]
    used[1] = used[1].copy()
    used[1][2, 1] = np.nan
    pooled = np.vstack(used)
    assert stats.hosts == ["h0", "h1", "h3"] and stats.withheld == ["h2"]
    assert stats.feature_names == ["area", "smoothness", "count"]
    assert stats.missing.tolist() == [0, 1, 0]
    # the CSV holds float32-rounded values once loaded; sums are float64
    assert np.allclose(stats.mean, np.nanmean(pooled.astype(np.float32), axis=0), rtol=1e-6)
    assert any("h2: fewer than 10 rows" in line for line in told), told
    findings = describe_findings(stats)
    assert any("constant on every host (count)" in line for line in findings), findings
    assert any(line.startswith("h3: feature 'area'") for line in findings), findings
    document = stats.as_dict()
    assert document["features"][0]["quantiles"]["0.5"] is not None
    assert set(document["label_skew"]) == {"h0", "h1", "h3"}


def rename_a_column_of_h0(fed, tables, tmp_path: Path) -> None:
    """h0's CSV calls its second column 'roughness' where the others have 'smoothness'."""
    x, y = tables[0]
    renamed = _write_csv(tmp_path / "renamed.csv", x, y,
                         header=["area", "roughness", "count", "label"])
    service = fed.services[0]
    service.config = dataclasses.replace(service.config, data_path=str(renamed))
    service._load_data()


def test_a_host_with_other_columns_is_left_out_naming_file_and_column(csv_federation,
                                                                      tmp_path: Path) -> None:
    fed, tables = csv_federation
    rename_a_column_of_h0(fed, tables, tmp_path)
    told: list[str] = []
    stats = federated_stats(_clients(fed), tell=told.append)
    assert "h0" not in stats.hosts
    line = next(line for line in told if line.startswith("left out: h0"))
    assert "renamed.csv" in line and "'roughness'" in line and "'smoothness'" in line


def test_a_host_whose_label_column_is_missing_is_left_out(csv_federation,
                                                          tmp_path: Path) -> None:
    fed, tables = csv_federation
    x, y = tables[1]
    # no "label" column: the last column is taken as the label, so a feature is missing
    path = tmp_path / "nolabel.csv"
    path.write_text("area,smoothness,count\n" + "\n".join(
        f"{a},{b},{int(c) % 3}" for a, b, c in x) + "\n")
    service = fed.services[1]
    service.config = dataclasses.replace(service.config, data_path=str(path))
    service._load_data()
    told: list[str] = []
    stats = federated_stats(_clients(fed), tell=told.append)
    assert "h1" not in stats.hosts
    assert any(line.startswith("left out: h1") and "nolabel.csv" in line and "'count'" in line
               for line in told), told


def test_no_usable_host_is_one_line(tmp_path: Path) -> None:
    fed = Federation(tmp_path, [3, 4])
    try:
        with pytest.raises(TrainingError, match="no host has 10 rows or more"):
            federated_stats(_clients(fed))
    finally:
        fed.close()


def test_equal_bins_in_one_pass_count_as_the_loop_does() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 7)) * [1, 10, 100, 1e-3, 5, 1, 1]
    x[3, 2] = np.nan
    stats = combine([check_summary("h", *host_summary(x, rng.integers(0, 2, 500)), width=7)])
    edges = histogram_edges(stats, 16)
    fast = host_histograms(x, edges)
    uneven = edges.copy()
    uneven[:, 1] += 1e-9 * (uneven[:, 2] - uneven[:, 1])     # forces the per-feature loop
    slow = host_histograms(x, uneven)
    assert fast.sum() == 500 * 7 - 1 and np.abs(fast - slow).sum() <= 2
    for i in range(7):   # numpy's own histogram (last bin closed, like ours)
        column = x[:, i][~np.isnan(x[:, i])]
        assert np.array_equal(fast[i], np.histogram(column, bins=edges[i])[0])
