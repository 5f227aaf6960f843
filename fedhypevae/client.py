"""One federated client: private data, encoder psi_i, code v_i, optimizers, generator.

Everything here stays on the client's rank. What leaves is only what its DP step releases: the noisy Phi
gradient (strict and paper modes) and, when `privacy.diagnostics` is on, loss sums that are labelled as
diagnostics outside the guarantee.

The DP step itself is `dp_step.DPStep`, which runs on a block of clients (`block.ClientBlock`: their state
stacked, the client's tensors views of the stacks). The trainer puts every client of a rank in one block (or
one block per client, when each steps its own copy of Phi). `Client.step` runs the client's step class
(`step_type`: DPStep, or a subclass overriding stages) on a block of one: `prepare_step` computes everything
up to the noise (Poisson batch, per-sample gradients, clipped sums: nothing is released, nothing changes),
`release_step` adds the noise and the post-noise terms and applies the local update; `step` is the two in a
row. The privacy ledger belongs to the rank (Trainer.ledger).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .block import ClientBlock
from .config import Config
from .data import ClientData
from .dp_step import DIAG_KEYS, PER_SAMPLE, DPStep, PendingBatch
from .model import CODE_NAME, ENCODER_PREFIX, PHI_PREFIX, ClientView, Encoder, HyperNetwork, project_codes
from .privacy import RandomFeatures, mean_embedding_sums, noise_mean_embeddings
from .rng import STREAM_INIT, STREAM_MMD_RELEASE, STREAM_STEP, ClientRNG, derive_seed

__all__ = ["DIAG_KEYS", "Client", "PendingStep", "StepOutput"]


@dataclass
class StepOutput:
    """What one client's step released: its noisy Phi gradient (plus the post-noise terms) by name."""
    phi_grad: dict  # keyed by HyperNetwork parameter name
    diag: torch.Tensor  # len(DIAG_KEYS)


class PendingStep:
    """One client's step computed up to the noise: the block-of-one PendingBatch, seen per client."""

    def __init__(self, client: "Client", step: DPStep, pending: PendingBatch):
        self.client, self.step, self.batch_pending = client, step, pending
        d = pending.draws[0]
        self.idx, self.eps, self.syn = d.idx, d.eps, d.syn
        self.expected = float(step.block.expected[0])  # q * declared size: public
        self.diag = pending.diag

    @property
    def hyper(self):
        return self.batch_pending.hyper

    @property
    def view(self) -> ClientView:
        return ClientView(self.client.encoder, self.client.code, self.hyper)

    @property
    def batch(self) -> tuple:
        c = self.client
        return c.x[self.idx], c.y[self.idx], self.eps

    @property
    def summed(self) -> dict:
        """The pre-noise sums by ClientView name over what is privatized (strict: psi_i, v_i and Phi; paper: Phi;
        privacy off: every parameter, unclipped)."""
        s, p = self.batch_pending.sums, self.client.cfg.privacy
        out = {}
        if self.batch_pending.strict or not p.enabled:
            out.update({ENCODER_PREFIX + n: t[0] for n, t in zip(self.step.block.enc_names, s.enc)})
            out[CODE_NAME] = s.code[0]
        coef = float(self.step.phi_coef[0])
        out.update({PHI_PREFIX + n: t.float() for n, t in unflatten(s.phi / coef, s.layout).items()})
        return out

    def payload(self) -> list:
        """The pre-noise payload, in a fixed order (what the ledger's digest covers)."""
        return self.batch_pending.payload()


def unflatten(vec: torch.Tensor, layout) -> dict:
    """{name: tensor of its shape} from a flat vector in `layout`'s order."""
    out, off = {}, 0
    for n, shape in layout:
        k = 1
        for d in shape:
            k *= d
        out[n] = vec[off:off + k].view(shape)
        off += k
    return out


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


class Client:
    step_type: type = DPStep  # the DP step's class: a subclass may name a DPStep subclass overriding stages

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
            self.encoder = Encoder.from_config(dim, num_classes, m)
            self.code = nn.Parameter(torch.randn(m.code_dim))  # v_i ~ N(0, I) (Algorithm 1)
        self.encoder.to(device)
        self.code = nn.Parameter(self.code.detach().to(device))
        project_codes(self.code, m.code_radius)
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
    @property
    def dp_step(self) -> DPStep:
        """This client's DP step: an instance of ``step_type`` on a block of one (itself), weight 1. It holds no
        state of its own; a copied client gets its own, on its own block."""
        s = self.__dict__.get("_dp_step")
        if s is None or s.block.clients[0] is not self or type(s) is not self.step_type:
            block = ClientBlock([self], self.cfg, device=self.device)
            s = self._dp_step = self.step_type(block, weights=[1.0], per_sample=PER_SAMPLE[self.cfg.train.engine])
        return s

    def step(self, hyper: HyperNetwork, round_: int, step: int, *, sigma, features: Optional[RandomFeatures],
             epoch: int = 0) -> StepOutput:
        return self.release_step(self.prepare_step(hyper, round_, step, epoch=epoch), sigma=sigma, features=features)

    def prepare_step(self, hyper: HyperNetwork, round_: int, step: int, *, epoch: int = 0) -> PendingStep:
        """Everything up to the noise on this step's generator stream. No state changes."""
        st = self.dp_step
        return PendingStep(self, st, st.prepare(hyper, round_, step, epoch=epoch,
                                                gens=[self.rng.generator(STREAM_STEP, round_, step, epoch)]))

    def release_step(self, pending: PendingStep, *, sigma, features: Optional[RandomFeatures]) -> StepOutput:
        """Noise, the post-noise terms and the local update of psi_i and v_i; returns what leaves the client."""
        # the step consumes the sums it releases: this client-level view keeps its pre-noise payload
        bp = dataclasses.replace(pending.batch_pending, sums=pending.batch_pending.sums.clone())
        rel = pending.step.release(bp, sigma=sigma, features=features)
        layout = pending.batch_pending.sums.layout
        return StepOutput({n: t.float() for n, t in unflatten(rel.phi, layout).items()}, rel.diag)
