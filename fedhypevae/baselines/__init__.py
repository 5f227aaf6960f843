"""Baselines on the federation's own splits, runnable by name (``get_baseline`` / ``run_baseline``):
local-only, FedAvg / FedProx linear classifiers (non-private and DP-SGD), DP-CVAE, pooled upper bound."""

from .dpcvae import CVAE, train_dpcvae
from .linear import (
    DPSpec,
    accuracy,
    augment_scores,
    balanced_accuracy,
    federated_linear,
    fit_federated_linear,
    fit_logreg,
    local_only,
    pooled,
    predict_linear,
    score_clients,
    summarize,
)
from .registry import BASELINES, FEDPROX_MU, get_baseline, run_baseline, valid_settings

__all__ = [
    "BASELINES",
    "CVAE",
    "DPSpec",
    "FEDPROX_MU",
    "accuracy",
    "augment_scores",
    "balanced_accuracy",
    "federated_linear",
    "fit_federated_linear",
    "fit_logreg",
    "get_baseline",
    "local_only",
    "pooled",
    "predict_linear",
    "run_baseline",
    "score_clients",
    "summarize",
    "train_dpcvae",
    "valid_settings",
]
