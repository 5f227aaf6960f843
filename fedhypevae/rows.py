"""The rows of one DP step and their per-sample gradients, in the form the clip stage consumes.

A step's rows are the records of every client of a block in their realized Poisson batches, concatenated
client-major (`Batch`). The DP step (`dp_step.DPStep`) needs from their per-sample gradients exactly three
things, and `Rows` is that interface:

* `norms2()`: each row's squared gradient norm over Phi's coordinates and over its client's own (psi_i, v_i);
* `private_sums(c)`: per client, sum_j c_j * grad_j over psi_i and v_i (c None: unclipped);
* `phi_sum(rho)`: sum_j rho_j * grad_j over Phi (rho: clip factor times the client's public coefficient).

Implementations: `engine.GhostRows` (the default: ghost norms and book-keeping sums, no per-sample gradient
materialized), `MaterializedRows` here (torch.func per-sample gradients, client by client: the reference,
and the only form for a per-sample loss that couples rows, the literal MMD cross term), `NoRows` (an empty
step) and `ExtraRows` (rows with given Phi gradients appended to another `Rows`: the audit's canaries go
through the same clip, noise and scale stages as records).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from .model import CODE_NAME, ENCODER_PREFIX, PHI_PREFIX, ClientView


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


@dataclass
class Batch:
    """All clients' rows of one step, concatenated client-major."""

    x: torch.Tensor  # (B, d_x)
    y: torch.Tensor  # (B,)
    eps: torch.Tensor  # (B, d_z) reparameterization noise
    counts: list  # realized batch size per client (stays on this rank)
    cidx: torch.Tensor  # (B,) client position of each row
    pad_pos: torch.Tensor  # (B,) row in the (M * bmax) padded layout
    bmax: int
    syn: list  # per client: the literal MMD's synthetic batch noise (labels, latent, output), or ()
    starts: list  # per client: its first row

    @classmethod
    def build(cls, x, y, eps, counts: list, device, syn: list | None = None) -> Batch:
        M, bmax = len(counts), max(counts, default=0)
        ct = torch.tensor(counts, dtype=torch.long)
        cidx = torch.repeat_interleave(torch.arange(M), ct)
        starts = torch.cumsum(ct, 0) - ct
        pos = torch.arange(len(cidx)) - starts[cidx]
        return cls(
            x,
            y,
            eps,
            list(counts),
            cidx.to(device),
            (cidx * bmax + pos).to(device),
            bmax,
            list(syn) if syn is not None else [()] * M,
            starts.tolist(),
        )

    def client_rows(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.counts[i])


class Rows:
    """Per-sample gradients of one step's rows by client (see the module docstring)."""

    cidx: torch.Tensor
    hyper: torch.nn.Module  # the Phi the rows were computed on
    nll_sum: float = 0.0
    kl_sum: float = 0.0

    def norms2(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Phi, private): each row's squared gradient norm over Phi and over its client's psi_i and v_i."""
        raise NotImplementedError

    def norms(self, strict: bool) -> torch.Tensor:
        """Each row's gradient norm over what is privatized: psi_i, v_i and Phi jointly (strict), Phi (paper)."""
        phi, private = self.norms2()
        return (phi + private if strict else phi).clamp_min(0.0).sqrt()

    def private_sums(self, c: torch.Tensor | None) -> tuple[list, torch.Tensor]:
        """([(M, *shape) per encoder parameter], (M, d_v)): per client sum_j c_j grad_j (c None: unclipped)."""
        raise NotImplementedError

    def phi_sum(self, rho: torch.Tensor) -> torch.Tensor:
        """sum_j rho_j grad_j over Phi, flat (P,) in the hypernetwork's parameter order."""
        raise NotImplementedError


def _zero_private(block) -> tuple[list, torch.Tensor]:
    return [torch.zeros_like(t) for t in block.enc_params], torch.zeros_like(block.codes)


def _flat_phi(hyper, sums: dict) -> torch.Tensor:
    return torch.cat([(sums[n] if n in sums else torch.zeros_like(p)).reshape(-1) for n, p in hyper.named_parameters()])


class NoRows(Rows):
    """A step in which no client sampled a record: every sum is zero (the noise is still added and released)."""

    def __init__(self, block, hyper):
        self.block, self.hyper = block, hyper
        self.cidx = torch.zeros(0, dtype=torch.long, device=block.device)

    def norms2(self):
        z = torch.zeros(0, device=self.block.device)
        return z, z

    def private_sums(self, c):
        return _zero_private(self.block)

    def phi_sum(self, rho):
        return torch.cat([p.detach().new_zeros(p.numel()) for p in self.hyper.parameters()])


class ExtraRows(Rows):
    """`base` with k more rows appended whose gradient is given: zero over every client's own coordinates and
    `phi_rows` (k, P) over Phi; they belong to the clients `cidx` (k,). Clip factors and weights cover all
    rows (the base's first)."""

    def __init__(self, base: Rows, cidx: torch.Tensor, phi_rows: torch.Tensor):
        self.base, self.phi_rows, self.hyper = base, phi_rows, base.hyper
        self.B = len(base.cidx)
        self.cidx = torch.cat([base.cidx, cidx.to(base.cidx.device)])
        self.nll_sum, self.kl_sum = base.nll_sum, base.kl_sum

    def norms2(self):
        phi, private = self.base.norms2()
        extra = self.phi_rows.pow(2).sum(1).to(phi.dtype)
        return torch.cat([phi, extra]), torch.cat([private, torch.zeros_like(extra)])

    def private_sums(self, c):
        return self.base.private_sums(None if c is None else c[: self.B])

    def phi_sum(self, rho):
        return self.base.phi_sum(rho[: self.B]) + rho[self.B :].to(self.phi_rows.dtype) @ self.phi_rows


class MaterializedRows(Rows):
    """The reference: torch.func per-sample gradients (`per_sample_grads`), client by client, of the client's
    `ClientView` over everything (psi_i, v_i, Phi). Materializes B x (|psi| + |v| + |Phi|) numbers; the
    literal MMD cross term (a per-sample loss that couples every row with the client's synthetic batch) is
    computed only this way."""

    def __init__(self, block, hyper, batch: Batch, literal_mmd=None):
        self.block, self.hyper = block, hyper
        self.cidx = batch.cidx
        self.per_client = []  # (position, {ClientView name: (B_i, ...)}) for clients with rows
        nll = kl = 0.0
        for i in range(block.M):
            if batch.counts[i] == 0:
                continue
            c = block.client(i)
            view = ClientView(c.encoder, c.code, hyper, literal_mmd=literal_mmd)
            names = [n for n, _ in view.named_parameters()]
            rows = batch.client_rows(i)
            grads, (n_i, k_i) = per_sample_grads(
                view, names, (batch.x[rows], batch.y[rows], batch.eps[rows]), batch.syn[i]
            )
            self.per_client.append((i, grads))
            nll += float(n_i.sum())
            kl += float(k_i.sum())
        self.nll_sum, self.kl_sum = nll, kl

    def norms2(self):
        phi, private = [], []
        for _, g in self.per_client:
            sq = {n: t.reshape(t.shape[0], -1).pow(2).sum(1) for n, t in g.items()}
            phi.append(sum(v for n, v in sq.items() if n.startswith(PHI_PREFIX)))
            private.append(sum(v for n, v in sq.items() if not n.startswith(PHI_PREFIX)))
        if not phi:
            z = torch.zeros(0, device=self.block.device)
            return z, z
        return torch.cat(phi), torch.cat(private)

    def _weighted(self, c: torch.Tensor | None):
        """Per client with rows: (position, its factors (B_i,) or None, its gradients)."""
        off = 0
        for i, g in self.per_client:
            b = next(iter(g.values())).shape[0]
            yield i, (None if c is None else c[off : off + b]), g
            off += b

    def private_sums(self, c):
        enc, code = _zero_private(self.block)
        for i, f, g in self._weighted(c):
            s = {
                n: (t.sum(0) if f is None else torch.einsum("b,b...->...", f, t))
                for n, t in g.items()
                if not n.startswith(PHI_PREFIX)
            }
            for k, name in enumerate(self.block.enc_names):
                enc[k][i] = s[ENCODER_PREFIX + name]
            code[i] = s[CODE_NAME]
        return enc, code

    def phi_sum(self, rho):
        sums: dict = {}
        for _, f, g in self._weighted(rho):
            for n, t in g.items():
                if n.startswith(PHI_PREFIX):
                    s = torch.einsum("b,b...->...", f.to(t.dtype), t)
                    key = n[len(PHI_PREFIX) :]
                    sums[key] = s if key not in sums else sums[key] + s
        return _flat_phi(self.hyper, sums)
