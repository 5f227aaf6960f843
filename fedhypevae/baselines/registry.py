"""Baselines by name. Every entry is ``fn(fed, *, seed, epsilon, delta, **settings) -> dict``.

The returned dict always has ``baseline``, ``private``, ``clients`` (one row per client:
client, n_test, accuracy, balanced_accuracy on that client's own test split), ``summary``
(mean / std over clients), ``privacy`` (None for non-private baselines; else epsilon_spent,
target_epsilon, delta, sigma, sample_rate, steps, accountant, clip_norm, ...), ``settings`` and
``wall_s``. ``dpcvae`` also returns ``x_syn`` / ``y_syn`` (the synthetic set, in the federation's
feature space); its ``clients`` rows are scored with this module's augment helper
(``linear.augment_scores``) unless ``score=False``.
Non-private baselines accept and ignore epsilon / delta.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

from ..errors import ConfigError
from .dpcvae import train_dpcvae
from .linear import augment_scores, federated_linear, local_only, pooled, summarize

FEDPROX_MU = 0.05


def _local(fed, *, seed: int = 0, epsilon: float = 1.0, delta: float = 1e-4, **settings) -> dict:
    return local_only(fed, seed=seed, **settings)


def _pooled(fed, *, seed: int = 0, epsilon: float = 1.0, delta: float = 1e-4, **settings) -> dict:
    return pooled(fed, seed=seed, **settings)


def _federated(name: str, *, private: bool, mu: float) -> Callable:
    def run(fed, *, seed: int = 0, epsilon: float = 1.0, delta: float = 1e-4, **settings) -> dict:
        settings.setdefault("mu", mu)
        return federated_linear(fed, seed=seed, epsilon=epsilon, delta=delta, private=private, name=name, **settings)

    run.__name__ = name.replace("-", "_")
    run.__doc__ = f"{name}: federated logistic regression (mu={mu}), {'DP-SGD' if private else 'non-private'}."
    return run


def _dpcvae(fed, *, seed: int = 0, epsilon: float = 1.0, delta: float = 1e-4, score: bool = True, **settings) -> dict:
    t0 = time.perf_counter()
    out = train_dpcvae(fed, seed=seed, epsilon=epsilon, delta=delta, **settings)
    rows = augment_scores(fed, out["x_syn"], out["y_syn"], seed=seed) if score else []
    res = {
        "baseline": "dpcvae",
        "private": out["privacy"] is not None,
        "clients": rows,
        "summary": summarize(rows),
        "protocol": "augment (baselines.linear.augment_scores)" if score else None,
    }
    res.update(out)
    res["wall_s"] = time.perf_counter() - t0
    return res


BASELINES: dict = {
    "local": _local,
    "fedavg": _federated("fedavg", private=False, mu=0.0),
    "fedprox": _federated("fedprox", private=False, mu=FEDPROX_MU),
    "fedavg-dp": _federated("fedavg-dp", private=True, mu=0.0),
    "fedprox-dp": _federated("fedprox-dp", private=True, mu=FEDPROX_MU),
    "dpcvae": _dpcvae,
    "pooled": _pooled,
}

#: the function whose keyword arguments each baseline's **settings are forwarded to
_TARGETS = {
    "local": local_only,
    "pooled": pooled,
    "fedavg": federated_linear,
    "fedprox": federated_linear,
    "fedavg-dp": federated_linear,
    "fedprox-dp": federated_linear,
    "dpcvae": train_dpcvae,
}
_RESERVED = {"fed", "seed", "epsilon", "delta", "private", "name"}


def get_baseline(name: str) -> Callable:
    """The baseline callable registered under ``name``; ConfigError listing the valid names otherwise."""
    try:
        return BASELINES[name]
    except KeyError:
        raise ConfigError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}") from None


def valid_settings(name: str) -> list:
    """The extra keyword settings a baseline accepts (besides seed, epsilon, delta)."""
    get_baseline(name)
    keys = [k for k in inspect.signature(_TARGETS[name]).parameters if k not in _RESERVED]
    if name == "dpcvae":
        keys.append("score")
    return keys


def run_baseline(name: str, fed, *, seed: int = 0, epsilon: float = 1.0, delta: float = 1e-4, **settings) -> dict:
    """``get_baseline(name)(fed, ...)`` with unknown settings rejected (ConfigError listing the valid ones)."""
    fn = get_baseline(name)
    valid = valid_settings(name)
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ConfigError(f"baseline {name!r} does not take setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return fn(fed, seed=seed, epsilon=epsilon, delta=delta, **settings)
