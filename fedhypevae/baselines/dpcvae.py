"""DP-CVAE baseline (Di Salvo et al. 2025): one global conditional-VAE decoder, FedAvg'd, DP-SGD.

Architecture (docs/DESIGN.md §6, baselines): encoder (d_x + K) -> h -> h -> h -> 2 d_z,
mirrored decoder (d_z + K) -> h -> h -> h -> d_x; h = 256, d_z = 100 by default. Loss per record:
squared reconstruction error summed over features + beta * KL(q(z | x, y) || N(0, I)).

Federation: every client keeps its own encoder (never leaves the client) and, each round, starts
from a copy of the global decoder; it runs ``local_steps`` DP-SGD steps over the WHOLE CVAE
(encoder and decoder jointly: one per-sample gradient clipped to C, summed, N(0, sigma^2 C^2)
added, divided by the public q * declared size; Adam on the noisy gradient), then the server
averages the clients' decoders weighted by declared (public) sizes. sigma is calibrated before
training with ``plan_dp_sgd`` over all rounds * local_steps steps; each client charges its ledger
before every step. Everything released (decoders, the synthetic set) is covered.

After training, the global decoder generates a class-balanced synthetic set with z ~ N(0, I), in the
federation's feature space (the same space as ``ClientData.x_train``).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from ..dp_step import NoiseSpec, add_noise_and_scale, clip_and_sum, per_sample_grads, poisson_sample
from ..errors import ConfigError, PrivacyError
from ..model import mlp, one_hot, soft_clamp
from ..privacy import DP_SGD, PrivacyLedger, plan_dp_sgd
from ..rng import STREAM_STEP, ClientRNG, SeedTag, public_generator
from .linear import _require_all_clients, aggregation_weights, ledger_summary, synthetic_result


class CVAE(nn.Module):
    """Di Salvo et al.'s conditional VAE; ``forward`` returns the per-sample loss and (mse, kl)."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        hidden: int = 256,
        latent_dim: int = 100,
        layers: int = 3,
        beta: float = 1.0,
    ):
        super().__init__()
        self.num_classes, self.latent_dim, self.beta = num_classes, latent_dim, beta
        self.encoder = mlp([dim + num_classes] + [hidden] * layers + [2 * latent_dim], act=nn.ReLU)
        self.decoder = mlp([latent_dim + num_classes] + [hidden] * layers + [dim], act=nn.ReLU)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, one_hot(y, self.num_classes, z.dtype)], dim=-1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor):
        yo = one_hot(y, self.num_classes, x.dtype)
        mu, logvar = self.encoder(torch.cat([x, yo], dim=-1)).chunk(2, dim=-1)
        logvar = soft_clamp(logvar, 8.0)
        z = mu + torch.exp(0.5 * logvar) * eps
        x_hat = self.decoder(torch.cat([z, yo], dim=-1))
        mse = (x - x_hat).pow(2).sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return mse + self.beta * kl, (mse, kl)


def decoder_names(model: CVAE) -> list:
    return [n for n, _ in model.named_parameters() if n.startswith("decoder.")]


def train_dpcvae(
    fed,
    *,
    seed: int = 0,
    epsilon: float = 1.0,
    delta: float = 1e-4,
    private: bool = True,
    rounds: int = 20,
    local_steps: int | None = None,
    hidden: int = 256,
    latent_dim: int = 100,
    layers: int = 3,
    beta: float = 1.0,
    lr: float = 1e-3,
    clip_norm: float = 1.0,
    sample_rate: float = 0.1,
    accountant: str = "rdp",
    noise_seed: int | None = None,
    noise_multiplier: float | None = None,
    weights: str = "declared",
    samples_per_class: int = 200,
) -> dict:
    """Train the federated DP-CVAE and draw a class-balanced synthetic set from the global decoder.

    ``local_steps``: DP-SGD steps per client per round; None = ceil(1/q) (one expected epoch).
    ``private=False`` is the non-private reference (same sampling, no clipping or noise).
    Returns {"x_syn", "y_syn" (numpy, samples_per_class per class, in the federation's feature space),
    "privacy" (None when not private), "settings", "diagnostics" (mean train loss per round: a function
    of private data, outside the guarantee), "decoder" (state dict of the global decoder)}.
    """
    t0 = time.perf_counter()
    _require_all_clients(fed, "dpcvae")
    if local_steps is None:
        local_steps = int(math.ceil(1.0 / sample_rate - 1e-12))
    if rounds < 1 or local_steps < 1 or samples_per_class < 1 or hidden < 1 or latent_dim < 1 or layers < 1:
        raise ConfigError(
            f"dpcvae needs rounds, local_steps, samples_per_class, hidden, latent_dim, layers >= 1; got "
            f"rounds={rounds}, local_steps={local_steps}, samples_per_class={samples_per_class}, "
            f"hidden={hidden}, latent_dim={latent_dim}, layers={layers}"
        )
    if not (0 < sample_rate <= 1) or clip_norm <= 0 or lr <= 0:
        raise ConfigError(
            f"dpcvae needs 0 < sample_rate <= 1, clip_norm > 0, lr > 0; got {sample_rate}, {clip_norm}, {lr}"
        )
    K, d = fed.num_classes, fed.dim
    steps = rounds * local_steps
    plan = None
    if private:
        plan = plan_dp_sgd(
            target_epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            noise_multiplier=noise_multiplier,
        )
    w_agg = aggregation_weights(fed, weights)
    clients = sorted(fed.clients, key=lambda c: c.client_id)

    # public initialization from the seed: the global decoder, and one encoder per client
    models, opts, rngs, ledgers, data = {}, {}, {}, {}, {}
    with torch.random.fork_rng():  # leaves the caller's global RNG state untouched
        torch.manual_seed(int(public_generator(seed, SeedTag.MODEL_INIT).initial_seed()))
        template = CVAE(d, K, hidden=hidden, latent_dim=latent_dim, layers=layers, beta=beta)
        for c in clients:
            m = CVAE(d, K, hidden=hidden, latent_dim=latent_dim, layers=layers, beta=beta)
            models[c.client_id] = m
    dec = decoder_names(template)
    global_dec = {n: p.detach().clone() for n, p in template.named_parameters() if n in dec}
    for c in clients:
        cid = c.client_id
        opts[cid] = torch.optim.Adam(models[cid].parameters(), lr=lr)
        rngs[cid] = ClientRNG(cid, noise_seed if (private or noise_seed is not None) else seed, method="dpcvae")
        ledgers[cid] = PrivacyLedger([cid])  # in memory: the baseline does not resume
        data[cid] = (
            torch.as_tensor(np.asarray(c.x_train, np.float32)),
            torch.as_tensor(np.asarray(c.y_train, np.int64)),
        )
    history = []

    for r in range(rounds):
        new_dec = {n: torch.zeros_like(t) for n, t in global_dec.items()}
        loss_sum, loss_count = 0.0, 0
        for c in clients:
            cid = c.client_id
            model, opt = models[cid], opts[cid]
            params = dict(model.named_parameters())
            names = list(params)
            with torch.no_grad():
                for n in dec:
                    params[n].copy_(global_dec[n])
            x, y = data[cid]
            expected = sample_rate * float(fed.declared_sizes[cid])  # public normalizer
            for s in range(local_steps):
                if plan is not None:
                    if not ledgers[cid].fits(DP_SGD, plan.sigma, sample_rate, plan):
                        raise PrivacyError(
                            f"dpcvae client {cid}: step {s} of round {r} would exceed epsilon={epsilon:g}"
                        )
                    ledgers[cid].charge(DP_SGD, plan.sigma, sample_rate, f"r{r}s{s}")
                gen = rngs[cid].generator(STREAM_STEP, r, s)
                idx = poisson_sample(len(y), sample_rate, gen)
                xb, yb = x[idx], y[idx]
                eps = torch.randn(len(idx), latent_dim, generator=gen)
                if len(idx) == 0:  # an empty batch is still noised, released and counted
                    g = {n: torch.zeros_like(params[n]) for n in names}
                    if plan is not None:
                        g = add_noise_and_scale(g, spec=NoiseSpec(plan.sigma, clip_norm, expected), generator=gen)
                elif plan is not None:
                    psg, (mse, kl) = per_sample_grads(model, names, (xb, yb, eps))
                    summed, _ = clip_and_sum(psg, clip_norm)
                    g = add_noise_and_scale(summed, spec=NoiseSpec(plan.sigma, clip_norm, expected), generator=gen)
                    loss_sum += float((mse + beta * kl).sum())
                    loss_count += len(idx)
                else:
                    loss, _ = model(xb, yb, eps)
                    grads = torch.autograd.grad(loss.sum() / expected, [params[n] for n in names])
                    g = dict(zip(names, grads))
                    loss_sum += float(loss.detach().sum())
                    loss_count += len(idx)
                for n in names:
                    params[n].grad = g[n].detach()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n in dec:
                    new_dec[n] += w_agg[cid] * params[n].detach()
        global_dec = new_dec
        history.append(loss_sum / max(loss_count, 1))

    # generation: z ~ N(0, I), balanced classes, from the global decoder (post-processing)
    with torch.no_grad():
        tparams = dict(template.named_parameters())
        for n in dec:
            tparams[n].copy_(global_dec[n])
        gen = public_generator(seed, SeedTag.DPCVAE_SYNTH)
        y_syn = torch.arange(K).repeat_interleave(samples_per_class)
        z = torch.randn(len(y_syn), latent_dim, generator=gen)
        x_syn = template.decode(z, y_syn)
    privacy = ledger_summary(ledgers, plan, clip_norm=clip_norm, noise_seed=noise_seed) if plan is not None else None
    settings = {
        "seed": seed,
        "rounds": rounds,
        "local_steps": local_steps,
        "hidden": hidden,
        "latent_dim": latent_dim,
        "layers": layers,
        "beta": beta,
        "lr": lr,
        "optimizer": "adam",
        "sample_rate": sample_rate,
        "clip_norm": clip_norm if private else None,
        "weights": weights,
        "samples_per_class": samples_per_class,
        "prior": "N(0, I)",
        "feature_space": f"federation ({fed.transform})",
    }
    return synthetic_result(
        x_syn.numpy(),
        y_syn.numpy(),
        privacy=privacy,
        settings=settings,
        started=t0,
        diagnostics={"train_loss_per_round": history, "note": "outside the guarantee"},
        decoder={n: t.clone() for n, t in global_dec.items()},
    )
