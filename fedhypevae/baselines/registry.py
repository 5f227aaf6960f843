"""Baselines by name: the baseline entries of the method registry (``fedhypevae.methods.METHODS``), each as a
callable ``fn(fed, *, seed, epsilon, delta, protocol="augment", **settings) -> dict`` (``methods.run_baseline``:
the result's fields are described there). A baseline is registered there, not here.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from ..methods import FEDPROX_MU, baseline_names, run_baseline, valid_settings

__all__ = ["BASELINES", "FEDPROX_MU", "get_baseline", "run_baseline", "valid_settings"]


def _runner(name: str) -> Callable:
    def run(fed, **kwargs) -> dict:
        return run_baseline(name, fed, **kwargs)

    run.__name__ = name.replace("-", "_")
    run.__doc__ = f"run_baseline({name!r}, fed, ...)"
    return run


BASELINES: dict = {name: _runner(name) for name in baseline_names()}


def get_baseline(name: str) -> Callable:
    """The baseline callable registered under ``name``; ConfigError listing the valid names otherwise."""
    try:
        return BASELINES[name]
    except KeyError:
        raise ConfigError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}") from None
