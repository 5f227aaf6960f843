"""Batched multi-client DP engine: every client of a rank in ONE computation, ghost-norm clipping.

The reference DP step (`Client.step`, `dp_step`) loops over clients in Python and materializes every
sample's gradient with `torch.func`. This engine computes the same release for all clients of a rank at
once. It runs the model's OWN math (`model.elbo_terms`, `model.sample_synthetic`, `model.merf_mmd`) —
no network is re-written here — through `RecordingOps`, which evaluates each layer type batched and
records what the norms and sums need (the layer types are listed in `model.Ops`). A model change
(depth, widths, activation, a new layer built from these types) therefore touches model.py alone;
tests/test_engine_oracle.py checks the engine against an independent torch.func oracle over several
model shapes.

* **Layout.** The samples of all clients' Poisson batches are concatenated, client-major, with a
  client index c(j) per row. The private encoders are stacked as (M, out, in) tensors and run as
  one `baddbmm` on a zero-padded (M, B_max, .) view of the batch; everything after the encoder
  works on the concatenated rows (no padding). The hypernetwork heads (h_theta, h_omega) run once per
  client on the stacked codes V (M, d_v) and their outputs are gathered per row; the decoder is ONE
  matmul with the shared base weights followed by the per-row client scales.
* **Per-sample norms without per-sample gradients.** One autograd pass gives the gradient of
  sum_j loss_j with respect to every recorded layer OUTPUT (g_j per row; rows are independent, so
  these are per-sample). A single sample's weight gradient is the outer product g_j a_j^T, hence
  ||g_j a_j^T||^2 = ||g_j||^2 ||a_j||^2 ("ghost norm", exact; Opacus' per-layer norm samplers are the
  pattern). A head layer sees a client-shared input s_i, so its per-sample gradient G_j s_i^T has norm
  ||G_j|| ||s_i||; G is carried back through the head per row (G @ W times the activation's
  derivative), so the head's forward never runs per row. Small per-sample pieces are materialized:
  the code v_i (strict mode), embedding rows, per-row vectors (x_logstd).
* **Clipped sums by book-keeping.** With clip factors c_j = min(1, C / (||grad_j|| + 1e-6)) (the
  reference's formula), each weight's clipped sum is one matmul (c * g)^T a: per client (bmm) for
  the encoders, and for Phi directly the aggregation-weighted sum over the rank's clients,
  sum_i (w_i / (q n~_i)) sum_{j in i} c_j g_j a_j^T, with PUBLIC w_i and n~_i only (no realized
  batch size enters). No second backward pass.
* **Noise.** N(0, sigma^2 C^2) on every privatized coordinate of every client — also for empty
  batches — drawn from the client's own generator with the same calls in the same order as the
  reference (`DPStep.add_noise`: sorted parameter names, one `normal_` per tensor of the
  tensor's shape, on the CPU), then divided by the public q * n~_i. With `privacy.noise_seed` the
  engine and the reference therefore release the same values up to float rounding.
* **Post-noise terms** (lambda_v ||v||^2, the DP-MERF MMD term) are added after the noise, as in
  `Client.step`, batched over clients.
* **Two calls, like the client.** `prepare` computes every client's step up to the noise (coins,
  forward/backward, norms, clipped sums; no state changes) and `release` adds the noise and the
  post-noise terms and updates every client; the trainer's release guard (digest, budget, ledger
  charge) runs in between. `PendingBatch.payload()` is what the ledger's digest covers: the block's
  pre-noise Phi sum and every client's clipped sums over psi_i and v_i.
* **Private state stays per client.** The engine stacks each client's encoder, code and their Adam
  moments and makes the client's own tensors views of the stacks, so `Client.state_dict` (which
  copies) always sees the current values and checkpoints keep the per-client format; torch's own
  Adam (functional form) on the (M, ...) stacks is elementwise the per-client Adam.

Cost on the CPU: the noise is drawn with the reference's generator (mt19937 + Box-Muller, about
3.5 ns per coordinate), one `normal_` per parameter tensor per client, so it grows with
clients x (|psi| + |v| + |Phi|); blocks of clients draw in parallel Python threads
(`noise_threads`, default: the usable cores). On a shared machine, one torch thread per process
(`threads: 1`, OMP_NUM_THREADS=1) avoids OpenMP threads waiting for busy cores, which made the many
small operations of 1000 clients per rank 4x slower in our measurements (docs/PERFORMANCE.md).

Precision: fp32 compute, clipping and noise in fp32 (as the reference). The weighted sum over a
rank's clients of the Phi clipped sums happens inside one fp32 GEMM (the reference sums per-client
fp32 results in fp64); the noise is combined across clients in fp64 and the all-reduce buffer is
fp64 as before.

Not batched (the trainer falls back to `Client.step`, see `engine_fallback_reason`):
`federation.aggregation: delta` (each client steps its own private copy of Phi) and
`model.mmd_kind: literal` with `lambda_mmd > 0` (the MMD cross term couples each sample with a
synthetic batch, so per-sample gradients are not those of independent rows).

The CUDA path (stacks and batches on the device; coins and noise still drawn on the CPU from the
clients' generators and copied over, like the reference) is untested: the development machine
has no GPU.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F
from torch.optim.adam import adam

from .aggregation import AGGREGATIONS
from .client import DIAG_KEYS
from .config import Config
from .dp_step import clip_factor, noise_blocks, poisson_sample
from .model import (CODE_NAME, ELEMENTWISE, ENCODER_PREFIX, PHI_PREFIX, HyperNetwork, Ops, elbo_terms, merf_mmd,
                    project_codes, sample_synthetic)
from .rng import STREAM_STEP

_SERIAL = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements run on the calling thread
PHASES = ("sample", "forward", "backward", "norms", "clip", "noise", "post", "optimizer")


def engine_fallback_reason(cfg: Config) -> Optional[str]:
    """Why the batched engine cannot run this configuration (the trainer then uses Client.step), or None."""
    rule = AGGREGATIONS[cfg.federation.aggregation]
    if not rule.batched_engine:
        return (f"federation.aggregation={cfg.federation.aggregation}: {rule.engine_note}")
    if cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "literal":
        return ("model.mmd_kind=literal with lambda_mmd > 0: the per-sample MMD cross term couples each sample "
                "with a synthetic batch")
    return None


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm over the last dimension (a reduction: no temporary of t's size)."""
    return torch.linalg.vector_norm(t, dim=-1).square()


@dataclass
class Batch:
    """All clients' samples of one step, concatenated client-major."""
    x: torch.Tensor  # (B, d_x)
    y: torch.Tensor  # (B,)
    eps: torch.Tensor  # (B, d_z) reparameterization noise
    counts: list  # realized batch size per client (stays on this rank)
    cidx: torch.Tensor  # (B,) client index of each row
    pad_pos: torch.Tensor  # (B,) row in the (M * bmax) padded layout
    bmax: int

    @classmethod
    def build(cls, x, y, eps, counts: list, device) -> "Batch":
        M, bmax = len(counts), max(counts, default=0)
        ct = torch.tensor(counts, dtype=torch.long)
        cidx = torch.repeat_interleave(torch.arange(M), ct)
        starts = torch.cumsum(ct, 0) - ct
        pos = torch.arange(len(cidx)) - starts[cidx]
        return cls(x, y, eps, list(counts), cidx.to(device), (cidx * bmax + pos).to(device), bmax)


def _tracked(t: torch.Tensor) -> torch.Tensor:
    """A tensor autograd can differentiate to (a leaf when nothing before it needs a gradient)."""
    return t if t.requires_grad else t.requires_grad_(True)


LAYER_TYPES = ("private_linear", "shared_linear", "add_bias", "embed", "per_row", "head_linear", "code_rows")


@dataclass
class _HeadLayer:
    """One linear layer of a hypernetwork head, evaluated once per client."""
    w: str  # the weight's name
    b: Optional[str]  # the bias' name
    s: torch.Tensor  # (M, in): its client-level input
    u: torch.Tensor  # (M, out): its output (before the activation that follows, if any)
    W: torch.Tensor  # the weight (detached)
    act: object = None  # the activation applied to u, or None
    du: Optional[torch.Tensor] = None  # that activation's derivative at u


@dataclass
class _Head:
    """A head's layers in order and its output handed to the rows in pieces (leaves of the row-level graph)."""
    layers: list
    leaves: list = None  # per piece: (B, width) rows
    widths: list = None
    fns: list = None  # per piece: its elementwise function, or None
    pieces: list = None  # per piece: (M, width) the last layer's output before that function
    factors: list = None  # per piece: (M, width) client-level derivative to the last layer's output u, or None (1)
    g_leaves: list = None  # per piece: d(sum loss)/d(leaf), per row
    g_last: list = None  # per piece, d(loss_j)/d(u_last) per row
    g_u: list = None  # per layer below the last, d(loss_j)/d(u_l) per row (with per-sample norms)

    def down(self, pieces: list, cid: Optional[torch.Tensor]) -> torch.Tensor:
        """The gradient at the last layer's output (in pieces) carried through its weight to its input, times the
        activation before it (rows, with cid; client-level sums, cid None)."""
        W, off, g = self.layers[-1].W, 0, None
        for gp, w in zip(pieces, self.widths):
            part = gp @ W[off:off + w]
            g = part if g is None else g.add_(part)
            off += w
        if len(self.layers) > 1 and self.layers[-2].du is not None:
            du = self.layers[-2].du
            g = g * (du if cid is None else du.index_select(0, cid))
        return g

    def below(self, pieces: list, cid: Optional[torch.Tensor]) -> list:
        """d(loss)/d(u_l) for every layer below the last, from the last layer's output gradient (in pieces):
        per row with cid, or on client-level sums with cid None (the map is linear)."""
        out = []
        if len(self.layers) > 1:
            g = self.down(pieces, cid)
            out.insert(0, g)
            for k in range(len(self.layers) - 2, 0, -1):
                g = g @ self.layers[k].W
                du = self.layers[k - 1].du
                if du is not None:
                    g = g * (du if cid is None else du.index_select(0, cid))
                out.insert(0, g)
        return out


class RecordingOps(Ops):
    """The model's math (`model.elbo_terms`) evaluated for every client of a rank at once, recording per
    layer type what the per-sample gradient norms and the clipped sums need (see `model.Ops`):

    * private layers (the encoders) run as ONE `baddbmm` over the clients' stacked weights on the zero-padded
      (M, B_max, .) view of the batch; a sample's weight gradient is g_j a_j^T, squared norm ||a_j||^2 ||g_j||^2;
    * head layers (h_theta, h_omega) run once per client on the codes (M rows, no graph); their output is
      gathered per row as a leaf. From the per-row output gradient G_j, the per-sample gradient of a head
      layer is G_j s_c(j)^T (s: the layer's client-shared input), squared norm ||G_j||^2 ||s_c(j)||^2, and G
      is carried back through the head per row (G @ W times the activation's derivative): the head's forward
      never runs per row, and its weight sums are formed from per-client sums of G (M rows);
    * shared layers (Phi on per-sample inputs): ghost norm ||a_j||^2 ||g_j||^2 (+ ||g_j||^2 for a bias);
      biases added on their own and per-row vectors: ||g_j||^2; embedding rows: ||g_j||^2.
    Parameters are identified by the tensors the math passes in (`names`: id -> name), never by name here."""

    def __init__(self, batch: "Batch", M: int, names: dict):
        self.b, self.M, self.names = batch, M, names
        self.used: set = set()  # the names recorded so far (each at most once)
        self.private, self.shared, self.biases, self.embeds, self.vectors, self.chains = [], [], [], [], [], []
        self._chain = None
        self.per_sample = False  # per-row head gradients formed (norms): set by `backward`

    def _name(self, t: Optional[torch.Tensor]) -> Optional[str]:
        if t is None:
            return None
        try:
            name = self.names[id(t)]
        except KeyError:
            raise ValueError("the model's math used a tensor that is neither a client's private parameter nor a "
                             "parameter of Phi (the batched engine cannot attribute its gradient)") from None
        if name in self.used:
            # the per-sample norm is summed per use: a parameter used twice (tied weights, a head run twice, a
            # vector used twice) would miss the cross term and be UNDER-clipped. Refused, never approximated.
            raise ValueError(f"the model's math uses parameter {name!r} twice in one step; the batched engine "
                             "computes per-sample norms per use and would under-clip it (use train.engine=reference)")
        self.used.add(name)
        return name

    def check_coverage(self) -> None:
        """Every parameter the step privatizes went through a layer type: one the math used in plain torch (or
        not at all) would get no gradient here, silently."""
        missing = sorted(set(self.names.values()) - self.used)
        if missing:
            raise ValueError(f"the batched engine saw no layer using {', '.join(missing)}: a parameter used outside "
                             "model.Ops' layer types gets no per-sample gradient (use train.engine=reference, or "
                             "write that use with an Ops method)")

    # -- the layer types -------------------------------------------------------------------------
    def private_input(self, t):
        b = self.b
        return t.new_zeros(self.M * b.bmax, t.shape[-1]).index_copy_(0, b.pad_pos, t).view(self.M, b.bmax, -1)

    def private_linear(self, a, w, bias):
        wt = w.transpose(1, 2)
        out = _tracked(torch.bmm(a, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), a, wt))
        self.private.append((self._name(w), self._name(bias), a.detach(), out))
        return out

    def private_output(self, t):
        return t.reshape(self.M * self.b.bmax, -1).index_select(0, self.b.pad_pos)

    def head_linear(self, s, w, bias):
        if s.dim() != 2 or s.shape[0] != self.M:
            raise ValueError(f"a head layer's input must be one row per client ({self.M}, in); got {tuple(s.shape)}")
        if self._chain is None:
            self._chain = _Head([])
        with torch.no_grad():
            u = F.linear(s, w.detach(), None if bias is None else bias.detach())
        self._chain.layers.append(_HeadLayer(self._name(w), self._name(bias), s.detach(), u, w.detach()))
        return u

    def head_activation(self, act, u):
        if not isinstance(act, ELEMENTWISE):
            raise ValueError(f"the batched engine carries head gradients through elementwise activations only "
                             f"({', '.join(c.__name__ for c in ELEMENTWISE)}); got {type(act).__name__}")
        if self._chain.layers[-1].act is not None:
            raise ValueError("two activations after one head layer: the batched engine composes none")
        self._chain.layers[-1].act = act
        with torch.no_grad():
            return act(u)

    def to_rows(self, o, parts=None):
        """The head's output in pieces, each through its elementwise f ONCE PER CLIENT, gathered per row as leaves;
        the pieces' derivatives (and the last layer's activation's) stay client-level factors (formed in
        `backward`)."""
        chain, cid = self._chain, self.b.cidx
        specs = parts if parts is not None else [(o.shape[-1], None)]
        chain.widths = [w for w, _ in specs]
        chain.fns = [f for _, f in specs]
        chain.pieces = list(o.split(chain.widths, dim=-1))
        with torch.no_grad():
            chain.leaves = [(t if f is None else f(t)).index_select(0, cid).requires_grad_(True)
                            for t, f in zip(chain.pieces, chain.fns)]
        self.chains.append(chain)
        self._chain = None
        return chain.leaves if parts is not None else chain.leaves[0]

    def shared_linear(self, a, w, bias=None):
        out = _tracked(F.linear(a, w.detach(), None if bias is None else bias.detach()))
        self.shared.append((self._name(w), self._name(bias), a.detach(), out))
        return out

    def add_bias(self, t, bias):
        out = _tracked(t + bias.detach())
        self.biases.append((self._name(bias), out))
        return out

    def embed(self, idx, table):
        rows = table.detach().index_select(0, idx).requires_grad_(True)
        self.embeds.append((self._name(table), idx, rows, table.shape[0]))
        return rows

    def per_row(self, p, f=None):
        """f(p) computed once, handed to every row as a leaf; its row gradients times f'(p) are the per-sample
        gradients of p (f is elementwise)."""
        with torch.no_grad():
            fp = p.detach() if f is None else f(p.detach())
        leaf = fp.expand(len(self.b.cidx), *p.shape).requires_grad_(True)  # a view: no copy per row
        self.vectors.append((self._name(p), leaf, f, p.detach()))
        return leaf

    # -- after the forward -------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, per_sample: bool) -> None:
        """ONE autograd pass to every recorded output (never to a weight); with `per_sample`, the per-row
        gradients through the heads too (what the norms and the clipped code sums need)."""
        tensors = ([r[3] for r in self.private] + [r[3] for r in self.shared] + [r[1] for r in self.biases]
                   + [r[2] for r in self.embeds] + [r[1] for r in self.vectors]
                   + [leaf for c in self.chains for leaf in c.leaves])
        # the client-level derivatives of every elementwise function (head activations, the pieces' functions,
        # per-row vectors' functions) come out of the SAME autograd call: their graphs are separate from the loss's
        derivs = [(layer.act, layer.u) for c in self.chains for layer in c.layers if layer.act is not None]
        derivs += [(f, t) for c in self.chains for f, t in zip(c.fns, c.pieces) if f is not None]
        derivs += [(f, p) for (_, _, f, p) in self.vectors if f is not None]
        at = [x.detach().requires_grad_(True) for _, x in derivs]
        total = loss.sum()
        for (f, _), x in zip(derivs, at):
            total = total + f(x).sum()
        grads = torch.autograd.grad(total, tensors + at, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors + at, grads)]
        d_of = {id(x): g for (_, x), g in zip(derivs, grads[len(tensors):])}
        it = iter(grads[:len(tensors)])
        self.g_private = [next(it) for _ in self.private]
        self.g_shared = [next(it) for _ in self.shared]
        self.g_biases = [next(it) for _ in self.biases]
        self.g_embeds = [next(it) for _ in self.embeds]
        self.g_vectors = [g if f is None else g * d_of[id(p)]
                          for (_, _, f, p), g in zip(self.vectors, (next(it) for _ in self.vectors))]
        cid = self.b.cidx
        for chain in self.chains:
            layers = chain.layers
            for layer in layers:
                layer.du = None if layer.act is None else d_of[id(layer.u)]
            chain.factors, off = [], 0
            for w, f, t in zip(chain.widths, chain.fns, chain.pieces):
                factor = None if f is None else d_of[id(t)]
                if layers[-1].du is not None:  # the activation after the last layer
                    du = layers[-1].du[:, off:off + w]
                    factor = du if factor is None else factor * du
                chain.factors.append(factor)
                off += w
            chain.g_leaves = [next(it) for _ in chain.leaves]
            if per_sample:  # d(loss_j)/d(u_l) per row, from the last layer back
                chain.g_last = [g if fac is None else g * fac.index_select(0, cid)
                                for g, fac in zip(chain.g_leaves, chain.factors)]
                chain.g_u = chain.below(chain.g_last, cid)
        self.per_sample = per_sample
        self.g_code = None
        if per_sample:  # per-sample gradient of the client's code (every head's input)
            gv = [(c.g_u[0] @ c.layers[0].W) if c.g_u else c.down(c.g_last, cid) for c in self.chains]
            self.g_code = sum(gv[1:], gv[0]) if gv else None

    def norm2_parts(self) -> dict:
        """Per-sample squared gradient norms by layer type (each (B,)); `norms2` adds them up."""
        b = self.b
        cid = b.cidx
        zero = torch.zeros(len(cid), dtype=self.b.x.dtype, device=cid.device)
        parts = {k: zero.clone() for k in LAYER_TYPES}
        for (_, bn, a, _), g in zip(self.private, self.g_private):
            n2 = _sq(a) * _sq(g) + (_sq(g) if bn is not None else 0.0)
            parts["private_linear"] += n2.reshape(-1).index_select(0, b.pad_pos)
        for (_, bn, a, _), g in zip(self.shared, self.g_shared):
            parts["shared_linear"] += _sq(a) * _sq(g) + (_sq(g) if bn is not None else 0.0)
        for kind, gs in (("add_bias", self.g_biases), ("embed", self.g_embeds), ("per_row", self.g_vectors)):
            for g in gs:
                parts[kind] += _sq(g)
        for chain in self.chains:
            for layer, g2 in zip(chain.layers, [_sq(g) for g in chain.g_u] + [sum(_sq(g) for g in chain.g_last)]):
                s2 = _sq(layer.s) + (1.0 if layer.b is not None else 0.0)
                parts["head_linear"] += g2 * s2.index_select(0, cid)
        if self.g_code is not None:
            parts["code_rows"] = _sq(self.g_code)
        return parts

    def norms2(self) -> tuple:
        """Per-sample squared gradient norms: (Phi, the private layers, the code), each (B,)."""
        p = self.norm2_parts()
        phi = p["shared_linear"] + p["add_bias"] + p["embed"] + p["per_row"] + p["head_linear"]
        return phi, p["private_linear"], p["code_rows"]

    def private_sums(self, c: Optional[torch.Tensor]) -> dict:
        """Per client sum_j c_j * grad_j of every private parameter: {name: (M, *shape)} (c None: unclipped)."""
        b = self.b
        cp = None if c is None else c.new_zeros(self.M * b.bmax).index_copy_(0, b.pad_pos, c).view(self.M, b.bmax, 1)
        out: dict = {}
        for (wn, bn, a, _), g in zip(self.private, self.g_private):
            cg = g if cp is None else g * cp
            out[wn] = torch.bmm(cg.transpose(1, 2), a)
            if bn is not None:
                out[bn] = cg.sum(1)
        return out

    def _seg(self, t: torch.Tensor, rho: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-client sums of (rho-weighted) rows: (M, k)."""
        return t.new_zeros(self.M, t.shape[1]).index_add_(0, self.b.cidx, t if rho is None else t * rho[:, None])

    def _chain_sums(self, chain: "_Head", rho: Optional[torch.Tensor]) -> list:
        """Per-client rho-weighted sums of d(loss)/d(u_l) for every layer of a head: [(M, out_l)]."""
        if self.per_sample:
            return [self._seg(g, rho) for g in chain.g_u] + [torch.cat([self._seg(g, rho) for g in chain.g_last], 1)]
        # linear in the output gradient: reduce per client first (M rows instead of B)
        last = [self._seg(g, rho) if fac is None else self._seg(g, rho) * fac
                for g, fac in zip(chain.g_leaves, chain.factors)]
        return chain.below(last, None) + [torch.cat(last, 1)]

    def code_sums(self, c: Optional[torch.Tensor], shape) -> torch.Tensor:
        """Per client sum_j c_j * d(loss_j)/d(v_i): (M, d_v) (c None: unclipped)."""
        if self.per_sample:
            g = self.g_code if c is None else self.g_code * c[:, None]
            if g is None:  # a model without heads: the code gets no gradient from the loss
                return torch.zeros(shape, dtype=self.b.x.dtype, device=self.b.x.device)
            return g.new_zeros(shape).index_add_(0, self.b.cidx, g)
        if c is not None:
            raise ValueError("clipped code sums need the per-sample head gradients (backward(per_sample=True))")
        out = torch.zeros(shape, dtype=self.b.x.dtype, device=self.b.x.device)
        for chain in self.chains:
            out += self._chain_sums(chain, None)[0] @ chain.layers[0].W
        return out

    def phi_sums(self, rho: torch.Tensor) -> dict:
        """sum_j rho_j * (per-sample gradient of sample j) for every Phi parameter, by book-keeping: one matmul
        per weight with the row weights rho (clip factor x public client coefficient)."""
        out: dict = {}
        for (wn, bn, a, _), g in zip(self.shared, self.g_shared):
            out[wn] = _wsum(g, a, rho)
            if bn is not None:
                out[bn] = g.t() @ rho
        for (bn, _), g in zip(self.biases, self.g_biases):
            out[bn] = g.t() @ rho
        for (name, idx, rows, n), g in zip(self.embeds, self.g_embeds):
            table = torch.zeros(n, rows.shape[1], dtype=g.dtype, device=g.device)
            out[name] = table.index_add_(0, idx, g * rho[:, None])
        for (name, _, _, _), g in zip(self.vectors, self.g_vectors):
            out[name] = g.t() @ rho
        for chain in self.chains:
            for layer, gs in zip(chain.layers, self._chain_sums(chain, rho)):
                out[layer.w] = gs.t() @ layer.s
                if layer.b is not None:
                    out[layer.b] = gs.sum(0)
        return out


def _wsum(g: torch.Tensor, a: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """sum_j rho_j g_j a_j^T as one matmul, scaling the narrower of the two."""
    if g.shape[1] <= a.shape[1]:
        return (g * rho[:, None]).t() @ a
    return g.t() @ (a * rho[:, None])


class BatchedEngine:
    """Runs the DP step of all `clients` (the clients of this rank) as one batched computation.

    `weights[i]` is client i's aggregation weight w_i (public). `step` returns the rank's
    contribution to the all-reduce buffer: sum_i w_i * (noisy Phi gradient of client i), fp64, in
    `hyper.named_parameters()` order, and the summed diagnostics (client.DIAG_KEYS); it also
    applies every client's local update (psi_i, v_i), exactly like calling `Client.step` on each.
    """

    def __init__(self, clients: list, cfg: Config, *, weights: list, device: torch.device | str = "cpu"):
        if not clients:
            raise ValueError("BatchedEngine needs at least one client")
        reason = engine_fallback_reason(cfg)
        if reason is not None:
            raise ValueError(f"the batched engine does not support this configuration: {reason}")
        self.clients = list(clients)
        self.cfg = cfg
        self.device = torch.device(device)
        self.M = len(self.clients)
        self.K = self.clients[0].num_classes
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        q = cfg.privacy.sample_rate
        self.expected = torch.tensor([q * c.declared_size for c in self.clients], dtype=torch.float64)  # public
        self.timings = {k: 0.0 for k in PHASES}
        self.profile = False  # per-phase timings (synchronizes CUDA between phases when on)
        # clients' noise is drawn by this many Python threads (serial kernels: no OpenMP oversubscription)
        self.noise_threads = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else (os.cpu_count() or 1)))
        self._pool: Optional[ThreadPoolExecutor] = None
        self._noise_key = None  # cached noise buffers and per-client views (see _noise)
        self._bind_data()
        self.bind()

    # ------------------------------------------------------------------ state
    def _bind_data(self) -> None:
        """One tensor of all clients' records; each client's x / y become views of it (no copy kept)."""
        xs = [c.x for c in self.clients]
        self.sizes = [len(c.y) for c in self.clients]
        self.X = torch.cat(xs).to(self.device)
        self.Y = torch.cat([c.y for c in self.clients]).to(self.device)
        off = 0
        self.offsets = []
        for c, n in zip(self.clients, self.sizes):
            self.offsets.append(off)
            c.x, c.y = self.X[off:off + n], self.Y[off:off + n]
            off += n
        self.offsets_t = torch.tensor(self.offsets, dtype=torch.long)

    def bind(self) -> None:
        """Stack every client's encoder, code and Adam state; the clients' tensors become views.

        Call again after anything replaced a client's tensors (load_state_dict of an optimizer);
        `step` checks and re-binds by itself."""
        cs = self.clients
        self.enc_names = [n for n, _ in cs[0].encoder.named_parameters()]
        self.enc_params = []  # (M, *shape) per encoder parameter
        self.enc_m, self.enc_v = [], []
        M = self.M
        self.enc_steps = torch.zeros(M, len(self.enc_names), dtype=torch.float32)
        self.code_steps = torch.zeros(M, 1, dtype=torch.float32)
        self.enc_hp = self._adam_hparams([c.enc_opt for c in cs])
        self.code_hp = self._adam_hparams([c.code_opt for c in cs])
        per_client = [list(c.encoder.parameters()) for c in cs]
        for k, name in enumerate(self.enc_names):
            ps = [pc[k] for pc in per_client]
            self.enc_params.append(torch.stack([p.detach() for p in ps]).to(self.device))
            m, v, st = self._stack_state([c.enc_opt for c in cs], ps)
            self.enc_m.append(m)
            self.enc_v.append(v)
            self.enc_steps[:, k] = st
        # the encoder's (weight, bias) pairs in layer order, as stacks (the model's math takes them as `layers`)
        pos = {id(p): k for k, p in enumerate(per_client[0])}
        linears = [m for m in cs[0].encoder.modules() if isinstance(m, torch.nn.Linear)]
        in_linears = {id(t) for m in linears for t in (m.weight, m.bias) if t is not None}
        if set(pos) != in_linears:  # a private parameter of another module would be client 0's for every client
            raise ValueError("the batched engine stacks encoders made of nn.Linear layers and parameter-free "
                             "activations only; use train.engine=reference for this encoder")
        self.enc_layers = [(self.enc_params[pos[id(m.weight)]], None if m.bias is None else self.enc_params[pos[id(m.bias)]])
                           for m in linears]
        self.codes = torch.stack([c.code.detach() for c in cs]).to(self.device)
        m, v, st = self._stack_state([c.code_opt for c in cs], [c.code for c in cs])
        self.code_m, self.code_v = m, v
        self.code_steps[:, 0] = st
        # the clients' tensors become views of the stacks
        for i, c in enumerate(cs):
            for k, p in enumerate(per_client[i]):
                p.data = self.enc_params[k][i]
                c.enc_opt.state[p] = {"step": self.enc_steps[i, k], "exp_avg": self.enc_m[k][i],
                                      "exp_avg_sq": self.enc_v[k][i]}
            c.code.data = self.codes[i]
            c.code_opt.state[c.code] = {"step": self.code_steps[i, 0], "exp_avg": self.code_m[i],
                                        "exp_avg_sq": self.code_v[i]}
        self._bound = [(c.code.data_ptr(), c.enc_opt.state[per_client[i][0]]["exp_avg"],
                        c.code_opt.state[c.code]["exp_avg"], c.mmd_target) for i, c in enumerate(cs)]
        if all(c.mmd_target is not None for c in cs):
            self.mmd_target = torch.stack([c.mmd_target for c in cs]).to(self.device)
            self.mmd_weights = torch.stack([c.mmd_weights for c in cs]).to(self.device)
        else:
            self.mmd_target = self.mmd_weights = None

    def _is_bound(self) -> bool:
        for c, (ptr, em, cm, tgt) in zip(self.clients, self._bound):
            first = next(iter(c.encoder.parameters()))
            if (c.code.data_ptr() != ptr or c.enc_opt.state.get(first, {}).get("exp_avg") is not em
                    or c.code_opt.state.get(c.code, {}).get("exp_avg") is not cm or c.mmd_target is not tgt):
                return False
        return True

    @staticmethod
    def _adam_hparams(opts: list) -> dict:
        hp = None
        for opt in opts:
            if not isinstance(opt, torch.optim.Adam) or len(opt.param_groups) != 1:
                raise ValueError("the batched engine expects one torch.optim.Adam param group per client optimizer")
            g = opt.param_groups[0]
            if g.get("weight_decay", 0) or g.get("amsgrad") or g.get("maximize"):
                raise ValueError("the batched engine implements plain Adam (no weight decay, amsgrad or maximize)")
            mine = {"lr": float(g["lr"]), "betas": tuple(float(b) for b in g["betas"]), "eps": float(g["eps"])}
            if hp is not None and mine != hp:
                raise ValueError("the batched engine needs the same Adam settings for every client")
            hp = mine
        return hp

    def _stack_state(self, opts, params):
        ms, vs, steps = [], [], []
        for opt, p in zip(opts, params):
            st = opt.state.get(p, {})
            if st:
                ms.append(st["exp_avg"].detach())
                vs.append(st["exp_avg_sq"].detach())
                steps.append(float(st["step"]))
            else:  # Adam creates its state lazily at the first step: zeros and step 0
                ms.append(torch.zeros_like(p.detach()))
                vs.append(torch.zeros_like(p.detach()))
                steps.append(0.0)
        return (torch.stack(ms).to(self.device), torch.stack(vs).to(self.device),
                torch.tensor(steps, dtype=torch.float32))

    # ------------------------------------------------------------------ timing
    @contextmanager
    def _phase(self, name: str):
        if not self.profile:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] += time.perf_counter() - t

    def reset_timings(self) -> None:
        self.timings = {k: 0.0 for k in PHASES}

    # ------------------------------------------------------------------ the batched computation
    def _names(self, hyper: HyperNetwork) -> dict:
        """id(tensor) -> name for every tensor the model's math may use: Phi's parameters and the private stacks."""
        names = {id(t): n for n, t in hyper.named_parameters()}
        names.update({id(t): ENCODER_PREFIX + n for n, t in zip(self.enc_names, self.enc_params)})
        return names

    def per_sample(self, hyper: HyperNetwork, b: Batch, *, norms: bool = True) -> RecordingOps:
        """The model's loss (`model.elbo_terms`) over all clients' rows and ONE autograd pass to the layers'
        outputs (parameters are used detached: autograd never forms a weight gradient). With `norms`, also the
        per-row gradients through the heads (the per-sample norms and clipped code sums need them)."""
        ops = RecordingOps(b, self.M, self._names(hyper))
        with self._phase("forward"):
            nll, kl = elbo_terms(self.clients[0].encoder, self.codes, hyper, b.x, b.y, b.eps, ops, self.enc_layers)
            loss = nll + kl
            ops.check_coverage()
        with self._phase("backward"):
            ops.backward(loss, per_sample=norms)
        ops.nll_sum, ops.kl_sum = float(nll.detach().sum()), float(kl.detach().sum())
        return ops

    def norms(self, ps: RecordingOps, mode: str) -> torch.Tensor:
        """Per-sample norm of the privatized gradient: (psi_i, v_i, Phi) jointly in strict mode, Phi in paper."""
        with self._phase("norms"):
            n2_phi, n2_priv, n2_code = ps.norms2()
            n2 = n2_phi + n2_priv + n2_code if mode == "strict" else n2_phi
            return n2.clamp_min(0.0).sqrt()

    def encoder_sums(self, ps: RecordingOps, c: Optional[torch.Tensor]) -> list:
        """Per-client sum_j c_j * grad_j of every encoder parameter: (M, *shape) each (c None: unclipped)."""
        sums = ps.private_sums(c)
        return [sums.get(ENCODER_PREFIX + n, torch.zeros_like(t)) for n, t in zip(self.enc_names, self.enc_params)]

    def code_sums(self, ps: RecordingOps, c: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-client sum_j c_j * d(loss_j)/d(v_i): (M, d_v) (c None: unclipped)."""
        return ps.code_sums(c, self.codes.shape)

    def phi_sums(self, ps: RecordingOps, hyper: HyperNetwork, rho: torch.Tensor) -> dict:
        """sum_j rho_j * (per-sample gradient of sample j) for every Phi parameter."""
        sums = ps.phi_sums(rho)
        return {n: sums[n] if n in sums else torch.zeros_like(p.detach()) for n, p in hyper.named_parameters()}

    def _empty_phi(self, hyper: HyperNetwork) -> dict:
        return {n: torch.zeros_like(p.detach()) for n, p in hyper.named_parameters()}

    # ------------------------------------------------------------------ for tests: per-client sums
    def clipped_sums(self, hyper: HyperNetwork, xs: list, ys: list, epss: list, *, mode: str, clip_norm: float):
        """Per client: the clipped, pre-noise sums {ClientView parameter name: tensor} of the
        privatized parameters (strict: encoder, code and Phi; paper: Phi), and the per-sample norms."""
        b = Batch.build(torch.cat(xs).to(self.device), torch.cat(ys).to(self.device), torch.cat(epss).to(self.device),
                        [len(y) for y in ys], self.device)
        if len(b.y) == 0:
            zero = self._empty_phi(hyper)
            res = []
            for _ in range(self.M):
                d = {PHI_PREFIX + n: t.clone() for n, t in zero.items()}
                if mode == "strict":
                    d.update({ENCODER_PREFIX + n: torch.zeros_like(t[0]) for n, t in zip(self.enc_names, self.enc_params)})
                    d[CODE_NAME] = torch.zeros_like(self.codes[0])
                res.append(d)
            return res, [torch.zeros(0) for _ in range(self.M)]
        ps = self.per_sample(hyper, b)
        norms = self.norms(ps, mode)
        c = clip_factor(norms, clip_norm)
        enc = self.encoder_sums(ps, c) if mode == "strict" else None
        code = self.code_sums(ps, c) if mode == "strict" else None
        res, per_norms = [], []
        for i in range(self.M):
            rho = c * (b.cidx == i).to(c.dtype)
            d = {PHI_PREFIX + n: t for n, t in self.phi_sums(ps, hyper, rho).items()}
            if mode == "strict":
                d.update({ENCODER_PREFIX + n: t[i] for n, t in zip(self.enc_names, enc)})
                d[CODE_NAME] = code[i]
            res.append(d)
            per_norms.append(norms[b.cidx == i])
        return res, per_norms

    # ------------------------------------------------------------------ one DP step of every client
    def _sample(self, gens: list, drop: Optional[tuple] = None) -> Batch:
        """Each client's Poisson coins and reparameterization noise, from its own generator (CPU),
        with the reference's calls in the reference's order. `drop` = (client position, record): that
        record left out of that client's realized batch, the same coins otherwise (the sensitivity
        check's neighbouring data set, as `SensitivityProbe.sample` does for the reference step)."""
        m = self.cfg.model
        q = self.cfg.privacy.sample_rate
        idxs, epss, counts = [], [], []
        for pos, (n, g) in enumerate(zip(self.sizes, gens)):
            idx = poisson_sample(n, q, g)
            eps = torch.randn(len(idx), m.latent_dim, generator=g)
            if drop is not None and pos == drop[0]:
                keep = idx != int(drop[1])
                idx, eps = idx[keep], eps[keep]
            idxs.append(idx)
            counts.append(len(idx))
            epss.append(eps)
        ct = torch.tensor(counts, dtype=torch.long)
        gidx = torch.cat(idxs) + torch.repeat_interleave(self.offsets_t, ct)
        gidx = gidx.to(self.device)
        return Batch.build(self.X.index_select(0, gidx), self.Y.index_select(0, gidx),
                           torch.cat(epss).to(self.device), counts, self.device)

    def _noise(self, gens: list, names: list, phi_coef: torch.Tensor, phi_layout: dict, P: int):
        """Every client's N(0, 1) draws for its privatized parameters, in sorted-name order, one
        `normal_` per tensor of that tensor's shape (the calls of `DPStep.add_noise`), on the CPU.
        Returns stacked encoder and code noise (M, ...) and sum_i phi_coef_i * noise_i over Phi (fp64).
        Clients draw from their own generators, so blocks of clients run in parallel threads
        (`noise_threads`); the fp64 partial sums are combined in a fixed order. Buffers and the
        per-client views into them are kept between steps (the Python calls dominate for small models)."""
        M = self.M
        workers = max(1, min(self.noise_threads, M))
        key = (tuple(sorted(names)), P, workers)
        if self._noise_key != key:
            self._noise_key = key
            dt = torch.float32
            enc_shapes = {ENCODER_PREFIX + n: tuple(t.shape[1:]) for n, t in zip(self.enc_names, self.enc_params)}
            enc_noise = {n: torch.empty((M, *s), dtype=dt) for n, s in enc_shapes.items() if n in names}
            code_noise = torch.empty(M, self.codes.shape[1], dtype=dt) if CODE_NAME in names else None
            bounds = [round(k * M / workers) for k in range(workers + 1)]
            rows = [torch.empty(P, dtype=dt) for _ in range(workers)]
            views = []
            for w in range(workers):
                for i in range(bounds[w], bounds[w + 1]):
                    vi = []
                    for name in key[0]:
                        if name.startswith(PHI_PREFIX):
                            off, shape = phi_layout[name[len(PHI_PREFIX):]]
                            vi.append(rows[w][off:off + _numel(shape)].view(shape))
                        else:
                            vi.append(code_noise[i] if name == CODE_NAME else enc_noise[name][i])
                    views.append(vi)
            accs = [torch.zeros(P, dtype=torch.float64) for _ in range(workers)]
            wides = [torch.empty(min(P, _SERIAL), dtype=torch.float64) for _ in range(workers)]
            self._noise_buf = (enc_noise, code_noise, bounds, rows, views, accs, wides)
        enc_noise, code_noise, bounds, rows, views, accs, wides = self._noise_buf
        coef = phi_coef.tolist()
        with_phi = any(n.startswith(PHI_PREFIX) for n in key[0])  # else the rows are never drawn: nothing to add

        def block(w: int) -> None:
            row, acc, wide = rows[w], accs[w], wides[w]
            acc.zero_()
            for i in range(bounds[w], bounds[w + 1]):
                g = gens[i]
                for t in views[i]:
                    t.normal_(generator=g)
                if not with_phi:
                    continue
                # fp64 accumulation over clients, in pieces below ATen's parallel grain size: these
                # threads must not each start an OpenMP team (oversubscription on few cores)
                for lo in range(0, P, _SERIAL):
                    hi = min(P, lo + _SERIAL)
                    part = wide[:hi - lo]
                    part.copy_(row[lo:hi])
                    acc[lo:hi].add_(part, alpha=coef[i])

        if workers == 1:
            block(0)
        else:
            if self._pool is None or self._pool._max_workers != workers:
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedhypevae-noise")
            list(self._pool.map(block, range(workers)))
        total = accs[0].clone()
        for part in accs[1:]:
            total.add_(part)
        return enc_noise, code_noise, total

    def _post_noise(self, hyper: HyperNetwork, gens: list, features, phi_coef_w: torch.Tensor):
        """lambda_v ||v_i||^2 + lambda_mmd * MMD_i (DP-MERF), batched over clients with the model's own
        `sample_synthetic` and `merf_mmd`: gradients with respect to each code v_i and sum_i w_i * d(post_i)/d(Phi);
        the synthetic noise is drawn from each client's generator after the DP noise, as in the client's step."""
        m = self.cfg.model
        V = self.codes.detach().clone().requires_grad_(True)
        loss = m.lambda_v * V.pow(2).sum(1)
        if m.lambda_mmd <= 0:
            (gv,) = torch.autograd.grad(loss.sum(), [V])
            return gv, None, 0.0
        if features is None or self.mmd_target is None:
            raise ValueError("model.lambda_mmd > 0 (merf) needs the random features and every client's released "
                             "mean embeddings (Trainer._release_mmd_embeddings) before the first step")
        K, spc, dx = self.K, m.mmd_synthetic_per_class, self.X.shape[1]
        n = K * spc
        syn_y = torch.arange(K).repeat_interleave(spc).to(self.device)
        zs, xs = [], []
        for g in gens:
            zs.append(torch.randn(n, m.latent_dim, generator=g))
            xs.append(torch.randn(n, dx, generator=g))
        syn_z = torch.stack(zs).to(self.device)
        syn_x = torch.stack(xs).to(self.device)
        params = [p for _, p in hyper.named_parameters()]
        names = [nm for nm, _ in hyper.named_parameters()]
        mods = [(d[:, None], db[:, None]) for d, db in hyper.decoder_modulation(V)]  # (M, 1, r): one row per client
        x_hat = sample_synthetic(hyper, mods, hyper.prior_features(V)[:, None], syn_y, syn_z, syn_x)  # (M, n, d_x)
        mmd = merf_mmd(features, x_hat.reshape(self.M, K, spc, dx), self.mmd_target, self.mmd_weights)  # (M,)
        post = loss + m.lambda_mmd * mmd
        (gv,) = torch.autograd.grad(post.sum(), [V], retain_graph=True)
        wsum = (post * phi_coef_w.to(post.dtype)).sum()
        gphi = torch.autograd.grad(wsum, params, allow_unused=True)
        phi = {nm: g for nm, g in zip(names, gphi) if g is not None}
        return gv, phi, float(mmd.detach().sum())

    def _adam(self, params, grads, ms, vs, steps, hp) -> None:
        """torch's own Adam (its functional form, single-tensor path: what each client's torch.optim.Adam runs on
        the CPU) on the (M, ...) stacks: elementwise the same as one Adam per client. Every client steps at every
        step, so the step counts agree and one call per stack suffices; otherwise one call per client."""
        b1, b2 = hp["betas"]
        kw = dict(foreach=False, amsgrad=False, beta1=b1, beta2=b2, lr=hp["lr"], weight_decay=0.0, eps=hp["eps"],
                  maximize=False)
        for k, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
            col = steps[:, k]
            if bool((col == col[0]).all()):
                adam([p], [g], [m], [v], [], [col[0].clone()], **kw)
                col += 1  # in place: the clients' step tensors are views
                continue
            for i in range(len(col)):
                adam([p[i]], [g[i]], [m[i]], [v[i]], [], [steps[i, k]], **kw)

    def step(self, hyper: HyperNetwork, round_: int, step: int, *, sigma: float, features=None, epoch: int = 0):
        """One DP step of every client: `release(prepare(...))`. Returns (sum_i w_i * noisy Phi gradient_i as
        one fp64 vector in hyper.named_parameters() order, summed diagnostics (client.DIAG_KEYS))."""
        return self.release(self.prepare(hyper, round_, step, epoch=epoch), sigma=sigma, features=features)

    def prepare(self, hyper: HyperNetwork, round_: int, step: int, *, epoch: int = 0,
                drop: Optional[tuple] = None) -> "PendingBatch":
        """Every client's step up to the noise: coins, the batched forward/backward, per-sample norms, the
        clipped sums. Nothing is released and no state changes (the release guard runs in between).
        `drop`: see `_sample` (the sensitivity check only)."""
        if not self._is_bound():
            self.bind()
        p = self.cfg.privacy
        M = self.M
        phi_items = [(n, t) for n, t in hyper.named_parameters()]
        layout, P = {}, 0
        for n, t in phi_items:
            layout[n] = (P, tuple(t.shape))
            P += t.numel()
        with self._phase("sample"):
            gens = [c.rng.generator(STREAM_STEP, round_, step, epoch) for c in self.clients]
            b = self._sample(gens, drop)
        B = len(b.y)
        diag = torch.zeros(len(DIAG_KEYS), dtype=torch.float64)
        diag[DIAG_KEYS.index("batch")] = B
        diag[DIAG_KEYS.index("clients")] = M
        coef = self.weights / self.expected  # w_i / (q n~_i): public
        coef_dev = coef.to(device=self.device, dtype=torch.float32)
        ps = self.per_sample(hyper, b, norms=p.enabled) if B > 0 else None
        strict = p.enabled and p.mode == "strict"
        norms = self.norms(ps, p.mode) if ps is not None and p.enabled else None  # its own phase
        with self._phase("clip"):
            if ps is None:
                enc_sum = [torch.zeros_like(t) for t in self.enc_params]
                code_sum = torch.zeros_like(self.codes)
                phi = self._empty_phi(hyper)
            else:
                c = None
                if p.enabled:
                    c = clip_factor(norms, p.clip_norm)
                    diag[DIAG_KEYS.index("clipped")] = float((norms > p.clip_norm).sum())
                enc_sum = self.encoder_sums(ps, c if strict else None)
                code_sum = self.code_sums(ps, c if strict else None)
                rho = coef_dev.index_select(0, b.cidx)
                phi = self.phi_sums(ps, hyper, rho if c is None else rho * c)
                diag[DIAG_KEYS.index("nll_sum")] = ps.nll_sum
                diag[DIAG_KEYS.index("kl_sum")] = ps.kl_sum
            phi_vec = torch.cat([phi[n].reshape(-1) for n, _ in phi_items]).double().cpu()
        return PendingBatch(hyper, gens, phi_items, layout, P, strict, enc_sum, code_sum, phi_vec, diag)

    def release(self, pend: "PendingBatch", *, sigma: float, features=None):
        """Noise on every privatized coordinate of every client, the post-noise terms, every client's local
        update; returns the rank's all-reduce contribution and the summed diagnostics."""
        cfg, p = self.cfg, self.cfg.privacy
        gens, phi_items, layout, P, strict = pend.gens, pend.phi_items, pend.layout, pend.P, pend.strict
        enc_sum, code_sum, phi_vec, diag = pend.enc_sum, pend.code_sum, pend.phi_vec, pend.diag
        hyper_names = [n for n, _ in phi_items]
        exp_dev = self.expected.to(self.device)

        def per_client(t):  # divide stacked (M, ...) sums by each client's public q * n~_i (in place: fresh sums)
            return t.div_(exp_dev.to(t.dtype).view((-1,) + (1,) * (t.dim() - 1)))

        blocks = noise_blocks(sigma)  # the client's own coordinates and Phi's may carry different noise
        std, std_phi = blocks["private"] * p.clip_norm, blocks["phi"] * p.clip_norm
        noised_private = p.enabled and strict and std > 0
        with self._phase("noise"):
            names = [CODE_NAME] + [ENCODER_PREFIX + n for n in self.enc_names] if noised_private else []
            names += [PHI_PREFIX + n for n in hyper_names] if p.enabled and std_phi > 0 else []
            if names:  # drawn in sorted-name order per client: the reference's draws, block by block
                enc_noise, code_noise, phi_noise = self._noise(gens, names, self.weights * std_phi / self.expected,
                                                               layout, P)
                phi_vec += phi_noise
            if noised_private:
                enc_grad = [per_client(s.add_(enc_noise[ENCODER_PREFIX + n].to(self.device), alpha=std))
                            for n, s in zip(self.enc_names, enc_sum)]
                code_grad = per_client(code_sum.add_(code_noise.to(self.device), alpha=std))
            else:
                enc_grad = [per_client(s) for s in enc_sum]
                code_grad = per_client(code_sum)
        with self._phase("post"):
            gv, gphi, mmd = self._post_noise(pend.hyper, gens, features, self.weights)
            code_grad = code_grad + gv
            if gphi:
                phi_vec += torch.cat([(gphi[n] if n in gphi else torch.zeros_like(t)).reshape(-1)
                                      for n, t in phi_items]).double().cpu()
            diag[DIAG_KEYS.index("mmd")] = mmd
        with self._phase("optimizer"):
            self._adam(self.enc_params, enc_grad, self.enc_m, self.enc_v, self.enc_steps, self.enc_hp)
            self._adam([self.codes], [code_grad], [self.code_m], [self.code_v], self.code_steps, self.code_hp)
            project_codes(self.codes, cfg.model.code_radius)
        return phi_vec, diag


@dataclass
class PendingBatch:
    """The step of every client of the rank computed up to the noise (BatchedEngine.prepare)."""
    hyper: HyperNetwork
    gens: list
    phi_items: list  # [(name, Phi parameter)]
    layout: dict
    P: int
    strict: bool
    enc_sum: list  # (M, ...) clipped sums per encoder parameter
    code_sum: torch.Tensor  # (M, d_v)
    phi_vec: torch.Tensor  # (P,) fp64: sum_i w_i / (q n~_i) * clipped Phi sum of client i
    diag: torch.Tensor

    def payload(self) -> list:
        """What the ledger's digest covers: the block's pre-noise Phi sum (the only Phi value that leaves the
        rank) and, in strict mode, every client's clipped sums over psi_i and v_i (its private state's input)."""
        return [self.phi_vec] + (list(self.enc_sum) + [self.code_sum] if self.strict else [])


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
