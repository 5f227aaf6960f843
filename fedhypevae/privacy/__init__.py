"""Differential privacy: accounting, budget planning, the per-client ledger, DP statistics."""
from .accounting import (
    ACCOUNTANTS,
    CLASS_STATS,
    BudgetShare,
    JointPlan,
    DP_SGD,
    MECHANISM_NAMES,
    MMD_EMBEDDINGS,
    Mechanism,
    PrivacyPlan,
    calibrate_one_shot,
    epsilon_of,
    history_fits,
    plan_budget,
    plan_mechanisms,
    privacy_plan,
    run_shares,
)
from .ledger import LEDGER_FORMAT, PrivacyLedger, Release, has_ledger
from .stats import (
    RandomFeatures,
    class_stat_sums,
    mean_embedding_sums,
    noise_class_stats,
    noise_mean_embeddings,
    finalize_class_stats,
    gaussian_kernel_mmd2,
    mean_embedding_mmd2,
    mean_embedding_release,
    release_class_stats,
    release_mean_embeddings,
)

__all__ = [
    "ACCOUNTANTS", "CLASS_STATS", "DP_SGD", "MECHANISM_NAMES", "MMD_EMBEDDINGS",
    "LEDGER_FORMAT", "Mechanism", "PrivacyLedger", "PrivacyPlan", "Release", "calibrate_one_shot", "epsilon_of",
    "has_ledger", "history_fits", "plan_budget", "BudgetShare", "JointPlan", "plan_mechanisms", "privacy_plan",
    "run_shares",
    "RandomFeatures", "class_stat_sums", "finalize_class_stats", "mean_embedding_sums", "noise_class_stats",
    "noise_mean_embeddings", "gaussian_kernel_mmd2", "mean_embedding_mmd2",
    "mean_embedding_release", "release_class_stats", "release_mean_embeddings",
]
