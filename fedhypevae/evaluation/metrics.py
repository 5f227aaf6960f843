"""Classification metrics, written out by hand so their definitions are explicit.

``balanced_accuracy`` is the mean recall over the classes PRESENT in ``y_true`` (docs/DESIGN.md §6: over
the classes present in that client's test split). A class that is predicted but absent from
``y_true`` contributes no recall term; predicting it is simply wrong for the records concerned.
This is the same definition as ``sklearn.metrics.balanced_accuracy_score`` (adjusted=False).
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


def summarize(values: Iterable) -> dict:
    """{"mean", "std", "n"} over the given per-client (or per-seed) values.

    ``std`` is the population standard deviation (ddof=0) over the values, i.e. the spread across
    clients, not a standard error. ``None`` values are ignored; with no values mean and std are None.
    """
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    a = np.asarray(vals, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=0)), "n": int(a.size)}
