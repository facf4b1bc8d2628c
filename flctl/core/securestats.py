"""Federated statistics through secure aggregation: what each host encodes, and
what the coordinator reads back from the sum of everyone's encodings.

Only sums can hide a host's part (fedstats.py), so under secure aggregation
the hosts send: pass 1, per feature the count of present and missing values,
their sum, sum of squares and sum of magnitudes, and the federation-wide label
counts; pass 2,
fixed-bin histograms. Min, max and per-host label counts are a host's own
values, not sums: they are not computed. The histogram range cannot come from
min and max either, so its edges are public ones the coordinator derives from
pass 1 (mean +- EDGE_SIGMAS standard deviations; values beyond count in the end
bins), and the quantiles read off them are approximate where the tails are.

A host with fewer than min_count rows still takes part (its masks must
cancel) but encodes zeros, including its row count: the coordinator learns
how many hosts contributed, never which. Nothing here can tell which host
sent a vector that does not add up, so the decoded totals are checked
(counts and missing values add up to the rows, histograms to the counts,
sums of squares are possible) and a failed check refuses the whole result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from flctl.core.fedstats import EDGE_SIGMAS, MAX_LABEL, FederatedStats, moments
from flctl.core.secagg.exactsum import COUNTS, REALS, decode, encode

# variance below this share of the mean square is float64 cancellation, not spread
# (sumsq/n - mean^2 of a constant column is a few ulps of mean^2, not zero)
CONSTANT_RELATIVE = 64 * float(np.finfo(np.float64).eps)
# columns a layout may claim (a vector is ~20 words per column: 80 MB at this bound)
MAX_WIDTH = 1 << 20
UNAVAILABLE = "min, max and per-host label counts are not computed under secure aggregation"
UNAVAILABLE_WARNINGS = ("per-host label skew and shifted hosts cannot be computed under "
                        "secure aggregation")


@dataclass(frozen=True)
class Layout:
    """What every host's vector holds: agreed before the keys are made."""

    width: int          # features
    labels: int         # label values 0..labels-1
    bins: int = 0       # pass 2 only

    def counts(self) -> int:
        """Pass 1's integer part: rows, contributing, count, missing, labels."""
        return 2 + 2 * self.width + self.labels

    def pass1_words(self) -> int:
        return COUNTS.size(self.counts()) + REALS.size(3 * self.width)

    def pass2_words(self) -> int:
        return COUNTS.size(self.width * self.bins)


def round_tag(min_count: int, layout: Layout, edges: np.ndarray | None) -> str:
    """A digest of what a pass asks every host, for the end of its round id.

    The round id is in every host's signed advertisement, and every host checks
    all the others' against its own, so hosts told different parameters cannot
    share a round. Without this a coordinator could tell every host but one a
    huge min_count (or far-away edges): their zeros would leave that one host's
    sums in the clear. A host recomputes the tag from its request and refuses
    the pass if it differs."""
    digest = hashlib.sha256(json.dumps([min_count, layout.width, layout.labels]).encode())
    if edges is not None:
        digest.update(np.ascontiguousarray(edges, dtype="<f8").tobytes())
        digest.update(json.dumps(list(edges.shape)).encode())
    return digest.hexdigest()[:32]


def label_bound(y: np.ndarray | None) -> int:
    """The label space a host asks for: a power of two above its largest label
    (at least 2), so the bound says little about which labels it holds."""
    if y is None or not len(y):
        return 0
    top = int(np.max(y)) + 1
    return min(MAX_LABEL, max(2, 1 << (top - 1).bit_length()))


def host_pass1(x: np.ndarray, y: np.ndarray | None, layout: Layout, min_count: int
               ) -> np.ndarray:
    """This host's pass-1 encoding; zeros below min_count rows. ValueError for
    data that cannot be encoded (labels outside the layout, wrong width)."""
    x = np.asarray(x, dtype=np.float64)
    rows, width = x.shape
    if width != layout.width:
        raise ValueError(f"the table has {width} features, the federation {layout.width}")
    counts = np.zeros(layout.counts())
    reals = np.zeros(3 * width)   # sum, sum of squares, sum of magnitudes
    if rows >= min_count:
        missing = np.isnan(x)
        filled = np.where(missing, 0.0, x) if missing.any() else x
        counts[0], counts[1] = rows, 1
        counts[2 + width:2 + 2 * width] = missing.sum(axis=0)
        counts[2:2 + width] = rows - counts[2 + width:2 + 2 * width]
        if y is not None and len(y):
            y = np.asarray(y)
            if y.min() < 0 or y.max() >= layout.labels or np.any(y != np.round(y)):
                raise ValueError(f"labels must be integers in 0..{layout.labels - 1}")
            counts[2 + 2 * width:] = np.bincount(y.astype(np.int64), minlength=layout.labels)
        reals[:width] = filled.sum(axis=0)
        reals[width:2 * width] = np.einsum("ij,ij->j", filled, filled)
        reals[2 * width:] = np.abs(filled).sum(axis=0)
    return np.concatenate([encode(counts, COUNTS), encode(reals, REALS)])


@dataclass(frozen=True)
class Totals:
    """Pass 1, decoded and checked."""

    rows: int
    contributing: int
    count: np.ndarray
    missing: np.ndarray
    labels: np.ndarray
    sums: np.ndarray
    squares: np.ndarray
    absolute: np.ndarray     # sums of |x|: for the magnitude (fedstats.scales_differ)


def read_pass1(total: np.ndarray, layout: Layout, n_hosts: int) -> Totals:
    """The federation's totals from the unmasked sum; ValueError if they cannot
    be true (some host sent a vector that is not an honest encoding)."""
    if total.shape != (layout.pass1_words(),):
        raise ValueError(f"expected {layout.pass1_words()} words, got {total.shape}")
    split = COUNTS.size(layout.counts())
    counts = decode(total[:split], COUNTS, n_hosts)
    reals = decode(total[split:], REALS, n_hosts)
    w = layout.width
    rows, contributing = counts[0], counts[1]
    count, missing, labels = counts[2:2 + w], counts[2 + w:2 + 2 * w], counts[2 + 2 * w:]
    sums, squares, absolute = reals[:w], reals[w:2 * w], reals[2 * w:]
    if np.any(counts < 0) or not 0 <= contributing <= n_hosts:
        raise ValueError("a count is negative or more hosts contributed than took part")
    if np.any(count + missing != rows) or labels.sum() > rows:
        raise ValueError("the feature or label counts do not add up to the rows")
    if contributing and not rows or rows and not contributing:
        raise ValueError("rows without contributing hosts, or the reverse")
    with np.errstate(invalid="ignore", divide="ignore"):
        implied = np.where(count > 0, sums * sums / np.maximum(count, 1), 0.0)
    if np.any(squares < implied - 1e-9 * np.abs(implied) - 1e-9):
        raise ValueError("a sum of squares is below what its sum implies")
    if np.any(absolute < np.abs(sums) * (1 - 1e-12) - 1e-12):
        raise ValueError("a sum of magnitudes is below the magnitude of its sum")
    return Totals(int(rows), int(contributing), count, missing, labels.astype(np.int64),
                  sums, squares, absolute)


def mean_std(totals: Totals) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature, NaN where a feature has no value; a variance
    within float64 cancellation of zero is zero (a constant feature)."""
    mean, square = moments(totals.count, totals.sums, totals.squares)
    variance = square - mean * mean
    variance = np.where(variance <= CONSTANT_RELATIVE * square, 0.0, variance)
    return mean, np.sqrt(variance)


def public_edges(mean: np.ndarray, std: np.ndarray, bins: int) -> np.ndarray:
    """(F, bins + 1) equal bins over mean +- EDGE_SIGMAS std (mean +- 0.5 for a
    constant feature, 0..1 for one with no value): public, from pass 1 only."""
    centre = np.nan_to_num(mean, nan=0.5)
    half = np.where(np.nan_to_num(std) > 0, EDGE_SIGMAS * np.nan_to_num(std), 0.5)
    return np.linspace(centre - half, centre + half, bins + 1, axis=1)


def host_pass2(histograms: np.ndarray) -> np.ndarray:
    """This host's pass-2 encoding of its (F, bins) counts (zeros if withheld)."""
    return encode(np.asarray(histograms, dtype=np.float64), COUNTS)


def read_pass2(total: np.ndarray, layout: Layout, count: np.ndarray, n_hosts: int
               ) -> np.ndarray:
    """(F, bins) summed histograms; ValueError unless each feature's bins hold
    exactly its present values (pass 1's count: same hosts, same data)."""
    if total.shape != (layout.pass2_words(),):
        raise ValueError(f"expected {layout.pass2_words()} words, got {total.shape}")
    histograms = decode(total, COUNTS, n_hosts).reshape(layout.width, layout.bins)
    if np.any(histograms < 0) or np.any(histograms.sum(axis=1) != count):
        raise ValueError("the histograms do not add up to the features' counts")
    return histograms.astype(np.int64)


def secure_stats(totals: Totals, hosts: list[str], feature_names: list[str] | None,
                 min_count: int) -> FederatedStats:
    """The federation's statistics from the secure totals: min and max unknown
    (NaN), label counts for the federation only; notes say what is missing."""
    if not totals.contributing:
        raise ValueError(f"no host has {min_count} rows or more")
    mean, std = mean_std(totals)
    width = len(totals.count)
    with np.errstate(invalid="ignore", divide="ignore"):
        magnitude = np.where(totals.absolute > 0, totals.squares / totals.absolute, 0.0)
    notes = [UNAVAILABLE, UNAVAILABLE_WARNINGS]
    withheld = len(hosts) - totals.contributing
    if withheld:
        notes.append(f"{withheld} of {len(hosts)} hosts had fewer than {min_count} rows and "
                     f"contribute nothing (secure aggregation does not say which)")
    return FederatedStats(
        hosts=list(hosts), withheld=[], rows=totals.rows, count=totals.count,
        missing=totals.missing, mean=mean, std=std, min=np.full(width, np.nan),
        max=np.full(width, np.nan), labels={}, feature_names=feature_names,
        min_count=min_count, secure=True, magnitude=magnitude,
        label_total={int(k): int(v) for k, v in enumerate(totals.labels) if v},
        notes=notes)
