"""Per-client downstream evaluation of a synthetic set (the protocol of the paper's Table 1).

For each client a linear classifier (``classifiers.train_linear``) is trained and scored on that
client's own held-out test split: accuracy and balanced accuracy (over the classes present in
that test split), then mean ± std (ddof=0) over clients. Protocols:

- ``augment`` (default, the paper's): the client's real train split plus the global synthetic set;
- ``local``: the real train split only (the lower bracket; needs no synthetic set);
- ``synthetic-only``: the synthetic set only (one classifier, scored on every client's test split);
- ``lambda-mix`` (Di Salvo et al. 2025): a local classifier (real train split) and a synthetic
  classifier are mixed, p = λ p_local + (1 - λ) p_syn; λ is chosen on a stratified validation split
  carved from the client's TRAIN split (never the test split), then the local classifier is refit on
  the full train split. The chosen λ is reported per client.

Test splits are touched only for the final score; nothing is fitted on pooled data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..checkpoint import dumps_json
from ..data.partition import stratified_mask
from ..errors import DataError, FedHypeVAEError
from ..methods import PROTOCOLS
from .classifiers import classifier_seed, train_linear
from .metrics import accuracy, balanced_accuracy, summarize

LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
VAL_FRACTION = 0.25
EVALUATION_FILE = "evaluation.json"


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise FedHypeVAEError(f"unknown evaluation protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def validation_split(y, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a stratified validation split (``data.partition.stratified_mask``, the split a client's
    train/test split uses): per class round(fraction * n_c) records, keeping >= 1 training record per class; at
    least one validation record when there are >= 2 records."""
    return stratified_mask(y, fraction, np.random.default_rng(seed))


def _choose_lambda(p_local: np.ndarray, p_syn: np.ndarray, y_val: np.ndarray, grid: Sequence[float]) -> tuple:
    """Best λ on validation: highest balanced accuracy, then accuracy, then the λ closest to 0.5."""
    best, best_key = None, None
    for lam in grid:
        pred = (lam * p_local + (1.0 - lam) * p_syn).argmax(1)
        key = (balanced_accuracy(y_val, pred), accuracy(y_val, pred), -abs(lam - 0.5))
        if best_key is None or key > best_key:
            best, best_key = float(lam), key
    return best, best_key[0]


def _test_split(c) -> tuple[np.ndarray, np.ndarray]:
    """A client's test split, refused when empty (no score can be given to it)."""
    if len(c.y_test) == 0:
        raise DataError(
            f"client {c.client_id} has an empty test split; it cannot be evaluated (raise partition.min_client_size "
            "or data.test_fraction)"
        )
    return np.asarray(c.x_test, np.float32), np.asarray(c.y_test).reshape(-1).astype(np.int64)


def score_clients(fed, predict: Callable[[object, np.ndarray], np.ndarray]) -> list[dict]:
    """One row per loaded client (by client id): ``predict(client, x_test)`` scored on that client's own test
    split: {"client", "n_test", "accuracy", "balanced_accuracy"}. How every classifier baseline is scored."""
    rows = []
    for c in sorted(fed.clients, key=lambda c: c.client_id):
        x_te, y_te = _test_split(c)
        pred = np.asarray(predict(c, x_te)).reshape(-1)
        rows.append(
            {
                "client": int(c.client_id),
                "n_test": int(len(y_te)),
                "accuracy": accuracy(y_te, pred),
                "balanced_accuracy": balanced_accuracy(y_te, pred),
            }
        )
    return rows


def evaluate_federation(
    fed,
    x_syn=None,
    y_syn=None,
    *,
    protocol: str = "augment",
    seed: int = 0,
    lambda_grid: Sequence[float] = LAMBDA_GRID,
    val_fraction: float = VAL_FRACTION,
    class_weight: str | None = "balanced",
) -> dict:
    """Score every loaded client of ``fed`` under ``protocol``.

    ``x_syn``/``y_syn`` must already be in the federation's (transformed) space; they may be None
    only for ``protocol="local"``. Returns {"protocol", "clients": [per-client rows], "summary":
    {"accuracy", "balanced_accuracy"[, "lambda"]: {"mean","std","n"}}, ...}.
    """
    _check_protocol(protocol)
    K = int(fed.num_classes)
    needs_syn = protocol != "local"
    if needs_syn:
        if x_syn is None or y_syn is None:
            raise FedHypeVAEError(f"protocol {protocol!r} needs a synthetic set; only 'local' runs without one")
        x_syn = np.asarray(x_syn, dtype=np.float32)
        y_syn = np.asarray(y_syn).reshape(-1).astype(np.int64)
        if x_syn.ndim != 2 or x_syn.shape[1] != fed.dim:
            raise DataError(f"synthetic records have shape {x_syn.shape}; the federation's dimension is {fed.dim}")
        if len(x_syn) != len(y_syn) or len(x_syn) == 0:
            raise DataError(f"synthetic set has {len(x_syn)} records and {len(y_syn)} labels; need the same, > 0")
        if y_syn.min() < 0 or y_syn.max() >= K:
            raise DataError(
                f"synthetic labels span {y_syn.min()}..{y_syn.max()}; the federation has classes 0..{K - 1}"
            )
        if not np.isfinite(x_syn).all():
            raise DataError("the synthetic set contains NaN or infinite values")
    if not fed.clients:
        raise DataError("the federation has no loaded clients to evaluate")

    syn_clf = None
    if protocol in ("synthetic-only", "lambda-mix"):
        # global: the same classifier for every client
        syn_clf = train_linear(x_syn, y_syn, K, seed=classifier_seed(seed), class_weight=class_weight)

    rows = []
    for c in sorted(fed.clients, key=lambda c: c.client_id):
        who = f"client {c.client_id}"
        x_te, y_te = _test_split(c)
        if len(c.y_train) == 0 and protocol != "synthetic-only":
            raise DataError(f"{who} has an empty train split; protocol {protocol!r} needs one")
        x_tr, y_tr = np.asarray(c.x_train, np.float32), np.asarray(c.y_train).reshape(-1).astype(np.int64)
        cseed = classifier_seed(seed, c.client_id)
        row = {
            "client_id": int(c.client_id),
            "n_train": int(len(y_tr)),
            "n_test": int(len(y_te)),
            "test_classes": [int(v) for v in np.unique(y_te)],
        }
        converged = True
        if protocol == "local":
            clf = train_linear(x_tr, y_tr, K, seed=cseed, class_weight=class_weight)
            pred, converged = clf.predict(x_te), clf.converged
        elif protocol == "augment":
            clf = train_linear(
                np.concatenate([x_tr, x_syn]), np.concatenate([y_tr, y_syn]), K, seed=cseed, class_weight=class_weight
            )
            pred, converged = clf.predict(x_te), clf.converged
        elif protocol == "synthetic-only":
            pred, converged = syn_clf.predict(x_te), syn_clf.converged
        else:  # lambda-mix
            val = validation_split(y_tr, val_fraction, cseed)
            if val.any() and (~val).any():
                loc = train_linear(x_tr[~val], y_tr[~val], K, seed=cseed, class_weight=class_weight)
                lam, val_bacc = _choose_lambda(
                    loc.predict_proba(x_tr[val]), syn_clf.predict_proba(x_tr[val]), y_tr[val], lambda_grid
                )
            else:
                lam, val_bacc = 0.5, None  # one training record: nothing to validate on
            loc = train_linear(x_tr, y_tr, K, seed=cseed, class_weight=class_weight)  # refit on the full train split
            pred = (lam * loc.predict_proba(x_te) + (1.0 - lam) * syn_clf.predict_proba(x_te)).argmax(1)
            converged = loc.converged and syn_clf.converged
            row.update({"lambda": lam, "n_val": int(val.sum()), "val_balanced_accuracy": val_bacc})
        row.update(
            {
                "accuracy": accuracy(y_te, pred),
                "balanced_accuracy": balanced_accuracy(y_te, pred),
                "converged": bool(converged),
            }
        )
        rows.append(row)

    summary = {
        "accuracy": summarize(r["accuracy"] for r in rows),
        "balanced_accuracy": summarize(r["balanced_accuracy"] for r in rows),
    }
    if protocol == "lambda-mix":
        summary["lambda"] = summarize(r["lambda"] for r in rows)
    summary["all_converged"] = all(r["converged"] for r in rows)
    out = {
        "protocol": protocol,
        "seed": int(seed),
        "num_classes": K,
        "clients": rows,
        "summary": summary,
        "std": "population std (ddof=0) over clients",
        "classifier": {
            "kind": "multinomial logistic regression (lbfgs) on features standardized on the "
            "classifier's own training data",
            "class_weight": class_weight,
        },
        "n_synthetic": None if not needs_syn else int(len(y_syn)),
    }
    if protocol == "lambda-mix":
        out["lambda_grid"] = [float(v) for v in lambda_grid]
        out["val_fraction"] = float(val_fraction)
    return out


# --------------------------------------------------------------------------- a run directory


def load_synthetic(path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from a synthetic.npz (x in the input data's units)."""
    p = Path(str(path))
    if not p.is_file():
        raise FedHypeVAEError(
            f"{p} does not exist; `fedhypevae train --out DIR` writes DIR/synthetic.npz at the end "
            "of a completed (not interrupted) run"
        )
    from ..data.loaders import _corrupt, npz_precheck

    npz_precheck(p, ["x", "y"])
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataError(f"{p} lacks arrays {missing}; a synthetic set holds 'x' (n, d) and 'y' (n,)")
            return np.asarray(z["x"], np.float32), np.asarray(z["y"]).reshape(-1).astype(np.int64)
    except FedHypeVAEError:
        raise
    except Exception as exc:
        raise _corrupt(p, exc) from None


def _run_summary(run_dir: Path) -> dict | None:
    p = run_dir / "results.json"
    if not p.is_file():
        return None
    try:
        res = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"results_json": "unreadable"}
    priv = res.get("privacy", {}) or {}
    return {
        k: priv.get(k) for k in ("enabled", "mode", "epsilon_spent", "target_epsilon", "delta", "formal_guarantee")
    } | {"config_hash": (res.get("provenance") or {}).get("config_hash")}


def _clipped_fraction(x_raw: np.ndarray, fed) -> float | None:
    """Share of synthetic values outside the declared value range (``range`` clips them on the way in)."""
    if fed.transform != "range" or fed.value_range is None:
        return None
    lo, hi = float(fed.value_range[0]), float(fed.value_range[1])
    return float(np.mean((x_raw < lo) | (x_raw > hi)))


def evaluate_run(
    run_dir,
    *,
    protocol: str = "augment",
    synthetic_path=None,
    seed: int | None = None,
    quality: bool = True,
    data_path: str | None = None,
    json_path=None,
) -> dict:
    """Evaluate a training run directory; writes ``json_path`` (default RUN_DIR/evaluation.json) and returns it.

    Rebuilds the federation from RUN_DIR/config.yaml (same data, partition and seed, hence the same
    splits the run trained on; ``data_path`` overrides ``data.path`` when the data moved or the path
    was relative to another working directory), loads ``synthetic_path`` (default
    RUN_DIR/synthetic.npz, in the input data's units) and maps it into the federation's space.
    ``seed`` (default: the run's seed) drives validation splits and the quality subsamples.
    """
    from ..config import load_config
    from ..data import apply_transform, build_federation
    from .quality import synthetic_quality

    _check_protocol(protocol)
    run = Path(str(run_dir))
    if not run.is_dir():
        raise FedHypeVAEError(f"{run} is not a directory; give the --out directory of `fedhypevae train`")
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FedHypeVAEError(
            f"{run} has no config.yaml; `fedhypevae train --out {run}` writes it (is this a run directory?)"
        )
    cfg = load_config(str(cfg_path))
    if data_path is not None:
        cfg.data.path = str(data_path)
    seed = int(cfg.seed if seed is None else seed)
    syn_file = Path(str(synthetic_path)) if synthetic_path is not None else run / "synthetic.npz"
    need_syn = protocol != "local"
    x_raw = y_syn = None
    if protocol == "local" and quality and syn_file.is_file():
        x_raw, y_syn = load_synthetic(syn_file)  # only for the quality section
    if need_syn:
        if not syn_file.is_file():
            hint = (
                "`fedhypevae train --out DIR` writes DIR/synthetic.npz when training completes (an interrupted "
                "run has none: finish it with `fedhypevae train --resume --out DIR`)"
            )
            raise FedHypeVAEError(f"no synthetic set at {syn_file}; {hint}. Protocol 'local' needs none")
        x_raw, y_syn = load_synthetic(syn_file)

    fed = build_federation(cfg.data, cfg.partition, cfg.seed)
    if x_raw is not None and (x_raw.ndim != 2 or x_raw.shape[1] != fed.dim):
        raise DataError(
            f"{syn_file}: synthetic records of shape {x_raw.shape} do not match the run's data, which has "
            f"{fed.dim} features; give the synthetic set of this run"
        )
    x_syn = None if x_raw is None else apply_transform(x_raw, fed.transform, fed.value_range)
    res = evaluate_federation(
        fed,
        x_syn if protocol != "local" else None,
        y_syn if protocol != "local" else None,
        protocol=protocol,
        seed=seed,
    )
    out = {
        "run_dir": str(run),
        "protocol": protocol,
        "seed": seed,
        "summary": res["summary"],
        "clients": res["clients"],
        "std": res["std"],
        "classifier": res["classifier"],
        "synthetic": None
        if x_raw is None
        else {
            "path": str(syn_file.resolve()),
            "samples": int(len(y_syn)),
            "class_counts": [int(v) for v in np.bincount(y_syn, minlength=fed.num_classes)],
            "mapped_with": {
                "transform": fed.transform,
                "value_range": None if fed.value_range is None else list(fed.value_range),
            },
            "clipped_fraction": _clipped_fraction(x_raw, fed),
        },
        "data": {
            "source": str(fed.source),
            "clients": int(fed.num_clients),
            "classes": int(fed.num_classes),
            "dim": int(fed.dim),
            "partition": cfg.partition.kind,
            "alpha": float(cfg.partition.alpha),
            "split_seed": int(cfg.seed),
            "test_fraction": float(cfg.data.test_fraction),
            # test: scores on the clients' test splits; validation: on validation splits carved from their train
            # splits (for choosing settings; no test record was used)
            "holdout": cfg.data.holdout,
            "group_column": cfg.data.group_column,
        },
        "run": _run_summary(run),
    }
    for k in ("lambda_grid", "val_fraction"):
        if k in res:
            out[k] = res[k]
    if protocol != "local":
        # the same classifiers without the synthetic set: what the synthetic set adds (or costs) is the difference
        local = evaluate_federation(fed, protocol="local", seed=seed)
        out["reference_local"] = {
            "summary": local["summary"],
            "what": "the same per-client classifiers trained on the real train split only",
        }
    if quality and x_syn is not None:
        out["quality"] = synthetic_quality(fed, x_syn, y_syn, seed=seed)
    try:
        from importlib import metadata

        from ..provenance import git_commit, package_versions

        packages = package_versions()
        packages["scikit-learn"] = metadata.version("scikit-learn")
        out["provenance"] = {"git_commit": git_commit(), "packages": packages, "config_hash": cfg.hash()}
    except Exception:  # provenance is best effort; never fail an evaluation on it
        pass
    target = Path(str(json_path)) if json_path is not None else run / EVALUATION_FILE
    atomic_write_text(target, dumps_json(out, indent=2) + "\n", owner_only=True)
    out["json_path"] = str(target)
    return out
