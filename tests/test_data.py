"""Data layer: every loader format, every validation error, partitions, splits, shards, transforms."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedhypevae.config import DataConfig, PartitionConfig
from fedhypevae.data import (
    apply_transform,
    build_federation,
    describe_dataset,
    invert_transform,
    load_dataset,
    load_shards,
    partition_indices,
    resolve_transform,
    split_client,
    write_shards,
)
from fedhypevae.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HAM_CSV = SHARED / "ham10000" / "hmnist_8_8_L.csv"
HAM_META = SHARED / "ham10000" / "HAM10000_metadata.csv"
BREAST = SHARED / "medmnist" / "breastmnist.npz"
PNEUMONIA = SHARED / "medmnist" / "pneumoniamnist.npz"


def _xy(n=40, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), np.arange(n) % k


def _assert_same(ds, x, y):
    np.testing.assert_allclose(ds.x, np.asarray(x, np.float32).reshape(len(x), -1))
    np.testing.assert_array_equal(ds.y, y)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.num_classes == int(np.max(y)) + 1


# --------------------------------------------------------------------------- loaders round-trip


def test_builtins():
    d = load_dataset("digits")
    assert d.x.shape == (1797, 64) and d.num_classes == 10 and d.value_range == (0.0, 16.0)
    b = load_dataset("breast_cancer")
    assert b.x.shape == (569, 30) and b.num_classes == 2 and b.value_range is None


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_builtins_read_without_sklearn_equal_sklearns_loaders(name, monkeypatch):
    """The built-in sets are read from scikit-learn's files without importing it (a faster start); they must be
    exactly what scikit-learn's loaders return, and a missing file falls back to those loaders."""
    import subprocess
    import sys

    from sklearn import datasets

    from fedhypevae.data import loaders

    b = datasets.load_digits() if name == "digits" else datasets.load_breast_cancer()
    arr = loaders._builtin_file(name)
    assert arr is not None, "scikit-learn's file was not found: the fast path is not taken"
    x, y = arr[:, :-1], arr[:, -1].astype(int)
    assert np.array_equal(x, b.data) and np.array_equal(y, b.target)
    d = load_dataset(name)
    np.testing.assert_array_equal(d.x, b.data.astype(np.float32))
    np.testing.assert_array_equal(d.y, b.target)
    # a fresh process reading the set does not import scikit-learn (nor SciPy through it)
    code = (
        f"import sys; from fedhypevae.data import load_dataset; load_dataset('{name}'); print('sklearn' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    # the file not where scikit-learn keeps it: scikit-learn's loader, the same data
    monkeypatch.setitem(loaders._BUILTIN_FILES, name, ("missing.csv", 0, (1, 1)))
    assert loaders._builtin_file(name) is None
    np.testing.assert_array_equal(load_dataset(name).x, d.x)


def test_npz_xy(tmp_path):
    x, y = _xy()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "a.npz")
    _assert_same(ds, x, y)
    assert ds.value_range is None


def test_npz_uint8_images_flatten_and_declare_range(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(12, 4, 4), dtype=np.uint8)
    y = np.arange(12) % 2
    np.savez(tmp_path / "img.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "img.npz")
    assert ds.x.shape == (12, 16) and ds.value_range == (0.0, 255.0)


def test_npz_medmnist_keys_concatenate_splits(tmp_path):
    rng = np.random.default_rng(0)
    parts = {}
    for s, n in (("train", 10), ("val", 3), ("test", 4)):
        parts[f"{s}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        parts[f"{s}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(tmp_path / "m.npz", **parts)
    ds = load_dataset(tmp_path / "m.npz")
    assert ds.x.shape == (17, 784) and ds.y.shape == (17,) and ds.value_range == (0.0, 255.0)
    np.testing.assert_allclose(ds.x[10:13], parts["val_images"].reshape(3, -1))


@pytest.mark.skipif(not PNEUMONIA.exists(), reason="shared data absent")
def test_real_medmnist():
    ds = load_dataset(PNEUMONIA)
    assert ds.x.shape == (2428 + 270 + 468, 784) and ds.value_range == (0.0, 255.0) and ds.num_classes == 2
    b = load_dataset(BREAST)
    assert b.x.shape == (546 + 78 + 156, 784) and b.y.ndim == 1


def test_npy_last_column_is_label(tmp_path):
    x, y = _xy()
    np.save(tmp_path / "a.npy", np.column_stack([x, y.astype(np.float32)]))
    _assert_same(load_dataset(tmp_path / "a.npy"), x, y)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_pt(tmp_path, as_tuple):
    x, y = _xy()
    obj = (
        (torch.from_numpy(x), torch.from_numpy(y)) if as_tuple else {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}
    )
    torch.save(obj, tmp_path / "a.pt")
    _assert_same(load_dataset(tmp_path / "a.pt"), x, y)


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_tables_with_label_group_site(tmp_path, ext):
    x, y = _xy()
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    df["target"] = y
    df["patient"] = np.arange(len(y)) // 2
    df["hospital"] = np.where(np.arange(len(y)) < 20, "A", "B")
    p = tmp_path / f"a.{ext}"
    df.to_csv(p, index=False) if ext == "csv" else df.to_parquet(p)
    ds = load_dataset(p, label_column="target", group_column="patient", site_column="hospital")
    _assert_same(ds, x, y)  # group/site columns are not features
    assert set(ds.sites) == {"A", "B"} and len(set(ds.groups)) == 20 and ds.value_range is None


def test_csv_default_label_y_and_pixel_range(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(10, 4))
    df = pd.DataFrame(x, columns=[f"pixel{i:04d}" for i in range(4)])
    df["y"] = np.arange(10) % 2
    df.to_csv(tmp_path / "p.csv", index=False)
    ds = load_dataset(tmp_path / "p.csv")
    assert ds.value_range == (0.0, 255.0) and ds.x.shape == (10, 4)


def test_integral_float_labels_accepted(tmp_path):
    x, y = _xy()
    np.savez(tmp_path / "a.npz", x=x, y=y.astype(np.float64))
    assert load_dataset(tmp_path / "a.npz").y.dtype == np.int64


def test_metadata_table(tmp_path):
    x, y = _xy()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    pd.DataFrame({"lesion": np.arange(40) // 4}).to_csv(tmp_path / "meta.csv", index=False)
    ds = load_dataset(tmp_path / "a.npz", group_column="lesion", metadata_path=tmp_path / "meta.csv")
    assert len(ds.groups) == 40
    pd.DataFrame({"lesion": np.arange(39)}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataError, match="row-aligned"):
        load_dataset(tmp_path / "a.npz", group_column="lesion", metadata_path=tmp_path / "short.csv")
    with pytest.raises(DataError, match="columns are"):
        load_dataset(tmp_path / "a.npz", group_column="nope", metadata_path=tmp_path / "meta.csv")


# --------------------------------------------------------------------------- bad inputs


def _npz(tmp_path, x, y, name="bad.npz"):
    p = tmp_path / name
    np.savez(p, x=x, y=y)
    return p


def test_missing_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope.npz")
    (tmp_path / "a.txt").write_text("1,2")
    with pytest.raises(DataError, match=r"supported: .npz"):
        load_dataset(tmp_path / "a.txt")


@pytest.mark.parametrize("ext", ["npz", "csv", "npy", "pt", "parquet"])
def test_empty_file(tmp_path, ext):
    (tmp_path / f"e.{ext}").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / f"e.{ext}")


def test_truncated_npz(tmp_path):
    x, y = _xy(200, 20)
    p = _npz(tmp_path, x, y, "t.npz")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(p)


@pytest.mark.parametrize("ext", ["pt", "parquet"])
def test_corrupt_binary(tmp_path, ext):
    (tmp_path / f"c.{ext}").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(tmp_path / f"c.{ext}")


def test_csv_header_only(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,label\n")
    with pytest.raises(DataError, match="no records"):
        load_dataset(tmp_path / "h.csv")


def test_nan_and_inf_rows(tmp_path):
    x, y = _xy()
    x[3, 1] = np.nan
    x[5, 0] = np.nan
    with pytest.raises(DataError, match=r"2 of 40 rows .*NaN"):
        load_dataset(_npz(tmp_path, x, y))
    x, y = _xy()
    x[7, 2] = np.inf
    with pytest.raises(DataError, match=r"1 of 40 rows.*inf"):
        load_dataset(_npz(tmp_path, x, y))


def test_wrong_dims(tmp_path):
    with pytest.raises(DataError, match="2-D"):
        load_dataset(_npz(tmp_path, np.ones(10, np.float32), np.arange(10) % 2))
    np.save(tmp_path / "one.npy", np.ones(10))
    with pytest.raises(DataError, match="last column"):
        load_dataset(tmp_path / "one.npy")


def test_mismatched_lengths(tmp_path):
    x, y = _xy()
    with pytest.raises(DataError, match="40 feature rows but 39 labels"):
        load_dataset(_npz(tmp_path, x, y[:39]))


def test_non_integer_and_negative_labels(tmp_path):
    x, y = _xy()
    yf = y.astype(np.float64)
    yf[0] = 1.5
    with pytest.raises(DataError, match="not integers"):
        load_dataset(_npz(tmp_path, x, yf))
    yn = y.copy()
    yn[0] = -1
    with pytest.raises(DataError, match="negative"):
        load_dataset(_npz(tmp_path, x, yn))


def test_single_class(tmp_path):
    x, _ = _xy()
    with pytest.raises(DataError, match="2 classes"):
        load_dataset(_npz(tmp_path, x, np.zeros(40, np.int64)))


def test_missing_label_column_and_non_numeric(tmp_path):
    pd.DataFrame({"a": [1, 2], "b": [3, 4]}).to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(DataError, match=r"no label column.*\[a, b\]"):
        load_dataset(tmp_path / "n.csv")
    with pytest.raises(DataError, match=r"'cls' not found; columns are \[a, b\]"):
        load_dataset(tmp_path / "n.csv", label_column="cls")
    pd.DataFrame({"a": [1, 2], "sex": ["m", "f"], "label": [0, 1]}).to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(DataError, match=r"\[sex\] are not"):
        load_dataset(tmp_path / "s.csv")


def test_garbled_csv(tmp_path):
    (tmp_path / "g.csv").write_text('a,b,label\n1,2,0\n"3,4,1\n5,6\n')
    with pytest.raises(DataError):
        load_dataset(tmp_path / "g.csv")


# --------------------------------------------------------------------------- partitions


def test_fewer_samples_than_clients():
    with pytest.raises(DataError, match="fewer than partition.clients"):
        partition_indices(np.arange(30) % 3, kind="iid", clients=4, alpha=1.0, seed=0, min_client_size=10)


def test_iid_balanced_and_disjoint():
    y = np.arange(103) % 5
    parts = partition_indices(y, kind="iid", clients=4, alpha=1.0, seed=1, min_client_size=2)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))


def test_dirichlet_min_size_and_deterministic():
    y = load_dataset("digits").y
    a = partition_indices(y, kind="dirichlet", clients=10, alpha=0.1, seed=3, min_client_size=40)
    b = partition_indices(y, kind="dirichlet", clients=10, alpha=0.1, seed=3, min_client_size=40)
    c = partition_indices(y, kind="dirichlet", clients=10, alpha=0.1, seed=4, min_client_size=40)
    assert all(len(p) >= 40 for p in a)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(len(y)))
    # label skew: at least one client is far from the global label mix
    assert max(np.bincount(y[p], minlength=10).max() / len(p) for p in a) > 0.3


def test_dirichlet_impossible_gives_advice():
    y = np.repeat([0, 1], 50)
    with pytest.raises(DataError, match="larger partition.alpha"):
        partition_indices(y, kind="dirichlet", clients=10, alpha=0.01, seed=0, min_client_size=10)


def test_site_partition():
    y = np.arange(30) % 2
    sites = np.array(["b"] * 10 + ["a"] * 12 + ["c"] * 8)
    parts = partition_indices(y, kind="site", clients=3, alpha=1.0, seed=0, min_client_size=2, sites=sites)
    assert [set(sites[p]) for p in parts] == [{"a"}, {"b"}, {"c"}]
    with pytest.raises(DataError, match=r"3 sites \(a, b, c\)"):
        partition_indices(y, kind="site", clients=2, alpha=1.0, seed=0, min_client_size=2, sites=sites)
    with pytest.raises(DataError, match="site_column"):
        partition_indices(y, kind="site", clients=3, alpha=1.0, seed=0, min_client_size=2)


def test_split_stratified_deterministic():
    y = np.arange(100) % 4
    idx = np.arange(10, 90)
    tr, te = split_client(idx, y, None, test_fraction=0.25, seed=5)
    tr2, te2 = split_client(idx, y, None, test_fraction=0.25, seed=5)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert set(tr) | set(te) == set(idx) and not set(tr) & set(te)
    assert np.bincount(y[te], minlength=4).tolist() == [5, 5, 5, 5]


def test_split_tiny_client():
    y = np.array([0, 1, 0])
    tr, te = split_client(np.array([0, 1]), y, None, test_fraction=0.2, seed=0)
    assert len(tr) == 1 and len(te) == 1
    with pytest.raises(DataError, match="client 7 has 1 record"):
        split_client(np.array([2]), y, None, test_fraction=0.2, seed=0, client_id=7)
    with pytest.raises(DataError, match="single group"):
        split_client(np.array([0, 1, 2]), y, np.array(["g"] * 3), test_fraction=0.2, seed=0, client_id=3)


@pytest.mark.skipif(not (HAM_CSV.exists() and HAM_META.exists()), reason="shared HAM10000 data absent")
def test_grouped_split_real_ham10000():
    cfg = DataConfig(path=str(HAM_CSV), group_column="lesion_id", metadata_path=str(HAM_META))
    fed_ds = load_dataset(cfg.path, group_column="lesion_id", metadata_path=cfg.metadata_path)
    assert fed_ds.value_range == (0.0, 255.0) and len(set(fed_ds.groups)) == 7470
    parts = partition_indices(fed_ds.y, kind="dirichlet", clients=5, alpha=0.5, seed=0, min_client_size=50)
    for i, p in enumerate(parts):
        tr, te = split_client(p, fed_ds.y, fed_ds.groups, test_fraction=0.2, seed=i, client_id=i)
        assert len(tr) >= 1 and len(te) >= 1
        assert not set(fed_ds.groups[tr]) & set(fed_ds.groups[te]), f"client {i}: a lesion is on both sides"
        assert 0.1 < len(te) / len(p) < 0.3


def _sklearn_folds(y, groups, k, seed):
    """Every record's test fold under scikit-learn's StratifiedGroupKFold (the reference)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(y), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups)
        for i, (_, test) in enumerate(splits):
            fold[test] = i
    return fold


def test_the_group_folds_equal_scikit_learns():
    """`stratified_group_folds` (vectorized) assigns every record to the fold scikit-learn's StratifiedGroupKFold
    does: random data with ties (groups of equal class counts), few and many groups, 2-10 folds and classes, string
    group ids; and HAM10000's clients as Table 1 partitions them. A different fold anywhere would move records
    between a client's train and test splits, i.e. change every published number on grouped data."""
    from fedhypevae.data.partition import stratified_group_folds

    rng = np.random.default_rng(0)
    cases = 0
    for trial in range(60):
        n = int(rng.integers(20, 400))
        C = int(rng.integers(2, 8))
        G = int(rng.integers(5, n))
        y = rng.integers(0, C, n)
        groups = np.array([f"lesion_{v}" for v in rng.integers(0, G, n)])
        k = int(rng.integers(2, 11))
        if len(np.unique(groups)) < k:
            continue
        seed = int(rng.integers(0, 2**32))
        ours = stratified_group_folds(y, groups, k, seed)
        if ours is None:  # scikit-learn refuses the same case
            with pytest.raises(ValueError):
                _sklearn_folds(y, groups, k, seed)
            continue
        assert np.array_equal(ours, _sklearn_folds(y, groups, k, seed)), trial
        cases += 1
    assert cases >= 40
    if HAM_CSV.exists() and HAM_META.exists():
        ds = load_dataset(str(HAM_CSV), group_column="lesion_id", metadata_path=str(HAM_META))
        for kind in ("iid", "dirichlet"):
            parts = partition_indices(ds.y, kind=kind, clients=10, alpha=0.3, seed=1, min_client_size=20)
            for i, p in enumerate(parts[:5]):
                y, g = ds.y[p], np.asarray(ds.groups)[p]
                assert np.array_equal(stratified_group_folds(y, g, 5, i), _sklearn_folds(y, g, 5, i)), (kind, i)


# --------------------------------------------------------------------------- federation and shards


def _digits_fed(client_ids=None, **part):
    kw = dict(kind="dirichlet", alpha=0.5, clients=5, min_client_size=20) | part
    return build_federation(DataConfig(path="digits"), PartitionConfig(**kw), seed=0, client_ids=client_ids)


def test_build_federation_every_client_has_train_and_test():
    fed = _digits_fed()
    assert fed.num_clients == 5 and len(fed.clients) == 5 and fed.dim == 64 and fed.num_classes == 10
    assert fed.transform == "range" and fed.value_range == (0.0, 16.0)
    for c in fed.clients:
        assert len(c.x_train) >= 1 and len(c.x_test) >= 1
        assert c.declared_size == len(c.x_train) == fed.declared_sizes[c.client_id]
        assert c.x_train.min() >= 0 and c.x_train.max() <= 1
    assert sum(len(c.x_train) + len(c.x_test) for c in fed.clients) == 1797
    sub = _digits_fed(client_ids=[3, 1])
    assert [c.client_id for c in sub.clients] == [3, 1] and sub.declared_sizes == fed.declared_sizes
    np.testing.assert_array_equal(sub.clients[0].x_train, fed.clients[3].x_train)


def test_shard_round_trip_and_corruption(tmp_path):
    fed = _digits_fed()
    out = write_shards(fed, tmp_path / "shards", clients_per_file=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clients"] == 5 and manifest["kind"] == "dirichlet" and manifest["format"] == 2
    assert manifest["files"] == ["clients_00000.npz", "clients_00001.npz", "clients_00002.npz"]  # 2 + 2 + 1 clients
    assert sorted(manifest["sha256"]) == manifest["files"] and sorted(p.name for p in out.iterdir()) == [
        *manifest["files"],
        "manifest.json",
    ]
    back = load_shards(out)
    assert back.declared_sizes == fed.declared_sizes and back.transform == "range" and back.value_range == (0.0, 16.0)
    for a, b in zip(fed.clients, back.clients):
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)
        assert a.declared_size == b.declared_size
    # a subset through build_federation reads only those shards
    sub = build_federation(DataConfig(path=str(out)), PartitionConfig(clients=5), seed=0, client_ids=[2])
    assert [c.client_id for c in sub.clients] == [2] and sub.num_clients == 5
    with pytest.raises(DataError, match="partition.clients=5"):
        build_federation(DataConfig(path=str(out)), PartitionConfig(clients=4), seed=0)
    # corrupt the file of clients 2 and 3: loading them fails, loading clients of other files still works
    shard = out / "clients_00001.npz"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(DataError, match=r"clients_00001\.npz for clients 2\.\.3 is truncated or corrupt"):
        load_shards(out)
    assert [c.client_id for c in load_shards(out, client_ids=[4, 0]).clients] == [4, 0]
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        load_shards(out, client_ids=[3])
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_shards(out)


def test_shard_files_hold_blocks_of_clients_and_format_1_directories_are_still_read(tmp_path):
    """`data partition` writes one file per block of clients (default 1,024: few files at any scale); a directory of
    shard format 1 (one file per client) loads to the same clients."""
    from fedhypevae.data import shard_file

    fed = _digits_fed()
    one = write_shards(fed, tmp_path / "one")  # the default block holds all 5 clients
    m = json.loads((one / "manifest.json").read_text())
    assert m["files"] == ["clients_00000.npz"] and m["clients_per_file"] == 1024
    assert {shard_file(m, i) for i in range(5)} == {"clients_00000.npz"}
    # format 1, as earlier versions wrote it
    old = tmp_path / "old"
    old.mkdir()
    names = []
    for c in fed.clients:
        name = f"client_{c.client_id:05d}.npz"
        arrays = dict(x_train=c.x_train, y_train=c.y_train, x_test=c.x_test, y_test=c.y_test)
        np.savez(old / name, declared_size=np.int64(c.declared_size), **arrays)
        names.append(name)
    digests = {n: hashlib.sha256((old / n).read_bytes()).hexdigest() for n in names}
    fmt1 = {k: v for k, v in m.items() if k != "clients_per_file"}
    (old / "manifest.json").write_text(json.dumps({**fmt1, "format": 1, "files": names, "sha256": digests}))
    assert shard_file(json.loads((old / "manifest.json").read_text()), 3) == "client_00003.npz"
    for back in (load_shards(one), load_shards(old)):
        for a, b in zip(fed.clients, back.clients):
            assert a.client_id == b.client_id and a.declared_size == b.declared_size
            np.testing.assert_array_equal(a.x_train, b.x_train)
            np.testing.assert_array_equal(a.y_test, b.y_test)
    bad = json.loads((one / "manifest.json").read_text())
    for change, why in (({"format": 3}, "shard format 3"), ({"clients_per_file": 0}, "clients_per_file is 0")):
        (one / "manifest.json").write_text(json.dumps({**bad, **change}))
        with pytest.raises(DataError, match=why):
            load_shards(one)


def test_describe_dataset():
    d = describe_dataset(load_dataset("digits"))
    assert d["n"] == 1797 and d["dim"] == 64 and d["classes"] == 10 and sum(d["class_counts"]) == 1797
    assert d["nan_count"] == 0 and d["x_min"] == 0 and d["x_max"] == 16 and d["has_groups"] is False


# --------------------------------------------------------------------------- transforms


def test_transforms_resolve_and_invert():
    assert resolve_transform("auto", (0, 255)) == "range" and resolve_transform("auto", None) == "none"
    with pytest.raises(DataError, match="none or l2"):
        resolve_transform("range", None)
    x = np.array([[0, 255, 51], [10, 20, 30]], np.float32)
    z = apply_transform(x, "range", (0, 255))
    assert z.dtype == np.float32 and z.min() >= 0 and z.max() <= 1
    np.testing.assert_allclose(invert_transform(z, "range", (0, 255)), x, atol=1e-4)
    y = np.array([[3, 4], [0, 0]], np.float32)
    np.testing.assert_allclose(apply_transform(y, "l2", None), [[0.6, 0.8], [0, 0]])
    np.testing.assert_array_equal(invert_transform(y, "l2", None), y)
    np.testing.assert_array_equal(apply_transform(y, "none", None), y)
    np.testing.assert_array_equal(invert_transform(y, "none", None), y)


def test_holdout_validation_never_uses_test_records():
    """data.holdout=validation: each client's validation split is carved from its train split; no validation record
    is a test or a train record, and no test record is in the federation at all (records carry their index)."""
    from fedhypevae.data import federation_from_dataset
    from fedhypevae.data.loaders import Dataset
    from fedhypevae.errors import ConfigError

    base = load_dataset("digits")
    ids = np.arange(len(base.y), dtype=np.float32)[:, None]
    ds = Dataset(
        x=np.concatenate([ids, base.x], axis=1),
        y=base.y,
        num_classes=base.num_classes,
        groups=None,
        sites=None,
        value_range=None,
        name="digits+id",
        source="test",
    )
    part = PartitionConfig(kind="dirichlet", alpha=0.3, clients=10, min_client_size=20)

    def fed_of(holdout):
        return federation_from_dataset(ds, DataConfig(transform="none", holdout=holdout), part, 0)

    test_fed, val_fed = fed_of("test"), fed_of("validation")
    assert test_fed.manifest["holdout"] == "test" and val_fed.manifest["holdout"] == "validation"
    all_test = set()
    for t in test_fed.clients:
        all_test |= set(t.x_test[:, 0].astype(int).tolist())
    for t, v in zip(test_fed.clients, val_fed.clients):
        tr, te = set(t.x_train[:, 0].astype(int)), set(t.x_test[:, 0].astype(int))
        vtr, vval = set(v.x_train[:, 0].astype(int)), set(v.x_test[:, 0].astype(int))
        assert len(vtr) == len(v.x_train) and len(vval) == len(v.x_test)  # no record twice
        assert vval and vtr  # both sides non-empty
        assert not vval & vtr, "a validation record is also a train record"
        assert not vval & all_test and not vtr & all_test, "a test record is in the validation federation"
        assert vtr | vval == tr  # the validation split is carved from this client's train split
        assert v.declared_size == len(v.x_train) == val_fed.declared_sizes[v.client_id]
        np.testing.assert_array_equal(v.y_test, base.y[sorted(vval)])
        # stratified with the same fraction: round(0.2 n_c) of each class of the train split
        counts = np.bincount(t.y_train, minlength=10)
        want = np.minimum(np.round(0.2 * counts), np.maximum(counts - 1, 0))
        assert np.array_equal(np.bincount(v.y_test, minlength=10), want.astype(int)) or len(vval) == 1
        assert te  # the test federation's own split is untouched
    again = fed_of("validation")  # deterministic
    for a, b in zip(val_fed.clients, again.clients):
        np.testing.assert_array_equal(a.x_test, b.x_test)
    with pytest.raises(ConfigError, match="data.holdout must be test .* or validation"):
        DataConfig(holdout="val")


def test_holdout_validation_refuses_shard_directories(tmp_path):
    from fedhypevae.errors import ConfigError

    out = write_shards(_digits_fed(), tmp_path / "shards")
    with pytest.raises(ConfigError, match="data.holdout=validation is not supported with a shard directory"):
        build_federation(DataConfig(path=str(out), holdout="validation"), PartitionConfig(clients=5), seed=0)
