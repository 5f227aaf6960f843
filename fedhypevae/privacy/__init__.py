"""Differential privacy: accounting, budget planning, the per-client ledger, DP statistics."""
from .accounting import (
    ACCOUNTANTS,
    CLASS_STATS,
    DP_SGD,
    MECHANISM_NAMES,
    MMD_EMBEDDINGS,
    LedgerEntry,
    Mechanism,
    PrivacyLedger,
    PrivacyPlan,
    calibrate_one_shot,
    epsilon_of,
    plan_budget,
)
from .stats import (
    RandomFeatures,
    finalize_class_stats,
    gaussian_kernel_mmd2,
    mean_embedding_mmd2,
    mean_embedding_release,
    release_class_stats,
    release_mean_embeddings,
)

__all__ = [
    "ACCOUNTANTS", "CLASS_STATS", "DP_SGD", "MECHANISM_NAMES", "MMD_EMBEDDINGS",
    "LedgerEntry", "Mechanism", "PrivacyLedger", "PrivacyPlan", "calibrate_one_shot", "epsilon_of", "plan_budget",
    "RandomFeatures", "finalize_class_stats", "gaussian_kernel_mmd2", "mean_embedding_mmd2",
    "mean_embedding_release", "release_class_stats", "release_mean_embeddings",
]
