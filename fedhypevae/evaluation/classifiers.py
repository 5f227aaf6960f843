"""The one linear classifier of the package: every evaluation protocol and every classifier baseline
(local-only, pooled) trains this one.

Multinomial logistic regression (scikit-learn, lbfgs, C = 1, class-balanced, at most ``DEFAULT_MAX_ITER``
iterations) on standardized features. The standardization is fitted ONLY on the classifier's own training
data (one client's real train split, plus the synthetic set where the protocol adds it; the union of the
train splits for the pooled upper bound): nothing is fitted on any test split (docs/DESIGN.md §6,
evaluation hygiene). Seeds follow one rule, ``classifier_seed``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..rng import SeedTag

DEFAULT_C = 1.0
DEFAULT_MAX_ITER = 2000


def classifier_seed(seed: int, client_id: int | None = None) -> int:
    """The seed of a classifier: derived from (``seed``, ``client_id``) for a client's own classifier, ``seed``
    itself for one classifier shared by every client (trained on a synthetic set or on the pooled train splits)."""
    if client_id is None:
        return int(seed)
    return int(
        np.random.SeedSequence([int(seed) % (2**63), int(SeedTag.EVAL_CLIENT), int(client_id)]).generate_state(1)[0]
    )


@dataclass
class LinearClassifier:
    """A fitted classifier whose outputs always cover all ``num_classes`` classes."""

    num_classes: int
    classes: np.ndarray  # classes seen in training (sorted)
    mean: np.ndarray
    scale: np.ndarray
    model: object | None = None  # sklearn LogisticRegression; None when training saw one class
    converged: bool = True
    info: dict = field(default_factory=dict)

    def _standardize(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected an (n, {self.mean.shape[0]}) array; got shape {x.shape}")
        return (x - self.mean) / self.scale

    def predict_proba(self, x) -> np.ndarray:
        """(n, num_classes) class probabilities; classes absent from training get probability 0."""
        z = self._standardize(x)
        out = np.zeros((z.shape[0], self.num_classes), dtype=np.float64)
        if self.model is None:
            out[:, int(self.classes[0])] = 1.0
        else:
            out[:, self.classes] = self.model.predict_proba(z)
        return out

    def predict(self, x) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1).astype(np.int64)


def train_linear(
    x,
    y,
    num_classes: int,
    *,
    seed: int = 0,
    sample_weight=None,
    class_weight: str | None = "balanced",
    C: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
) -> LinearClassifier:
    """Fit standardization + multinomial logistic regression on (x, y) alone.

    ``class_weight="balanced"`` (default) reweights classes inversely to their frequency in THIS
    training set (multiplied with ``sample_weight`` if given); ``None`` switches it off. A training
    set with a single class gives a classifier that always predicts that class.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (n, d) with one label per row; got x {x.shape}, y {y.shape}")
    if x.shape[0] == 0:
        raise ValueError("cannot train a classifier on an empty training set")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {y.min()}..{y.max()}")
    if not np.isfinite(x).all():
        raise ValueError("training features contain NaN or infinite values")
    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if sw is not None and sw.shape[0] != y.shape[0]:
        raise ValueError(f"sample_weight has {sw.shape[0]} entries for {y.shape[0]} records")
    if sw is not None:
        mean = np.average(x, axis=0, weights=sw)
        var = np.average((x - mean) ** 2, axis=0, weights=sw)
    else:
        mean, var = x.mean(axis=0), x.var(axis=0)
    scale = np.sqrt(var)
    scale[scale < 1e-12] = 1.0  # constant features (e.g. always-black pixels) stay constant
    classes = np.unique(y)
    if classes.size == 1:
        return LinearClassifier(num_classes, classes, mean, scale, None, True, {"single_class": int(classes[0])})
    model = LogisticRegression(
        C=C, solver="lbfgs", max_iter=max_iter, class_weight=class_weight, random_state=int(seed) % (2**32)
    )
    # small problems: BLAS threads only oversubscribe the cores (5-20x slower on 2 cores)
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
        warnings.simplefilter("always")
        model.fit((x - mean) / scale, y, sample_weight=sw)
    converged = not any("converge" in str(w.message).lower() for w in caught)
    return LinearClassifier(num_classes, classes, mean, scale, model, converged, {"n_iter": int(np.max(model.n_iter_))})
