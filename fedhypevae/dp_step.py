"""The client's DP step as small named stages: sample -> per-sample grads -> clip -> sum -> noise -> scale.

Reference implementation with `torch.func` (per-sample gradients are materialized). The
privacy argument rests on three facts checked by the tests:
  * each sample's gradient over everything that is privatized is clipped to norm C, so adding
    or removing one record changes the clipped sum by at most C;
  * Gaussian noise N(0, sigma^2 C^2) is added to every privatized coordinate, also when the
    Poisson batch is empty (the step is still released and charged);
  * the sum is divided by the *expected* batch size q * n_declared, a public constant: dividing
    by the realized batch size (or a true client size) would leak it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson batch: each record taken independently with probability `rate`."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate, as_tuple=False).flatten()


def per_sample_grads(module: torch.nn.Module, names: list[str], inputs: tuple, shared: tuple = ()):
    """Per-sample gradients of `module(*inputs_j, *shared)` w.r.t. the parameters in `names`.

    `inputs` are batched along dim 0 (one slice per sample); `shared` is passed unbatched to
    every sample (e.g. the reparameterization noise of a synthetic batch). The module returns
    (loss, aux) for a batch of one; aux is a tuple of per-sample diagnostics.
    Returns ({name: (B, *shape)}, aux batched along dim 0).
    """
    params = {n: p.detach() for n, p in module.named_parameters()}
    trainable = {n: params[n] for n in names}
    frozen = {n: p for n, p in params.items() if n not in trainable}

    def loss_one(tp, *args):
        k = len(inputs)
        batched = tuple(a.unsqueeze(0) for a in args[:k])
        loss, aux = functional_call(module, {**frozen, **tp}, batched + tuple(args[k:]))
        return loss.sum(), tuple(a.sum() for a in aux)

    in_dims = (None,) + (0,) * len(inputs) + (None,) * len(shared)
    grads, aux = vmap(grad(loss_one, has_aux=True), in_dims=in_dims)(trainable, *inputs, *shared)
    return grads, aux


def sample_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each sample's gradient over all privatized parameters jointly."""
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
    return sq.sqrt()


def clip_and_sum(grads: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each sample's joint gradient to norm <= C and sum over the batch.
    Returns the clipped sums and the per-sample norms (before clipping)."""
    norms = sample_norms(grads)
    factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factor, g) for n, g in grads.items()}, norms


@dataclass
class NoiseSpec:
    noise_multiplier: float
    clip_norm: float
    expected_batch: float  # q * n_declared: public


def add_noise_and_scale(summed: dict[str, torch.Tensor], *, spec: NoiseSpec, generator: torch.Generator):
    """(sum + N(0, sigma^2 C^2 I)) / (q n_declared), in a fixed parameter order so that the noise
    drawn from a reproducible generator is the same on every world size."""
    out = {}
    std = spec.noise_multiplier * spec.clip_norm
    for name in sorted(summed):
        s = summed[name]
        if std > 0:
            # drawn on the generator's device (the CPU) so that every device gets the same numbers
            s = s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device)
        out[name] = s / spec.expected_batch
    return out
