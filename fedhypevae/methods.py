"""The methods a table or a sweep compares, in one registry: name -> ``Method``.

    fedhypevae table (fedhypevae.table), python -m fedhypevae.slurm.sweep / .job / .collect

Everything that depends on which method a cell or a sweep point runs is read from here: its label, how it
treats privacy, whether it uses the target epsilon, how it is run and how it is scored. Adding a baseline is
one file under ``fedhypevae/baselines/`` (a function ``fn(fed, *, seed[, epsilon, delta], **settings) ->
dict``) plus one ``Method`` entry in ``METHODS`` below; the table, the sweep, the SLURM job and the collector
then accept it by name.

How a method is run:
  * ``run=None``: FedHypeVAE training (``fedhypevae.run.run_training``) under the base config with the
    entry's ``overrides`` (privacy mode, trust model); the table and the SLURM job own that run (run
    directory, resume, ranks), and score it with ``score_run``;
  * ``run="module:function"``: a baseline, called by ``run_baseline`` with ``seed``, ``epsilon`` and
    ``delta`` where its signature takes them, the entry's ``fixed`` keywords and the caller's settings
    (over the entry's ``defaults``); settings the function does not take are refused.
How a method is scored (``output``), always by ``fedhypevae.evaluation`` (one classifier, one set of metrics):
  * ``"predictions"``: the baseline predicts each client's test labels itself and returns its rows
    scored by ``evaluation.score_clients`` (result["clients"]);
  * ``"synthetic"``: the method returns a synthetic set (result["x_syn"], result["y_syn"], in the
    federation's feature space; a FedHypeVAE run writes RUN/synthetic.npz), scored per client under the
    table's or the sweep's evaluation protocol (``score_synthetic``).

This module imports no baseline (nor torch) until a method is run: the sweep reads the registry at no cost.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .errors import ConfigError

PRIVACY_KINDS = ("dp", "paper", "none")
# how a synthetic set is scored (fedhypevae.evaluation.evaluate_federation; `fedhypevae evaluate --protocol`)
PROTOCOLS = ("augment", "local", "synthetic-only", "lambda-mix")
OUTPUTS = ("predictions", "synthetic")
FEDPROX_MU = 0.05
#: DP-CVAE as FedHypeVAE training: no h_theta, the standard prior, Di Salvo et al.'s sizes, squared error (a fixed
#: output scale 1/sqrt(2) makes the Gaussian NLL the squared error plus a constant; records released as the decoder
#: mean), no MMD term and no class statistics (no head would use a meta-code)
DPCVAE_OVERRIDES = (
    "privacy.mode=strict",
    "model.modulation=false",
    "model.prior=standard",
    "model.hidden=[256,256,256]",
    "model.latent_dim=100",
    "model.activation=relu",
    "model.output_std=0.7071067811865476",
    "synth.output_noise=false",  # its synthetic records are the decoder's mean, as in Di Salvo et al.
    "model.lambda_mmd=0",
    "model.class_anchor=false",  # its decoder has no anchor (and it releases no class statistics to anchor to)
    "privacy.stats_epsilon_fraction=0",
    "privacy.mmd_epsilon_fraction=0",
)
#: keyword arguments ``run_baseline`` passes itself; never settings
_RESERVED = ("fed", "seed", "epsilon", "delta")


def _frozen(d: Mapping | None) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Method:
    """One method of a table or a sweep."""

    name: str
    # how tables, the sweep summary and plots name it
    label: str
    # "dp": differentially private with a formal guarantee; "paper": DP-SGD on Phi only (not a formal
    # guarantee); "none": non-private
    privacy: str
    # its result depends on the target epsilon (a sweep runs it once per epsilon; else once per partition/seed)
    uses_epsilon: bool
    # how it is scored: "predictions" (its own per-client rows) or "synthetic" (its synthetic set)
    output: str
    # "module:function" of a baseline (imported when it runs), or the function itself; None: FedHypeVAE training
    run: str | Callable | None = None
    # keyword arguments this entry always passes to `run` (not settings)
    fixed: Mapping = field(default_factory=dict)
    # settings with this entry's own default (a table's or a sweep's `baselines` section may override them)
    defaults: Mapping = field(default_factory=dict)
    # FedHypeVAE: dotted overrides of the base train config
    overrides: tuple = ()
    # in a table config's default method list
    in_default_table: bool = True

    def __post_init__(self):
        if self.privacy not in PRIVACY_KINDS:
            raise ValueError(f"method {self.name}: privacy must be one of {PRIVACY_KINDS}; got {self.privacy!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"method {self.name}: output must be one of {OUTPUTS}; got {self.output!r}")
        if (self.run is None) != bool(self.overrides):
            raise ValueError(f"method {self.name}: FedHypeVAE methods (run=None) and only they set overrides")
        if self.run is None and self.output != "synthetic":
            raise ValueError(f"method {self.name}: FedHypeVAE training is scored by its synthetic set")
        if self.privacy == "none" and self.uses_epsilon:
            raise ValueError(f"method {self.name}: a non-private method cannot use epsilon")
        object.__setattr__(self, "fixed", _frozen(self.fixed))
        object.__setattr__(self, "defaults", _frozen(self.defaults))
        object.__setattr__(self, "overrides", tuple(self.overrides))

    @property
    def private(self) -> bool:
        return self.privacy != "none"

    @property
    def trains_fedhypevae(self) -> bool:
        """Run as FedHypeVAE training (multi-rank in a sweep) rather than as a baseline function."""
        return self.run is None

    def function(self) -> Callable:
        """The baseline's function (imported now)."""
        if self.run is None:
            raise ConfigError(f"method {self.name!r} is FedHypeVAE training, not a baseline function")
        if callable(self.run):
            return self.run
        module, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(module), attr)

    def settings(self) -> list:
        """The keyword settings the baseline accepts (besides seed, epsilon, delta and its fixed keywords)."""
        params = inspect.signature(self.function()).parameters
        return [k for k in params if k not in _RESERVED and k not in self.fixed]


def _federated(name: str, label: str, *, private: bool, mu: float) -> Method:
    return Method(
        name,
        label,
        privacy="dp" if private else "none",
        uses_epsilon=private,
        output="predictions",
        run="fedhypevae.baselines.linear:federated_linear",
        fixed={"private": private, "name": name},
        defaults={"mu": mu},
    )


def _fedhypevae(
    name: str, label: str, *, mode: str, trust: str | None = None, default: bool = True, secure: bool = False
) -> Method:
    """FedHypeVAE training in privacy mode ``mode`` (strict, paper; none: ``privacy.enabled=false``); ``secure``:
    ``privacy.secure_aggregation`` (with trust distributed)."""
    if mode == "none":
        overrides, privacy = ("privacy.enabled=false",), "none"
    else:
        overrides = (f"privacy.mode={mode}",) + ((f"privacy.trust_model={trust}",) if trust else ())
        overrides += ("privacy.secure_aggregation=true",) if secure else ()
        privacy = "dp" if mode == "strict" else "paper"
    return Method(
        name,
        label,
        privacy=privacy,
        uses_epsilon=privacy != "none",
        output="synthetic",
        overrides=overrides,
        in_default_table=default,
    )


def _gaussian(name: str, label: str, *, trust: str, default: bool = True) -> Method:
    return Method(
        name,
        label,
        privacy="dp",
        uses_epsilon=True,
        output="synthetic",
        run="fedhypevae.baselines.gaussian:dp_gaussian_sampler",
        fixed={"private": True, "trust_model": trust},
        in_default_table=default,
    )


#: every method, in the order tables list them
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "local",
            "Local only",
            privacy="none",
            uses_epsilon=False,
            output="predictions",
            run="fedhypevae.baselines.linear:local_only",
        ),
        _federated("fedavg", "FedAvg", private=False, mu=0.0),
        _federated("fedprox", f"FedProx (mu={FEDPROX_MU})", private=False, mu=FEDPROX_MU),
        _federated("fedavg-dp", "FedAvg (DP-SGD)", private=True, mu=0.0),
        _federated("fedprox-dp", "FedProx (DP-SGD)", private=True, mu=FEDPROX_MU),
        # Di Salvo et al.'s conditional VAE (3 x 256 ReLU layers each way, d_z = 100, squared error + KL to N(0, I))
        # trained by the FedHypeVAE engine without modulation or learned prior: strict DP-SGD over everything it
        # trains, the run's trust model, rounds and steps, like FedHypeVAE itself
        Method(
            "dpcvae",
            "DP-CVAE (strict, on the engine)",
            privacy="dp",
            uses_epsilon=True,
            output="synthetic",
            overrides=DPCVAE_OVERRIDES,
        ),
        # per-class noisy sums, counts and squared norms (one release, the whole epsilon), then N(mu_y, s^2 I)
        _gaussian("gaussian", "DP Gaussian sampler", trust="local"),
        _fedhypevae("fedhypevae-strict", "FedHypeVAE (strict)", mode="strict"),
        _fedhypevae("fedhypevae-paper", "FedHypeVAE (paper mode*)", mode="paper"),
        # the generator's ceiling: the same training without clipping, noise or budget
        _fedhypevae("fedhypevae-nonprivate", "FedHypeVAE, no privacy (generator ceiling)", mode="none"),
        Method(
            "pooled",
            "Pooled, non-private (upper bound)",
            privacy="none",
            uses_epsilon=False,
            output="predictions",
            run="fedhypevae.baselines.linear:pooled",
        ),
        # FedHypeVAE under another trust model than the base config's (privacy.trust_model)
        _fedhypevae(
            "fedhypevae-distributed",
            "FedHypeVAE (strict, distributed noise, simulated)",
            mode="strict",
            trust="distributed",
            default=False,
        ),
        _fedhypevae(
            "fedhypevae-secure",
            "FedHypeVAE (strict, distributed noise, secure aggregation)",
            mode="strict",
            trust="distributed",
            default=False,
            secure=True,
        ),
        _fedhypevae(
            "fedhypevae-central",
            "FedHypeVAE (strict, central noise)",
            mode="strict",
            trust="central",
            default=False,
        ),
        # the same model in its own training loop (FedAvg of the decoders after local DP-SGD steps, torch.func
        # per-sample gradients; several times slower): the cross-check of the engine version
        Method(
            "dpcvae-loop",
            "DP-CVAE (own loop, FedAvg)",
            privacy="dp",
            uses_epsilon=True,
            output="synthetic",
            run="fedhypevae.baselines.dpcvae:train_dpcvae",
            fixed={"private": True},
            in_default_table=False,
        ),
        _gaussian(
            "gaussian-distributed",
            "DP Gaussian sampler (distributed noise, simulated)",
            trust="distributed",
            default=False,
        ),
        _gaussian("gaussian-central", "DP Gaussian sampler (central noise)", trust="central", default=False),
    )
}


def get_method(name: str) -> Method:
    """The method registered under ``name``; ConfigError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(METHODS)}") from None


def check_methods(names) -> list:
    """``names`` as a list, every one registered; ConfigError naming the unknown ones and the valid ones."""
    names = list(names)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    return names


def baseline_names() -> list:
    """The methods that are baseline functions (not FedHypeVAE training), in registry order."""
    return [n for n, m in METHODS.items() if not m.trains_fedhypevae]


def method_overrides(name: str, private: Sequence[str] = ()) -> list:
    """The train-config overrides of a FedHypeVAE method (privacy mode; trust model where it has one), after
    `private` (a table's private_overrides, a sweep's --private-set: the private recipe) when the method is private:
    the non-private ceiling never gets them, and the method's own settings win over them."""
    m = get_method(name)
    if not m.trains_fedhypevae:
        raise ConfigError(f"method {name!r} is a baseline; only FedHypeVAE methods override the train config")
    return (list(private) if m.privacy != "none" else []) + list(m.overrides)


# --------------------------------------------------------------------------- running a baseline


def valid_settings(name: str) -> list:
    """The extra keyword settings baseline ``name`` accepts (besides seed, epsilon, delta)."""
    return get_method(name).settings()


def run_baseline(
    name: str,
    fed,
    *,
    seed: int = 0,
    epsilon: float = 1.0,
    delta: float = 1e-4,
    protocol: str = "augment",
    **settings,
) -> dict:
    """Run baseline ``name`` on ``fed`` and score it per client on each client's own test split.

    Unknown settings are refused (ConfigError listing the valid ones); non-private baselines ignore epsilon
    and delta. A baseline with a synthetic output is scored under ``protocol`` (``score_synthetic``).
    The result always has ``baseline``, ``private``, ``clients`` (one row per client: client, n_test,
    accuracy, balanced_accuracy), ``summary`` (``evaluation.summarize_clients``: mean / population std over
    clients), ``privacy`` (None for non-private baselines), ``settings`` and ``wall_s``; a synthetic output
    also ``x_syn``, ``y_syn`` and ``protocol``.
    """
    m = get_method(name)
    if m.trains_fedhypevae:
        raise ConfigError(f"method {name!r} is FedHypeVAE training; run it with `fedhypevae train` or a table")
    fn = m.function()
    valid = m.settings()
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ConfigError(f"baseline {name!r} does not take setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    params = inspect.signature(fn).parameters
    if m.uses_epsilon and not {"epsilon", "delta"} <= set(params):
        raise ConfigError(f"baseline {name!r} is registered as using epsilon, but {m.run} takes no epsilon and delta")
    given = {"seed": seed, "epsilon": epsilon, "delta": delta}
    kwargs = {k: v for k, v in given.items() if k in params}
    kwargs.update(m.fixed)
    kwargs.update({**m.defaults, **settings})
    t0 = time.perf_counter()
    res = dict(fn(fed, **kwargs))
    if m.output == "synthetic":
        from .evaluation import summarize_clients

        rows = score_synthetic(fed, res["x_syn"], res["y_syn"], protocol=protocol, seed=seed, n_test=True)
        res.update({"clients": rows, "summary": summarize_clients(rows), "protocol": protocol})
    res.setdefault("privacy", None)
    res.update({"baseline": name, "private": res["privacy"] is not None, "wall_s": time.perf_counter() - t0})
    return res


# --------------------------------------------------------------------------- scoring


def score_synthetic(fed, x_syn, y_syn, *, protocol: str, seed: int, n_test: bool = False) -> list[dict]:
    """Per-client rows for a synthetic set (in the federation's feature space), scored the same way for every
    generative method: ``evaluation.evaluate_federation`` under ``protocol``."""
    from .evaluation import evaluate_federation

    scored = evaluate_federation(fed, x_syn, y_syn, protocol=protocol, seed=seed)
    keep = ("n_test", "accuracy", "balanced_accuracy") if n_test else ("accuracy", "balanced_accuracy")
    if protocol == "lambda-mix":
        keep += ("lambda",)  # the mixing weight each client chose on its validation split
    return [{"client": r["client_id"], **{k: r[k] for k in keep}} for r in scored["clients"]]


def score_run(run_dir, fed, *, protocol: str, seed: int) -> list[dict]:
    """Per-client rows for a finished FedHypeVAE run: its synthetic set, mapped into the federation's units,
    scored by ``score_synthetic``."""
    import numpy as np

    from .data import apply_transform

    syn = np.load(Path(run_dir) / "synthetic.npz")
    return score_synthetic(
        fed, apply_transform(syn["x"], fed.transform, fed.value_range), syn["y"], protocol=protocol, seed=seed
    )


def result_rows(result: dict) -> list[dict]:
    """The per-client rows a table cell or a sweep point keeps of a baseline's result: client, accuracy,
    balanced accuracy (and the chosen lambda under lambda-mix)."""
    keep = ("client", "accuracy", "balanced_accuracy", "lambda")
    return [{k: r[k] for k in keep if k in r} for r in result["clients"]]
