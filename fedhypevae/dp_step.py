"""THE DP step: one class, :class:`DPStep`, whose stages run on a block of clients (`block.ClientBlock`).

Stages, in the order one step runs them (each a method a subclass may override; the module-level functions
below are the arithmetic they use, shared with the baselines):

  sample -> per_sample -> clip_and_accumulate          (prepare: nothing released, nothing changed)
         -> add_noise -> scale -> released -> post_noise -> local_update   (release)

There is no second spelling of the step. The trainer runs it on a block of every client of a rank (or one
block per client when each steps its own copy of Phi), `Client.step` on a block of one, the white-box audit
with its canaries and sabotages as stage overrides, the sensitivity check with its neighbouring data set and
replayed history as stage overrides. The per-sample stage has two forms of the same rows (`rows.Rows`):
ghost norms (`engine.GhostRows`, `train.engine: batched`, the default) and torch.func per-sample gradients
(`rows.MaterializedRows`, `train.engine: reference`); everything else is written once.

The privacy argument rests on three facts checked by the tests:
  * each sample's gradient over everything that is privatized is clipped to norm C, so adding or removing
    one record changes its client's clipped sum by at most C and no other client's at all;
  * Gaussian noise N(0, sigma^2 C^2) is added to every privatized coordinate of every client, also when its
    Poisson batch is empty (the step is still released and charged);
  * each client's sum is divided by its *expected* batch size q * n_declared, a public constant: dividing by
    the realized batch size (or a true client size) would leak it.

What leaves the block is sum_i w_i * (client i's noisy Phi gradient + its post-noise terms), w_i public (the
aggregation rule's weight of client i: its Eq. 10 weight under `grad`, 1 for a block of one that steps its own
Phi). With M > 1 the weights and the normalizers are folded into the row weights, so no per-client Phi sum is
ever formed; with M = 1 the client's sum is divided by q * n_declared as written.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .block import ClientBlock
from .engine import GhostRows, ghost_refusal
from .model import (
    PHI_PREFIX,
    merf_mmd,
    mmd_bandwidths,
    multi_kernel,
    project_codes,
    sample_synthetic,
)
from .rng import client_seeds, secret_generators
from .rows import Batch, MaterializedRows, NoRows, Rows, per_sample_grads

__all__ = [
    "DIAG_KEYS",
    "BLOCKS",
    "PER_SAMPLE",
    "DPStep",
    "Draw",
    "Sums",
    "PendingBatch",
    "StepRelease",
    "NoiseSpec",
    "add_noise",
    "add_noise_and_scale",
    "block_of",
    "clip_and_sum",
    "clip_factor",
    "noise_blocks",
    "per_sample_grads",
    "poisson_sample",
    "sample_norms",
    "scale",
    "summed_phi_noise",
]

# diagnostics carried per step: sums over the block's rows (outside the guarantee)
DIAG_KEYS = ("nll_sum", "kl_sum", "batch", "clipped", "mmd", "clients")
BLOCKS = ("private", "phi")  # the client's own coordinates (psi_i, v_i) and Phi's
# train.engine -> the form of the per-sample stage
PER_SAMPLE = {"batched": "ghost", "reference": "materialized"}
PHASES = ("sample", "forward", "backward", "norms", "clip", "noise", "post", "optimizer")
_PHI_SUM_TAG = 0x5A3  # the summed Phi noise's tag, mixed with the first client's generator seed
_PHI_GROUP = 64  # clients whose Phi noise is summed in fp32 (one matrix-vector product) before the fp64 total
_POST_GROUP = 128  # clients whose post-noise MMD term is one forward and one backward pass


# ------------------------------------------------------------------------------------------ the arithmetic


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson batch: each record taken independently with probability `rate`."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate, as_tuple=False).flatten()


def sample_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each sample's gradient over all privatized parameters jointly."""
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
    return sq.sqrt()


def clip_factor(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """min(1, C / (||g_j|| + 1e-6)) per sample: the one clip factor."""
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_sum(grads: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each sample's joint gradient to norm <= C and sum over the batch (the baselines' step).
    Returns the clipped sums and the per-sample norms (before clipping)."""
    norms = sample_norms(grads)
    factor = clip_factor(norms, clip_norm)
    return {n: torch.einsum("b,b...->...", factor, g) for n, g in grads.items()}, norms


@dataclass
class NoiseSpec:
    noise_multiplier: float
    clip_norm: float
    expected_batch: float  # q * n_declared: public


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
    """sum + N(0, std^2 I) per parameter, drawn in sorted parameter order (the baselines' noise; the DP step
    draws the same way, see DPStep.add_noise). `std` is one value or {name: std}; std 0 draws nothing."""
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
    """(sum + N(0, sigma^2 C^2 I)) / (q n_declared), in a fixed parameter order."""
    return scale(
        add_noise(summed, std=spec.noise_multiplier * spec.clip_norm, generator=generator), spec.expected_batch
    )


# ------------------------------------------------------------------------------------------ what a step holds


@dataclass
class Draw:
    """One client's draws of one step before any record is used."""

    idx: torch.Tensor  # the realized Poisson batch: indices into the client's data
    eps: torch.Tensor  # (len(idx), d_z) reparameterization noise, one row per sampled record
    syn: tuple = ()  # literal MMD: the synthetic batch's (labels, latent noise, output noise); else ()


@dataclass
class Sums:
    """A block's sums of one step: every client's over its own coordinates, and the block's Phi sum."""

    enc: list  # (M, *shape) per encoder parameter
    code: torch.Tensor  # (M, d_v)
    phi: torch.Tensor  # (P,) fp64: sum_i a_i * (client i's sum over Phi), a_i the step's public coefficients
    layout: tuple  # ((Phi parameter name, shape), ...) in the order of `phi`: public

    def clone(self) -> Sums:
        return Sums(
            [t.detach().clone() for t in self.enc], self.code.detach().clone(), self.phi.detach().clone(), self.layout
        )


@dataclass
class PendingBatch:
    """The step of every client of a block computed up to the noise (`DPStep.prepare`). Nothing in it has been
    released."""

    hyper: object
    gens: list  # the clients' generators: they continue with the noise draws
    draws: list  # Draw per client
    sums: Sums  # privatized: clipped pre-noise sums; paper mode's psi_i, v_i and privacy off: plain sums
    norms: torch.Tensor | None  # per-row norms before clipping (None without privacy)
    diag: torch.Tensor
    strict: bool

    def payload(self) -> list:
        """What the ledger's digest covers: the block's pre-noise Phi sum (the only Phi value that leaves the
        block) and, in strict mode, every client's clipped sums over psi_i and v_i (its private state's input)."""
        return [self.sums.phi] + (list(self.sums.enc) + [self.sums.code] if self.strict else [])


@dataclass
class StepRelease:
    phi: torch.Tensor  # (P,) fp64: sum_i w_i (noisy Phi gradient of client i + its post-noise terms), Phi's order
    diag: torch.Tensor  # len(DIAG_KEYS)


def summed_phi_noise(privacy) -> bool:
    """Whether a block of several clients draws its Phi noise as ONE Gaussian of the summed variance
    (`DPStep._noise`): local trust with secure noise (with privacy.noise_seed or another trust model, per client)."""
    return privacy.noise_seed is None and privacy.trust_model == "local"


# how each version drew a step's noise (the ledger's digests start with "noise<N>:"; format 1 wrote no prefix)
NOISE_FORMATS = {
    1: "one draw per parameter tensor",
    2: "generators seeded with 32 bits of the seed",
    3: "one flat draw per client from a generator seeded with all 63 bits",  # DPStep._noise, rng.secret_generators
}
NOISE_FORMAT = 3


class NoiseDraws:
    """The scratch buffer the DP noise is drawn into (one chunk's worth: chunks of a trainer share it) and the
    threads that draw it. `noise_threads` clients' rows are drawn in parallel; each thread runs serial kernels only.
    Default: torch's thread count (the `threads` setting where given), at most the usable cores and 8 — a process
    told to use one core draws in its own thread, and ranks that share a node's cores do not each start a thread
    per core."""

    def __init__(self, threads: int | None = None):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        default = min(8, cores, torch.get_num_threads())
        self.noise_threads = max(1, default) if threads is None else max(1, int(threads))
        self._buf = torch.empty(0)
        self._sum = torch.empty(0)
        self._pool: ThreadPoolExecutor | None = None

    def rows(self, M: int, D: int) -> torch.Tensor:
        """An (M, D) fp32 view of the scratch (grown when needed, never shrunk)."""
        if self._buf.numel() < M * D:
            self._buf = torch.empty(M * D, dtype=torch.float32)
        return self._buf[: M * D].view(M, D)

    def vector(self, P: int) -> torch.Tensor:
        """A (P,) fp32 scratch for a block's summed Phi noise (apart from the rows, which hold the private draws)."""
        if self._sum.numel() < P:
            self._sum = torch.empty(P, dtype=torch.float32)
        return self._sum[:P]

    def workers(self, M: int) -> tuple:
        workers = max(1, min(self.noise_threads, M))
        if workers > 1 and (self._pool is None or self._pool._max_workers != workers):
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedhypevae-noise")
        return workers, self._pool


# ------------------------------------------------------------------------------------------ the step


class DPStep:
    """THE DP step of a block of clients. ``weights[i]`` is client i's public weight w_i in what leaves the
    block; ``per_sample`` the form of the per-sample stage ("ghost" or "materialized"; "ghost" falls back to
    "materialized", said in ``note``, for a loss the ghost rows cannot compute).

    Two drivers, so that the trainer's release guard can stand between them:

    * :meth:`prepare` (nothing released, no state changed): :meth:`sample` (per client: Poisson coins, then the
      reparameterization noise, then the literal-MMD synthetic noise, from the client's generator) ->
      :meth:`per_sample` (the rows' gradients) -> :meth:`clip_and_accumulate` (strict: psi_i, v_i and Phi
      jointly; paper: Phi; privacy off: plain sums) -> a :class:`PendingBatch`.
    * :meth:`release`: :meth:`add_noise` -> :meth:`scale` -> :meth:`released` -> :meth:`post_noise` (terms
      that touch no private data) -> :meth:`local_update` of every client's psi_i and v_i -> the
      :class:`StepRelease` that leaves the block.

    Every stage is a method a subclass may override (like the stages of Opacus' DP optimizer); the drivers fix
    their order and each generator's draw order (coins, eps, synthetic noise, DP noise in sorted parameter
    order, post-noise synthetic noise), which any override must keep for its release to stay reproducible.
    Overrides in this code base: the white-box audit's canaries (per_sample) and sabotages
    (clip_and_accumulate, add_noise) in ``fedhypevae.audit``; the sensitivity check's neighbouring data set,
    replayed history and negative controls (sample, released, local_update, per_sample) in
    ``fedhypevae.privacy.sensitivity``. Override stages, not the drivers. The step holds no client state:
    everything it reads and updates is the block's.
    """

    def __init__(self, block: ClientBlock, *, weights, per_sample: str = "ghost", draws: NoiseDraws | None = None):
        if per_sample not in ("ghost", "materialized"):
            raise ValueError(f"per_sample must be ghost or materialized; got {per_sample!r}")
        self.block, self.cfg = block, block.cfg
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        if self.weights.shape != (block.M,):
            raise ValueError(f"{block.M} clients need {block.M} weights; got {len(self.weights)}")
        self.note = ghost_refusal(self.cfg) if per_sample == "ghost" else None
        self.per_sample_kind = "materialized" if self.note else per_sample
        # Phi's sum is sum_i a_i * (client i's sum), then divided by phi_divisor: with one client the division by
        # q * n_declared is written as such; with more, w_i / (q n_i) is folded into the row weights
        if block.M == 1:
            self.phi_coef, self.phi_divisor = self.weights.clone(), float(block.expected[0])
        else:
            self.phi_coef, self.phi_divisor = self.weights / block.expected, 1.0
        self.phi_noise_summed = summed_phi_noise(self.cfg.privacy) and block.M > 1  # see `_noise`
        self.timings = {k: 0.0 for k in PHASES}
        self.profile = False  # per-phase timings (synchronizes CUDA between phases when on)
        self.draws = draws if draws is not None else NoiseDraws()  # the noise scratch (shared by a trainer's chunks)

    # -- drivers --------------------------------------------------------------------------------------
    def prepare(self, hyper, round_: int, step: int, *, epoch: int = 0, gens: list | None = None) -> PendingBatch:
        """Every client's step up to the noise: coins, per-sample gradients, clipping, the sums. No state changes.
        `gens`: the clients' generators (default: their own streams for (round, step, epoch))."""
        block, p = self.block, self.cfg.privacy
        with self._phase("sample"):
            gens = gens if gens is not None else block.generators(round_, step, epoch)
            draws = self.sample(gens)
            batch = self.batch(draws)
        rows = self.per_sample(hyper, batch)
        sums, norms = self.clip_and_accumulate(rows)
        diag = torch.zeros(len(DIAG_KEYS), dtype=torch.float64)
        diag[DIAG_KEYS.index("batch")] = sum(len(d.idx) for d in draws)
        diag[DIAG_KEYS.index("clients")] = block.M
        diag[DIAG_KEYS.index("nll_sum")] = rows.nll_sum
        diag[DIAG_KEYS.index("kl_sum")] = rows.kl_sum
        if norms is not None and len(batch.y):
            diag[DIAG_KEYS.index("clipped")] = float((norms[: len(batch.y)] > p.clip_norm).sum())
        return PendingBatch(hyper, gens, draws, sums, norms, diag, p.enabled and p.mode == "strict")

    def release(self, pending: PendingBatch, *, sigma, features=None) -> StepRelease:
        """Noise, the post-noise terms and every client's local update of psi_i and v_i; returns what leaves the
        block. `sigma`: one noise multiplier, or one per block (`noise_blocks`). The pending sums are consumed
        (noised and scaled in place): whoever needs the pre-noise payload afterwards copies it first."""
        with self._phase("noise"):
            noisy = pending.sums
            if self.cfg.privacy.enabled:
                noisy = self.add_noise(noisy, sigma=sigma, gens=pending.gens)
            noisy = self.scale(noisy)
        noisy = self.released(pending, noisy)
        # terms that do not touch private data are added after the noise (post-processing)
        with self._phase("post"):
            gv, gphi, mmd = self.post_noise(pending.hyper, pending.gens, features)
        phi = noisy.phi.add_(gphi) if gphi is not None else noisy.phi
        with self._phase("optimizer"):
            self.local_update(noisy.enc, noisy.code + gv)
        diag = pending.diag.clone()
        diag[DIAG_KEYS.index("mmd")] = mmd
        return StepRelease(phi, diag)

    def step(self, hyper, round_: int, step: int, *, sigma, features=None, epoch: int = 0) -> StepRelease:
        return self.release(self.prepare(hyper, round_, step, epoch=epoch), sigma=sigma, features=features)

    # -- prepare's stages ------------------------------------------------------------------------------
    def sample(self, gens: list) -> list:
        """Per client a :class:`Draw`: its realized Poisson batch, the reparameterization noise (one row per
        sampled record) and, for the literal MMD term, the synthetic batch's noise; drawn on the CPU from the
        client's generator in this order (the same numbers on any device). Override to change the realized
        batch (the sensitivity check's D minus one record: the same coins, one record fewer)."""
        m, q, b = self.cfg.model, self.cfg.privacy.sample_rate, self.block
        literal = self.literal_mmd()
        # every client's coins are what `poisson_sample` draws (torch.rand(n, generator=g): uniform_ on n floats), into
        # one flat buffer in the block's record order: the comparison, the selection and the split into clients are
        # then one operation each for the whole block instead of three per client
        coins = torch.empty(sum(b.sizes))
        for off, n, g in zip(b.offsets, b.sizes, gens):
            coins[off : off + n].uniform_(generator=g)
        picked = torch.nonzero(coins < q).flatten()  # ascending: client-major, each client's records in order
        owner = torch.bucketize(picked, b.offsets_t, right=True) - 1
        counts = torch.bincount(owner, minlength=b.M).tolist()
        idxs = (picked - b.offsets_t[owner]).split(counts)
        out = []
        for idx, g in zip(idxs, gens):
            eps = torch.randn(len(idx), m.latent_dim, generator=g)
            out.append(Draw(idx, eps, self.synthetic_noise(g) if literal else ()))
        return out

    def batch(self, draws: list) -> Batch:
        """The rows of the draws, concatenated client-major (not a stage: bookkeeping)."""
        b = self.block
        counts = [len(d.idx) for d in draws]
        ct = torch.tensor(counts, dtype=torch.long)
        gidx = (torch.cat([d.idx for d in draws]) + torch.repeat_interleave(b.offsets_t, ct)).to(b.device)
        syn = [tuple(t.to(b.device) for t in d.syn) for d in draws]
        return Batch.build(
            b.X.index_select(0, gidx),
            b.Y.index_select(0, gidx),
            torch.cat([d.eps for d in draws]).to(b.device),
            counts,
            b.device,
            syn,
        )

    def per_sample(self, hyper, batch: Batch) -> Rows:
        """The rows' per-sample gradients (`rows.Rows`): ghost norms or torch.func. Override to add rows that
        go through clipping and noise like records (the audit's canaries) or to change the inputs (a
        negative control)."""
        if len(batch.y) == 0:
            return NoRows(self.block, hyper)
        if self.per_sample_kind == "ghost":
            return GhostRows(self.block, hyper, batch, per_sample=self.cfg.privacy.enabled, phase=self._phase)
        with self._phase("backward"):
            literal = (self.cfg.model.lambda_mmd, self.bandwidths()) if self.literal_mmd() else None
            return MaterializedRows(self.block, hyper, batch, literal_mmd=literal)

    def clip_and_accumulate(self, rows: Rows) -> tuple[Sums, torch.Tensor | None]:
        """(sums, norms): every row clipped to its joint norm <= C over what is privatized and accumulated per
        client; norms before clipping. This is what bounds one record's influence by C."""
        p = self.cfg.privacy
        if not p.enabled:
            return self.accumulate(rows, None), None
        with self._phase("norms"):
            norms = rows.norms(p.mode == "strict")
        return self.accumulate(rows, clip_factor(norms, p.clip_norm)), norms

    def accumulate(self, rows: Rows, c: torch.Tensor | None) -> Sums:
        """The sums of the rows weighted by the factors `c` (None: unweighted). Strict mode weights the client's
        own coordinates too; paper mode and privacy off sum them plainly. Bookkeeping of the clip stage."""
        p = self.cfg.privacy
        with self._phase("clip"):
            strict = p.enabled and p.mode == "strict"
            enc, code = rows.private_sums(c if strict else None)
            coef = self.phi_coef.to(device=self.block.device, dtype=torch.float32).index_select(0, rows.cidx)
            phi = rows.phi_sum(coef if c is None else coef * c).double().cpu()
        return Sums(enc, code, phi, tuple((n, tuple(t.shape)) for n, t in rows.hyper.named_parameters()))

    # -- release's stages ------------------------------------------------------------------------------
    def add_noise(self, sums: Sums, *, sigma, gens: list) -> Sums:
        """sum + N(0, sigma^2 C^2 I) on every privatized coordinate of every client (strict: psi_i, v_i and Phi;
        paper: Phi), also for an empty batch: drawn from the client's own generator, one `normal_` per client
        over all its privatized coordinates (`_noise`; under local trust with secure noise the block's Phi noise is
        one draw of the summed variance). `sigma` is one multiplier or one per block (`noise_blocks`: the
        client's own coordinates and Phi's, as the aggregation rule places them). Override only to change the
        noise (the audit's no-noise sabotage)."""
        p = self.cfg.privacy
        blocks, C = noise_blocks(sigma), p.clip_norm
        std = blocks["private"] * C if p.mode == "strict" else 0.0
        std_phi = blocks["phi"] * C
        if std == 0 and std_phi == 0:
            return sums
        enc_noise, code_noise, phi_noise = self._noise(gens, std > 0, std_phi > 0, self.phi_coef * std_phi, sums.layout)
        dev = self.block.device
        if std > 0:  # in place: a release consumes its pending sums (the guard digested them before)
            for s, z in zip(sums.enc, enc_noise):
                s.add_(z.to(dev), alpha=std)
            sums.code.add_(code_noise.to(dev), alpha=std)
        if std_phi > 0:
            sums.phi.add_(phi_noise)
        return sums

    def scale(self, noisy: Sums) -> Sums:
        """Divide every client's sums by its public normalizer q * n_declared (never the realized batch size);
        in place, like the noise."""
        e = self.block.expected.to(self.block.device)
        for t in [*noisy.enc, noisy.code]:
            t.div_(e.to(t.dtype).view((-1,) + (1,) * (t.dim() - 1)))
        if self.phi_divisor != 1.0:
            noisy.phi.div_(self.phi_divisor)
        return noisy

    def released(self, pending: PendingBatch, noisy: Sums) -> Sums:
        """The noisy values the rest of the step continues from (the post-noise terms are added to them and the
        local update follows them): these, unchanged. Override to observe them, or to substitute a given
        released history (the sensitivity check on D minus one record)."""
        return noisy

    def post_noise(self, hyper, gens: list, features):
        """(d/dv_i, sum_i w_i d/dPhi, summed value of the MMD term) of lambda_v ||v_i||^2 plus the data-free part
        of the MMD term (literal: the synthetic-synthetic kernel mean; merf: the distance to the client's DP mean
        embeddings), batched over clients with the model's own `sample_synthetic` and `merf_mmd`, `_POST_GROUP`
        clients at a time (one forward and one backward pass per group: the synthetic batch's activations of a
        group stay in cache, those of a whole chunk would not). Post-processing: no private record enters; the
        synthetic noise comes from each client's generator after the DP noise."""
        m, block = self.cfg.model, self.block
        if m.lambda_mmd <= 0:
            V = block.codes.detach().clone().requires_grad_(True)
            (gv,) = torch.autograd.grad((m.lambda_v * V.pow(2).sum(1)).sum(), [V])
            return gv, None, 0.0
        if m.mmd_kind != "literal" and (features is None or block.mmd_target is None):
            raise ValueError(
                "model.lambda_mmd > 0 (merf) needs the random features and every client's released "
                "mean embeddings (Trainer._release_mmd_embeddings) before the first step"
            )
        params = [p for _, p in hyper.named_parameters()]
        gvs, gphi, total = [], None, 0.0
        for lo in range(0, block.M, _POST_GROUP):
            hi = min(block.M, lo + _POST_GROUP)
            gv, flat, mmd = self._post_group(hyper, params, gens[lo:hi], features, lo, hi)
            gvs.append(gv)
            gphi = flat if gphi is None else gphi.add_(flat)
            total += mmd
        return torch.cat(gvs), gphi, total

    def _post_group(self, hyper, params: list, gens: list, features, lo: int, hi: int):
        """post_noise for the block's clients lo..hi-1: (their d/dv_i, sum_i w_i d/dPhi in fp64, their MMD sum)."""
        m, block = self.cfg.model, self.block
        V = block.codes[lo:hi].detach().clone().requires_grad_(True)
        loss = m.lambda_v * V.pow(2).sum(1)
        syn_y, syn_z, syn_x = (t.to(block.device) for t in self.synthetic_batch(gens))
        # (G, 1, r): one row per client (None: a decoder without modulation, a prior without the code)
        mods = [(None, None) if d is None else (d[:, None], db[:, None]) for d, db in hyper.decoder_modulation(V)]
        hw = hyper.prior_features(V)
        x_hat = sample_synthetic(hyper, mods, None if hw is None else hw[:, None], syn_y, syn_z, syn_x)  # (G, n, d_x)
        if m.mmd_kind == "literal":
            mmd = multi_kernel(x_hat, x_hat, self.bandwidths()).mean((-2, -1))
        else:
            spc = m.mmd_synthetic_per_class
            x_hat = x_hat.reshape(hi - lo, block.K, spc, -1)
            mmd = merf_mmd(features, x_hat, block.mmd_target[lo:hi], block.mmd_weights[lo:hi])
        post = loss + m.lambda_mmd * mmd
        w = self.weights[lo:hi].to(post.dtype).to(post.device)
        if bool((w > 0).all()):
            # ONE backward pass for both: client i's term depends on Phi and on its own v_i only, so the gradient of
            # sum_i w_i post_i in v_i is w_i d post_i / d v_i
            gv, *gphi = torch.autograd.grad((post * w).sum(), [V, *params], allow_unused=True)
            gv = gv / w[:, None]
        else:  # a client of weight 0 still steps its code: its own pass
            (gv,) = torch.autograd.grad(post.sum(), [V], retain_graph=True)
            gphi = torch.autograd.grad((post * w).sum(), params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gphi, params)])
        return gv, flat.double().cpu(), float(mmd.detach().sum())

    def local_update(self, enc_grads: list, code_grad: torch.Tensor) -> None:
        """Every client's psi_i and v_i step with their (noisy in strict mode) gradients, with its own Adam (the
        stacked form); they never leave the rank. Then the code's projection onto its ball."""
        b = self.block
        b.adam(b.enc_params, enc_grads, b.enc_m, b.enc_v, b.enc_steps, b.enc_hp)
        b.adam([b.codes], [code_grad], [b.code_m], [b.code_v], b.code_steps, b.code_hp)
        project_codes(b.codes, self.cfg.model.code_radius)

    def _noise(self, gens: list, private: bool, phi: bool, phi_coef: torch.Tensor, layout: tuple):
        """Every client's N(0, 1) draws for its privatized coordinates: ONE `normal_` per client filling its row of
        a flat (M, D) buffer, from the client's generator (`NOISE_FORMAT`): the row holds the
        client's own coordinates (`private`: the code, then the encoder's parameters in sorted-name order) and then
        Phi's (`phi`: in the hypernetwork's parameter order). Returns the encoder noise per parameter and the code
        noise as (M, ...) views of the buffer, and sum_i phi_coef_i * (client i's Phi noise) in fp64. Blocks of
        clients draw in parallel Python threads (the draws release the GIL); then the calling thread sums Phi's
        rows, `_PHI_GROUP` clients at a time, with one fp32 matrix-vector product per group (BLAS: one pass over the
        rows; relative rounding ~1e-7 of the noise) added into the fp64 total in a fixed order. (Summing in the
        drawing threads would start a BLAS thread team per thread; one fp64 add per client cost 3x more.)

        Summed Phi noise (`phi_noise_summed`: local trust, secure noise, more than one client): only that weighted
        sum ever leaves the block, and a sum of independent Gaussians is Gaussian with the summed variance, so it is
        drawn as ONE N(0, (sum_i phi_coef_i^2) I) over Phi: what leaves the block has the distribution it has with
        a draw per client, for 1/M of the draws. The draw comes from a generator seeded from the block's first
        client's (secret) generator seed mixed with its own tag, so it is as secret as the clients' noise and
        independent of it; the clients' rows then hold their own coordinates only. With `privacy.noise_seed` the
        draws stay per client: the same numbers on any placement of the clients."""
        b, M = self.block, self.block.M
        P = sum(math.prod(shape) for _, shape in layout) if phi else 0
        summed = phi and self.phi_noise_summed
        priv_shapes = (
            [tuple(b.codes.shape[1:])] + [s for _, s in sorted(zip(b.enc_names, b.enc_shapes))] if private else []
        )
        D0 = sum(math.prod(s) for s in priv_shapes)
        buf = self.draws.rows(M, D0 + (0 if summed else P))
        if buf.shape[1]:
            workers, pool = self.draws.workers(M)
            bounds = [round(k * M / workers) for k in range(workers + 1)]
            rows = buf.unbind(0)

            def block(w: int) -> None:
                for i in range(bounds[w], bounds[w + 1]):
                    rows[i].normal_(generator=gens[i])

            if workers == 1:
                block(0)
            else:
                list(pool.map(block, range(workers)))
        enc_noise, code_noise = [], None
        if private:
            off, views = 0, []
            for shape in priv_shapes:
                k = math.prod(shape)
                views.append(buf[:, off : off + k].view(M, *shape))
                off += k
            code_noise = views[0]
            by_name = dict(zip(sorted(b.enc_names), views[1:]))
            enc_noise = [by_name[n] for n in b.enc_names]
        total = None
        if summed:
            seed = int(client_seeds(gens[0].initial_seed(), _PHI_SUM_TAG, [0])[0])
            z = self.draws.vector(P).normal_(generator=secret_generators([seed])[0])
            total = z.double().mul_(float(phi_coef.double().norm()))
        elif phi:
            total = torch.zeros(P, dtype=torch.float64)
            c32 = phi_coef.to(torch.float32)
            for g in range(0, M, _PHI_GROUP):
                h = min(M, g + _PHI_GROUP)
                total.add_(torch.mv(buf[g:h, D0:].t(), c32[g:h]))
        return enc_noise, code_noise, total

    # -- helpers ----------------------------------------------------------------------------------------
    def literal_mmd(self) -> bool:
        m = self.cfg.model
        return m.lambda_mmd > 0 and m.mmd_kind == "literal"

    def bandwidths(self) -> list[float]:
        return mmd_bandwidths(self.cfg.model, self.block.X.shape[1])

    def synthetic_batch(self, gens: list) -> tuple:
        """Every client's synthetic batch, stacked: (labels (n,), latent noise (M, n, l), output noise (M, n, d_x)),
        each client's rows drawn in place from its generator: its latent noise, then its output noise."""
        m, K = self.cfg.model, self.block.K
        n = m.mmd_synthetic_per_class * K
        z = torch.empty(len(gens), n, m.latent_dim)
        x = torch.empty(len(gens), n, self.block.X.shape[1])
        for k, g in enumerate(gens):
            z[k].normal_(generator=g)
            x[k].normal_(generator=g)
        return torch.arange(K).repeat_interleave(m.mmd_synthetic_per_class), z, x

    def synthetic_noise(self, generator: torch.Generator) -> tuple:
        """(labels, latent noise, output noise) of one client's synthetic batch, from its generator (CPU)."""
        syn_y, z, x = self.synthetic_batch([generator])
        return syn_y, z[0], x[0]

    @contextmanager
    def _phase(self, name: str):
        if not self.profile:
            yield
            return
        cuda = self.block.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.block.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.block.device)
            self.timings[name] += time.perf_counter() - t
