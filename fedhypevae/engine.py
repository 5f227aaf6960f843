"""Batched multi-client DP engine: every client of a rank in ONE computation, ghost-norm clipping.

The reference DP step (`Client.step`, `dp_step.per_sample_grads`) loops over clients in Python
and materializes every sample's gradient with `torch.func`. This engine computes the same
release for all clients of a rank at once:

* **Layout.** The samples of all clients' Poisson batches are concatenated, client-major, with a
  client index c(j) per row. The private encoders are stacked as (M, out, in) tensors and run as
  one `baddbmm` on a zero-padded (M, B_max, .) view of the batch; everything after the encoder
  works on the concatenated rows (no padding). The hypernetwork heads h_theta, h_omega run once per
  client on the stacked codes V (M, d_v) and are gathered per row; the decoder is ONE matmul with
  the shared base weights followed by the per-row client scales: (h @ W.T) * d(v_c(j)) + b + db(v_c(j)).
* **Per-sample norms without per-sample gradients.** One autograd pass gives the gradient of
  sum_j loss_j with respect to every linear layer's OUTPUT (g_j per row; rows are independent, so
  these are per-sample). A single sample's weight gradient is the outer product g_j a_j^T, hence
  ||g_j a_j^T||^2 = ||g_j||^2 ||a_j||^2 ("ghost norm", exact). The decoder's base weight sees
  g_j * d_c(j). The client-dependent parts are exact too: the per-sample gradient of the
  h_theta/h_omega outputs is read off the gathered rows, and a linear layer inside those heads
  sees a client-shared input s_i, so its per-sample gradient G_j s_i^T has norm ||G_j|| ||s_i||.
  Small per-sample pieces are materialized: the code v_i (strict mode), the label embedding row,
  x_logstd.
* **Clipped sums by book-keeping.** With clip factors c_j = min(1, C / (||grad_j|| + 1e-6)) (the
  reference's formula), each weight's clipped sum is one matmul (c * g)^T a: per client (bmm) for
  the encoders, and for Phi directly the aggregation-weighted sum over the rank's clients,
  sum_i (w_i / (q n~_i)) sum_{j in i} c_j g_j a_j^T, with PUBLIC w_i and n~_i only (no realized
  batch size enters). No second backward pass.
* **Noise.** N(0, sigma^2 C^2) on every privatized coordinate of every client — also for empty
  batches — drawn from the client's own generator with the same calls in the same order as the
  reference (`add_noise_and_scale`: sorted parameter names, one `normal_` per tensor of the
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
  copies) always sees the current values and checkpoints keep the per-client format; a stacked
  Adam over (M, ...) tensors with per-client step counts is elementwise the per-client Adam.

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

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F

from .client import DIAG_KEYS
from .config import Config
from .dp_step import poisson_sample
from .model import LOG2PI, HyperNetwork, kl_diag_gaussians, one_hot, soft_clamp
from .rng import STREAM_STEP

_SERIAL = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements run on the calling thread
PHASES = ("sample", "forward", "backward", "norms", "clip", "noise", "post", "optimizer")


def engine_fallback_reason(cfg: Config) -> Optional[str]:
    """Why the batched engine cannot run this configuration (the trainer then uses Client.step), or None."""
    if cfg.federation.aggregation == "delta":
        return ("federation.aggregation=delta: every client runs its local steps on a private copy of Phi, "
                "so the clients' computations do not share Phi")
    if cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "literal":
        return ("model.mmd_kind=literal with lambda_mmd > 0: the per-sample MMD cross term couples each sample "
                "with a synthetic batch")
    return None


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm over the last dimension (a reduction: no temporary of t's size)."""
    return torch.linalg.vector_norm(t, dim=-1).square()


def _dsilu(u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


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


class PerSample:
    """Activations, output gradients and per-sample squared norms of one batched forward/backward."""


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
    def per_sample(self, hyper: HyperNetwork, b: Batch, *, norms: bool = True) -> PerSample:
        """Forward over all clients' rows and ONE autograd pass to the layers' outputs (parameters
        are used detached: autograd never forms a weight gradient). With `norms`, also every piece
        of the per-sample squared gradient norms (not needed without DP)."""
        M, K = self.M, self.K
        P = {n: p.detach() for n, p in hyper.named_parameters()}
        ps = PerSample()
        ps.batch = b
        dt = self.X.dtype
        cid = b.cidx
        with self._phase("forward"):
            y1h = one_hot(b.y, K, dt)
            a0 = torch.cat([b.x, y1h], 1)
            a = a0.new_zeros(M * b.bmax, a0.shape[1]).index_copy_(0, b.pad_pos, a0).view(M, b.bmax, -1)
            enc_in, enc_out = [], []
            L = len(self.enc_params) // 2
            for layer in range(L):
                w, bias = self.enc_params[2 * layer], self.enc_params[2 * layer + 1]
                out = torch.baddbmm(bias.unsqueeze(1), a, w.transpose(1, 2))
                if layer == 0:
                    out.requires_grad_(True)  # the graph starts here: nothing before needs a gradient
                enc_in.append(a.detach())
                enc_out.append(out)
                if layer < L - 1:
                    a = F.silu(out)
            enc = enc_out[-1].reshape(M * b.bmax, -1).index_select(0, b.pad_pos)
            mu_q, logvar_q = enc.chunk(2, dim=-1)
            logvar_q = soft_clamp(logvar_q, 8.0)
            z = mu_q + (0.5 * logvar_q).exp() * b.eps

            # hypernetwork heads once per client (no graph); their outputs gathered per row as leaves
            V = self.codes
            ht0, ht2, ho0, ho2 = (hyper.h_theta[0], hyper.h_theta[2], hyper.h_omega[0], hyper.h_omega[2])
            with torch.no_grad():
                u_t = F.linear(V, ht0.weight, ht0.bias)
                s_t = F.silu(u_t)
                o_t = F.linear(s_t, ht2.weight, ht2.bias)
                u_o = F.linear(V, ho0.weight, ho0.bias)
                s_o = F.silu(u_o)
                hw = F.linear(s_o, ho2.weight, ho2.bias)
            h = torch.cat([z, y1h], 1)
            dec_in, dec_pre, dec_d, dec_db, dec_tprime = [], [], [], [], []
            start, nd = 0, len(hyper.out_sizes)
            for layer, r in enumerate(hyper.out_sizes):
                t = torch.tanh(o_t[:, start:start + r])
                d = (1.0 + t).index_select(0, cid).requires_grad_(True)  # d_l(v_c(j)) per row
                db = o_t[:, start + r:start + 2 * r].index_select(0, cid).requires_grad_(True)
                dec_tprime.append(1.0 - t * t)  # d(1 + tanh)/do per client
                start += 2 * r
                pre = h @ P[f"base_weight.{layer}"].t()
                out = torch.addcmul(db + P[f"base_bias.{layer}"], pre, d)  # diag(d) W h + b + db
                dec_in.append(h.detach())
                dec_pre.append(pre)
                dec_d.append(d)
                dec_db.append(db)
                if layer < nd - 1:
                    h = F.silu(out)
            # Gaussian NLL with the shared log-scale as a constant: its per-sample gradient is 1 - r^2
            ls = soft_clamp(P["x_logstd"], 5.0)
            resid = (b.x - out) * torch.exp(-ls)
            nll = 0.5 * resid.pow(2).sum(-1) + (ls.sum() + 0.5 * LOG2PI * ls.numel())
            HW = hw.index_select(0, cid).requires_grad_(True)
            E = P["label_embed.weight"].index_select(0, b.y).requires_grad_(True)
            gin = torch.cat([HW, E], dim=-1)
            yg1 = F.linear(gin, P["g_omega.0.weight"], P["g_omega.0.bias"])
            sg = F.silu(yg1)
            yg2 = F.linear(sg, P["g_omega.2.weight"], P["g_omega.2.bias"])
            mu_p, logstd_p = yg2.chunk(2, dim=-1)
            kl = kl_diag_gaussians(mu_q, logvar_q, mu_p, soft_clamp(logstd_p, 5.0))
            loss = nll + kl
        with self._phase("backward"):
            inputs = enc_out + dec_pre + dec_d + dec_db + [HW, yg1, yg2, E]
            grads = torch.autograd.grad(loss.sum(), inputs)
        ne = len(enc_out)
        g_enc = grads[:ne]
        g_pre, g_d, g_db = grads[ne:ne + nd], grads[ne + nd:ne + 2 * nd], grads[ne + 2 * nd:ne + 3 * nd]
        gHW, gy1, gy2, gE = grads[ne + 3 * nd:]
        with self._phase("norms" if norms else "backward"):
            # d(loss_j)/d(o_j) for h_theta's output o, per decoder layer: (d-part, db-part); db's is g itself
            g_od = [gd * tp.index_select(0, cid) for gd, tp in zip(g_d, dec_tprime)]
            rr = resid.detach()
            gX = (1.0 - rr * rr) * (1.0 - torch.tanh(P["x_logstd"] / 5.0) ** 2)  # per-sample d/d x_logstd
            W2t, W2o = ht2.weight.detach(), ho2.weight.detach()
            ps.slices = []
            start = 0
            for r in hyper.out_sizes:
                ps.slices.append((slice(start, start + r), slice(start + r, start + 2 * r)))
                start += 2 * r
        ps.nll_sum, ps.kl_sum = float(nll.detach().sum()), float(kl.detach().sum())
        ps.enc_in, ps.g_enc, ps.dec_in, ps.g_pre, ps.g_db, ps.g_od = enc_in, g_enc, dec_in, g_pre, g_db, g_od
        ps.gHW, ps.s_t, ps.s_o, ps.u_t, ps.u_o, ps.V = gHW, s_t, s_o, u_t, u_o, V
        ps.gin, ps.sg, ps.gy1, ps.gy2, ps.gE, ps.gX = gin.detach(), sg.detach(), gy1, gy2, gE, gX
        ps.W2t, ps.W2o = W2t, W2o
        ps.W1t, ps.W1o = ht0.weight.detach(), ho0.weight.detach()
        ps.per_sample_heads = norms
        if norms:
            with self._phase("norms"):
                self._norm_pieces(ps)
        return ps

    def _norm_pieces(self, ps: PerSample) -> None:
        """Per-sample squared norms: ghost norms ||a_j||^2 ||g_j||^2 (+ ||g_j||^2 for the bias) for
        linear layers with per-sample inputs; ||G_j||^2 ||s_i||^2 for the heads' layers whose input
        s_i is shared by the client's samples; materialized small pieces (code, embedding row, x_logstd)."""
        b = ps.batch
        cid = b.cidx
        n2e = sum(_sq(ai) * _sq(gi) + _sq(gi) for ai, gi in zip(ps.enc_in, ps.g_enc))
        ps.n2_enc = n2e.reshape(-1).index_select(0, b.pad_pos)
        # shared decoder: the base weight sees g_j * d_c(j) (= the gradient of the pre-scale output)
        n2p = sum(_sq(h) * _sq(gp) + _sq(gdb) for h, gp, gdb in zip(ps.dec_in, ps.g_pre, ps.g_db))
        # h_theta: per-sample output gradient G_j (d- and db-parts of every layer), shared inputs per client
        sqO = sum(_sq(go) + _sq(gdb) for go, gdb in zip(ps.g_od, ps.g_db))
        gU_t = None
        for (sd, sdb), go, gdb in zip(ps.slices, ps.g_od, ps.g_db):
            part = go @ ps.W2t[sd] + gdb @ ps.W2t[sdb]
            gU_t = part if gU_t is None else gU_t.add_(part)
        gU_t = gU_t * _dsilu(ps.u_t).index_select(0, cid)
        gU_o = (ps.gHW @ ps.W2o) * _dsilu(ps.u_o).index_select(0, cid)
        sqV = _sq(ps.V).index_select(0, cid)
        sqUt, sqHW, sqUo = _sq(gU_t), _sq(ps.gHW), _sq(gU_o)
        n2p = n2p + sqO * (_sq(ps.s_t).index_select(0, cid) + 1.0) + sqUt * (sqV + 1.0)
        n2p = n2p + sqHW * (_sq(ps.s_o).index_select(0, cid) + 1.0) + sqUo * (sqV + 1.0)
        # g_omega (per-sample inputs), the label-embedding row, x_logstd
        n2p = n2p + _sq(ps.gy1) * (_sq(ps.gin) + 1.0) + _sq(ps.gy2) * (_sq(ps.sg) + 1.0) + _sq(ps.gE)
        ps.n2_phi = n2p + _sq(ps.gX)
        # the code v_i: materialized per sample (d_v is small)
        ps.gU_t, ps.gU_o = gU_t, gU_o
        ps.gV = gU_t @ ps.W1t + gU_o @ ps.W1o
        ps.n2_code = _sq(ps.gV)

    def norms(self, ps: PerSample, mode: str) -> torch.Tensor:
        """Per-sample norm of the privatized gradient: (psi_i, v_i, Phi) jointly in strict mode, Phi in paper."""
        n2 = ps.n2_phi + ps.n2_enc + ps.n2_code if mode == "strict" else ps.n2_phi
        return n2.clamp_min(0.0).sqrt()

    def encoder_sums(self, ps: PerSample, c: Optional[torch.Tensor]) -> list:
        """Per-client sum_j c_j * grad_j of every encoder parameter: (M, *shape) each (c None: unclipped)."""
        b = ps.batch
        cp = None
        if c is not None:
            cp = c.new_zeros(self.M * b.bmax).index_copy_(0, b.pad_pos, c).view(self.M, b.bmax, 1)
        out = []
        for a, g in zip(ps.enc_in, ps.g_enc):
            cg = g if cp is None else g * cp
            out.append(torch.bmm(cg.transpose(1, 2), a))
            out.append(cg.sum(1))
        return out

    def _seg(self, t: torch.Tensor, rho: Optional[torch.Tensor], cidx: torch.Tensor) -> torch.Tensor:
        """Per-client sums of (rho-weighted) rows: (M, k)."""
        return t.new_zeros(self.M, t.shape[1]).index_add_(0, cidx, t if rho is None else t * rho[:, None])

    def _head_grads(self, ps: PerSample, rho: Optional[torch.Tensor]):
        """Per-client rho-weighted sums of h_theta's output gradient (M, 2 sum r) and of the heads'
        pre-activation gradients (M, hh) each."""
        cid = ps.batch.cidx
        go = torch.cat([torch.cat([self._seg(a, rho, cid), self._seg(g, rho, cid)], 1)
                        for a, g in zip(ps.g_od, ps.g_db)], 1)
        gw = self._seg(ps.gHW, rho, cid)
        if ps.per_sample_heads:
            gu_t, gu_o = self._seg(ps.gU_t, rho, cid), self._seg(ps.gU_o, rho, cid)
        else:  # linear in the output gradient: reduce per client first (M rows instead of B)
            gu_t = (go @ ps.W2t) * _dsilu(ps.u_t)
            gu_o = (gw @ ps.W2o) * _dsilu(ps.u_o)
        return go, gu_t, gw, gu_o

    def code_sums(self, ps: PerSample, c: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-client sum_j c_j * d(loss_j)/d(v_i): (M, d_v) (c None: unclipped)."""
        if ps.per_sample_heads:
            g = ps.gV if c is None else ps.gV * c[:, None]
            return self.codes.new_zeros(self.codes.shape).index_add_(0, ps.batch.cidx, g)
        assert c is None, "clipped code sums need per-sample norms"
        _, gu_t, _, gu_o = self._head_grads(ps, None)
        return gu_t @ ps.W1t + gu_o @ ps.W1o

    @staticmethod
    def _wsum(g: torch.Tensor, a: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """sum_j rho_j g_j a_j^T as one matmul, scaling the narrower of the two."""
        if g.shape[1] <= a.shape[1]:
            return (g * rho[:, None]).t() @ a
        return g.t() @ (a * rho[:, None])

    def phi_sums(self, ps: PerSample, hyper: HyperNetwork, rho: torch.Tensor) -> dict:
        """sum_j rho_j * (per-sample gradient of sample j) for every Phi parameter, by book-keeping:
        one matmul per weight with the row weights rho (clip factor x public client coefficient)."""
        b = ps.batch
        out = {}
        for layer, (h, gp, g) in enumerate(zip(ps.dec_in, ps.g_pre, ps.g_db)):
            out[f"base_weight.{layer}"] = self._wsum(gp, h, rho)
            out[f"base_bias.{layer}"] = g.t() @ rho
        go, gu_t, gw, gu_o = self._head_grads(ps, rho)
        for head, g_out, g_u, s in (("h_theta", go, gu_t, ps.s_t), ("h_omega", gw, gu_o, ps.s_o)):
            out[f"{head}.2.weight"], out[f"{head}.2.bias"] = g_out.t() @ s, g_out.sum(0)
            out[f"{head}.0.weight"], out[f"{head}.0.bias"] = g_u.t() @ ps.V, g_u.sum(0)
        out["g_omega.0.weight"], out["g_omega.0.bias"] = self._wsum(ps.gy1, ps.gin, rho), ps.gy1.t() @ rho
        out["g_omega.2.weight"], out["g_omega.2.bias"] = self._wsum(ps.gy2, ps.sg, rho), ps.gy2.t() @ rho
        emb = hyper.label_embed.weight
        out["label_embed.weight"] = emb.new_zeros(emb.shape).index_add_(0, b.y, ps.gE * rho[:, None])
        out["x_logstd"] = ps.gX.t() @ rho
        return out

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
                d = {"hyper." + n: t.clone() for n, t in zero.items()}
                if mode == "strict":
                    d.update({"encoder." + n: torch.zeros_like(t[0]) for n, t in zip(self.enc_names, self.enc_params)})
                    d["code"] = torch.zeros_like(self.codes[0])
                res.append(d)
            return res, [torch.zeros(0) for _ in range(self.M)]
        ps = self.per_sample(hyper, b)
        norms = self.norms(ps, mode)
        c = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
        enc = self.encoder_sums(ps, c) if mode == "strict" else None
        code = self.code_sums(ps, c) if mode == "strict" else None
        res, per_norms = [], []
        for i in range(self.M):
            rho = c * (b.cidx == i).to(c.dtype)
            d = {"hyper." + n: t for n, t in self.phi_sums(ps, hyper, rho).items()}
            if mode == "strict":
                d.update({"encoder." + n: t[i] for n, t in zip(self.enc_names, enc)})
                d["code"] = code[i]
            res.append(d)
            per_norms.append(norms[b.cidx == i])
        return res, per_norms

    # ------------------------------------------------------------------ one DP step of every client
    def _sample(self, gens: list) -> Batch:
        """Each client's Poisson coins and reparameterization noise, from its own generator (CPU),
        with the reference's calls in the reference's order."""
        m = self.cfg.model
        q = self.cfg.privacy.sample_rate
        idxs, epss, counts = [], [], []
        for n, g in zip(self.sizes, gens):
            idx = poisson_sample(n, q, g)
            idxs.append(idx)
            counts.append(len(idx))
            epss.append(torch.randn(len(idx), m.latent_dim, generator=g))
        ct = torch.tensor(counts, dtype=torch.long)
        gidx = torch.cat(idxs) + torch.repeat_interleave(self.offsets_t, ct)
        gidx = gidx.to(self.device)
        return Batch.build(self.X.index_select(0, gidx), self.Y.index_select(0, gidx),
                           torch.cat(epss).to(self.device), counts, self.device)

    def _noise(self, gens: list, names: list, std: float, phi_coef: torch.Tensor, phi_layout: dict, P: int):
        """Every client's N(0, 1) draws for its privatized parameters, in sorted-name order, one
        `normal_` per tensor of that tensor's shape (the calls of `add_noise_and_scale`), on the CPU.
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
            enc_shapes = {"encoder." + n: tuple(t.shape[1:]) for n, t in zip(self.enc_names, self.enc_params)}
            enc_noise = {n: torch.empty((M, *s), dtype=dt) for n, s in enc_shapes.items() if n in names}
            code_noise = torch.empty(M, self.codes.shape[1], dtype=dt) if "code" in names else None
            bounds = [round(k * M / workers) for k in range(workers + 1)]
            rows = [torch.empty(P, dtype=dt) for _ in range(workers)]
            views = []
            for w in range(workers):
                for i in range(bounds[w], bounds[w + 1]):
                    vi = []
                    for name in key[0]:
                        if name.startswith("hyper."):
                            off, shape = phi_layout[name[len("hyper."):]]
                            vi.append(rows[w][off:off + _numel(shape)].view(shape))
                        else:
                            vi.append(code_noise[i] if name == "code" else enc_noise[name][i])
                    views.append(vi)
            accs = [torch.zeros(P, dtype=torch.float64) for _ in range(workers)]
            wides = [torch.empty(min(P, _SERIAL), dtype=torch.float64) for _ in range(workers)]
            self._noise_buf = (enc_noise, code_noise, bounds, rows, views, accs, wides)
        enc_noise, code_noise, bounds, rows, views, accs, wides = self._noise_buf
        coef = phi_coef.tolist()

        def block(w: int) -> None:
            row, acc, wide = rows[w], accs[w], wides[w]
            acc.zero_()
            for i in range(bounds[w], bounds[w + 1]):
                g = gens[i]
                for t in views[i]:
                    t.normal_(generator=g)
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
        """lambda_v ||v_i||^2 + lambda_mmd * MMD_i (DP-MERF), batched over clients: gradients with
        respect to each code v_i and sum_i w_i * d(post_i)/d(Phi); the synthetic noise is drawn from
        each client's generator after the DP noise, as in Client._post_noise_loss."""
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
        mods = hyper.decoder_modulation(V)  # [(d (M, r), db (M, r))]
        hw = hyper.prior_features(V)  # (M, hh)
        e = hyper.label_embed(syn_y)  # (n, le)
        gin = torch.cat([hw[:, None, :].expand(-1, n, -1), e[None].expand(self.M, -1, -1)], -1)
        mu_p, logstd_p = hyper.g_omega(gin).chunk(2, dim=-1)
        zz = mu_p + soft_clamp(logstd_p, 5.0).exp() * syn_z
        h = torch.cat([zz, one_hot(syn_y, K, zz.dtype)[None].expand(self.M, -1, -1)], -1)
        nl = len(hyper.base_weight)
        for layer, (w, bias, (d, db)) in enumerate(zip(hyper.base_weight, hyper.base_bias, mods)):
            h = (h @ w.t()) * d[:, None, :] + bias + db[:, None, :]
            if layer < nl - 1:
                h = F.silu(h)
        x_hat = h + hyper.output_logstd().exp() * syn_x
        phi = features(x_hat.reshape(self.M * n, dx)).reshape(self.M, K, spc, -1).mean(2)
        mmd = features.kernel_scale * (self.mmd_weights * (phi - self.mmd_target).pow(2).sum(-1)).sum(-1)  # (M,)
        post = loss + m.lambda_mmd * mmd
        (gv,) = torch.autograd.grad(post.sum(), [V], retain_graph=True)
        wsum = (post * phi_coef_w.to(post.dtype)).sum()
        gphi = torch.autograd.grad(wsum, params, allow_unused=True)
        phi = {nm: g for nm, g in zip(names, gphi) if g is not None}
        return gv, phi, float(mmd.detach().sum())

    def _adam(self, params, grads, ms, vs, steps, hp) -> None:
        """torch.optim.Adam's update (single-tensor form) on (M, ...) stacks with per-client step
        counts: elementwise the same arithmetic as one Adam per client."""
        b1, b2 = hp["betas"]
        steps += 1  # in place: the clients' step tensors are views
        for k, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
            col = steps[:, k]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if bool((col == col[0]).all()):  # the usual case: every client has taken as many steps
                s = float(col[0])
                step_size = hp["lr"] / (1 - b1 ** s)
                denom = v.sqrt().div_(math.sqrt(1 - b2 ** s)).add_(hp["eps"])
                p.addcdiv_(m, denom, value=-step_size)
                continue
            s = col.double()
            shape = (-1,) + (1,) * (p.dim() - 1)
            step_size = (hp["lr"] / (1 - b1 ** s)).to(device=p.device, dtype=p.dtype).view(shape)
            bc2_sqrt = (1 - b2 ** s).sqrt().to(device=p.device, dtype=p.dtype).view(shape)
            denom = v.sqrt().div_(bc2_sqrt).add_(hp["eps"])
            p.sub_(torch.div(m, denom, out=denom).mul_(step_size))

    def step(self, hyper: HyperNetwork, round_: int, step: int, *, sigma: float, features=None, epoch: int = 0):
        """One DP step of every client: `release(prepare(...))`. Returns (sum_i w_i * noisy Phi gradient_i as
        one fp64 vector in hyper.named_parameters() order, summed diagnostics (client.DIAG_KEYS))."""
        return self.release(self.prepare(hyper, round_, step, epoch=epoch), sigma=sigma, features=features)

    def prepare(self, hyper: HyperNetwork, round_: int, step: int, *, epoch: int = 0) -> "PendingBatch":
        """Every client's step up to the noise: coins, the batched forward/backward, per-sample norms, the
        clipped sums. Nothing is released and no state changes (the release guard runs in between)."""
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
            b = self._sample(gens)
        B = len(b.y)
        diag = torch.zeros(len(DIAG_KEYS), dtype=torch.float64)
        diag[DIAG_KEYS.index("batch")] = B
        diag[DIAG_KEYS.index("clients")] = M
        coef = self.weights / self.expected  # w_i / (q n~_i): public
        coef_dev = coef.to(device=self.device, dtype=torch.float32)
        ps = self.per_sample(hyper, b, norms=p.enabled) if B > 0 else None
        strict = p.enabled and p.mode == "strict"
        with self._phase("clip"):
            if ps is None:
                enc_sum = [torch.zeros_like(t) for t in self.enc_params]
                code_sum = torch.zeros_like(self.codes)
                phi = self._empty_phi(hyper)
            else:
                c = None
                if p.enabled:
                    norms = self.norms(ps, p.mode)
                    c = (p.clip_norm / (norms + 1e-6)).clamp(max=1.0)
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

        std = sigma * p.clip_norm
        with self._phase("noise"):
            if p.enabled and std > 0:
                names = ["code"] + ["encoder." + n for n in self.enc_names] if strict else []
                names += ["hyper." + n for n in hyper_names]
                enc_noise, code_noise, phi_noise = self._noise(gens, names, std, self.weights * std / self.expected,
                                                               layout, P)
                phi_vec += phi_noise
                if strict:
                    enc_grad = [per_client(s.add_(enc_noise["encoder." + n].to(self.device), alpha=std))
                                for n, s in zip(self.enc_names, enc_sum)]
                    code_grad = per_client(code_sum.add_(code_noise.to(self.device), alpha=std))
            if not (p.enabled and std > 0 and strict):
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
            radius = cfg.model.code_radius
            nrm = self.codes.norm(dim=1)
            self.codes.mul_(torch.where(nrm > radius, radius / nrm, torch.ones_like(nrm))[:, None])
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
