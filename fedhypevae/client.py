"""One federated client, as a view of its row in a block (`block.ClientBlock`), which owns the state.

Everything here stays on the client's rank. What leaves is only what its DP step releases: the noisy Phi
gradient (strict and paper modes) and, when `privacy.diagnostics` is on, loss sums that are labelled as
diagnostics outside the guarantee.

A `Client` reads and writes its block's stacks: its data (`x`, `y`), encoder psi_i (`encoder`, a module whose
parameters are views of the stacks), code v_i (`code`), Adam state, generators (`rng`) and DP-MERF mean
embeddings. The trainer keeps one block per group of clients and never walks its clients on a hot path;
`Client` is for code that works one client at a time (the statistics release, tests, tools). A client built
on its own (`Client(data, cfg=..., ...)`) has a block of one: `step` runs its step class (`step_type`:
DPStep, or a subclass overriding stages) on that block, `prepare_step` up to the noise (nothing released,
nothing changed), `release_step` the rest. The privacy ledger belongs to the rank (Trainer.ledger).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .block import ClientBlock
from .config import Config
from .data import ClientData
from .dp_step import DIAG_KEYS, PER_SAMPLE, DPStep, PendingBatch
from .model import CODE_NAME, ENCODER_PREFIX, PHI_PREFIX, ClientView, Encoder, HyperNetwork
from .privacy import RandomFeatures, mean_embedding_sums, noise_mean_embeddings
from .rng import STREAM_MMD_RELEASE, STREAM_STEP, ClientRNG

__all__ = ["DIAG_KEYS", "Client", "PendingStep", "StepOutput"]


@dataclass
class StepOutput:
    """What one client's step released: its noisy Phi gradient (plus the post-noise terms) by name."""

    phi_grad: dict  # keyed by HyperNetwork parameter name
    diag: torch.Tensor  # len(DIAG_KEYS)


class PendingStep:
    """One client's step computed up to the noise: the block-of-one PendingBatch, seen per client."""

    def __init__(self, client: Client, step: DPStep, pending: PendingBatch):
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
        out[n] = vec[off : off + k].view(shape)
        off += k
    return out


class Client:
    """Client `index` of `block` (see the module docstring). `Client(data, cfg=..., num_classes=..., dim=...)`
    makes a client with a block of its own; `Client.view(block, i)` looks at a row of an existing block."""

    step_type: type = DPStep  # the DP step's class: a subclass may name a DPStep subclass overriding stages

    def __init__(
        self,
        data: ClientData,
        *,
        cfg: Config,
        num_classes: int,
        dim: int,
        declared_size: int | None = None,
        device: torch.device | str = "cpu",
    ):
        # the public size every DP normalizer uses: the federation's declared size (federation.declared_sizes,
        # rounding included) as the trainer resolved it; the shard's own only where no trainer is involved
        declared = int(declared_size if declared_size is not None else data.declared_size)
        self._attach(
            ClientBlock.from_data([data], cfg, num_classes=num_classes, dim=dim, declared=[declared], device=device), 0
        )

    @classmethod
    def view(cls, block: ClientBlock, index: int) -> Client:
        c = cls.__new__(cls)
        c._attach(block, index)
        return c

    def _attach(self, block: ClientBlock, index: int) -> None:
        self.block, self.index = block, int(index)
        self.id = block.ids[index]
        self.cfg = block.cfg
        self.num_classes = block.K
        self.device = block.device
        self._code = self._encoder = None

    @property
    def declared_size(self) -> int:
        return self.block.declared[self.index]

    # -- data ----------------------------------------------------------------------------------------
    @property
    def x(self) -> torch.Tensor:
        return self.block.X[self.block.client_rows(self.index)]

    @property
    def y(self) -> torch.Tensor:
        return self.block.Y[self.block.client_rows(self.index)]

    def set_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Replace this client's training records (a neighbouring data set in the sensitivity tests)."""
        b, i = self.block, self.index
        Xs = [b.X[b.client_rows(k)] if k != i else x.to(b.X) for k in range(b.M)]
        Ys = [b.Y[b.client_rows(k)] if k != i else y.to(b.Y) for k in range(b.M)]
        b._set_data(torch.cat(Xs), torch.cat(Ys), [len(t) for t in Ys])

    # -- private state (views of the block's stacks) ---------------------------------------------------
    @property
    def code(self) -> nn.Parameter:
        """v_i as a parameter sharing the block's storage."""
        if self._code is None or self._code.data_ptr() != self.block.codes[self.index].data_ptr():
            self._code = nn.Parameter(self.block.codes[self.index], requires_grad=True)
        return self._code

    @property
    def encoder(self) -> Encoder:
        """psi_i as an Encoder module whose parameters share the block's storage."""
        b, i = self.block, self.index
        if self._encoder is None or next(self._encoder.parameters()).data_ptr() != b.enc_params[0][i].data_ptr():
            with torch.random.fork_rng(devices=[]):
                enc = Encoder.from_config(b.dim, b.K, b.cfg.model).to(b.device)
            for p, stack in zip(enc.parameters(), b.enc_params):
                p.data = stack[i]
            self._encoder = enc
        return self._encoder

    @property
    def rng(self) -> ClientRNG:
        """The client's generators (keyed by the block's key: the noise seed, or the block's secret)."""
        return ClientRNG(self.id, self.cfg.privacy.noise_seed, key=self.block.key)

    @property
    def mmd_target(self) -> torch.Tensor | None:
        return None if self.block.mmd_target is None else self.block.mmd_target[self.index]

    @property
    def mmd_weights(self) -> torch.Tensor | None:
        return None if self.block.mmd_weights is None else self.block.mmd_weights[self.index]

    def state_dict(self) -> dict:
        """A copy of the client's private state (never a view: a saved view would carry the whole stack, other
        clients' state included)."""
        b, i = self.block, self.index
        return {
            "id": self.id,
            "encoder": {n: t[i].detach().clone() for n, t in zip(b.enc_names, b.enc_params)},
            "code": b.codes[i].detach().clone(),
            "enc_adam": {
                "m": {n: t[i].clone() for n, t in zip(b.enc_names, b.enc_m)},
                "v": {n: t[i].clone() for n, t in zip(b.enc_names, b.enc_v)},
                "steps": b.enc_steps[i].clone(),
            },
            "code_adam": {"m": b.code_m[i].clone(), "v": b.code_v[i].clone(), "steps": b.code_steps[i].clone()},
            "mmd_target": None if b.mmd_target is None else b.mmd_target[i].clone(),
            "mmd_weights": None if b.mmd_weights is None else b.mmd_weights[i].clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Write a `state_dict` (or a client file of the per-client checkpoint format 1) into the block's row."""
        b, i = self.block, self.index
        if "enc_opt" in state:  # format 1: torch.optim state dicts, parameters in the encoder's order
            state = _from_format1(state, b.enc_names)
        with torch.no_grad():
            for n, t in zip(b.enc_names, b.enc_params):
                t[i].copy_(state["encoder"][n])
            b.codes[i].copy_(state["code"])
            for n, m, v in zip(b.enc_names, b.enc_m, b.enc_v):
                m[i].copy_(state["enc_adam"]["m"][n])
                v[i].copy_(state["enc_adam"]["v"][n])
            b.enc_steps[i].copy_(state["enc_adam"]["steps"])
            b.code_m[i].copy_(state["code_adam"]["m"])
            b.code_v[i].copy_(state["code_adam"]["v"])
            b.code_steps[i].copy_(state["code_adam"]["steps"])
        if state.get("mmd_target") is not None:
            self._set_mmd(state["mmd_target"], state["mmd_weights"])

    def _set_mmd(self, target: torch.Tensor, weights: torch.Tensor) -> None:
        b = self.block
        if b.mmd_target is None:
            b.mmd_target = torch.zeros((b.M, *target.shape), dtype=torch.float32, device=b.device)
            b.mmd_weights = torch.zeros((b.M, *weights.shape), dtype=torch.float32, device=b.device)
        b.mmd_target[self.index] = target.to(b.device, torch.float32)
        b.mmd_weights[self.index] = weights.to(b.device, torch.float32)

    def standalone(self) -> Client:
        """A copy of this client with a block of its own (its data, state, embeddings and generator key)."""
        c = type(self).view(ClientBlock.copy_of([self]), 0)
        if type(self).step_type is not self.step_type:
            c.step_type = self.step_type
        return c

    # -- one-shot release for the MMD term ---------------------------------------------------------
    def mmd_sums(self, features: RandomFeatures) -> tuple:
        """The pre-noise payload of the DP-MERF release: per-class sums of phi(x) and counts."""
        return mean_embedding_sums(self.x, self.y, features=features, num_classes=self.num_classes)

    def release_mmd_embeddings(
        self, sums: tuple, *, noise_multiplier: float, epoch: int = 0, generator: torch.Generator | None = None
    ) -> None:
        """DP-MERF: the per-class mean random-feature embeddings, released once with the Gaussian
        mechanism (the caller has charged it). The MMD term is then post-processing. `generator`: this release's
        (default: the client's own for `epoch`; the trainer makes a block's at once)."""
        g = generator if generator is not None else self.rng.generator(STREAM_MMD_RELEASE, 0, 0, epoch)
        sums, counts = noise_mean_embeddings(*sums, noise_multiplier=noise_multiplier, generator=g)
        counts = counts.clamp(min=0.0)
        total = counts.sum()
        weights = (counts / total).float() if total > 0 else torch.full((self.num_classes,), 1.0 / self.num_classes)
        self._set_mmd((sums / counts.clamp(min=1.0)[:, None]).float(), weights)

    # -- the DP step ---------------------------------------------------------------------------------
    @property
    def dp_step(self) -> DPStep:
        """This client's DP step: an instance of ``step_type`` on its block of one, weight 1. A client that is a
        row of a block of many is stepped by its block's step (the trainer's): use `standalone()` for a copy."""
        if self.block.M != 1:
            raise ValueError(
                f"client {self.id} is a row of a block of {self.block.M} clients: its step is the "
                "block's (Trainer.steps); use client.standalone() for a copy with a block of its own"
            )
        s = self.__dict__.get("_dp_step")
        if s is None or s.block is not self.block or type(s) is not self.step_type:
            s = self._dp_step = self.step_type(self.block, weights=[1.0], per_sample=PER_SAMPLE[self.cfg.train.engine])
        return s

    def step(
        self, hyper: HyperNetwork, round_: int, step: int, *, sigma, features: RandomFeatures | None, epoch: int = 0
    ) -> StepOutput:
        return self.release_step(self.prepare_step(hyper, round_, step, epoch=epoch), sigma=sigma, features=features)

    def prepare_step(self, hyper: HyperNetwork, round_: int, step: int, *, epoch: int = 0) -> PendingStep:
        """Everything up to the noise on this step's generator stream. No state changes."""
        st = self.dp_step
        return PendingStep(
            self,
            st,
            st.prepare(hyper, round_, step, epoch=epoch, gens=[self.rng.generator(STREAM_STEP, round_, step, epoch)]),
        )

    def release_step(self, pending: PendingStep, *, sigma, features: RandomFeatures | None) -> StepOutput:
        """Noise, the post-noise terms and the local update of psi_i and v_i; returns what leaves the client."""
        # the step consumes the sums it releases: this client-level view keeps its pre-noise payload
        bp = dataclasses.replace(pending.batch_pending, sums=pending.batch_pending.sums.clone())
        rel = pending.step.release(bp, sigma=sigma, features=features)
        layout = pending.batch_pending.sums.layout
        return StepOutput({n: t.float() for n, t in unflatten(rel.phi, layout).items()}, rel.diag)


def _from_format1(state: dict, enc_names: list) -> dict:
    """A client file of checkpoint format 1 (encoder/code plus torch.optim state dicts) in `state_dict`'s form."""

    def adam(opt: dict, names: list, like: list):
        st = opt.get("state", {})
        m = {n: (st[k]["exp_avg"] if k in st else torch.zeros_like(t)) for k, (n, t) in enumerate(zip(names, like))}
        v = {n: (st[k]["exp_avg_sq"] if k in st else torch.zeros_like(t)) for k, (n, t) in enumerate(zip(names, like))}
        steps = torch.tensor([float(st[k]["step"]) if k in st else 0.0 for k in range(len(names))])
        return m, v, steps

    enc = [state["encoder"][n] for n in enc_names]
    m, v, steps = adam(state["enc_opt"], enc_names, enc)
    cm, cv, cs = adam(state["code_opt"], ["code"], [state["code"]])
    return {
        "encoder": dict(state["encoder"]),
        "code": state["code"],
        "enc_adam": {"m": m, "v": v, "steps": steps},
        "code_adam": {"m": cm["code"], "v": cv["code"], "steps": cs},
        "mmd_target": state.get("mmd_target"),
        "mmd_weights": state.get("mmd_weights"),
    }
