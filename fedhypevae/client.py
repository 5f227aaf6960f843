"""One federated client: private data, encoder psi_i, code v_i, optimizers, generator, ledger.

Everything here stays on the client's rank. What leaves is only what `step` returns: the noisy
Phi gradient (strict and paper modes) and, when `privacy.diagnostics` is on, loss sums that are
labelled as diagnostics outside the guarantee.

A step is two calls, so that the trainer's release guard can stand between them: `prepare_step`
computes everything up to the noise (Poisson batch, per-sample gradients, clipped sums: nothing is
released, nothing changes), `release_step` adds the noise, the post-noise terms and applies the
local update. `step` is the two in a row. The privacy ledger belongs to the rank (Trainer.ledger).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import Config
from .data import ClientData
from .dp_step import NoiseSpec, add_noise_and_scale, clip_and_sum, per_sample_grads, poisson_sample
from .model import ClientView, Encoder, HyperNetwork, multi_kernel, sample_synthetic
from .privacy import RandomFeatures, mean_embedding_sums, noise_mean_embeddings
from .rng import STREAM_INIT, STREAM_MMD_RELEASE, STREAM_STEP, ClientRNG, derive_seed

# diagnostics carried per step: sums over the client's batch (outside the guarantee)
DIAG_KEYS = ("nll_sum", "kl_sum", "batch", "clipped", "mmd", "clients")


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

    def payload(self) -> list:
        """The pre-noise payload, in a fixed order (what the ledger's digest covers)."""
        return [self.summed[n] for n in sorted(self.summed)]


def _copied(obj):
    """Deep copy of nested dicts/lists whose tensors get their own compact storage."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, _copied(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state dict's version info
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v) for v in obj)
    return obj


def project_code(code: torch.Tensor, radius: float) -> None:
    with torch.no_grad():
        n = code.norm()
        if n > radius:
            code.mul_(radius / n)


class Client:
    def __init__(self, data: ClientData, *, cfg: Config, num_classes: int, dim: int,
                 declared_size: Optional[int] = None, device: torch.device = torch.device("cpu")):
        self.id = data.client_id
        self.cfg = cfg
        self.num_classes = num_classes
        # the public size every DP normalizer uses: the federation's declared size (federation.declared_sizes,
        # rounding included) as the trainer resolved it; the shard's own only where no trainer is involved
        self.declared_size = int(declared_size if declared_size is not None else data.declared_size)
        self.device = device
        self.x = torch.as_tensor(data.x_train, dtype=torch.float32, device=device)
        self.y = torch.as_tensor(data.y_train, dtype=torch.long, device=device)
        m = cfg.model
        with torch.random.fork_rng(devices=[]):
            # public initialization: seeded by (seed, client), never by the rank
            torch.manual_seed(derive_seed(cfg.seed, STREAM_INIT, self.id))
            self.encoder = Encoder(dim, num_classes, m.latent_dim, m.hidden)
            self.code = nn.Parameter(torch.randn(m.code_dim))  # v_i ~ N(0, I) (Algorithm 1)
        self.encoder.to(device)
        self.code = nn.Parameter(self.code.detach().to(device))
        project_code(self.code, m.code_radius)
        self.enc_opt = torch.optim.Adam(self.encoder.parameters(), lr=cfg.train.encoder_lr)
        self.code_opt = torch.optim.Adam([self.code], lr=cfg.train.code_lr)
        self.rng = ClientRNG(self.id, cfg.privacy.noise_seed)
        # DP random-feature mean embeddings of this client's data (merf), set by release_mmd_embeddings
        self.mmd_target: Optional[torch.Tensor] = None  # (K, F)
        self.mmd_weights: Optional[torch.Tensor] = None  # (K,)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A copy of the client's private state. Copies, not references: under the batched engine
        the client's tensors are views of stacks holding every client of the rank, and saving a
        view would write the whole stack (other clients' private state) into this client's file."""
        return _copied({
            "id": self.id,
            "encoder": self.encoder.state_dict(),
            "code": self.code.detach(),
            "enc_opt": self.enc_opt.state_dict(),
            "code_opt": self.code_opt.state_dict(),
            "mmd_target": self.mmd_target,
            "mmd_weights": self.mmd_weights,
        })

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])
        with torch.no_grad():
            self.code.copy_(state["code"])
        self.enc_opt.load_state_dict(state["enc_opt"])
        self.code_opt.load_state_dict(state["code_opt"])
        self.mmd_target = None if state["mmd_target"] is None else state["mmd_target"].to(self.device)
        self.mmd_weights = None if state["mmd_weights"] is None else state["mmd_weights"].to(self.device)

    # -- one-shot release for the MMD term ---------------------------------------------------------
    def mmd_sums(self, features: RandomFeatures) -> tuple:
        """The pre-noise payload of the DP-MERF release: per-class sums of phi(x) and counts."""
        return mean_embedding_sums(self.x, self.y, features=features, num_classes=self.num_classes)

    def release_mmd_embeddings(self, sums: tuple, *, noise_multiplier: float, epoch: int = 0) -> None:
        """DP-MERF: the per-class mean random-feature embeddings, released once with the Gaussian
        mechanism (the caller has charged it). The MMD term is then post-processing."""
        g = self.rng.generator(STREAM_MMD_RELEASE, 0, 0, epoch)
        sums, counts = noise_mean_embeddings(*sums, noise_multiplier=noise_multiplier, generator=g)
        counts = counts.clamp(min=0.0)
        self.mmd_target = (sums / counts.clamp(min=1.0)[:, None]).float().to(self.device)
        total = counts.sum()
        self.mmd_weights = ((counts / total).float() if total > 0 else torch.full((self.num_classes,), 1.0 / self.num_classes)).to(self.device)

    # -- the DP step ---------------------------------------------------------------------------------
    def step(self, hyper: HyperNetwork, round_: int, step: int, *, sigma: float, features: Optional[RandomFeatures],
             epoch: int = 0) -> StepOutput:
        return self.release_step(self.prepare_step(hyper, round_, step, epoch=epoch), sigma=sigma, features=features)

    def prepare_step(self, hyper: HyperNetwork, round_: int, step: int, *, epoch: int = 0) -> PendingStep:
        """Everything up to the noise: coins, per-sample gradients, clipping, the sum. No state changes."""
        p, m = self.cfg.privacy, self.cfg.model
        g = self.rng.generator(STREAM_STEP, round_, step, epoch)
        # coins and noise are drawn on the CPU from the client's generator (the same numbers on any device)
        idx = poisson_sample(len(self.y), p.sample_rate, g).to(self.device)
        x, y = self.x[idx], self.y[idx]
        eps = torch.randn(len(idx), m.latent_dim, generator=g).to(self.device)
        literal = m.lambda_mmd > 0 and m.mmd_kind == "literal"
        syn = self._synthetic_noise(g) if literal else ()
        bws = self._bandwidths()
        view = ClientView(self.encoder, self.code, hyper, literal_mmd=(m.lambda_mmd, bws) if literal else None)
        all_names = [n for n, _ in view.named_parameters()]
        phi_names = [n for n in all_names if n.startswith("hyper.")]
        expected = p.sample_rate * self.declared_size  # public normalizer
        diag = torch.zeros(len(DIAG_KEYS), dtype=torch.float64)
        diag[DIAG_KEYS.index("batch")] = len(idx)
        diag[DIAG_KEYS.index("clients")] = 1.0
        batch = (x, y, eps)
        if p.enabled:
            names = all_names if p.mode == "strict" else phi_names
            summed, norms, (nll, kl) = self._clipped_sum(view, names, batch, syn)
            diag[DIAG_KEYS.index("clipped")] = float((norms > p.clip_norm).sum())
        else:
            summed, (nll, kl) = self._plain_grads(view, all_names, batch, syn, expected, with_aux=True)
        diag[DIAG_KEYS.index("nll_sum")] = float(nll)
        diag[DIAG_KEYS.index("kl_sum")] = float(kl)
        return PendingStep(g, view, all_names, phi_names, batch, syn, expected, summed, diag)

    def release_step(self, pending: PendingStep, *, sigma: float, features: Optional[RandomFeatures]) -> StepOutput:
        """Noise, the post-noise terms and the local update of psi_i and v_i; returns what leaves the client."""
        p = self.cfg.privacy
        g, view, all_names, phi_names = pending.generator, pending.view, pending.all_names, pending.phi_names
        diag = pending.diag
        if p.enabled:
            noisy = add_noise_and_scale(pending.summed, spec=NoiseSpec(sigma, p.clip_norm, pending.expected), generator=g)
            if p.mode == "paper":
                # Eq. 8 literally: psi_i and v_i follow the un-noised batch gradient (not a formal guarantee)
                noisy.update(self._plain_grads(view, [n for n in all_names if n not in phi_names], pending.batch,
                                               pending.syn, pending.expected))
        else:
            noisy = dict(pending.summed)

        # terms that do not touch private data are added after the noise (post-processing)
        post, mmd_value = self._post_noise_loss(view, g, features)
        diag[DIAG_KEYS.index("mmd")] = mmd_value
        post_names = ["code"] + phi_names
        post_grads = torch.autograd.grad(post, [dict(view.named_parameters())[n] for n in post_names], allow_unused=True)
        for n, pg in zip(post_names, post_grads):
            if pg is not None:
                noisy[n] = noisy[n] + pg

        self._local_update(noisy)
        phi = {n[len("hyper."):]: noisy[n] for n in phi_names}
        return StepOutput(phi, diag)

    # -- stages ------------------------------------------------------------------------------------
    def _clipped_sum(self, view, names, batch, syn):
        x = batch[0]
        params = dict(view.named_parameters())
        if len(x) == 0:  # an empty Poisson batch still releases noise and counts as a step
            zeros = {n: torch.zeros_like(params[n]) for n in names}
            return zeros, torch.zeros(0), (0.0, 0.0)
        grads, (nll, kl) = per_sample_grads(view, names, batch, syn)
        summed, norms = clip_and_sum(grads, self.cfg.privacy.clip_norm)
        return summed, norms, (nll.sum().item(), kl.sum().item())

    def _plain_grads(self, view, names, batch, syn, expected, with_aux=False):
        params = dict(view.named_parameters())
        x = batch[0]
        if len(x) == 0:
            out = {n: torch.zeros_like(params[n]) for n in names}
            return (out, (0.0, 0.0)) if with_aux else out
        loss, (nll, kl) = view(*batch, *syn)
        grads = torch.autograd.grad(loss.sum() / expected, [params[n] for n in names], allow_unused=True)
        out = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)}
        return (out, (nll.sum().item(), kl.sum().item())) if with_aux else out

    def _bandwidths(self) -> list[float]:
        return [b * math.sqrt(self.x.shape[1]) for b in self.cfg.model.mmd_bandwidths]

    def _synthetic_noise(self, g: torch.Generator):
        m, K = self.cfg.model, self.num_classes
        n = m.mmd_synthetic_per_class * K
        syn_y = torch.arange(K).repeat_interleave(m.mmd_synthetic_per_class)
        return (syn_y.to(self.device), torch.randn(n, m.latent_dim, generator=g).to(self.device),
                torch.randn(n, self.x.shape[1], generator=g).to(self.device))

    def _post_noise_loss(self, view: ClientView, g: torch.Generator, features: Optional[RandomFeatures]):
        """lambda_v ||v||^2 plus the data-free part of the MMD term: the synthetic-synthetic kernel
        mean (literal) or the distance to this client's DP mean embeddings (merf)."""
        m = self.cfg.model
        loss = m.lambda_v * view.code.pow(2).sum()
        if m.lambda_mmd <= 0:
            return loss, 0.0
        syn_y, syn_z, syn_x = self._synthetic_noise(g)
        hyper = view.hyper
        x_hat = sample_synthetic(hyper, hyper.decoder_modulation(view.code), hyper.prior_features(view.code), syn_y, syn_z, syn_x)
        if m.mmd_kind == "literal":
            mmd = multi_kernel(x_hat, x_hat, self._bandwidths()).mean()
        else:
            phi = features(x_hat).reshape(self.num_classes, m.mmd_synthetic_per_class, -1).mean(1)
            # kernel_scale turns feature inner products back into kernel values: the term is an MMD^2 estimate
            mmd = features.kernel_scale * (self.mmd_weights * (phi - self.mmd_target).pow(2).sum(-1)).sum()
        return loss + m.lambda_mmd * mmd, float(mmd.detach())

    def _local_update(self, grads: dict[str, torch.Tensor]) -> None:
        """psi_i and v_i step with their (noisy in strict mode) gradients; they never leave the client."""
        for n, p in self.encoder.named_parameters():
            p.grad = grads["encoder." + n].detach()
        self.code.grad = grads["code"].detach()
        self.enc_opt.step()
        self.code_opt.step()
        self.enc_opt.zero_grad(set_to_none=True)
        self.code_opt.zero_grad(set_to_none=True)
        project_code(self.code, self.cfg.model.code_radius)
