"""Baselines on the federation's own splits, runnable by name (``get_baseline`` / ``run_baseline``):
local-only, FedAvg / FedProx linear classifiers (non-private and DP-SGD), DP-CVAE, pooled upper bound.
Each is registered in ``fedhypevae.methods`` and scored by ``fedhypevae.evaluation``."""

from .dpcvae import CVAE, train_dpcvae
from .linear import (
    DPSpec,
    federated_linear,
    fit_federated_linear,
    local_only,
    pooled,
    predict_linear,
)
from .registry import BASELINES, FEDPROX_MU, get_baseline, run_baseline, valid_settings

__all__ = [
    "BASELINES",
    "CVAE",
    "DPSpec",
    "FEDPROX_MU",
    "federated_linear",
    "fit_federated_linear",
    "get_baseline",
    "local_only",
    "pooled",
    "predict_linear",
    "run_baseline",
    "train_dpcvae",
    "valid_settings",
]
