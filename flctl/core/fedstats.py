"""Federated statistics: what all hosts' data look like, without moving a row.

Each host sums its own rows (`host_summary`): per feature the count of
present values, missing values, sum, sum of squares, min and max, and its
label counts. The coordinator adds the sums (`combine`): count, mean and
standard deviation follow exactly; min and max are the extremes of the
hosts' extremes. A second pass counts each host's values in fixed bins
between the federation's min and max (`host_histograms`), and quantiles
are read off the summed histograms (`quantiles`: exact to a bin's width).

Counts, sums, sums of squares and fixed-bin histograms are sums over hosts,
so secure aggregation could hide each host's part; min, max and quantiles
cannot be computed from masked sums, and a min or max is one row's value.
A host with fewer than `min_count` rows (MIN_COUNT by default) contributes
nothing at all: a sum over three rows says too much about each of them.

The same statistics decide preprocessing (`Transform`): the built-in tasks
standardise features when their magnitudes differ by more than
STANDARDIZE_FACTOR, and leave constant features at zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_COUNT = 10
DEFAULT_BINS = 32
MAX_BINS = 1024
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# standardize: auto turns it on when the largest feature magnitude is more
# than this many times the smallest (digits: 16x, off; breast cancer: 10^4x, on)
STANDARDIZE_FACTOR = 100.0
# a host's feature mean this many standard deviations (of the other hosts'
# data) from theirs looks like other data (units, a broken sensor), not skew
SHIFT_SIGMAS = 3.0
# secure aggregation's public histogram range: mean +- this many standard deviations
EDGE_SIGMAS = 4.0
MAX_LABEL = 1 << 16
# rows of the per-feature array a host sends: count, missing, sum, sumsq, min, max
ROWS = ("count", "missing", "sum", "sumsq", "min", "max")


@dataclass(frozen=True)
class HostSummary:
    """One host's sums, as it sent them (checked by `check_summary`)."""

    name: str
    rows: int
    features: np.ndarray          # (6, F) float64: ROWS
    labels: np.ndarray            # (L,) int64: count per label value
    withheld: bool = False        # fewer than min_count rows: it sent nothing


def host_summary(x: np.ndarray, y: np.ndarray | None, min_count: int = MIN_COUNT
                 ) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, (6, F) sums, label counts) of one host's data; NaN is a missing
    value. Below `min_count` rows everything is zero: nothing is revealed."""
    x = np.asarray(x, dtype=np.float64)
    rows, width = x.shape
    out = np.zeros((len(ROWS), width))
    if rows < min_count:
        return rows, out, np.zeros(0, np.int64)
    missing = np.isnan(x)
    filled = np.where(missing, 0.0, x) if missing.any() else x
    out[1] = missing.sum(axis=0)
    out[0] = rows - out[1]
    out[2] = filled.sum(axis=0)
    out[3] = np.einsum("ij,ij->j", filled, filled)
    # fmin/fmax skip NaN (a feature with no value at all stays NaN)
    out[4] = np.fmin.reduce(x, axis=0)
    out[5] = np.fmax.reduce(x, axis=0)
    labels = np.zeros(0, np.int64)
    if y is not None and len(y):
        y = np.asarray(y)
        if y.min() < 0 or y.max() >= MAX_LABEL or np.any(y != np.round(y)):
            raise ValueError(f"labels must be integers in 0..{MAX_LABEL - 1}")
        labels = np.bincount(y.astype(np.int64))
    return rows, out, labels


def check_summary(name: str, rows: Any, features: Any, labels: Any, width: int | None
                  ) -> HostSummary:
    """A host's sums, if they could be true; ValueError saying why not (a
    host's numbers are its claims: counts within its rows, sums of squares
    not below what the sums imply, min <= max)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows < 2**40:
        raise ValueError("rows: not a count")
    f = np.asarray(features)
    if f.dtype != np.float64 or f.ndim != 2 or f.shape[0] != len(ROWS) or \
            (width is not None and f.shape[1] != width):
        raise ValueError(f"feature sums: expected float64 ({len(ROWS)}, {width}), "
                         f"got {f.dtype} {f.shape}")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.dtype != np.int64 or lab.size > MAX_LABEL or \
            (lab.size and lab.min() < 0):
        raise ValueError("label counts: expected non-negative int64 counts")
    if not rows or not f[0].any() and not lab.any():
        return HostSummary(name, rows, np.zeros_like(f), np.zeros(0, np.int64), withheld=True)
    count, missing, total, squares, low, high = f
    if not np.all(np.isfinite(f[:4])) or np.any(count < 0) or np.any(missing < 0) or \
            np.any(count + missing != rows) or np.any(count != np.round(count)):
        raise ValueError("feature counts do not add up to its rows")
    if lab.sum() != rows:
        raise ValueError(f"label counts add up to {lab.sum()}, not its {rows} rows")
    seen = count > 0
    if np.any(~np.isfinite(low[seen])) or np.any(~np.isfinite(high[seen])) or \
            np.any(low[seen] > high[seen]):
        raise ValueError("min and max are not finite or min > max")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(seen, total / np.maximum(count, 1), 0.0)
    if np.any(mean[seen] < low[seen] - 1e-9 * np.abs(low[seen]) - 1e-12) or \
            np.any(mean[seen] > high[seen] + 1e-9 * np.abs(high[seen]) + 1e-12):
        raise ValueError("a feature's mean is outside its min and max")
    if np.any(squares + 1e-9 * np.abs(squares) + 1e-9 < total * mean):
        raise ValueError("a feature's sum of squares is below what its sum implies")
    return HostSummary(name, rows, f, lab)


@dataclass
class FederatedStats:
    """What `flctl stats` shows and a run records."""

    hosts: list[str]                    # hosts whose data count
    withheld: list[str]                 # below min_count: nothing from them
    rows: int
    count: np.ndarray
    missing: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    labels: dict[str, dict[int, int]]   # per host: label -> rows
    feature_names: list[str] | None = None
    quantiles: np.ndarray | None = None   # (F, len(QUANTILES))
    min_count: int = MIN_COUNT
    shifted: list[tuple[str, int, float]] = field(default_factory=list)
    # under secure aggregation (securestats.py): min and max are NaN, `labels`
    # is empty and the federation's label counts are all there is
    secure: bool = False
    label_total: dict[int, int] | None = None
    magnitude: np.ndarray | None = None   # E[x^2] / E[|x|] per feature (scales_differ)
    notes: list[str] = field(default_factory=list)   # what is approximate or unknown

    @property
    def constant(self) -> list[int]:
        """Features with one value everywhere (or no value at all)."""
        return [int(i) for i in np.flatnonzero((self.std == 0) | (self.count == 0))]

    def label_totals(self) -> dict[int, int]:
        if self.label_total is not None:
            return dict(sorted(self.label_total.items()))
        totals: dict[int, int] = {}
        for counts in self.labels.values():
            for label, n in counts.items():
                totals[label] = totals.get(label, 0) + n
        return dict(sorted(totals.items()))

    def skew(self) -> dict[str, float]:
        """Per host, the total variation distance between its label shares and
        the federation's (0: the same mix; 1: labels no one else has)."""
        totals = self.label_totals()
        whole = sum(totals.values()) or 1
        out = {}
        for host, counts in self.labels.items():
            n = sum(counts.values()) or 1
            out[host] = 0.5 * sum(abs(counts.get(k, 0) / n - v / whole)
                                  for k, v in totals.items())
        return out

    def as_dict(self) -> dict[str, Any]:
        names = self.feature_names or [f"x{i}" for i in range(len(self.count))]

        def plain(value: float) -> float | None:
            return float(value) if np.isfinite(value) else None

        features = []
        for i, name in enumerate(names):
            row: dict[str, Any] = {
                "name": name, "count": int(self.count[i]), "missing": int(self.missing[i]),
                "mean": plain(self.mean[i]), "std": plain(self.std[i]),
                "min": plain(self.min[i]), "max": plain(self.max[i])}
            if self.quantiles is not None:
                row["quantiles"] = {f"{q:g}": plain(v)
                                    for q, v in zip(QUANTILES, self.quantiles[i])}
            features.append(row)
        return {
            "hosts": self.hosts, "withheld": self.withheld, "rows": self.rows,
            "min_count": self.min_count, "features": features,
            "labels": {h: {str(k): v for k, v in c.items()} for h, c in self.labels.items()},
            "label_totals": {str(k): v for k, v in self.label_totals().items()},
            "label_skew": {h: round(v, 4) for h, v in self.skew().items()},
            "constant": [names[i] for i in self.constant],
            "shifted": [{"host": h, "feature": names[i], "sigmas": round(z, 2)}
                        for h, i, z in self.shifted],
            "secure_aggregation": self.secure,
            "notes": list(self.notes),
        }


def moments(count: np.ndarray, sums: np.ndarray, squares: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, mean of squares) per feature from summed counts, sums and squares;
    NaN where a feature has no value (the variance is their difference)."""
    seen = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(seen, sums / np.maximum(count, 1), np.nan),
                np.where(seen, squares / np.maximum(count, 1), np.nan))


def combine(summaries: Sequence[HostSummary], feature_names: list[str] | None = None,
            min_count: int = MIN_COUNT) -> FederatedStats:
    """The federation's statistics from the hosts' checked sums."""
    used = [s for s in summaries if not s.withheld]
    if not used:
        raise ValueError(f"no host has {min_count} rows or more")
    total = np.sum([s.features for s in used], axis=0)
    count, missing, sums, squares = total[0], total[1], total[2], total[3]
    seen = count > 0
    mean, square = moments(count, sums, squares)
    variance = square - mean * mean
    low = np.min([np.where(s.features[0] > 0, s.features[4], np.inf) for s in used], axis=0)
    high = np.max([np.where(s.features[0] > 0, s.features[5], -np.inf) for s in used], axis=0)
    low, high = np.where(seen, low, np.nan), np.where(seen, high, np.nan)
    std = np.sqrt(np.maximum(variance, 0.0))
    std = np.where(seen & (high > low), std, np.where(seen, 0.0, np.nan))
    labels = {s.name: {int(k): int(v) for k, v in enumerate(s.labels) if v}
              for s in used}
    stats = FederatedStats(
        hosts=[s.name for s in used], withheld=[s.name for s in summaries if s.withheld],
        rows=int(sum(s.rows for s in used)), count=count, missing=missing, mean=mean,
        std=std, min=low, max=high, labels=labels, feature_names=feature_names,
        min_count=min_count)
    stats.shifted = shifted_hosts(used, stats)
    return stats


def shifted_hosts(used: Sequence[HostSummary], stats: FederatedStats,
                  sigmas: float = SHIFT_SIGMAS) -> list[tuple[str, int, float]]:
    """(host, feature, distance) where a host's mean of a feature lies more than
    `sigmas` standard deviations of the other hosts' data from their mean (the
    others, not the federation: one big host would move the federation's)."""
    if len(used) < 2:
        return []
    total = np.sum([s.features for s in used], axis=0)
    out = []
    for s in used:
        count, sums = s.features[0], s.features[2]
        rest = total - s.features
        ok = (count > 0) & (rest[0] > 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums / np.maximum(count, 1)
            rest_mean = rest[2] / np.maximum(rest[0], 1)
            rest_std = np.sqrt(np.maximum(rest[3] / np.maximum(rest[0], 1) - rest_mean ** 2, 0))
            z = np.where(ok & (rest_std > 0), (mean - rest_mean) / rest_std, 0.0)
        for i in np.flatnonzero(np.abs(z) > sigmas):
            out.append((s.name, int(i), float(z[i])))
    return out


def histogram_edges(stats: FederatedStats, bins: int = DEFAULT_BINS) -> np.ndarray:
    """(F, bins + 1) edges spanning each feature's federated min..max."""
    low = np.nan_to_num(stats.min, nan=0.0)
    high = np.nan_to_num(stats.max, nan=0.0)
    high = np.where(high > low, high, low + 1.0)
    return np.linspace(low, high, bins + 1, axis=1)


def host_histograms(x: np.ndarray, edges: np.ndarray, rows_ok: bool = True) -> np.ndarray:
    """(F, bins) int64 counts of a host's present values in `edges` (values
    outside land in the end bins); zeros when `rows_ok` is False (withheld)."""
    x = np.asarray(x, dtype=np.float64)
    width, bins = edges.shape[0], edges.shape[1] - 1
    out = np.zeros((width, bins), np.int64)
    if not rows_ok:
        return out
    step = (edges[:, -1] - edges[:, 0]) / bins
    if np.all(step > 0) and np.allclose(edges, edges[:, :1] + step[:, None] * np.arange(bins + 1),
                                        rtol=1e-12, atol=0):
        # equal bins (what histogram_edges makes): one pass over the whole table
        missing = np.isnan(x)
        scaled = x - edges[:, 0]
        scaled *= 1.0 / step
        np.clip(scaled, 0, bins - 1, out=scaled)      # NaN stays NaN, dropped below
        index = scaled.astype(np.int64) if not missing.any() else \
            np.where(missing, 0, scaled).astype(np.int64)
        index += np.arange(width) * bins
        counts = np.bincount(index[~missing] if missing.any() else index.ravel(),
                             minlength=width * bins)
        return counts.reshape(width, bins)
    for i in range(width):
        column = x[:, i]
        column = column[~np.isnan(column)]
        index = np.clip(np.searchsorted(edges[i], column, side="right") - 1, 0, bins - 1)
        out[i] = np.bincount(index, minlength=bins)
    return out


def quantiles(histograms: np.ndarray, edges: np.ndarray,
              qs: Sequence[float] = QUANTILES) -> np.ndarray:
    """(F, len(qs)) quantiles from summed histograms, interpolated within a bin."""
    out = np.full((histograms.shape[0], len(qs)), np.nan)
    for i, counts in enumerate(histograms):
        total = counts.sum()
        if total == 0:
            continue
        cumulative = np.concatenate([[0], np.cumsum(counts)])
        for j, q in enumerate(qs):
            target = q * total
            k = int(np.clip(np.searchsorted(cumulative, target, side="left") - 1, 0,
                            len(counts) - 1))
            inside = (target - cumulative[k]) / counts[k] if counts[k] else 0.0
            out[i, j] = edges[i, k] + inside * (edges[i, k + 1] - edges[i, k])
    return out


@dataclass(frozen=True)
class Transform:
    """x -> (x - mean) / scale, missing values -> 0 (the mean); constant
    features -> 0. Stored with a run so the model is used as it was trained."""

    mean: np.ndarray
    scale: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = (np.asarray(x, dtype=np.float32) - self.mean) / self.scale
        return np.nan_to_num(out, nan=0.0).astype(np.float32, copy=False)

    def as_params(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "scale": [float(v) for v in self.scale]}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], width: int) -> Transform:
        mean = np.asarray(params.get("mean"), dtype=np.float32)
        scale = np.asarray(params.get("scale"), dtype=np.float32)
        if mean.shape != (width,) or scale.shape != (width,) or \
                not np.all(np.isfinite(mean)) or not np.all(np.isfinite(scale)) or \
                np.any(scale <= 0):
            raise ValueError(f"transform: expected {width} finite means and positive scales")
        return cls(mean, scale)


def standardize_transform(stats: FederatedStats) -> Transform:
    """Standardise with the federated mean and standard deviation; constant
    features (std 0) are centred to 0 with scale 1."""
    mean = np.nan_to_num(stats.mean, nan=0.0)
    scale = np.where(np.nan_to_num(stats.std, nan=0.0) > 0, stats.std, 1.0)
    return Transform(mean.astype(np.float32), scale.astype(np.float32))


def scales_differ(stats: FederatedStats, factor: float = STANDARDIZE_FACTOR) -> bool:
    """standardize: auto's test: do the non-constant features' magnitudes
    (largest absolute value) differ by more than `factor`?"""
    if stats.magnitude is not None:
        # secure aggregation: no min or max. E[x^2] / E[|x|] is a sum's ratio, the
        # value itself for a feature that is 0 or v (a sparse pixel: its max, where
        # mean + k std would be far below it), ~1.1-1.3x the spread of a dense one
        # (digits: 13.9x against the maxima's 16x; area against smoothness: 10^4x)
        magnitude = np.nan_to_num(stats.magnitude)
    else:
        magnitude = np.maximum(np.abs(np.nan_to_num(stats.min)),
                               np.abs(np.nan_to_num(stats.max)))
    varying = (np.nan_to_num(stats.std) > 0) & (magnitude > 0)
    if varying.sum() < 2:
        return False
    return bool(magnitude[varying].max() > factor * magnitude[varying].min())
