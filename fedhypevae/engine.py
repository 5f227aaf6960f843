"""Ghost-norm per-sample gradients: the default form of the DP step's per-sample stage (`dp_step.DPStep.per_sample`).

The DP step needs, per row of a step (a record of one client of a block), its gradient norm and clip-factor
weighted sums of the gradients (`rows.Rows`). The reference (`rows.MaterializedRows`) materializes every
row's gradient with `torch.func`. This module gets the same numbers without ever forming a per-sample weight
gradient, for all clients of a block in one computation. It runs the model's OWN math (`model.elbo_terms`)
through `RecordingOps`, which evaluates each layer type batched and records what the norms and sums need
(the layer types are listed in `model.Ops`). A model change (depth, widths, activation, a new layer built
from these types) therefore touches model.py alone; tests/test_engine_oracle.py checks these rows against an
independent torch.func oracle over several model shapes.

* **Layout.** The rows of all clients are concatenated client-major, with a client index c(j) per row. The
  private encoders are stacked as (M, out, in) tensors (`block.ClientBlock`) and run as one `baddbmm` on a
  zero-padded (M, B_max, .) view of the batch; everything after the encoder works on the concatenated rows.
  The hypernetwork heads (h_theta, h_omega) run once per client on the stacked codes V (M, d_v) and their
  outputs are gathered per row; the decoder is ONE matmul with the shared base weights followed by the
  per-row client scales.
* **Per-sample norms without per-sample gradients.** One autograd pass gives the gradient of sum_j loss_j
  with respect to every recorded layer OUTPUT (g_j per row; rows are independent, so these are per-sample).
  A single sample's weight gradient is the outer product g_j a_j^T, hence ||g_j a_j^T||^2 = ||g_j||^2 ||a_j||^2
  ("ghost norm", exact; Opacus' per-layer norm samplers are the pattern). A head layer sees a client-shared
  input s_i, so its per-sample gradient G_j s_i^T has norm ||G_j|| ||s_i||; G is carried back through the head
  per row (G @ W times the activation's derivative), so the head's forward never runs per row. Small
  per-sample pieces are materialized: the code v_i (strict mode), embedding rows, per-row vectors (x_logstd).
* **Sums by book-keeping.** With row weights rho_j (the clip factor times the client's public coefficient),
  each weight's sum is one matmul (rho * g)^T a: per client (bmm) for the encoders, over all rows at once for
  Phi. No second backward pass.

Refused, never approximated (the step then needs `train.engine: reference`): a parameter used in two layer
calls (per-use ghost norms would miss the cross term and under-clip), a parameter used outside the layer
types, an encoder with non-Linear parameters, a non-elementwise head activation; and a per-sample loss that
couples rows (`ghost_refusal`: the literal MMD cross term), for which the step materializes the rows itself.

Precision: fp32 compute (as the reference); the weighted sum over a block's clients of the Phi sums happens
inside one fp32 GEMM.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .config import Config
from .model import ELEMENTWISE, ENCODER_PREFIX, Ops, elbo_terms
from .rows import Batch, Rows, _flat_phi


def ghost_refusal(cfg: Config) -> str | None:
    """Why the ghost-norm rows cannot compute this configuration's per-sample gradients (the step then
    materializes them), or None."""
    if cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "literal":
        return (
            "model.mmd_kind=literal with lambda_mmd > 0: the per-sample MMD cross term couples each sample "
            "with a synthetic batch"
        )
    return None


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm over the last dimension (a reduction: no temporary of t's size)."""
    return torch.linalg.vector_norm(t, dim=-1).square()


def _tracked(t: torch.Tensor) -> torch.Tensor:
    """A tensor autograd can differentiate to (a leaf when nothing before it needs a gradient)."""
    return t if t.requires_grad else t.requires_grad_(True)


LAYER_TYPES = ("private_linear", "shared_linear", "add_bias", "embed", "per_row", "head_linear", "code_rows")


@dataclass
class _HeadLayer:
    """One linear layer of a hypernetwork head, evaluated once per client."""

    w: str  # the weight's name
    b: str | None  # the bias' name
    s: torch.Tensor  # (M, in): its client-level input
    u: torch.Tensor  # (M, out): its output (before the activation that follows, if any)
    W: torch.Tensor  # the weight (detached)
    act: object = None  # the activation applied to u, or None
    du: torch.Tensor | None = None  # that activation's derivative at u


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

    def down(self, pieces: list, cid: torch.Tensor | None) -> torch.Tensor:
        """The gradient at the last layer's output (in pieces) carried through its weight to its input, times the
        activation before it (rows, with cid; client-level sums, cid None)."""
        W, off, g = self.layers[-1].W, 0, None
        for gp, w in zip(pieces, self.widths):
            part = gp @ W[off : off + w]
            g = part if g is None else g.add_(part)
            off += w
        if len(self.layers) > 1 and self.layers[-2].du is not None:
            du = self.layers[-2].du
            g = g * (du if cid is None else du.index_select(0, cid))
        return g

    def below(self, pieces: list, cid: torch.Tensor | None) -> list:
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

    def __init__(self, batch: Batch, M: int, names: dict):
        self.b, self.M, self.names = batch, M, names
        self.used: set = set()  # the names recorded so far (each at most once)
        self.private, self.shared, self.biases, self.embeds, self.vectors, self.chains = [], [], [], [], [], []
        self._chain = None
        self.per_sample = False  # per-row head gradients formed (norms): set by `backward`

    def _name(self, t: torch.Tensor | None) -> str | None:
        if t is None:
            return None
        try:
            name = self.names[id(t)]
        except KeyError:
            raise ValueError(
                "the model's math used a tensor that is neither a client's private parameter nor a "
                "parameter of Phi (the batched engine cannot attribute its gradient)"
            ) from None
        if name in self.used:
            # the per-sample norm is summed per use: a parameter used twice (tied weights, a head run twice, a
            # vector used twice) would miss the cross term and be UNDER-clipped. Refused, never approximated.
            raise ValueError(
                f"the model's math uses parameter {name!r} twice in one step; the batched engine "
                "computes per-sample norms per use and would under-clip it (use train.engine=reference)"
            )
        self.used.add(name)
        return name

    def check_coverage(self) -> None:
        """Every parameter the step privatizes went through a layer type: one the math used in plain torch (or
        not at all) would get no gradient here, silently."""
        missing = sorted(set(self.names.values()) - self.used)
        if missing:
            raise ValueError(
                f"the batched engine saw no layer using {', '.join(missing)}: a parameter used outside "
                "model.Ops' layer types gets no per-sample gradient (use train.engine=reference, or "
                "write that use with an Ops method)"
            )

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
            raise ValueError(
                f"the batched engine carries head gradients through elementwise activations only "
                f"({', '.join(c.__name__ for c in ELEMENTWISE)}); got {type(act).__name__}"
            )
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
            chain.leaves = [
                (t if f is None else f(t)).index_select(0, cid).requires_grad_(True)
                for t, f in zip(chain.pieces, chain.fns)
            ]
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
        tensors = (
            [r[3] for r in self.private]
            + [r[3] for r in self.shared]
            + [r[1] for r in self.biases]
            + [r[2] for r in self.embeds]
            + [r[1] for r in self.vectors]
            + [leaf for c in self.chains for leaf in c.leaves]
        )
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
        d_of = {id(x): g for (_, x), g in zip(derivs, grads[len(tensors) :])}
        it = iter(grads[: len(tensors)])
        self.g_private = [next(it) for _ in self.private]
        self.g_shared = [next(it) for _ in self.shared]
        self.g_biases = [next(it) for _ in self.biases]
        self.g_embeds = [next(it) for _ in self.embeds]
        self.g_vectors = [
            g if f is None else g * d_of[id(p)]
            for (_, _, f, p), g in zip(self.vectors, (next(it) for _ in self.vectors))
        ]
        cid = self.b.cidx
        for chain in self.chains:
            layers = chain.layers
            for layer in layers:
                layer.du = None if layer.act is None else d_of[id(layer.u)]
            chain.factors, off = [], 0
            for w, f, t in zip(chain.widths, chain.fns, chain.pieces):
                factor = None if f is None else d_of[id(t)]
                if layers[-1].du is not None:  # the activation after the last layer
                    du = layers[-1].du[:, off : off + w]
                    factor = du if factor is None else factor * du
                chain.factors.append(factor)
                off += w
            chain.g_leaves = [next(it) for _ in chain.leaves]
            if per_sample:  # d(loss_j)/d(u_l) per row, from the last layer back
                chain.g_last = [
                    g if fac is None else g * fac.index_select(0, cid) for g, fac in zip(chain.g_leaves, chain.factors)
                ]
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

    def private_sums(self, c: torch.Tensor | None) -> dict:
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

    def _seg(self, t: torch.Tensor, rho: torch.Tensor | None) -> torch.Tensor:
        """Per-client sums of (rho-weighted) rows: (M, k)."""
        return t.new_zeros(self.M, t.shape[1]).index_add_(0, self.b.cidx, t if rho is None else t * rho[:, None])

    def _chain_sums(self, chain: _Head, rho: torch.Tensor | None) -> list:
        """Per-client rho-weighted sums of d(loss)/d(u_l) for every layer of a head: [(M, out_l)]."""
        if self.per_sample:
            return [self._seg(g, rho) for g in chain.g_u] + [torch.cat([self._seg(g, rho) for g in chain.g_last], 1)]
        # linear in the output gradient: reduce per client first (M rows instead of B)
        last = [
            self._seg(g, rho) if fac is None else self._seg(g, rho) * fac
            for g, fac in zip(chain.g_leaves, chain.factors)
        ]
        return chain.below(last, None) + [torch.cat(last, 1)]

    def code_sums(self, c: torch.Tensor | None, shape) -> torch.Tensor:
        """Per client sum_j c_j * d(loss_j)/d(v_i): (M, d_v) (c None: unclipped)."""
        if self.per_sample:
            if self.g_code is None:  # a model without heads: the code gets no gradient from the loss
                return torch.zeros(shape, dtype=self.b.x.dtype, device=self.b.x.device)
            g = self.g_code if c is None else self.g_code * c[:, None]
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


class GhostRows(Rows):
    """The rows of one step of a block with ghost norms (see the module docstring): the model's loss over all
    clients' rows, ONE autograd pass to the layers' outputs (parameters are used detached: autograd never forms
    a weight gradient), and, with `per_sample`, the per-row gradients through the heads (the per-sample norms
    and clipped code sums need them)."""

    def __init__(self, block, hyper, batch: Batch, *, per_sample: bool = True, phase=None):
        self.block, self.hyper, self.cidx = block, hyper, batch.cidx
        phase = phase or (lambda name: nullcontext())
        names = {id(t): n for n, t in hyper.named_parameters()}
        names.update({id(t): ENCODER_PREFIX + n for n, t in zip(block.enc_names, block.enc_params)})
        ops = RecordingOps(batch, block.M, names)
        with phase("forward"):
            nll, kl = elbo_terms(block.encoder, block.codes, hyper, batch.x, batch.y, batch.eps, ops, block.enc_layers)
            ops.check_coverage()
        with phase("backward"):
            ops.backward(nll + kl, per_sample=per_sample)
        self.ops = ops
        self.nll_sum, self.kl_sum = float(nll.detach().sum()), float(kl.detach().sum())

    def norms2(self):
        phi, private, code = self.ops.norms2()
        return phi, private + code

    def private_sums(self, c):
        sums = self.ops.private_sums(c)
        enc = [
            sums[ENCODER_PREFIX + n] if ENCODER_PREFIX + n in sums else torch.zeros_like(t)
            for n, t in zip(self.block.enc_names, self.block.enc_params)
        ]
        return enc, self.ops.code_sums(c, self.block.codes.shape)

    def phi_sum(self, rho):
        return _flat_phi(self.hyper, self.ops.phi_sums(rho))
