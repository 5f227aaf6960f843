"""After training: neutral meta-code(s) fitted to DP class statistics (Eq. 11), generation (Eq. 12, 13).

All of this is post-processing on the server side: Phi is frozen and the only data-dependent
inputs are the DP-noisy class statistics, so none of it costs privacy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import HyperNetwork, generator_params, project_codes, sample_synthetic
from .optim import Optimizer


@dataclass
class ClassMoments:
    """Finalized (noisy) statistics of one domain: means (K, d), cov (K, d, d) or var (K, d), counts (K,)."""

    means: torch.Tensor
    counts: torch.Tensor
    cov: torch.Tensor | None = None
    var: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        """Classes whose noisy count is at least one record: the others' means are mostly noise."""
        return self.counts >= 1.0


def model_moments(
    hyper: HyperNetwork, code: torch.Tensor, z_noise: torch.Tensor, *, output_noise: bool, second: str = "cov"
):
    """Monte-Carlo mean and second moment of x(z, y), z ~ p_omega(z | y), per class, for one code.
    z_noise is (K, M, d_z), fixed across optimizer steps (common random numbers). `second`: "cov" (K, d, d),
    "var" (K, d: the covariance's diagonal, without the d x d product) or "none" (None: the means alone)."""
    K, M, _ = z_noise.shape
    mods, hw = generator_params(hyper, code)
    y = torch.arange(K, device=z_noise.device).repeat_interleave(M)
    x = sample_synthetic(hyper, mods, hw, y, z_noise.reshape(K * M, -1), None).reshape(K, M, -1)
    mean = x.mean(1)
    if second == "none":
        return mean, None
    centered = x - mean[:, None, :]
    noise_var = hyper.output_logstd().exp().pow(2) if output_noise else None
    if second == "var":
        var = centered.pow(2).sum(1) / (M - 1)
        return mean, var if noise_var is None else var + noise_var
    cov = centered.transpose(1, 2) @ centered / (M - 1)
    if noise_var is not None:  # Cov[x] = Cov_z[E[x|z]] + diag(sigma_x^2) when x is drawn from p_theta(x | z, y)
        cov = cov + torch.diag_embed(noise_var).expand_as(cov)
    return mean, cov


def metacode_loss(hyper, code, target: ClassMoments, z_noise, *, beta: float, output_noise: bool) -> torch.Tensor:
    """Eq. 11: sum_y ||E[x(z,y)] - mu_y||^2 + beta ||Cov[x(z,y)] - Sigma_y||_F^2 over valid classes (the
    diagonal alone with variances as the target; the means alone without a second moment)."""
    second = "cov" if target.cov is not None else "var" if target.var is not None else "none"
    mean, mom = model_moments(hyper, code, z_noise, output_noise=output_noise, second=second)
    valid = target.valid.to(device=mean.device, dtype=mean.dtype)
    loss = (mean - target.means.to(device=mean.device, dtype=mean.dtype)).pow(2).sum(-1) * valid
    if target.cov is not None:
        loss = loss + beta * ((mom - target.cov.to(device=mom.device, dtype=mom.dtype)).pow(2).sum((-1, -2)) * valid)
    elif target.var is not None:
        loss = loss + beta * ((mom - target.var.to(device=mom.device, dtype=mom.dtype)).pow(2).sum(-1) * valid)
    return loss.sum() / valid.sum().clamp(min=1.0)


def fit_metacode(
    hyper: HyperNetwork,
    target: ClassMoments,
    *,
    steps: int,
    lr: float,
    beta: float,
    samples_per_class: int,
    radius: float,
    output_noise: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[float]]:
    """Fit v_o (Phi frozen), starting from the neutral point 0, projected to ||v|| <= r."""
    K = hyper.num_classes
    dev = next(hyper.parameters()).device
    z_noise = torch.randn(K, samples_per_class, hyper.latent_dim, generator=generator).to(dev)
    code = torch.zeros(hyper.code_dim, device=dev, requires_grad=True)
    opt = Optimizer([code], kind="adam", lr=lr)  # torch.optim.Adam([code], lr=lr), without importing torch._dynamo
    trace = []
    if not bool(target.valid.any()):
        return code.detach(), trace  # nothing to fit: stay at the neutral point
    for _ in range(steps):
        loss = metacode_loss(hyper, code, target, z_noise, beta=beta, output_noise=output_noise)
        (g,) = torch.autograd.grad(loss, [code])  # gradient w.r.t. the code only: Phi stays frozen
        code.grad = g
        opt.step()
        project_codes(code, radius)
        trace.append(float(loss.detach()))
    return code.detach(), trace


def mixture_weights(domains: list[ClassMoments]) -> torch.Tensor:
    """pi_k proportional to each domain's noisy record count (DP), uniform if none is positive."""
    totals = torch.stack([d.counts.clamp(min=0).sum() for d in domains]).double()
    if float(totals.sum()) <= 0:
        return torch.full((len(domains),), 1.0 / len(domains), dtype=torch.float64)
    return totals / totals.sum()


def class_counts(total_counts: torch.Tensor, *, samples_per_class: int, balance: str) -> list[int]:
    K = total_counts.shape[0]
    if balance == "balanced":
        return [samples_per_class] * K
    w = total_counts.clamp(min=0).double()
    w = w / w.sum() if float(w.sum()) > 0 else torch.full((K,), 1.0 / K, dtype=torch.float64)
    return [int(round(float(v) * samples_per_class * K)) for v in w]


@torch.no_grad()
def generate(
    hyper: HyperNetwork,
    codes: torch.Tensor,
    weights: torch.Tensor,
    counts: list[int],
    *,
    output_noise: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 12/13: z ~ p_omega_o(z | y), x ~ p_theta_o(x | z, y), with theta_o, omega_o from the
    meta-code or the pi-weighted mixture of meta-codes."""
    dev = codes.device
    mods, hw = generator_params(hyper, codes, weights.to(device=dev, dtype=codes.dtype))
    y = torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)]).to(dev)
    z_noise = torch.randn(len(y), hyper.latent_dim, generator=generator).to(dev)
    x_noise = torch.randn(len(y), hyper.dim, generator=generator).to(dev) if output_noise else None
    return sample_synthetic(hyper, mods, hw, y, z_noise, x_noise), y
