"""The client's DP step: the stage functions and THE reference step object, :class:`DPStep`.

Stages, in the order one step runs them (each a method of :class:`DPStep` that a subclass may
override; the module-level functions below are the arithmetic they use, shared with the baselines):

  sample -> per_sample_grads -> clip_and_accumulate   (prepare: nothing released, nothing changed)
         -> add_noise -> scale -> released -> post_noise -> local_update   (release)

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

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.func import functional_call, grad, vmap

from .model import (CODE_NAME, ENCODER_PREFIX, PHI_PREFIX, ClientView, merf_mmd, mmd_bandwidths, multi_kernel,
                    project_codes, sample_synthetic)

# diagnostics carried per step: sums over the client's batch (outside the guarantee)
DIAG_KEYS = ("nll_sum", "kl_sum", "batch", "clipped", "mmd", "clients")


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


def clip_factor(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """min(1, C / (||g_j|| + 1e-6)) per sample: the one clip factor (the reference step and the batched engine)."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_sum(grads: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each sample's joint gradient to norm <= C and sum over the batch.
    Returns the clipped sums and the per-sample norms (before clipping)."""
    norms = sample_norms(grads)
    factor = clip_factor(norms, clip_norm)
    return {n: torch.einsum("b,b...->...", factor, g) for n, g in grads.items()}, norms


@dataclass
class NoiseSpec:
    noise_multiplier: float
    clip_norm: float
    expected_batch: float  # q * n_declared: public


BLOCKS = ("private", "phi")  # the client's own coordinates (psi_i, v_i) and Phi's


def noise_blocks(sigma) -> dict:
    """{"private": sigma_private, "phi": sigma_phi}: one noise multiplier for both blocks, or a per-block dict
    (Aggregation.noise_multipliers). ValueError for a missing block or a negative or non-finite multiplier."""
    blocks = dict(sigma) if isinstance(sigma, dict) else {b: float(sigma) for b in BLOCKS}
    if set(blocks) != set(BLOCKS) or not all(math.isfinite(v) and v >= 0 for v in blocks.values()):
        raise ValueError(f"noise multipliers per block must be finite and >= 0 for exactly {BLOCKS}; got {sigma!r}")
    return blocks


def block_of(name: str) -> str:
    """The noise block of a ClientView parameter name."""
    return "phi" if name.startswith(PHI_PREFIX) else "private"


def add_noise(summed: dict[str, torch.Tensor], *, std, generator: torch.Generator) -> dict:
    """sum + N(0, std^2 I) per parameter, drawn in sorted parameter order so that the noise drawn from a
    reproducible generator is the same on every world size. `std` is one value or {name: std}; a
    parameter whose std is 0 draws nothing."""
    out = {}
    for name in sorted(summed):
        s = summed[name]
        sd = std[name] if isinstance(std, dict) else std
        if sd > 0:
            # drawn on the generator's device (the CPU) so that every device gets the same numbers
            s = s + sd * torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device)
        out[name] = s
    return out


def scale(noisy: dict[str, torch.Tensor], expected_batch: float) -> dict:
    """Divide by the public normalizer q * n_declared (never the realized batch size)."""
    return {name: noisy[name] / expected_batch for name in sorted(noisy)}


def add_noise_and_scale(summed: dict[str, torch.Tensor], *, spec: NoiseSpec, generator: torch.Generator):
    """(sum + N(0, sigma^2 C^2 I)) / (q n_declared), in a fixed parameter order so that the noise
    drawn from a reproducible generator is the same on every world size."""
    return scale(add_noise(summed, std=spec.noise_multiplier * spec.clip_norm, generator=generator), spec.expected_batch)


# ------------------------------------------------------------------------------------------ the step


@dataclass
class StepOutput:
    phi_grad: dict[str, torch.Tensor]  # keyed by HyperNetwork parameter name
    diag: torch.Tensor  # len(DIAG_KEYS)


@dataclass
class PendingStep:
    """One client's DP step computed up to the noise. Nothing in it has been released."""
    generator: torch.Generator  # continues with the noise draws (the same order as one uninterrupted step)
    view: ClientView
    all_names: list
    phi_names: list
    batch: tuple  # (x, y, eps)
    syn: tuple
    expected: float  # q * declared size: public
    summed: dict  # privatized: the clipped pre-noise sums; non-private: the plain gradients (already scaled)
    diag: torch.Tensor
    idx: Optional[torch.Tensor] = None  # indices (into the client's data) of the realized batch

    def payload(self) -> list:
        """The pre-noise payload, in a fixed order (what the ledger's digest covers)."""
        return [self.summed[n] for n in sorted(self.summed)]


def project_code(code: torch.Tensor, radius: float) -> None:
    project_codes(code, radius)


class DPStep:
    """THE reference DP step of one client; `Client.prepare_step` / `release_step` / `step` run it.

    Two drivers, so that the trainer's release guard can stand between them:

    * :meth:`prepare` (nothing released, no state changed): :meth:`sample` (Poisson coins, then the
      reparameterization noise, then the literal-MMD synthetic noise, all from the step's generator)
      -> :meth:`payload` = :meth:`clip_and_accumulate` of :meth:`per_sample_grads` (privatized
      parameters: strict mode psi_i, v_i and Phi jointly, paper mode Phi) -> a :class:`PendingStep`;
      without privacy the payload is the plain batch gradient (:meth:`plain_grads`).
    * :meth:`release`: :meth:`add_noise` -> :meth:`scale` -> :meth:`released` -> (paper mode: the
      un-noised psi_i, v_i gradients) -> :meth:`post_noise` (terms that touch no private data) ->
      :meth:`local_update` of psi_i and v_i -> the :class:`StepOutput` that leaves the client.

    Every stage is a method a subclass may override (like the stages of Opacus' DP optimizer); the
    drivers fix their order and the generator's draw order (coins, eps, synthetic noise, DP noise in
    sorted parameter order, post-noise synthetic noise), which any override must keep for its
    release to stay reproducible. Overrides in this code base: the white-box audit's canaries
    (per_sample_grads) and its sabotages (clip_and_accumulate, add_noise), in ``fedhypevae.audit``;
    the sensitivity check's neighbouring data set, exposed payload and replayed history (sample,
    payload, released, local_update), in ``fedhypevae.privacy.sensitivity``. Override stages, not the
    drivers. DPStep itself holds no state (subclasses may carry settings): everything it reads and
    updates is the client's (``self.client``). The batched engine (``fedhypevae.engine``) is a second,
    vectorized implementation of this mechanism, checked equal to it by tests/test_engine.py.
    """

    def __init__(self, client):
        self.client = client

    # -- drivers --------------------------------------------------------------------------------------
    def prepare(self, hyper, generator: torch.Generator) -> PendingStep:
        """Everything up to the noise: coins, per-sample gradients, clipping, the sum. No state changes."""
        c = self.client
        p = c.cfg.privacy
        g = generator
        idx, eps, syn = self.sample(g)
        view = self.view(hyper)
        all_names = [n for n, _ in view.named_parameters()]
        phi_names = [n for n in all_names if n.startswith(PHI_PREFIX)]
        expected = p.sample_rate * c.declared_size  # public normalizer
        diag = torch.zeros(len(DIAG_KEYS), dtype=torch.float64)
        diag[DIAG_KEYS.index("batch")] = len(idx)
        diag[DIAG_KEYS.index("clients")] = 1.0
        batch = (c.x[idx], c.y[idx], eps)
        if p.enabled:
            names = all_names if p.mode == "strict" else phi_names
            summed, norms, (nll, kl) = self.payload(view, names, batch, syn)
            diag[DIAG_KEYS.index("clipped")] = float((norms > p.clip_norm).sum())
        else:
            summed, (nll, kl) = self.plain_grads(view, all_names, batch, syn, expected)
        diag[DIAG_KEYS.index("nll_sum")] = float(nll)
        diag[DIAG_KEYS.index("kl_sum")] = float(kl)
        return PendingStep(g, view, all_names, phi_names, batch, syn, expected, summed, diag, idx)

    def release(self, pending: PendingStep, *, sigma: float, features) -> StepOutput:
        """Noise, the post-noise terms and the local update of psi_i and v_i; returns what leaves the client."""
        p = self.client.cfg.privacy
        g, view, all_names, phi_names = pending.generator, pending.view, pending.all_names, pending.phi_names
        diag = pending.diag
        if p.enabled:
            noisy = self.scale(self.add_noise(pending.summed, sigma=sigma, generator=g), pending.expected)
            noisy = self.released(pending, noisy)
            if p.mode == "paper":
                # Eq. 8 literally: psi_i and v_i follow the un-noised batch gradient (not a formal guarantee)
                noisy.update(self.plain_grads(view, [n for n in all_names if n not in phi_names], pending.batch,
                                              pending.syn, pending.expected)[0])
        else:
            noisy = dict(pending.summed)

        # terms that do not touch private data are added after the noise (post-processing)
        post, mmd_value = self.post_noise(view, g, features)
        diag[DIAG_KEYS.index("mmd")] = mmd_value
        post_names = [CODE_NAME] + phi_names
        post_grads = torch.autograd.grad(post, [dict(view.named_parameters())[n] for n in post_names], allow_unused=True)
        for n, pg in zip(post_names, post_grads):
            if pg is not None:
                noisy[n] = noisy[n] + pg

        self.local_update(noisy)
        phi = {n[len(PHI_PREFIX):]: noisy[n] for n in phi_names}
        return StepOutput(phi, diag)

    # -- prepare's stages ------------------------------------------------------------------------------
    def sample(self, generator: torch.Generator) -> tuple:
        """(idx, eps, syn): the realized Poisson batch (indices into the client's data), its
        reparameterization noise (one row per sampled record) and, for the literal MMD term, the
        synthetic batch's noise (else ()). Drawn on the CPU from the step's generator in this order
        (the same numbers on any device). Override to change the realized batch (the sensitivity
        check's D minus one record: the same coins, one record fewer)."""
        c = self.client
        m = c.cfg.model
        idx = poisson_sample(len(c.y), c.cfg.privacy.sample_rate, generator).to(c.device)
        eps = torch.randn(len(idx), m.latent_dim, generator=generator).to(c.device)
        syn = self.synthetic_noise(generator) if self.literal_mmd() else ()
        return idx, eps, syn

    def view(self, hyper) -> ClientView:
        """The client's model (psi_i, v_i) on `hyper` as one module whose loss the step differentiates."""
        c, m = self.client, self.client.cfg.model
        return ClientView(c.encoder, c.code, hyper, literal_mmd=(m.lambda_mmd, self.bandwidths()) if self.literal_mmd() else None)

    def payload(self, view: ClientView, names: list, batch: tuple, syn: tuple):
        """The pre-noise payload over the privatized parameters `names`: (clipped sums, per-sample norms
        before clipping, (nll sum, kl sum) over the records). Composes :meth:`per_sample_grads` and
        :meth:`clip_and_accumulate`; override those for a change inside the mechanism, this one to
        replace the payload whole (the sensitivity check's negative controls)."""
        grads, (nll, kl) = self.per_sample_grads(view, names, batch, syn)
        summed, norms = self.clip_and_accumulate(grads)
        return summed, norms, (nll.sum().item(), kl.sum().item())

    def per_sample_grads(self, view: ClientView, names: list, batch: tuple, syn: tuple):
        """({name: (B, *shape)}, (nll (B,), kl (B,))): one gradient row per record of the batch (B = 0
        for an empty Poisson batch: it still releases noise and counts as a step). Override to add
        rows that go through clipping and noise like records (the audit's gradient canaries); the aux
        stays the records'."""
        if len(batch[0]) == 0:
            params = dict(view.named_parameters())
            empty = {n: params[n].new_zeros((0,) + tuple(params[n].shape)) for n in names}
            return empty, (torch.zeros(0), torch.zeros(0))
        return per_sample_grads(view, names, batch, syn)

    def clip_and_accumulate(self, grads: dict) -> tuple:
        """(sums, norms): every row clipped to joint norm <= C and summed over the batch; norms before
        clipping. This is what bounds one record's influence by C."""
        if next(iter(grads.values())).shape[0] == 0:
            return {n: g.new_zeros(g.shape[1:]) for n, g in grads.items()}, torch.zeros(0)
        return clip_and_sum(grads, self.client.cfg.privacy.clip_norm)

    def plain_grads(self, view: ClientView, names: list, batch: tuple, syn: tuple, expected: float):
        """(grads, (nll sum, kl sum)): the un-noised, unclipped batch gradient over `names`, divided by
        the public normalizer: the whole step without privacy, psi_i and v_i in paper mode."""
        params = dict(view.named_parameters())
        if len(batch[0]) == 0:
            return {n: torch.zeros_like(params[n]) for n in names}, (0.0, 0.0)
        loss, (nll, kl) = view(*batch, *syn)
        grads = torch.autograd.grad(loss.sum() / expected, [params[n] for n in names], allow_unused=True)
        out = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)}
        return out, (nll.sum().item(), kl.sum().item())

    # -- release's stages ------------------------------------------------------------------------------
    def add_noise(self, summed: dict, *, sigma, generator: torch.Generator) -> dict:
        """sum + N(0, sigma^2 C^2 I) on every privatized coordinate (sorted parameter order; also for
        an empty batch). `sigma` is one multiplier or one per block (`noise_blocks`: the client's own
        coordinates and Phi's, as the aggregation rule places them). Override only to change the noise
        (the audit's no-noise sabotage)."""
        blocks, C = noise_blocks(sigma), self.client.cfg.privacy.clip_norm
        return add_noise(summed, std={n: blocks[block_of(n)] * C for n in summed}, generator=generator)

    def scale(self, noisy: dict, expected: float) -> dict:
        """Divide by the public normalizer q * n_declared."""
        return scale(noisy, expected)

    def released(self, pending: PendingStep, noisy: dict) -> dict:
        """The noisy privatized values the rest of the step continues from (the post-noise terms are
        added to them and the local update follows them): these, unchanged. Override to observe them,
        or to substitute a given released history (the sensitivity check on D minus one record)."""
        return noisy

    def post_noise(self, view: ClientView, generator: torch.Generator, features):
        """(loss, mmd value): lambda_v ||v||^2 plus the data-free part of the MMD term (the
        synthetic-synthetic kernel mean, literal; the distance to this client's DP mean embeddings,
        merf). Post-processing: no private record enters; its synthetic noise comes from the step's
        generator after the DP noise."""
        c = self.client
        m = c.cfg.model
        loss = m.lambda_v * view.code.pow(2).sum()
        if m.lambda_mmd <= 0:
            return loss, 0.0
        syn_y, syn_z, syn_x = self.synthetic_noise(generator)
        hyper = view.hyper
        x_hat = sample_synthetic(hyper, hyper.decoder_modulation(view.code), hyper.prior_features(view.code), syn_y, syn_z, syn_x)
        if m.mmd_kind == "literal":
            mmd = multi_kernel(x_hat, x_hat, self.bandwidths()).mean()
        else:
            mmd = merf_mmd(features, x_hat.reshape(c.num_classes, m.mmd_synthetic_per_class, -1), c.mmd_target,
                           c.mmd_weights)
        return loss + m.lambda_mmd * mmd, float(mmd.detach())

    def local_update(self, grads: dict) -> None:
        """psi_i and v_i step with their (noisy in strict mode) gradients; they never leave the client."""
        c = self.client
        for n, p in c.encoder.named_parameters():
            p.grad = grads[ENCODER_PREFIX + n].detach()
        c.code.grad = grads[CODE_NAME].detach()
        c.enc_opt.step()
        c.code_opt.step()
        c.enc_opt.zero_grad(set_to_none=True)
        c.code_opt.zero_grad(set_to_none=True)
        project_code(c.code, c.cfg.model.code_radius)

    # -- helpers ----------------------------------------------------------------------------------------
    def literal_mmd(self) -> bool:
        m = self.client.cfg.model
        return m.lambda_mmd > 0 and m.mmd_kind == "literal"

    def bandwidths(self) -> list[float]:
        return mmd_bandwidths(self.client.cfg.model, self.client.x.shape[1])

    def synthetic_noise(self, generator: torch.Generator) -> tuple:
        """(labels, latent noise, output noise) of the synthetic batch, from the step's generator."""
        c = self.client
        m, K = c.cfg.model, c.num_classes
        n = m.mmd_synthetic_per_class * K
        syn_y = torch.arange(K).repeat_interleave(m.mmd_synthetic_per_class)
        return (syn_y.to(c.device), torch.randn(n, m.latent_dim, generator=generator).to(c.device),
                torch.randn(n, c.x.shape[1], generator=generator).to(c.device))
