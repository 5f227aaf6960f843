"""DP statistics released once per client: class moments (meta-code, Eq. 11) and
random-feature mean embeddings (DP-MERF, for the MMD term of Eq. 6).

Both are Gaussian mechanisms on the client's TRAINING records only (never test splits),
with sample rate 1 and one step; the caller charges them to the client's ledger BEFORE
calling these functions (``class-stats`` and ``mmd-embeddings`` at the plan's
``noise_multiplier(name)``). Releases are summed across clients by the caller; everything
after the noise (``finalize_class_stats``, MMD from the embeddings) is post-processing.

Joint sensitivity (add/remove one record, all components released together): each
component k is divided by its own sensitivity Delta_k, so each scaled component moves by
at most 1 and the joint scaled vector of m components by at most sqrt(m). Adding noise
of std sigma*sqrt(m) to every scaled coordinate is then the Gaussian mechanism with
noise multiplier sigma; in original units component k gets std sigma*sqrt(m)*Delta_k.
With shares w_k of the budget (``privacy.stats_split``, adding up to 1) each component is
divided by Delta_k / sqrt(m w_k) instead (``component_units``): it moves by at most
sqrt(m w_k), the joint vector still by at most sqrt(m), and component k gets std
sigma*Delta_k/sqrt(w_k) — equal shares are the rule above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import PrivacyError

COVARIANCE_KINDS = ("full", "diag", "none")


# --------------------------------------------------------------------------- helpers


def stats_components(covariance: str) -> int:
    """m: the components of a class-statistics release (sums and counts, and second moments unless "none")."""
    return 2 if covariance == "none" else 3


def stats_flat_size(num_classes: int, dim: int, covariance: str) -> int:
    """The length of one release's flat vector (count, second moment, sum: the keys in sorted order)."""
    second = {"none": 0, "diag": num_classes * dim, "full": num_classes * dim * dim}[covariance]
    return num_classes + second + num_classes * dim


def component_units(clip_norm: float, covariance: str, split: Sequence[float] | None = None) -> dict:
    """Each component's unit: its sensitivity Delta_k (count 1, sums C, second moments C^2) divided by
    sqrt(m * share_k). In these units a record moves component k by at most sqrt(m * share_k), the joint vector by at
    most sqrt(m) whatever the split, and noise std sigma * sqrt(m) per unit is the Gaussian mechanism at multiplier
    sigma: std sigma * Delta_k / sqrt(share_k) in original units. Equal shares (None) give the units Delta_k."""
    keys = ("sum", "count") if covariance == "none" else ("sum", "count", "second_moment")
    delta = {"sum": clip_norm, "count": 1.0, "second_moment": clip_norm * clip_norm}
    m = len(keys)
    shares = [1.0 / m] * m if split is None else [float(v) for v in split]
    return {k: delta[k] / math.sqrt(m * w) for k, w in zip(keys, shares)}


def stats_scales(layout: list, clip_norm: float, split: Sequence[float] | None = None) -> torch.Tensor:
    """Per coordinate of a flat release with `layout` [(key, shape)]: its component's unit (`component_units`: the
    sensitivity, count 1, sums C, second moments C^2, with equal shares), float64."""
    second = any(k == "second_moment" for k, _ in layout)
    per = component_units(clip_norm, "diag" if second else "none", split)
    return torch.cat([torch.full((math.prod(shape),), per[k], dtype=torch.float64) for k, shape in layout])


def clip_rows(x: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row to L2 norm <= clip_norm (rows already inside are unchanged)."""
    norms = x.norm(dim=1, keepdim=True)
    return x * torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0)


def _gaussian(shape, std: float, generator: torch.Generator, device) -> torch.Tensor:
    """float64 N(0, std^2) noise drawn from ``generator`` (on its device), moved to ``device``."""
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float64, device=generator.device)
    return (noise * std).to(device)


def _check_release(num_classes: int, noise_multiplier: float, y: torch.Tensor) -> None:
    if num_classes < 1:
        raise PrivacyError(f"num_classes must be >= 1; got {num_classes}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise PrivacyError(f"noise multiplier must be a finite number >= 0; got {noise_multiplier}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise PrivacyError(f"labels must lie in 0..{num_classes - 1}")


def _one_hot(y: torch.Tensor, num_classes: int, device) -> torch.Tensor:
    return torch.nn.functional.one_hot(y.long().to(device), num_classes).to(torch.float64)


# --------------------------------------------------------------------------- class statistics


def class_stat_sums(
    x: torch.Tensor, y: torch.Tensor, *, num_classes: int, clip_norm: float, covariance: str, center: float = 0.0
) -> dict:
    """The pre-noise payload of ``release_class_stats``: per-class sums of the clipped rows, counts and
    (for "diag"/"full") second moments, float64. Stays on the client. ``center`` (public) is subtracted from
    every coordinate before the clip: the sums are of clipped x - center (``finalize_class_stats`` adds it back)."""
    if covariance not in COVARIANCE_KINDS:
        raise PrivacyError(f"covariance must be one of {', '.join(COVARIANCE_KINDS)}; got {covariance!r}")
    if not clip_norm > 0:
        raise PrivacyError(f"clip_norm must be > 0; got {clip_norm}")
    _check_release(num_classes, 0.0, y)
    xc = clip_rows(x.detach().to(torch.float64) - float(center), clip_norm)
    onehot = _one_hot(y, num_classes, x.device)  # (n, K)
    out = {"sum": onehot.T @ xc, "count": onehot.sum(0)}
    if covariance == "diag":
        out["second_moment"] = onehot.T @ xc.pow(2)
    elif covariance == "full":
        out["second_moment"] = torch.einsum("nk,ni,nj->kij", onehot, xc, xc)
    return out


def noise_class_stats(
    sums: dict,
    *,
    clip_norm: float,
    noise_multiplier: float,
    covariance: str,
    generator: torch.Generator,
    split: Sequence[float] | None = None,
) -> dict:
    """``sums`` (from ``class_stat_sums``) plus the Gaussian noise of the release (see release_class_stats); `split`:
    the components' shares of the budget (``component_units``; None: equal)."""
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise PrivacyError(f"noise multiplier must be a finite number >= 0; got {noise_multiplier}")
    device = sums["sum"].device
    std = noise_multiplier * math.sqrt(stats_components(covariance))
    unit = component_units(clip_norm, covariance, split)
    k, d = sums["sum"].shape
    out = {
        "sum": sums["sum"] + _gaussian((k, d), std * unit["sum"], generator, device),
        "count": sums["count"] + _gaussian((k,), std * unit["count"], generator, device),
    }
    if covariance == "diag":
        out["second_moment"] = sums["second_moment"] + _gaussian((k, d), std * unit["second_moment"], generator, device)
    elif covariance == "full":
        noise = torch.triu(_gaussian((k, d, d), std * unit["second_moment"], generator, device))
        out["second_moment"] = sums["second_moment"] + noise + torch.triu(noise, diagonal=1).transpose(1, 2)
    return out


def release_class_stats(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    clip_norm: float,
    noise_multiplier: float,
    covariance: str,
    generator: torch.Generator,
) -> dict:
    """Noisy per-class sums of one client: {"sum" (K,d), "count" (K,), ["second_moment"]}.

    ``second_moment`` is sum x x^T (K,d,d) for ``covariance="full"``, sum x**2 (K,d) for
    "diag", absent for "none". Rows are clipped to ``clip_norm`` = C first, so one record
    changes: sum by <= C (L2), count by 1, second moment by ||x x^T||_F = ||x||^2 <= C^2
    (full) or ||x**2||_2 <= ||x||^2 <= C^2 (diag). With m = 3 (or 2 without moments)
    components, each coordinate gets noise std sigma*sqrt(m)*Delta_k (module docstring):
    noise multiplier ``noise_multiplier`` for the whole release. For "full" the noise is
    drawn on the upper triangle and mirrored (the upper triangle's sensitivity is at most
    the Frobenius one; mirroring is post-processing). Returned in float64.
    """
    _check_release(num_classes, noise_multiplier, y)
    sums = class_stat_sums(x, y, num_classes=num_classes, clip_norm=clip_norm, covariance=covariance)
    return noise_class_stats(
        sums, clip_norm=clip_norm, noise_multiplier=noise_multiplier, covariance=covariance, generator=generator
    )


def finalize_class_stats(
    summed: dict,
    *,
    covariance: str,
    rank: int = 0,
    min_count: float = 1.0,
    var_floor: float = 1e-6,
    center: float = 0.0,
) -> dict:
    """Global class means / covariances from the summed noisy releases (post-processing).

    Returns {"means" (K,d), "counts" (K,) clipped at 0, and "covariances" (K,d,d) for full
    (projected to PSD by clipping eigenvalues at 0; with ``rank`` > 0 only the top-``rank``
    eigencomponents are kept) or "variances" (K,d) for diag (clipped at ``var_floor``)}.
    Noisy counts may be tiny or negative: divisions use max(count, min_count). ``center``: the public point the
    release's rows were centred on (``class_stat_sums``): added back to the means (covariances do not move).
    """
    if covariance not in COVARIANCE_KINDS:
        raise PrivacyError(f"covariance must be one of {', '.join(COVARIANCE_KINDS)}; got {covariance!r}")
    s = summed["sum"].to(torch.float64)
    n = summed["count"].to(torch.float64)
    denom = n.clamp_min(min_count)
    means = s / denom[:, None]
    out = {"means": means, "counts": n.clamp_min(0.0)}
    if covariance == "diag":
        var = summed["second_moment"].to(torch.float64) / denom[:, None] - means.pow(2)
        out["variances"] = var.clamp_min(var_floor)
    elif covariance == "full":
        cov = summed["second_moment"].to(torch.float64) / denom[:, None, None] - means[:, :, None] * means[:, None, :]
        out["covariances"] = project_psd(cov, rank=rank)
    out["means"] = means + float(center)
    return out


def project_psd(cov: torch.Tensor, *, rank: int = 0) -> torch.Tensor:
    """Nearest PSD matrices (Frobenius): symmetrize, clip eigenvalues at 0, optionally keep top-``rank``."""
    sym = 0.5 * (cov + cov.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(sym)  # ascending
    evals = evals.clamp_min(0.0)
    if 0 < rank < evals.shape[-1]:
        evals[..., : evals.shape[-1] - rank] = 0.0
    out = (evecs * evals[..., None, :]) @ evecs.transpose(-1, -2)
    return 0.5 * (out + out.transpose(-1, -2))


# --------------------------------------------------------------------------- DP-MERF


class RandomFeatures:
    """Fixed random Fourier features of the multi-kernel Gaussian k = sum_h exp(-|a-b|^2 / 2h^2).

    ``bandwidths`` are absolute (the config's are in units of sqrt(d_x): multiply first).
    ``features_per_bandwidth`` (even) output features per bandwidth: half cos, half sin of
    omega.x with omega ~ N(0, I/h^2). The frequencies come from the PUBLIC ``seed`` so every
    client and the server use the same map (it depends on no private data). All F/2 cos/sin
    pairs are scaled by 1/sqrt(F/2), so every feature row has L2 norm exactly 1 (this is
    the sensitivity the release relies on) and phi(a).phi(b) ~ k(a,b) / B, B = number of
    bandwidths; ``kernel_scale`` = B converts back to the kernel of ``gaussian_kernel_mmd2``.
    """

    def __init__(self, *, dim: int, bandwidths: Sequence[float], features_per_bandwidth: int, seed: int):
        if dim < 1 or features_per_bandwidth < 2 or features_per_bandwidth % 2:
            raise PrivacyError(
                "RandomFeatures needs dim >= 1 and an even features_per_bandwidth >= 2; "
                f"got dim={dim}, features_per_bandwidth={features_per_bandwidth}"
            )
        if not bandwidths or any(h <= 0 for h in bandwidths):
            raise PrivacyError(f"bandwidths must be positive numbers; got {list(bandwidths)}")
        gen = torch.Generator().manual_seed(int(seed))
        per = features_per_bandwidth // 2
        omegas = [torch.randn(per, dim, generator=gen, dtype=torch.float64) / float(h) for h in bandwidths]
        self.omega = torch.cat(omegas)  # (F/2, dim)
        self.dim, self.seed = dim, int(seed)
        self.bandwidths = [float(h) for h in bandwidths]
        self.num_features = 2 * self.omega.shape[0]
        self.kernel_scale = float(len(self.bandwidths))
        self.scale = 1.0 / math.sqrt(self.num_features / 2)  # every feature row then has L2 norm 1

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.omega.to(device=x.device, dtype=x.dtype).T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) -> (n, F), rows of unit L2 norm; differentiable in x, in x's dtype/device."""
        proj = self._project(x)
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=1) * self.scale

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n, dim) -> (..., F): the mean of the n rows' features, equal to ``self(x).mean(-2)`` and
        differentiable in x, without forming the (..., n, F) features: one matmul, one cos and one sin per
        projection, and a backward that reuses them (autograd's own backward of cos and sin evaluates both again)."""
        return _CosSinMean.apply(self._project(x)) * self.scale


class _CosSinMean(torch.autograd.Function):
    """(..., n, h) -> (..., 2h): [mean over n of cos, mean over n of sin]; the backward is
    d/dp = (g_sin cos - g_cos sin) / n from the forward's saved cos and sin."""

    @staticmethod
    def forward(ctx, proj: torch.Tensor) -> torch.Tensor:
        c, s = torch.cos(proj), torch.sin(proj)
        ctx.save_for_backward(c, s)
        return torch.cat([c.mean(-2), s.mean(-2)], dim=-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        c, s = ctx.saved_tensors
        h, n = c.shape[-1], c.shape[-2]
        g = (g / n).unsqueeze(-2)
        return torch.addcmul(g[..., h:] * c, g[..., :h], s, value=-1.0)


def mean_embedding_sums(x: torch.Tensor, y: torch.Tensor, *, features: RandomFeatures, num_classes: int) -> tuple:
    """The pre-noise payload of ``release_mean_embeddings``: per-class (sum of phi(x) (K,F), count (K,)), float64."""
    _check_release(num_classes, 0.0, y)
    phi = features(x.detach().to(torch.float64))
    onehot = _one_hot(y, num_classes, x.device)
    return onehot.T @ phi, onehot.sum(0)


def noise_mean_embeddings(
    sums: torch.Tensor, counts: torch.Tensor, *, noise_multiplier: float, generator: torch.Generator
) -> tuple:
    """(sums, counts) from ``mean_embedding_sums`` plus the noise of the release (see release_mean_embeddings)."""
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise PrivacyError(f"noise multiplier must be a finite number >= 0; got {noise_multiplier}")
    std = noise_multiplier * math.sqrt(2.0)
    return (
        sums + _gaussian(tuple(sums.shape), std, generator, sums.device),
        counts + _gaussian(tuple(counts.shape), std, generator, counts.device),
    )


def release_mean_embeddings(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    features: RandomFeatures,
    num_classes: int,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple:
    """Noisy per-class (sum of phi(x) (K,F), count (K,)) of one client, float64.

    phi rows have norm exactly 1 and a record adds 1 to one count, so both components have
    sensitivity 1 and the pair sqrt(2): each coordinate gets std sigma*sqrt(2) (noise
    multiplier sigma). No clipping is needed. Mean embedding = summed sums / max(count, 1).
    """
    _check_release(num_classes, noise_multiplier, y)
    sums, counts = mean_embedding_sums(x, y, features=features, num_classes=num_classes)
    return noise_mean_embeddings(sums, counts, noise_multiplier=noise_multiplier, generator=generator)


mean_embedding_release = release_mean_embeddings


def mean_embedding_mmd2(real_embedding: torch.Tensor, x_synth: torch.Tensor, features: RandomFeatures) -> torch.Tensor:
    """MMD^2 between a released mean embedding (F,) and synthetic samples, in the kernel of
    ``gaussian_kernel_mmd2``: kernel_scale * ||mu_real - mean phi(x_synth)||^2.
    Post-processing of the DP release; differentiable in x_synth."""
    mu = features.mean(x_synth)
    diff = real_embedding.to(dtype=mu.dtype, device=mu.device) - mu
    return features.kernel_scale * diff.pow(2).sum()


def gaussian_kernel_mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Biased (V-statistic) multi-kernel MMD^2, Eq. 6: mean k(x,x') + mean k(y,y') - 2 mean k(x,y),
    k(a,b) = sum_h exp(-||a-b||^2 / (2 h^2)). Differentiable (squared distances computed
    without sqrt, so no NaN gradient at zero distance)."""

    def kmean(a, b):
        d2 = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0.0)
        return sum(torch.exp(-d2 / (2 * float(h) ** 2)) for h in bandwidths).mean()

    return kmean(x, x) + kmean(y, y) - 2 * kmean(x, y)
