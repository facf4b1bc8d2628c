"""Local data sets: loading a host's files, the bundled digits, and non-IID splits.

Each host keeps its own data; the agent loads it with `load_dataset` from the
path the inventory names. The demo and the accuracy tests use the bundled UCI
digits split across hosts with Dirichlet label skew, because an IID split of a
real data set would hide exactly the difficulty federated training has to cope
with (hosts that see mostly a few classes).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np

from flctl.core.fsutil import atomic_write
from flctl.errors import FlctlError

PathLike = Union[Path, str]

DIGITS_RESOURCE = "data/digits.npz"
DIGITS_MAX_PIXEL = 16.0
MAX_SPLIT_ATTEMPTS = 1000
# CSV cells that mean "no value" (a missing value, not a mistake)
MISSING = frozenset({"", "na", "nan", "null", "?"})


class DataError(FlctlError):
    """A data file is missing, malformed, or cannot be split as asked.

    The message starts with the file (and the CSV line) so the user can open
    it at the right place.
    """

    def __init__(self, message: str, *, file: PathLike | None = None,
                 line: int | None = None) -> None:
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        super().__init__(f"{where}{message}")
        self.file = str(file) if file is not None else None
        self.line = line
        self.reason = message


@dataclass
class Dataset:
    """Features and integer labels; the test part is optional (hosts may only train)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    # a CSV's feature columns by name (the label column left out); None for .npz
    feature_names: list[str] | None = None
    source: str | None = None    # the file it was read from

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return 0 if self.x_test is None else int(self.x_test.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1]) if self.x_train.ndim > 1 else 1

    @property
    def n_classes(self) -> int:
        """Largest label seen in train or test, plus one (0 when there are no labels)."""
        highest = -1
        for labels in (self.y_train, self.y_test):
            if labels is not None and labels.size:
                highest = max(highest, int(labels.max()))
        return highest + 1


# --------------------------------------------------------------------------- loading


def load_dataset(path: PathLike) -> Dataset:
    """Load a host's data from `.npz` (x_train, y_train[, x_test, y_test]) or `.csv`."""
    file = Path(path)
    if not file.exists():
        raise DataError("no such file", file=file)
    if not file.is_file():
        raise DataError("not a regular file", file=file)
    suffix = file.suffix.lower()
    if suffix == ".npz":
        return _load_npz(file)
    if suffix == ".csv":
        return _load_csv(file)
    raise DataError(f"unsupported data format {suffix or '(no suffix)'!r}; use .npz or .csv",
                    file=file)


def _load_npz(file: Path) -> Dataset:
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read as .npz: {exc}", file=file) from exc
    except Exception as exc:  # zipfile.BadZipFile and friends: still the user's file, not a bug
        raise DataError(f"cannot read as .npz: {type(exc).__name__}: {exc}", file=file) from exc

    missing = [key for key in ("x_train", "y_train") if key not in arrays]
    if missing:
        raise DataError(f"missing array(s) {', '.join(missing)} (found: "
                        f"{', '.join(sorted(arrays)) or 'none'})", file=file)
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError("x_test and y_test must be given together", file=file)

    x_train, y_train = _checked_pair(arrays["x_train"], arrays["y_train"], "train", file)
    x_test = y_test = None
    if "x_test" in arrays:
        x_test, y_test = _checked_pair(arrays["x_test"], arrays["y_test"], "test", file)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(f"x_test has features of shape {x_test.shape[1:]} but x_train "
                            f"has {x_train.shape[1:]}", file=file)
    if x_train.shape[0] == 0:
        raise DataError("x_train is empty", file=file)
    return Dataset(x_train, y_train, x_test, y_test)


def _checked_pair(x: np.ndarray, y: np.ndarray, part: str,
                  file: Path) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2:
        raise DataError(f"x_{part} must be 2-D (examples, features), got shape {x.shape}",
                        file=file)
    if y.ndim != 1:
        raise DataError(f"y_{part} must be 1-D, got shape {y.shape}", file=file)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"x_{part} has {x.shape[0]} rows but y_{part} has {y.shape[0]}",
                        file=file)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"x_{part} is not numeric (dtype {x.dtype})", file=file)
    return x.astype(np.float32, copy=False), _labels(y, f"y_{part}", file)


def _labels(y: np.ndarray, name: str, file: Path) -> np.ndarray:
    """Labels must be non-negative integers even when stored as floats."""
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise DataError(f"{name} is not numeric (dtype {y.dtype})", file=file)
    if y.size:
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"{name} must hold integer class labels", file=file)
        if y.min() < 0:
            raise DataError(f"{name} has negative labels", file=file)
    return y.astype(np.int64)


def _load_csv(file: Path) -> Dataset:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {exc}", file=file) from exc
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[list[float]] = []
    lines: list[int] = []   # each row's line in the file, for errors found later
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            continue
        if len(row) != len(header):
            raise DataError(f"expected {len(header)} columns as in the header, got {len(row)}",
                            file=file, line=line)
        values = []
        for column, cell in zip(header, row):
            if cell.strip().lower() in MISSING:
                values.append(math.nan)    # counted by flctl stats, filled by the transform
                continue
            try:
                value = float(cell)
            except ValueError:
                raise DataError(f"column {column!r}: not a number: {cell.strip()!r}",
                                file=file, line=line) from None
            if not math.isfinite(value):
                raise DataError(f"column {column!r}: not a finite number: {cell.strip()!r}",
                                file=file, line=line)
            values.append(value)
        rows.append(values)
        lines.append(line)
    if header is None:
        raise DataError("empty file (expected a header row and data rows)", file=file)
    if len(header) < 2:
        raise DataError("need at least one feature column and a label column", file=file)
    if not rows:
        raise DataError("no data rows after the header", file=file)

    label_col = header.index("label") if "label" in header else len(header) - 1
    table = np.asarray(rows, dtype=np.float64)
    if np.isnan(table[:, label_col]).any():
        row_index = int(np.flatnonzero(np.isnan(table[:, label_col]))[0])
        raise DataError(f"column {header[label_col]!r}: the label is missing (a missing "
                        f"value may be a feature's, not a label)", file=file,
                        line=lines[row_index])
    y = _labels(table[:, label_col], f"label column {header[label_col]!r}", file)
    x = np.delete(table, label_col, axis=1).astype(np.float32)
    names = [name for i, name in enumerate(header) if i != label_col]
    return Dataset(x, y, feature_names=names, source=str(file))


def save_dataset(ds: Dataset, path: PathLike) -> None:
    """Write `ds` as an .npz that `load_dataset` reads back (atomically: hosts may be reading)."""
    arrays = {"x_train": ds.x_train, "y_train": ds.y_train}
    if ds.x_test is not None and ds.y_test is not None:
        arrays["x_test"] = ds.x_test
        arrays["y_test"] = ds.y_test
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


# --------------------------------------------------------------------------- digits


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled UCI digits: float32 features in [0, 1] (1797 x 64), int64 labels 0..9."""
    resource = resources.files("flctl").joinpath(DIGITS_RESOURCE)
    with resource.open("rb") as handle:
        payload = handle.read()
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        x = archive["x"].astype(np.float32) / np.float32(DIGITS_MAX_PIXEL)
        y = archive["y"].astype(np.int64)
    return x, y


# --------------------------------------------------------------------------- splits


def dirichlet_split(labels: np.ndarray, n_parts: int, alpha: float, seed: int,
                    min_size: int = 10) -> list[np.ndarray]:
    """Partition example indices into `n_parts` with label skew.

    For every class the share each part receives is drawn from
    Dirichlet(alpha): small alpha gives parts dominated by a few classes,
    large alpha approaches an IID split. Draws are repeated until every part
    holds at least `min_size` examples. Returns sorted int64 index arrays that
    are disjoint and together cover every index; the same seed gives the same split.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if n_parts < 1:
        raise DataError(f"cannot split into {n_parts} parts")
    if not alpha > 0 or not math.isfinite(alpha):
        raise DataError(f"Dirichlet alpha must be a positive number, got {alpha}")
    if min_size * n_parts > n:
        raise DataError(f"cannot give {n_parts} parts at least {min_size} examples each "
                        f"from {n} examples")

    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    cap = n / n_parts
    for _ in range(MAX_SPLIT_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        sizes = np.zeros(n_parts, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(n_parts, alpha))
            # Parts already holding their fair share take no more: without this a
            # small alpha keeps handing whole classes to the same part and the
            # others never reach min_size.
            shares = np.where(sizes < cap, shares, 0.0)
            total = shares.sum()
            shares = shares / total if total > 0 else np.full(n_parts, 1.0 / n_parts)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for part, chunk in enumerate(np.split(members, cuts)):
                parts[part].append(chunk)
                sizes[part] += len(chunk)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    raise DataError(f"no Dirichlet split (alpha={alpha}) gave all {n_parts} parts "
                    f"{min_size}+ examples in {MAX_SPLIT_ATTEMPTS} tries; raise alpha or "
                    f"lower the number of parts")


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test index split keeping each class's share in both parts."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split_like(labels: np.ndarray, class_shares: np.ndarray, seed: int) -> list[np.ndarray]:
    """Split indices so part p gets about class_shares[p, c] of each class c.

    Rounding uses largest remainders so each class is handed out exactly once.
    """
    rng = np.random.default_rng(seed)
    n_parts = class_shares.shape[0]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
    for c in range(class_shares.shape[1]):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) == 0:
            continue
        shares = class_shares[:, c]
        if shares.sum() <= 0:
            shares = np.full(n_parts, 1.0 / n_parts)
        exact = shares / shares.sum() * len(members)
        counts = np.floor(exact).astype(np.int64)
        short = len(members) - int(counts.sum())
        if short:
            counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
        for part, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            parts[part].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) if chunks
            else np.zeros(0, dtype=np.int64) for chunks in parts]


def make_federated_shards(n_hosts: int, alpha: float = 0.5, seed: int = 0,
                          test_fraction: float = 0.2) -> tuple[list[Dataset], Dataset]:
    """Digits split across `n_hosts` with label skew, plus the pooled central data set.

    A stratified global split comes first, so the pooled test set is the same
    held-out data a central baseline is judged on. Each host's local test data
    follows its own class mix (host h gets the same fraction of each test class
    as it got of that train class): federated evaluation then measures how the
    model serves each host's own distribution.
    """
    x, y = load_digits()
    split_seed, dirichlet_seed, test_seed = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(3))
    train_idx, test_idx = stratified_split(y, test_fraction, split_seed)
    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]

    train_parts = dirichlet_split(y_train, n_hosts, alpha, dirichlet_seed)
    n_classes = int(y.max()) + 1
    per_host = np.stack([np.bincount(y_train[p], minlength=n_classes) for p in train_parts])
    class_totals = np.maximum(per_host.sum(axis=0, keepdims=True), 1)
    test_parts = _split_like(y_test, per_host / class_totals, test_seed)

    shards = [Dataset(x_train[tr], y_train[tr], x_test[te], y_test[te])
              for tr, te in zip(train_parts, test_parts)]
    return shards, Dataset(x_train, y_train, x_test, y_test)
