"""Downstream evaluation: the package's one linear classifier, one set of metrics and one per-client scoring,
used by every evaluation protocol and every baseline; and synthetic-set quality."""

from .classifiers import DEFAULT_MAX_ITER, LinearClassifier, classifier_seed, train_linear
from .evaluate import (
    EVALUATION_FILE,
    LAMBDA_GRID,
    PROTOCOLS,
    evaluate_federation,
    evaluate_run,
    load_synthetic,
    score_clients,
    validation_split,
)
from .metrics import accuracy, balanced_accuracy, per_class_recall, population_std, summarize, summarize_clients
from .quality import c2st, coverage_density, mmd2, real_reference, synthetic_quality

__all__ = [
    "DEFAULT_MAX_ITER",
    "EVALUATION_FILE",
    "LAMBDA_GRID",
    "LinearClassifier",
    "PROTOCOLS",
    "accuracy",
    "balanced_accuracy",
    "c2st",
    "classifier_seed",
    "coverage_density",
    "evaluate_federation",
    "evaluate_run",
    "load_synthetic",
    "mmd2",
    "per_class_recall",
    "population_std",
    "real_reference",
    "score_clients",
    "summarize",
    "summarize_clients",
    "synthetic_quality",
    "train_linear",
    "validation_split",
]
