"""DP Gaussian sampler: the simplest private generator, the floor a generative model has to beat.

Each client clips its training records to L2 norm C (public) and releases, once, per class y: the sum of its
clipped records, their count and the sum of their squared norms. That one release is a Gaussian mechanism
on the joint vector, component k (sums, counts, squared norms) scaled by sqrt(share_k) / Delta_k (Delta = C, 1,
C^2; the shares add up to 1, so one record moves the scaled vector by at most 1): noise std sigma * Delta_k /
sqrt(share_k) in original units, sigma calibrated so that this single release spends the whole (epsilon, delta)
(``calibrate_one_shot``). ``budget_split`` is the shares, i.e. how the release's zCDP budget is split between
the three (equal thirds is ``privacy.stats.noise_class_stats``' rule).

Where the noise goes is the trust model (docs/PRIVACY.md, ``privacy.trust_model``):
  local        every client noises its own release at sigma: each release alone is (epsilon, delta)-DP,
               against anyone who sees it. The global sums carry sqrt(M) times that noise.
  distributed  noise shares: each client adds sigma / sqrt(M - t) (t = ``collusion``, parties = clients), so
               that the shares of the clients outside any t-coalition sum to sigma. Simulated, as in training:
               the sum is a plain floating-point sum in this process.
  central      a trusted aggregator sums the clean releases and adds one draw at sigma.
Everything after the release is post-processing: the class means mu_y = sum_y / max(count_y, 1), one pooled
isotropic variance s^2 = sum_y (sqnorm_y - ||sum_y||^2 / count_y) / (d sum_y count_y) (floored; ||sum_y||^2
less the noise's known share), and the synthetic
set, samples_per_class draws of N(mu_y, s^2 I) per class (clipped to the data's range for range-mapped data,
a public bound). One release, so no composition with anything else: the whole epsilon is this release's.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..errors import ConfigError
from ..privacy import CLASS_STATS, PrivacyLedger, calibrate_one_shot
from ..privacy.stats import clip_rows
from ..rng import STREAM_STATS_RELEASE, ClientRNG, SeedTag, public_generator
from .linear import _require_all_clients, synthetic_result

TRUST_MODELS = ("local", "distributed", "central")
COMPONENTS = 3  # per class: sum, count, sum of squared norms
VAR_FLOOR = 1e-4
# shares of the release's budget for (sums, counts, squared norms): chosen on digits' validation splits
# (docs/RESULTS.md, "DP Gaussian sampler"), then frozen for every data set
BUDGET_SPLIT = (0.8, 0.15, 0.05)


def default_clip_norm(fed) -> float:
    """The public clip for a federation's records: sqrt(d)/2 for data mapped to [0, 1]^d (the table configs'
    rule for the class-statistics release), 1 for unit-norm (l2) records; else the caller must choose."""
    if fed.transform == "range":
        return math.sqrt(fed.dim) / 2.0
    if fed.transform == "l2":
        return 1.0
    raise ConfigError(
        "the gaussian baseline needs clip_norm when the records are not range- or l2-mapped (data.transform "
        f"{fed.transform!r}): give a public bound on a record's L2 norm"
    )


def _sums(x: torch.Tensor, y: torch.Tensor, num_classes: int, clip: float) -> torch.Tensor:
    """(K, d + 2) per-class [sum of clipped rows, count, sum of squared norms], float64; stays on the client."""
    xc = clip_rows(x.to(torch.float64), clip)
    onehot = torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float64)
    return onehot.T @ torch.cat([xc, torch.ones(len(xc), 1, dtype=torch.float64), xc.pow(2).sum(1, keepdim=True)], 1)


def _noise(shape, multiplier: float, clip: float, split, generator: torch.Generator) -> torch.Tensor:
    """Noise of the joint release at `multiplier`, in original units: component k (sums, counts, squared norms) is
    scaled by sqrt(split_k) / Delta_k (Delta = C, 1, C^2; the splits sum to 1, so one record moves the scaled
    vector by at most 1) and gets `multiplier` per scaled coordinate: std multiplier * Delta_k / sqrt(split_k)."""
    d = shape[1] - 2
    per = [clip / math.sqrt(split[0]), 1.0 / math.sqrt(split[1]), clip**2 / math.sqrt(split[2])]
    scale = torch.tensor([per[0]] * d + per[1:], dtype=torch.float64)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * multiplier * scale


def dp_gaussian_sampler(
    fed,
    *,
    seed: int = 0,
    epsilon: float = 1.0,
    delta: float = 1e-4,
    private: bool = True,
    clip_norm: float | None = None,
    trust_model: str = "local",
    collusion: int = 1,
    accountant: str = "rdp",
    noise_seed: int | None = None,
    budget_split: tuple | list = BUDGET_SPLIT,
    samples_per_class: int = 200,
    center: float = 0.0,
) -> dict:
    """Release the per-class statistics once (see the module docstring) and draw a class-balanced synthetic set
    from N(mu_y, s^2 I), in the federation's feature space. ``private=False``: the same without clipping'
    noise (the sampler's ceiling). ``center``: a public point subtracted from every coordinate before the clip (the
    release is of the clipped x - center; the means get it back), so that a smaller clip keeps more. Returns
    {"x_syn", "y_syn", "release" (the summed noisy statistics), "privacy" (None when not private), "settings",
    "diagnostics", "wall_s"}."""
    t0 = time.perf_counter()
    _require_all_clients(fed, "gaussian")
    if trust_model not in TRUST_MODELS:
        raise ConfigError(f"gaussian: trust_model must be one of {', '.join(TRUST_MODELS)}; got {trust_model!r}")
    if samples_per_class < 1:
        raise ConfigError(f"gaussian: samples_per_class must be >= 1; got {samples_per_class}")
    clip = default_clip_norm(fed) if clip_norm is None else float(clip_norm)
    if not clip > 0:
        raise ConfigError(f"gaussian: clip_norm must be > 0; got {clip_norm}")
    split = [float(v) for v in budget_split]
    if len(split) != COMPONENTS or min(split) <= 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(
            f"gaussian: budget_split must be three positive shares (sums, counts, squared norms) adding up to 1; "
            f"got {list(budget_split)}"
        )
    K, d = int(fed.num_classes), int(fed.dim)
    clients = sorted(fed.clients, key=lambda c: c.client_id)
    M = len(clients)
    if trust_model == "distributed" and not 0 <= collusion < M:
        raise ConfigError(f"gaussian: distributed noise needs 0 <= collusion < clients ({M}); got {collusion}")

    sigma = calibrate_one_shot(epsilon=epsilon, delta=delta, accountant=accountant) if private else 0.0
    share = {"local": sigma, "distributed": sigma / math.sqrt(M - collusion) if M > collusion else 0.0}
    total = torch.zeros(K, d + 2, dtype=torch.float64)
    ledgers = {}
    for c in clients:
        x = torch.as_tensor(np.asarray(c.x_train, np.float32))
        y = torch.as_tensor(np.asarray(c.y_train, np.int64)).reshape(-1)
        s = _sums(x.to(torch.float64) - float(center), y, K, clip if private else math.inf)
        if private:
            ledgers[c.client_id] = led = PrivacyLedger([c.client_id])
            led.charge(CLASS_STATS, sigma, 1.0, "gaussian-sampler")  # before the release
            if trust_model != "central":
                gen = ClientRNG(c.client_id, noise_seed, method="gaussian").generator(STREAM_STATS_RELEASE)
                s = s + _noise(s.shape, share[trust_model], clip, split, gen)
        total += s
    if private and trust_model == "central":  # the trusted aggregator's one draw
        gen = ClientRNG(-1, noise_seed, method="gaussian").generator(STREAM_STATS_RELEASE)
        total += _noise(total.shape, sigma, clip, split, gen)

    # post-processing of the one release
    count = total[:, d]
    n = count.clamp_min(1.0)
    mu = total[:, :d] / n[:, None] + float(center)
    # the noise's variance per coordinate of a summed class sum (public): subtracted from ||sum||^2 so that the
    # spread is not underestimated by the noise the means carry
    draws = {"local": M * sigma**2, "distributed": M * share["distributed"] ** 2, "central": sigma**2}
    v_sum = draws[trust_model] * clip**2 / split[0] if private else 0.0
    sq_sum = (total[:, :d].pow(2).sum(1) - d * v_sum).clamp_min(0.0)
    resid = (total[:, d + 1] - sq_sum / n).clamp_min(0.0).sum()
    var = max(float(resid) / (d * max(float(count.clamp_min(0.0).sum()), 1.0)), VAR_FLOOR)
    gen = public_generator(seed, SeedTag.GAUSSIAN_SYNTH)
    y_syn = torch.arange(K).repeat_interleave(samples_per_class)
    x_syn = mu[y_syn] + math.sqrt(var) * torch.randn(len(y_syn), d, generator=gen, dtype=torch.float64)
    if fed.transform == "range":
        x_syn = x_syn.clamp(0.0, 1.0)  # the public range of the mapped data

    privacy = None
    if private:
        eps = max(led.epsilon(delta=delta, accountant=accountant) for led in ledgers.values())
        privacy = {
            "epsilon_spent": eps,
            "target_epsilon": float(epsilon),
            "delta": float(delta),
            "sigma": sigma,
            "release": "one Gaussian mechanism per client: per-class sums, counts and squared-norm sums",
            "budget_split": {"sums": split[0], "counts": split[1], "squared_norms": split[2]},
            "budget_split_is": "shares of the one release's zCDP budget (component k gets noise sigma * Delta_k / "
            "sqrt(share_k)); nothing else is released",
            "trust_model": trust_model,
            "collusion": int(collusion) if trust_model == "distributed" else None,
            "simulated": trust_model == "distributed",
            "accountant": accountant,
            "clip_norm": clip,
            "center": float(center),
            "unit": "one record of one client's train split",
            "formal_guarantee": True,
            "noise": "reproducible (noise_seed set): not for release" if noise_seed is not None else "secure",
            "noise_seed": noise_seed,
        }
    settings = {
        "seed": seed,
        "clip_norm": clip if private else None,
        "center": float(center),
        "trust_model": trust_model if private else None,
        "samples_per_class": samples_per_class,
        "variance": "pooled isotropic",
        "feature_space": f"federation ({fed.transform})",
    }
    return synthetic_result(
        x_syn.numpy(),
        y_syn.numpy(),
        privacy=privacy,
        settings=settings,
        started=t0,
        # the summed release itself (K, d + 2: sums, count, squared norms per class): DP, like the synthetic set
        release=total.numpy(),
        diagnostics={"pooled_variance": var, "note": "post-processing of the release"},
    )
