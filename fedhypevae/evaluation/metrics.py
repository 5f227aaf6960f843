"""Classification metrics, written out by hand so their definitions are explicit.

``balanced_accuracy`` is the mean recall over the classes PRESENT in ``y_true`` (docs/DESIGN.md §6: over
the classes present in that client's test split). A class that is predicted but absent from
``y_true`` contributes no recall term; predicting it is simply wrong for the records concerned.
This is the same definition as ``sklearn.metrics.balanced_accuracy_score`` (adjusted=False).

These are the package's only accuracy, balanced accuracy and summary: the evaluation protocols, the
baselines and the tables all score with them. Empty input is refused (ValueError): a client without a
test split cannot be scored, and a NaN would travel silently into the means. Every std in the package,
over clients or over seeds, is the population std (ddof=0; ``population_std``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("cannot score an empty set of predictions")
    return t, p


def accuracy(y_true, y_pred) -> float:
    """Fraction of records whose prediction equals the label."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def per_class_recall(y_true, y_pred) -> dict:
    """{class: recall} for every class present in ``y_true`` (sorted by class)."""
    t, p = _pair(y_true, y_pred)
    return {int(c): float(np.mean(p[t == c] == c)) for c in np.unique(t)}


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true`` (unweighted by class size)."""
    recalls = per_class_recall(y_true, y_pred)
    return float(sum(recalls.values()) / len(recalls))


def population_std(values) -> float:
    """The package's one std convention: the population standard deviation (ddof=0); 0.0 for one value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("cannot take the std of no values")
    return float(np.asarray(vals, dtype=np.float64).std(ddof=0))


def summarize(values: Iterable) -> dict:
    """{"mean", "std", "n"} over the given per-client (or per-seed) values.

    ``std`` is the population standard deviation (ddof=0) over the values, i.e. the spread across
    clients, not a standard error. ``None`` values are ignored; with no values mean and std are None.
    """
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    a = np.asarray(vals, dtype=np.float64)
    return {"mean": float(a.mean()), "std": population_std(a), "n": int(a.size)}


def summarize_clients(rows: list) -> dict:
    """{"clients", "accuracy_mean", "accuracy_std", "balanced_accuracy_mean", "balanced_accuracy_std"} over
    per-client rows (``summarize``: population std over clients; mean and std None without rows)."""
    out = {"clients": len(rows)}
    for key in ("accuracy", "balanced_accuracy"):
        s = summarize(r[key] for r in rows)
        out[f"{key}_mean"], out[f"{key}_std"] = s["mean"], s["std"]
    return out
