"""Downstream evaluation of synthetic sets: per-client linear classifiers, metrics and synthetic-set quality."""

from .classifiers import LinearClassifier, train_linear
from .evaluate import (
    EVALUATION_FILE,
    LAMBDA_GRID,
    PROTOCOLS,
    evaluate_federation,
    evaluate_run,
    load_synthetic,
    validation_split,
)
from .metrics import accuracy, balanced_accuracy, per_class_recall, summarize
from .quality import c2st, coverage_density, mmd2, real_reference, synthetic_quality

__all__ = [
    "EVALUATION_FILE",
    "LAMBDA_GRID",
    "LinearClassifier",
    "PROTOCOLS",
    "accuracy",
    "balanced_accuracy",
    "c2st",
    "coverage_density",
    "evaluate_federation",
    "evaluate_run",
    "load_synthetic",
    "mmd2",
    "per_class_recall",
    "real_reference",
    "summarize",
    "synthetic_quality",
    "train_linear",
    "validation_split",
]
