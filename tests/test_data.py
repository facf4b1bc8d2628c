"""Data loading, the bundled digits, and the non-IID splits."""

from __future__ import annotations

import numpy as np
import pytest

from flctl.core.data import (
    DataError,
    Dataset,
    dirichlet_split,
    load_dataset,
    load_digits,
    make_federated_shards,
    save_dataset,
    stratified_split,
)
from flctl.errors import FlctlError

# --------------------------------------------------------------------------- digits


def test_bundled_digits():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.all(x * 16 == np.round(x * 16))  # stored as pixel counts 0..16
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


# sha256 of x (uint8) then y (uint8) as scikit-learn 1.9's load_digits() gives
# them, computed when scripts/make_digits.py wrote the file: the bundled data
# is the UCI data set, byte for byte, without needing scikit-learn here.
DIGITS_SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"


def test_bundled_digits_are_the_uci_data_byte_for_byte():
    import hashlib
    from importlib import resources

    with np.load(resources.files("flctl.data").joinpath("digits.npz")) as archive:
        payload = archive["x"].tobytes() + archive["y"].tobytes()
    assert hashlib.sha256(payload).hexdigest() == DIGITS_SHA256


# --------------------------------------------------------------------------- npz


def test_npz_roundtrip_and_properties(tmp_path):
    rng = np.random.default_rng(0)
    ds = Dataset(rng.normal(size=(30, 5)), rng.integers(0, 3, 30).astype(np.int32),
                 rng.normal(size=(7, 5)), np.full(7, 4))
    path = tmp_path / "local.npz"
    save_dataset(ds, path)
    back = load_dataset(path)
    assert back.x_train.dtype == np.float32 and back.y_train.dtype == np.int64
    np.testing.assert_allclose(back.x_train, ds.x_train.astype(np.float32))
    np.testing.assert_array_equal(back.y_test, ds.y_test)
    assert (back.n_train, back.n_test, back.n_features, back.n_classes) == (30, 7, 5, 5)


def test_npz_without_test_part(tmp_path):
    path = tmp_path / "train_only.npz"
    np.savez(path, x_train=np.ones((4, 2)), y_train=np.array([0, 1, 1, 0]))
    ds = load_dataset(str(path))
    assert ds.x_test is None and ds.n_test == 0 and ds.n_classes == 2


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=np.ones((4, 2))), "missing array(s) y_train (found: x_train)"),
    (dict(x_train=np.ones((4, 2)), y_train=np.zeros(3)), "x_train has 4 rows but y_train has 3"),
    (dict(x_train=np.ones(4), y_train=np.zeros(4)), "x_train must be 2-D"),
    (dict(x_train=np.ones((4, 2)), y_train=np.array([0, 1.5, 0, 0])),
     "y_train must hold integer class labels"),
    (dict(x_train=np.ones((4, 2)), y_train=np.array([0, -1, 0, 0])), "y_train has negative labels"),
    (dict(x_train=np.ones((4, 2)), y_train=np.zeros(4), x_test=np.ones((2, 3)),
          y_test=np.zeros(2)), "x_test has features of shape (3,) but x_train has (2,)"),
    (dict(x_train=np.ones((4, 2)), y_train=np.zeros(4), x_test=np.ones((2, 2))),
     "x_test and y_test must be given together"),
    (dict(x_train=np.ones((0, 2)), y_train=np.zeros(0)), "x_train is empty"),
    (dict(x_train=np.array([["a", "b"]]), y_train=np.zeros(1)), "x_train is not numeric"),
])
def test_npz_errors_name_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert isinstance(info.value, FlctlError)


def test_missing_corrupt_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.npz: no such file$"):
        load_dataset(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match=r"corrupt\.npz: cannot read as \.npz"):
        load_dataset(corrupt)
    other = tmp_path / "data.parquet"
    other.write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.parquet: unsupported data format '\.parquet'"):
        load_dataset(other)


# --------------------------------------------------------------------------- csv


def test_csv_with_label_column(tmp_path):
    path = tmp_path / "local.csv"
    path.write_text("a,label,b\n1,2,3\n\n4.5,0,-6\n")
    ds = load_dataset(path)
    np.testing.assert_array_equal(ds.x_train, np.array([[1, 3], [4.5, -6]], np.float32))
    np.testing.assert_array_equal(ds.y_train, [2, 0])
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_test is None


def test_csv_without_label_column_uses_the_last(tmp_path):
    path = tmp_path / "local.csv"
    path.write_text("f1,f2,cls\n0.5,1,7\n0.25,2,3.0\n")
    ds = load_dataset(path)
    np.testing.assert_array_equal(ds.y_train, [7, 3])
    np.testing.assert_array_equal(ds.x_train, [[0.5, 1], [0.25, 2]])


@pytest.mark.parametrize("text, message", [
    ("a,label\n1,0\n2,x\n", ":3: column 'label': not a number: 'x'"),
    ("a,b,label\n1,2,0\n\n1,oops,1\n", ":4: column 'b': not a number: 'oops'"),
    ("a,label\n1,0\n1,2,3\n", ":3: expected 2 columns as in the header, got 3"),
    ("a,label\n1,inf\n", ":2: column 'label': not a finite number: 'inf'"),
    ("a,label\n1,0\n2,\n", ":3: column 'label': the label is missing (a missing value may "
                             "be a feature's, not a label)"),
    ("a,label\n", ": no data rows after the header"),
    ("", ": empty file (expected a header row and data rows)"),
    ("a,label\n1,0.5\n", ": label column 'label' must hold integer class labels"),
])
def test_csv_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert str(info.value).startswith(str(path))
    assert str(info.value).endswith(message)


# --------------------------------------------------------------------------- splits


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> list[float]:
    """Total variation distance between each part's label mix and the global one."""
    n_classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=n_classes) / len(labels)
    return [0.5 * float(np.abs(np.bincount(labels[p], minlength=n_classes) / len(p)
                               - overall).sum()) for p in parts]


@pytest.mark.parametrize("n_parts, alpha", [(4, 0.5), (10, 0.1), (3, 1000.0)])
def test_dirichlet_split_is_a_partition(n_parts, alpha):
    _, y = load_digits()
    parts = dirichlet_split(y, n_parts, alpha, seed=3, min_size=20)
    assert len(parts) == n_parts
    assert all(len(p) >= 20 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(y)
    assert np.array_equal(np.sort(joined), np.arange(len(y)))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_dirichlet_split_is_deterministic_per_seed():
    _, y = load_digits()
    a = dirichlet_split(y, 5, 0.5, seed=11)
    b = dirichlet_split(y, 5, 0.5, seed=11)
    c = dirichlet_split(y, 5, 0.5, seed=12)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(len(p) == len(q) and np.array_equal(p, q) for p, q in zip(a, c))


def test_dirichlet_alpha_controls_label_skew():
    _, y = load_digits()
    for seed in range(3):
        skewed = label_skew(y, dirichlet_split(y, 4, 0.5, seed))
        near_iid = label_skew(y, dirichlet_split(y, 4, 1000.0, seed))
        assert min(skewed) > 0.25, skewed
        assert max(near_iid) < 0.05, near_iid


def test_dirichlet_split_refuses_the_impossible():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(DataError, match="cannot give 4 parts at least 10"):
        dirichlet_split(labels, 4, 0.5, 0)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_split(labels, 2, 0.0, 0)
    with pytest.raises(DataError, match="0 parts"):
        dirichlet_split(labels, 0, 0.5, 0)


def test_stratified_split_keeps_class_shares():
    _, y = load_digits()
    train, test = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(y)
    share = np.bincount(y[test], minlength=10) / np.bincount(y, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.01)


def test_federated_shards():
    shards, pooled = make_federated_shards(4, alpha=0.5, seed=0)
    x, y = load_digits()
    assert pooled.n_train + pooled.n_test == len(y)
    assert pooled.n_test == pytest.approx(0.2 * len(y), abs=10)
    assert sum(s.n_train for s in shards) == pooled.n_train
    assert sum(s.n_test for s in shards) == pooled.n_test
    # Shards are disjoint pieces of the pooled sets (rows identified by content + label).
    def rows(xs, ys):
        return sorted(map(bytes, np.column_stack([xs, ys]).astype(np.float32)))
    assert rows(np.concatenate([s.x_train for s in shards]),
                np.concatenate([s.y_train for s in shards])) == rows(pooled.x_train, pooled.y_train)
    assert rows(np.concatenate([s.x_test for s in shards]),
                np.concatenate([s.y_test for s in shards])) == rows(pooled.x_test, pooled.y_test)
    for shard in shards:
        assert shard.x_train.dtype == np.float32 and shard.y_train.dtype == np.int64
        train_mix = np.bincount(shard.y_train, minlength=10) / shard.n_train
        test_mix = np.bincount(shard.y_test, minlength=10) / shard.n_test
        # Local test data follows the host's own class mix, not the global one.
        assert 0.5 * np.abs(train_mix - test_mix).sum() < 0.1
    overall = np.bincount(pooled.y_train, minlength=10) / pooled.n_train
    skews = [0.5 * np.abs(np.bincount(s.y_train, minlength=10) / s.n_train - overall).sum()
             for s in shards]
    assert min(skews) > 0.25


def test_federated_shards_deterministic_and_seeded():
    a, _ = make_federated_shards(3, seed=4)
    b, _ = make_federated_shards(3, seed=4)
    c, _ = make_federated_shards(3, seed=5)
    assert all(np.array_equal(p.x_train, q.x_train) and np.array_equal(p.y_test, q.y_test)
               for p, q in zip(a, b))
    assert [s.n_train for s in a] != [s.n_train for s in c]


def test_csv_missing_values_are_nan_and_named_columns(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("area,smooth,label\n1000,,0\nNA,0.1,1\n?,null,1\n3,NaN,0\n")
    ds = load_dataset(path)
    assert ds.feature_names == ["area", "smooth"] and ds.source == str(path)
    assert np.isnan(ds.x_train).sum() == 5 and ds.x_train[0, 0] == 1000
    np.testing.assert_array_equal(ds.y_train, [0, 1, 1, 0])
