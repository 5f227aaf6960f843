"""Linear-classifier baselines on real embeddings: local-only, FedAvg / FedProx (non-private and
DP-SGD), and the pooled non-private upper bound.

Every baseline is scored by the evaluation's own code (``fedhypevae.evaluation.score_clients``): per
client, on that client's own test split, accuracy and balanced accuracy (mean recall over the classes
present in that client's test split), plus mean / population std over clients
(``evaluation.summarize_clients``). Test splits never touch training.

Classifiers:
  * local-only and pooled train the evaluation's classifier (``evaluation.train_linear``: one max_iter, one
    seeding rule), standardized on its own training data: local-only is the evaluation protocol ``local``
    (each client's own train split), pooled (the non-private upper bound, where pooling is the point) the
    union of the train splits;
  * federated models (FedAvg, FedProx) use the features exactly as they are in the federation
    (already in the public, fixed per-record transform): nothing is fitted on pooled data, and a
    shared model cannot use client-local standardization.

DP variant (DP-SGD, docs/DESIGN.md §1): per local step, a Poisson batch at rate q from the client's
private generator, per-sample gradients over (W, b) clipped jointly to C, summed, N(0, sigma^2 C^2)
added (also for an empty batch, which still counts as a step), divided by the public expected batch
q * declared size. One local epoch is ceil(1/q) such steps. sigma is calibrated before training with
``plan_dp_sgd`` over every step that will run (rounds x local epochs x ceil(1/q)); each client
charges its ``PrivacyLedger`` before each step. The FedProx proximal term mu (w - w_global) does not
touch private data and is added after the noise (post-processing). Aggregation weights are the
declared (public) sizes, or uniform.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..dp_step import NoiseSpec, add_noise_and_scale, clip_factor, poisson_sample
from ..errors import ConfigError, DataError, PrivacyError
from ..evaluation import classifier_seed, evaluate_federation, score_clients, summarize_clients, train_linear
from ..model import one_hot
from ..privacy import DP_SGD, PrivacyLedger, plan_dp_sgd
from ..rng import STREAM_STEP, ClientRNG, SeedTag, public_generator

SAMPLINGS = ("shuffle", "poisson")
CLASSIFIER = "fedhypevae.evaluation.train_linear (class-balanced multinomial logistic regression, lbfgs)"
WEIGHTS = ("declared", "uniform")


# --------------------------------------------------------------------------- results


def _require_all_clients(fed, what: str) -> None:
    if len(fed.clients) != fed.num_clients:
        raise DataError(
            f"the {what} baseline needs every client of the federation in this process; only "
            f"{len(fed.clients)} of {fed.num_clients} are loaded (build the federation without client_ids)"
        )


def _result(name: str, rows: list, *, privacy: dict | None, settings: dict, started: float, **extra) -> dict:
    out = {
        "baseline": name,
        "private": privacy is not None,
        "clients": rows,
        "summary": summarize_clients(rows),
        "privacy": privacy,
        "settings": settings,
        "wall_s": time.perf_counter() - started,
    }
    out.update(extra)
    return out


def synthetic_result(x_syn, y_syn, *, privacy: dict | None, settings: dict, started: float, **extra) -> dict:
    """The result of a baseline that generates (``methods.Method.output == "synthetic"``): its synthetic set in the
    federation's feature space (float32 records, int64 labels), privacy facts, settings and wall time."""
    out = {
        "x_syn": np.asarray(x_syn, dtype=np.float32),
        "y_syn": np.asarray(y_syn, dtype=np.int64),
        "privacy": privacy,
        "settings": settings,
        "wall_s": time.perf_counter() - started,
    }
    out.update(extra)
    return out


# --------------------------------------------------------------------------- the evaluation's classifier


def local_only(fed, *, seed: int = 0) -> dict:
    """Each client alone: the evaluation's classifier on its own train split (standardized on that split),
    scored on its own test split: exactly the evaluation protocol ``local``."""
    t0 = time.perf_counter()
    scored = evaluate_federation(fed, protocol="local", seed=seed)
    rows = [
        {
            "client": r["client_id"],
            "n_test": r["n_test"],
            "accuracy": r["accuracy"],
            "balanced_accuracy": r["balanced_accuracy"],
        }
        for r in scored["clients"]
    ]
    return _result(
        "local",
        rows,
        privacy=None,
        started=t0,
        settings={"seed": seed, "classifier": CLASSIFIER, "protocol": "local (fedhypevae.evaluation)"},
        all_converged=scored["summary"]["all_converged"],
    )


def pooled(fed, *, seed: int = 0) -> dict:
    """Non-private upper bound: the evaluation's classifier on the union of all train splits (standardized on
    that union), scored per client."""
    t0 = time.perf_counter()
    _require_all_clients(fed, "pooled")
    x = np.concatenate([c.x_train for c in fed.clients])
    y = np.concatenate([c.y_train for c in fed.clients])
    model = train_linear(x, y, fed.num_classes, seed=classifier_seed(seed))
    rows = score_clients(fed, lambda c, xt: model.predict(xt))
    return _result(
        "pooled",
        rows,
        privacy=None,
        started=t0,
        settings={"seed": seed, "classifier": CLASSIFIER},
        all_converged=model.converged,
    )


# --------------------------------------------------------------------------- federated linear models


class LinearCE(nn.Module):
    """Multinomial logistic regression; returns the per-sample cross-entropy (and it again as aux)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logp = F.log_softmax(self.linear(x), dim=-1)
        loss = -(logp * one_hot(y, self.num_classes, logp.dtype)).sum(-1)
        return loss, (loss,)


PARAM_NAMES = ["linear.bias", "linear.weight"]


def clipped_linear_sums(model: LinearCE, x: torch.Tensor, y: torch.Tensor, clip_norm: float | None) -> dict:
    """The per-sample gradient sums of the cross-entropy of a linear model, each sample's gradient clipped to
    ``clip_norm`` (None: unclipped), in closed form (what ``clip_and_sum(per_sample_grads(...))`` computes,
    without materializing a gradient per sample): sample j's gradient is r_j x_j^T for the weight and r_j for the
    bias, r_j = softmax(W x_j + b) - onehot(y_j), so its squared norm is ||r_j||^2 (||x_j||^2 + 1) and the
    clipped sums are (c * r)^T X and sum_j c_j r_j."""
    with torch.no_grad():
        r = torch.softmax(model.linear(x), dim=-1) - one_hot(y, model.num_classes, x.dtype)
        if clip_norm is not None:
            norms = (r.pow(2).sum(1) * (x.pow(2).sum(1) + 1.0)).sqrt()
            r = r * clip_factor(norms, clip_norm)[:, None]
        return {"linear.bias": r.sum(0), "linear.weight": r.t() @ x}


@dataclass
class DPSpec:
    """DP-SGD settings of a federated linear run (sigma already calibrated, or forced)."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float


def aggregation_weights(fed, weights: str) -> dict:
    """w_i from the declared (public) sizes, or uniform; never from the true sizes."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    ids = [c.client_id for c in fed.clients]
    if weights == "uniform":
        return {i: 1.0 / len(ids) for i in ids}
    sizes = {i: float(fed.declared_sizes[i]) for i in ids}
    total = sum(sizes.values())
    return {i: s / total for i, s in sizes.items()}


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson steps that make one expected pass over the data: ceil(1/q)."""
    return int(math.ceil(1.0 / sample_rate - 1e-12))


def fit_federated_linear(
    fed,
    *,
    rounds: int,
    local_epochs: int,
    lr: float,
    mu: float = 0.0,
    batch_size: int = 32,
    sampling: str = "shuffle",
    sample_rate: float = 0.1,
    dp: DPSpec | None = None,
    seed: int = 0,
    noise_seed: int | None = None,
    weights: str = "declared",
    ledgers: dict | None = None,
    on_step: Callable | None = None,
    method: str = "fedavg",
) -> dict:
    """Train a global linear model with FedAvg (mu = 0) or FedProx (mu > 0); no accounting here.

    ``sampling``: ``shuffle`` (non-private only: minibatches of ``batch_size`` over a public
    permutation, loss = batch mean) or ``poisson`` (rate ``sample_rate``, ceil(1/q) steps per local
    epoch, sum of per-sample gradients / (q * declared size)). With ``dp`` the Poisson batch's
    per-sample gradients are clipped and noised (dp_step). ``on_step(client, round, step)`` runs
    before each DP step (the caller charges its ledger there). Coins and noise come from
    ``ClientRNG(client, noise_seed, method=method)`` (the method's own stream namespace): secure when
    noise_seed is None and dp is set; the non-private Poisson mode uses noise_seed, else the public
    ``seed`` (nothing private to protect).
    Returns {"weight": (K, d), "bias": (K,)} as float32 tensors.
    """
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
    if dp is not None:
        sampling, sample_rate = "poisson", dp.sample_rate
    if rounds < 1 or local_epochs < 1 or lr <= 0 or mu < 0 or batch_size < 1 or not (0 < sample_rate <= 1):
        raise ConfigError(
            f"need rounds >= 1, local_epochs >= 1, lr > 0, mu >= 0, batch_size >= 1, 0 < q <= 1; got "
            f"rounds={rounds}, local_epochs={local_epochs}, lr={lr}, mu={mu}, batch_size={batch_size}, "
            f"q={sample_rate}"
        )
    _require_all_clients(fed, "federated linear")
    K, d = fed.num_classes, fed.dim
    w_agg = aggregation_weights(fed, weights)
    model = LinearCE(d, K)
    with torch.no_grad():  # zero init: deterministic, no public seed needed
        model.linear.weight.zero_()
        model.linear.bias.zero_()
    global_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = {
        c.client_id: (
            torch.as_tensor(np.asarray(c.x_train, np.float32)),
            torch.as_tensor(np.asarray(c.y_train, np.int64)),
        )
        for c in fed.clients
    }
    rngs = {}
    for c in fed.clients:
        if dp is not None:
            rngs[c.client_id] = ClientRNG(c.client_id, noise_seed, method=method)
        else:
            rngs[c.client_id] = ClientRNG(c.client_id, noise_seed if noise_seed is not None else seed, method=method)
    spe = steps_per_epoch(sample_rate)
    params = dict(model.named_parameters())

    for r in range(rounds):
        new_state = {n: torch.zeros_like(t) for n, t in global_state.items()}
        for c in sorted(fed.clients, key=lambda c: c.client_id):
            cid = c.client_id
            x, y = data[cid]
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(global_state[n])
            expected = sample_rate * float(fed.declared_sizes[cid])  # public normalizer
            step = 0
            for e in range(local_epochs):
                if sampling == "shuffle":
                    perm = torch.randperm(len(y), generator=public_generator(seed, SeedTag.BASELINE_SHUFFLE, cid, r, e))
                    batches = [perm[i : i + batch_size] for i in range(0, len(y), batch_size)]
                else:
                    batches = [None] * spe
                for idx in batches:
                    if sampling == "shuffle":
                        g = {n: t / len(idx) for n, t in clipped_linear_sums(model, x[idx], y[idx], None).items()}
                    else:
                        gen = rngs[cid].generator(STREAM_STEP, r, step)
                        if dp is not None and on_step is not None:
                            on_step(cid, r, step)
                        idx = poisson_sample(len(y), sample_rate, gen)
                        xb, yb = x[idx], y[idx]
                        if dp is not None:
                            if len(idx) == 0:  # still noised, released and counted
                                summed = {n: torch.zeros_like(params[n]) for n in PARAM_NAMES}
                            else:
                                summed = clipped_linear_sums(model, xb, yb, dp.clip_norm)
                            g = add_noise_and_scale(
                                summed, spec=NoiseSpec(dp.noise_multiplier, dp.clip_norm, expected), generator=gen
                            )
                        elif len(idx) == 0:
                            g = {n: torch.zeros_like(params[n]) for n in PARAM_NAMES}
                        else:
                            g = {n: t / expected for n, t in clipped_linear_sums(model, xb, yb, None).items()}
                    with torch.no_grad():
                        for n in PARAM_NAMES:
                            upd = g[n]
                            if mu > 0:  # proximal term: no private data, added after the noise
                                upd = upd + mu * (params[n] - global_state[n])
                            params[n].sub_(lr * upd)
                    step += 1
            with torch.no_grad():
                for n in PARAM_NAMES:
                    new_state[n] += w_agg[cid] * params[n].detach()
        global_state = new_state
    return {"weight": global_state["linear.weight"].clone(), "bias": global_state["linear.bias"].clone()}


def predict_linear(state: dict, x: np.ndarray) -> np.ndarray:
    logits = torch.as_tensor(np.asarray(x, np.float32)) @ state["weight"].T + state["bias"]
    return logits.argmax(-1).numpy()


def federated_linear(
    fed,
    *,
    seed: int = 0,
    epsilon: float = 1.0,
    delta: float = 1e-4,
    private: bool = False,
    mu: float = 0.0,
    rounds: int = 20,
    local_epochs: int = 1,
    lr: float = 0.5,
    batch_size: int = 32,
    sampling: str = "shuffle",
    clip_norm: float = 1.0,
    sample_rate: float = 0.1,
    accountant: str = "rdp",
    noise_seed: int | None = None,
    noise_multiplier: float | None = None,
    weights: str = "declared",
    name: str | None = None,
) -> dict:
    """FedAvg (mu = 0) / FedProx (mu > 0) logistic regression on the real embeddings.

    ``private``: DP-SGD at (epsilon, delta); sigma calibrated by ``plan_dp_sgd`` over all
    rounds * local_epochs * ceil(1/q) steps before training (or ``noise_multiplier`` checked
    against the budget), every step charged to each client's ledger first. Non-private runs
    ignore epsilon/delta; they use ``sampling`` (shuffle minibatches by default, or poisson).
    """
    t0 = time.perf_counter()
    name = name or ("fedprox" if mu > 0 else "fedavg") + ("-dp" if private else "")
    settings = {
        "seed": seed,
        "mu": mu,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "lr": lr,
        "weights": weights,
        "init": "zeros",
        "features": "as in the federation (no standardization)",
    }
    privacy = None
    if private:
        steps = rounds * local_epochs * steps_per_epoch(sample_rate)
        plan = plan_dp_sgd(
            target_epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            noise_multiplier=noise_multiplier,
        )
        ledgers = {c.client_id: PrivacyLedger([c.client_id]) for c in fed.clients}  # in memory: no resume

        def charge(cid, r, s):
            led = ledgers[cid]
            if not led.fits(DP_SGD, plan.sigma, plan.sample_rate, plan):
                raise PrivacyError(f"client {cid}: step {s} of round {r} would exceed the budget epsilon={epsilon:g}")
            led.charge(DP_SGD, plan.sigma, plan.sample_rate, f"r{r}s{s}")

        state = fit_federated_linear(
            fed,
            rounds=rounds,
            local_epochs=local_epochs,
            lr=lr,
            mu=mu,
            dp=DPSpec(plan.sigma, clip_norm, sample_rate),
            seed=seed,
            noise_seed=noise_seed,
            weights=weights,
            on_step=charge,
            method="fedprox" if mu > 0 else "fedavg",
        )
        privacy = ledger_summary(ledgers, plan, clip_norm=clip_norm, noise_seed=noise_seed)
        settings.update(
            {
                "sampling": "poisson",
                "sample_rate": sample_rate,
                "clip_norm": clip_norm,
                "steps_per_epoch": steps_per_epoch(sample_rate),
            }
        )
    else:
        state = fit_federated_linear(
            fed,
            rounds=rounds,
            local_epochs=local_epochs,
            lr=lr,
            mu=mu,
            batch_size=batch_size,
            sampling=sampling,
            sample_rate=sample_rate,
            seed=seed,
            noise_seed=noise_seed,
            weights=weights,
            method="fedprox" if mu > 0 else "fedavg",
        )
        settings.update({"sampling": sampling})
        settings.update(
            {"batch_size": batch_size}
            if sampling == "shuffle"
            else {"sample_rate": sample_rate, "steps_per_epoch": steps_per_epoch(sample_rate)}
        )
    rows = score_clients(fed, lambda c, x: predict_linear(state, x))
    return _result(
        name,
        rows,
        privacy=privacy,
        settings=settings,
        started=t0,
        model={"weight": state["weight"].numpy(), "bias": state["bias"].numpy()},
    )


def ledger_summary(ledgers: dict, plan, *, clip_norm: float, noise_seed: int | None) -> dict:
    """Privacy facts of a DP baseline from the clients' ledgers (all clients share q, so one epsilon)."""
    eps = {cid: led.epsilon(delta=plan.delta, accountant=plan.accountant) for cid, led in ledgers.items()}
    steps = {cid: led.steps() for cid, led in ledgers.items()}
    return {
        "epsilon_spent": max(eps.values()),
        "target_epsilon": plan.target_epsilon,
        "planned_epsilon": plan.planned_epsilon,
        "delta": plan.delta,
        "sigma": plan.sigma,
        "sample_rate": plan.sample_rate,
        "steps": max(steps.values()),
        "planned_steps": plan.steps,
        "accountant": plan.accountant,
        "clip_norm": clip_norm,
        "unit": "one record of one client's train split",
        "weights_and_normalizers": "declared sizes (public)",
        "formal_guarantee": True,
        "noise": "reproducible (noise_seed set): not for release" if noise_seed is not None else "secure",
        "noise_seed": noise_seed,
    }
