"""Evaluation layer: metrics, the linear classifier, per-client protocols, synthetic-set quality,
evaluate_run on a real run directory, and the split invariants evaluation relies on."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedhypevae.config import load_config, save_config
from fedhypevae.data import ClientData, Federation
from fedhypevae.errors import FedHypeVAEError
from fedhypevae.evaluation import (
    LAMBDA_GRID,
    accuracy,
    balanced_accuracy,
    c2st,
    coverage_density,
    evaluate_federation,
    evaluate_run,
    mmd2,
    summarize,
    synthetic_quality,
    train_linear,
    validation_split,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- metrics


def test_balanced_accuracy_matches_a_hand_computation_with_an_absent_class():
    # classes 0, 1, 3 are present in y_true; class 2 is absent but predicted twice (both wrong)
    y_true = [0, 0, 0, 0, 1, 1, 3, 3, 3, 3]
    y_pred = [0, 0, 0, 2, 1, 0, 3, 3, 2, 1]
    # recalls: class 0 -> 3/4, class 1 -> 1/2, class 3 -> 2/4; class 2 has no recall term
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert accuracy(y_true, y_pred) == pytest.approx(6 / 10)
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the predicted-but-absent class
        assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_metrics_edge_cases():
    assert balanced_accuracy([2, 2, 2], [2, 2, 0]) == pytest.approx(2 / 3)  # one class present: recall = accuracy
    assert accuracy([1, 2], [1, 2]) == 1.0
    with pytest.raises(ValueError):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        balanced_accuracy([], [])


def test_summarize_uses_population_std_over_values():
    s = summarize([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(np.sqrt(0.08 / 3))  # ddof=0
    assert s["n"] == 3
    assert summarize([]) == {"mean": None, "std": None, "n": 0}
    assert summarize([1.0, None])["n"] == 1


# --------------------------------------------------------------------------- classifier


def test_linear_classifier_with_a_single_training_class_predicts_it():
    rng = np.random.default_rng(0)
    clf = train_linear(rng.normal(size=(7, 3)), np.full(7, 2), 4, seed=0)
    x = rng.normal(size=(5, 3))
    assert (clf.predict(x) == 2).all()
    p = clf.predict_proba(x)
    assert p.shape == (5, 4) and np.allclose(p[:, 2], 1.0) and np.allclose(p.sum(1), 1.0)


def test_linear_classifier_gives_columns_for_every_class():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 3], 20)
    x = rng.normal(size=(40, 2)) + 4.0 * y[:, None]
    clf = train_linear(x, y, 5, seed=0)
    p = clf.predict_proba(x)
    assert p.shape == (40, 5)
    assert np.allclose(p[:, [1, 2, 4]], 0.0) and np.allclose(p.sum(1), 1.0)
    assert accuracy(y, clf.predict(x)) > 0.95
    with pytest.raises(ValueError):
        train_linear(x, np.full(40, 7), 5, seed=0)


# --------------------------------------------------------------------------- a hand-made federation


def _blobs(n, rng, centers, scale=1.0):
    y = rng.integers(0, len(centers), size=n)
    return (centers[y] + scale * rng.normal(size=(n, centers.shape[1]))).astype(np.float32), y.astype(np.int64)


def _federation(seed=0, clients=3, n_train=60, n_test=30, dim=5, classes=3):
    rng = np.random.default_rng(seed)
    centers = 3.0 * np.eye(classes, dim)
    cs = []
    for i in range(clients):
        xtr, ytr = _blobs(n_train, rng, centers)
        xte, yte = _blobs(n_test, rng, centers)
        cs.append(ClientData(client_id=i, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, declared_size=n_train))
    fed = Federation(
        clients=cs,
        num_clients=clients,
        num_classes=classes,
        dim=dim,
        declared_sizes=[n_train] * clients,
        transform="none",
        value_range=None,
        source="blobs",
    )
    return fed, centers


def _pooled_train(fed):
    return (np.concatenate([c.x_train for c in fed.clients]), np.concatenate([c.y_train for c in fed.clients]))


def test_evaluate_federation_on_a_copy_of_real_data_is_sane_and_beats_random_labels():
    fed, _ = _federation()
    x, y = _pooled_train(fed)
    res = {p: evaluate_federation(fed, x, y, protocol=p, seed=0) for p in ("augment", "local", "synthetic-only")}
    for p, r in res.items():
        assert len(r["clients"]) == 3 and r["protocol"] == p
        assert r["summary"]["balanced_accuracy"]["mean"] > 0.8, p
        assert r["summary"]["accuracy"]["n"] == 3
        for row in r["clients"]:
            assert 0.0 <= row["balanced_accuracy"] <= 1.0 and row["n_test"] == 30
    y_rand = np.random.default_rng(5).permutation(y)
    bad = evaluate_federation(fed, x, y_rand, protocol="synthetic-only", seed=0)
    assert (
        bad["summary"]["balanced_accuracy"]["mean"]
        < res["synthetic-only"]["summary"]["balanced_accuracy"]["mean"] - 0.3
    )
    assert res["local"]["n_synthetic"] is None and res["augment"]["n_synthetic"] == len(y)


def test_lambda_mix_picks_lambda_on_train_validation_and_reports_it():
    fed, _ = _federation()
    x, y = _pooled_train(fed)
    r = evaluate_federation(fed, x, y, protocol="lambda-mix", seed=0)
    for row in r["clients"]:
        assert 0.0 <= row["lambda"] <= 1.0 and row["lambda"] in LAMBDA_GRID
        assert row["n_val"] == pytest.approx(0.25 * row["n_train"], abs=3)
    assert r["summary"]["lambda"]["n"] == 3 and r["lambda_grid"] == list(LAMBDA_GRID)
    # a confidently wrong synthetic set (classes relabelled) must push lambda towards the local classifier
    r2 = evaluate_federation(fed, x, (y + 1) % 3, protocol="lambda-mix", seed=0)
    assert min(row["lambda"] for row in r2["clients"]) >= 0.5
    assert r2["summary"]["balanced_accuracy"]["mean"] > 0.8


def test_validation_split_is_stratified_and_keeps_a_training_record_per_class():
    y = np.array([0] * 8 + [1] * 4 + [2])
    m = validation_split(y, 0.25, seed=0)
    assert m[y == 0].sum() == 2 and m[y == 1].sum() == 1 and m[y == 2].sum() == 0
    assert validation_split(np.array([4, 4]), 0.25, seed=0).sum() == 1


def test_evaluate_federation_rejects_bad_synthetic_sets():
    fed, _ = _federation()
    x, y = _pooled_train(fed)
    with pytest.raises(FedHypeVAEError, match="protocol"):
        evaluate_federation(fed, x, y, protocol="nope")
    with pytest.raises(FedHypeVAEError, match="needs a synthetic set"):
        evaluate_federation(fed, None, None, protocol="augment")
    with pytest.raises(FedHypeVAEError, match="dimension"):
        evaluate_federation(fed, x[:, :2], y, protocol="augment")
    with pytest.raises(FedHypeVAEError, match="labels"):
        evaluate_federation(fed, x, y + 10, protocol="augment")


# --------------------------------------------------------------------------- quality


def test_quality_separates_same_distribution_from_shifted_data():
    fed, centers = _federation(n_test=100)
    rng = np.random.default_rng(3)
    x_same, y_same = _blobs(300, rng, centers)
    x_shift = x_same + 2.0
    same = synthetic_quality(fed, x_same, y_same, seed=0)
    shifted = synthetic_quality(fed, x_shift, y_same, seed=0)
    assert 0.35 <= same["c2st"]["accuracy"] <= 0.65
    assert shifted["c2st"]["accuracy"] >= 0.95
    assert shifted["mmd2"]["real_vs_synthetic"] > 5 * same["mmd2"]["real_vs_synthetic"]
    assert same["mmd2"]["real_vs_synthetic"] < 3 * same["mmd2"]["real_vs_real"] + 1e-3
    assert same["coverage"]["overall"] > 0.8 > shifted["coverage"]["overall"]
    assert same["n_real"] == 300 and same["classes_missing_from_synthetic"] == []
    assert set(same["coverage"]["per_class"]) == {"0", "1", "2"}


def test_coverage_of_an_identical_set_is_one_and_of_nothing_is_zero():
    x = np.random.default_rng(0).normal(size=(50, 4))
    r = coverage_density(x, x.copy(), k=5)
    assert r["coverage"] == 1.0 and r["density"] >= 1.0
    assert coverage_density(x, np.zeros((0, 4)))["coverage"] == 0.0
    assert coverage_density(x[:1], x)["coverage"] is None
    assert c2st(x, x[:3])["accuracy"] is None  # too few for 5 folds, said so
    assert mmd2(x, x) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- a run directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fedhypevae.run import run_training

    out = tmp_path_factory.mktemp("eval") / "run"
    run_training(load_config("tiny", ["train.rounds=1"]), out, progress=False)
    return out


def test_evaluate_run_writes_evaluation_json(tiny_run):
    res = evaluate_run(tiny_run, protocol="augment")
    saved = json.loads((tiny_run / "evaluation.json").read_text())
    assert len(saved["clients"]) == 4 and saved["protocol"] == "augment"
    assert saved["summary"]["balanced_accuracy"]["n"] == 4
    assert 0.0 <= saved["summary"]["accuracy"]["mean"] <= 1.0
    assert saved["synthetic"]["samples"] == 100 and saved["synthetic"]["path"].endswith("synthetic.npz")
    assert saved["run"]["epsilon_spent"] is not None
    assert 0.0 <= saved["synthetic"]["clipped_fraction"] <= 1.0
    assert {"mmd2", "c2st", "coverage"} <= set(saved["quality"])
    assert res["summary"] == saved["summary"]
    # the same splits the run trained on: client sizes match the run's declared sizes
    results = json.loads((tiny_run / "results.json").read_text())
    assert [r["n_train"] for r in saved["clients"]] == results["data"]["declared_sizes"]
    mix = evaluate_run(tiny_run, protocol="lambda-mix", quality=False, json_path=tiny_run / "eval_mix.json")
    assert all(0.0 <= r["lambda"] <= 1.0 for r in mix["clients"]) and "quality" not in mix


def test_evaluate_run_says_what_is_missing(tmp_path):
    with pytest.raises(FedHypeVAEError, match="config.yaml"):
        evaluate_run(tmp_path)
    save_config(load_config("tiny"), tmp_path / "config.yaml")
    with pytest.raises(FedHypeVAEError, match=r"synthetic.npz.*fedhypevae train"):
        evaluate_run(tmp_path)
    # the local protocol needs no synthetic set
    res = evaluate_run(tmp_path, protocol="local")
    assert len(res["clients"]) == 4 and res["synthetic"] is None and "quality" not in res


# --------------------------------------------------------------------------- split invariants


def test_ham10000_lesion_split_invariants():
    """Every client's train and test lesion sets are disjoint and every test split is non-empty."""
    ham = SHARED_DATA / "ham10000"
    if not (ham / "hmnist_8_8_L.csv").is_file() or not (ham / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"{ham} is not present")
    from fedhypevae.data import federation_from_dataset, load_dataset, partition_indices, split_client
    from fedhypevae.data.federation import _client_seed

    cfg = load_config(
        None,
        [
            f"data.path={ham / 'hmnist_8_8_L.csv'}",
            f"data.metadata_path={ham / 'HAM10000_metadata.csv'}",
            "data.group_column=lesion_id",
            "partition.clients=10",
            "partition.kind=dirichlet",
            "partition.alpha=0.3",
        ],
    )
    ds = load_dataset(cfg.data.path, group_column="lesion_id", metadata_path=cfg.data.metadata_path)
    assert ds.groups is not None
    fed = federation_from_dataset(ds, cfg.data, cfg.partition, cfg.seed)  # what build_federation does after loading
    parts = partition_indices(
        ds.y, kind="dirichlet", clients=10, alpha=0.3, seed=cfg.seed, min_client_size=cfg.partition.min_client_size
    )
    for i, p in enumerate(parts):
        tr, te = split_client(p, ds.y, ds.groups, test_fraction=cfg.data.test_fraction, seed=_client_seed(cfg.seed, i))
        assert len(te) > 0 and len(tr) > 0
        assert not set(ds.groups[tr]) & set(ds.groups[te]), f"client {i}: a lesion on both sides"
        c = fed.client(i)  # the federation evaluation rebuilds holds exactly these records
        assert np.array_equal(c.y_test, ds.y[te]) and np.array_equal(c.y_train, ds.y[tr])
        assert len(c.y_test) > 0
