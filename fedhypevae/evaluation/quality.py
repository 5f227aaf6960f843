"""Quality of a synthetic set against real embeddings.

The real reference is the POOLED TEST SPLITS of the loaded clients: records that never touched
generative training or the DP statistics. Pooling them is fine here: nothing is fitted on them
that feeds back into training or into the per-client classifiers; they are only compared with
the synthetic set. All comparisons happen in the federation's (transformed) space.

- ``mmd2``: biased multi-kernel Gaussian MMD^2 (the same estimator as the training loss,
  ``privacy.stats.gaussian_kernel_mmd2``) with bandwidths given in units of sqrt(d), on
  subsamples of at most ``max_samples`` per side. It is reported beside the same statistic
  between two disjoint halves of the real reference at the same sample sizes (the floor a
  perfect generator would reach; the V-statistic is biased upwards at small n).
- ``c2st``: classifier two-sample test: the evaluation's classifier (``train_linear``), real vs synthetic on
  equal-sized subsamples, stratified k-fold cross-validated accuracy. 0.5 = indistinguishable,
  1.0 = perfectly separable (by a linear classifier: a weak but cheap critic).
- ``coverage`` / ``density`` (Naeem et al. 2020, "Reliable fidelity and diversity metrics for
  generative models"): coverage = fraction of real records whose k-NN ball (radius = distance
  to the k-th nearest other real record) holds at least one synthetic record; density = mean
  number of real balls a synthetic record falls in, divided by k (about 1 when the
  distributions match). Per class (real and synthetic records of that class) and overall
  (labels ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .classifiers import classifier_seed, train_linear
from .metrics import accuracy, population_std

DEFAULT_BANDWIDTHS = (0.25, 0.5, 1.0)  # in units of sqrt(d)
DEFAULT_MAX_SAMPLES = 1000
DEFAULT_K = 5
DEFAULT_FOLDS = 5


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator, y: np.ndarray | None = None):
    if len(x) <= n:
        return (x, y) if y is not None else x
    idx = np.sort(rng.choice(len(x), size=n, replace=False))
    return (x[idx], y[idx]) if y is not None else x[idx]


def mmd2(
    x, y, *, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int = 0
) -> float:
    """Multi-kernel Gaussian MMD^2 (biased) between x and y, kernel bandwidths ``b * sqrt(d)``;
    each side is subsampled to at most ``max_samples`` records."""
    import torch

    from ..privacy.stats import gaussian_kernel_mmd2

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd2 needs two (n, d) arrays of the same d; got {x.shape} and {y.shape}")
    if len(x) == 0 or len(y) == 0:
        raise ValueError("mmd2 needs at least one record on each side")
    rng = np.random.default_rng(seed)
    x, y = _subsample(x, max_samples, rng), _subsample(y, max_samples, rng)
    scale = math.sqrt(x.shape[1])
    with torch.no_grad():
        val = gaussian_kernel_mmd2(torch.from_numpy(x), torch.from_numpy(y), [float(b) * scale for b in bandwidths])
    return float(val)


def c2st(x_real, x_syn, *, seed: int = 0, folds: int = DEFAULT_FOLDS, max_samples: int = DEFAULT_MAX_SAMPLES) -> dict:
    """Classifier two-sample test accuracy (real = 0, synthetic = 1) on equal-sized subsamples: the evaluation's
    classifier (``classifiers.train_linear``, standardized on each fold's training part) scored by ``accuracy``
    on the held-out fold, mean and population std over stratified folds."""
    from sklearn.model_selection import StratifiedKFold

    x_real = np.asarray(x_real, dtype=np.float64)
    x_syn = np.asarray(x_syn, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = int(min(len(x_real), len(x_syn), max_samples))
    if n < folds:
        return {
            "accuracy": None,
            "std": None,
            "n_per_side": n,
            "folds": folds,
            "note": f"too few records for {folds}-fold cross-validation",
        }
    a, b = _subsample(x_real, n, rng), _subsample(x_syn, n, rng)
    x = np.concatenate([a, b])
    lab = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(seed) % (2**32))
    scores = []
    for tr, te in cv.split(x, lab):
        clf = train_linear(x[tr], lab[tr], 2, seed=classifier_seed(seed))
        scores.append(accuracy(lab[te], clf.predict(x[te])))
    return {"accuracy": float(np.mean(scores)), "std": population_std(scores), "n_per_side": n, "folds": folds}


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(d2, 0.0, None))


def coverage_density(x_real, x_syn, *, k: int = DEFAULT_K) -> dict:
    """Naeem et al. (2020) coverage and density of ``x_syn`` with respect to ``x_real``.

    With fewer than k+1 real records, k drops to (records - 1); below 2 real records both are None.
    """
    r = np.asarray(x_real, dtype=np.float64)
    s = np.asarray(x_syn, dtype=np.float64)
    n = len(r)
    if n < 2:
        return {"coverage": None, "density": None, "k": None, "n_real": n, "n_synthetic": int(len(s))}
    k_eff = int(min(k, n - 1))
    drr = _pairwise(r, r)
    np.fill_diagonal(drr, np.inf)
    radii = np.partition(drr, k_eff - 1, axis=1)[:, k_eff - 1]
    if len(s) == 0:
        return {"coverage": 0.0, "density": 0.0, "k": k_eff, "n_real": n, "n_synthetic": 0}
    drs = _pairwise(r, s)  # (n_real, n_syn)
    inside = drs <= radii[:, None]
    return {
        "coverage": float(inside.any(axis=1).mean()),
        "density": float(inside.sum() / (k_eff * len(s))),
        "k": k_eff,
        "n_real": n,
        "n_synthetic": int(len(s)),
    }


def real_reference(fed) -> tuple[np.ndarray, np.ndarray]:
    """The pooled test splits of the loaded clients (the only real data quality metrics look at)."""
    xs = [np.asarray(c.x_test, np.float64) for c in fed.clients]
    ys = [np.asarray(c.y_test, np.int64).reshape(-1) for c in fed.clients]
    return np.concatenate(xs), np.concatenate(ys)


def synthetic_quality(
    fed,
    x_syn,
    y_syn,
    *,
    seed: int = 0,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    k: int = DEFAULT_K,
    folds: int = DEFAULT_FOLDS,
) -> dict:
    """MMD^2, C2ST and per-class coverage/density of (x_syn, y_syn) against the pooled real test splits.

    ``x_syn`` must already be in the federation's space (see ``apply_transform``).
    """
    x_syn = np.asarray(x_syn, dtype=np.float64)
    y_syn = np.asarray(y_syn, dtype=np.int64).reshape(-1)
    x_real, y_real = real_reference(fed)
    if x_syn.ndim != 2 or x_syn.shape[1] != x_real.shape[1]:
        raise ValueError(f"synthetic records have shape {x_syn.shape}; the federation's dimension is {x_real.shape[1]}")
    rng = np.random.default_rng(seed)

    # MMD^2 at equal sample sizes: real half A vs synthetic, and real half A vs real half B (the floor).
    perm = rng.permutation(len(x_real))
    half = len(x_real) // 2
    a, b = x_real[perm[:half]], x_real[perm[half:]]
    m = int(min(len(b), len(x_syn), max_samples))
    mmd = {
        "bandwidths_sqrt_d": [float(h) for h in bandwidths],
        "estimator": "biased (V-statistic), kernels summed",
        "n_real": int(min(len(a), max_samples)),
        "n_other": m,
    }
    if half >= 1 and m >= 1:
        s_idx = rng.choice(len(x_syn), size=m, replace=False)
        mmd["real_vs_synthetic"] = mmd2(a, x_syn[s_idx], bandwidths=bandwidths, max_samples=max_samples, seed=seed)
        mmd["real_vs_real"] = mmd2(a, b[:m], bandwidths=bandwidths, max_samples=max_samples, seed=seed)
    else:
        mmd["real_vs_synthetic"] = mmd["real_vs_real"] = None

    # Coverage / density per class and overall (real side capped at max_samples, stratified by the cap).
    per_class = {}
    classes = sorted(set(np.unique(y_real).tolist()) | set(np.unique(y_syn).tolist()))
    for c in classes:
        rc = _subsample(x_real[y_real == c], max_samples, rng)
        sc = _subsample(x_syn[y_syn == c], max_samples, rng)
        per_class[str(int(c))] = coverage_density(rc, sc, k=k)
    overall = coverage_density(_subsample(x_real, max_samples, rng), _subsample(x_syn, max_samples, rng), k=k)
    cov_vals = [v["coverage"] for v in per_class.values() if v["coverage"] is not None]
    real_counts = np.bincount(y_real, minlength=fed.num_classes)
    syn_counts = np.bincount(y_syn, minlength=fed.num_classes) if len(y_syn) else np.zeros(fed.num_classes, np.int64)
    return {
        "reference": f"pooled test splits of the {len(fed.clients)} loaded clients (never training data), "
        "in the federation's transformed space",
        "n_real": int(len(x_real)),
        "n_synthetic": int(len(x_syn)),
        "real_class_counts": [int(v) for v in real_counts],
        "synthetic_class_counts": [int(v) for v in syn_counts],
        "classes_missing_from_synthetic": [int(c) for c in np.flatnonzero((real_counts > 0) & (syn_counts == 0))],
        "mmd2": mmd,
        "c2st": c2st(x_real, x_syn, seed=seed, folds=folds, max_samples=max_samples),
        "coverage": {
            "k": k,
            "overall": overall["coverage"],
            "density_overall": overall["density"],
            "mean_over_classes": float(np.mean(cov_vals)) if cov_vals else None,
            "per_class": per_class,
        },
    }
