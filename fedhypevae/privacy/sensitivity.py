"""Single-step sensitivity through the real DP step (docs/PRIVACY.md, "the sensitivity check").

The DP-SGD argument for one client rests on one claim: from the same state, with the same released history
and the same sampling coins, the pre-noise payload a client computes on D and on D minus one record (its local
state recomputed along that history) differs by at most the clip norm C, and no other client's payload moves
at all. This module measures that difference instead of assuming it.

The check runs the trainer's OWN step objects (`dp_step.DPStep` on the trainer's block, with every stage a
subclass overrides, e.g. an audited client's) on either form of the per-sample stage (ghost norms, the
default, or torch.func), combined with :class:`SensitivityProbe`, a mixin overriding three stages and
re-spelling none of the step:

* ``sample``: D minus one record — the same coins (and noise) as on D, that record left out of the realized
  batch of its client;
* ``released``: records the step's own noisy release and, on D minus one record, substitutes the released
  history of the D pass (the noise is still drawn, so the generators stay in step);
* ``local_update``: optionally skipped.

The released step reaches Phi through the trainer's aggregation rule (``add_release``, ``reduce_step``,
``apply_step``): the D pass's Phi trajectory is the public history, and the D minus one record pass must
reproduce it exactly (``replay_drift``). The pre-noise payload is the :class:`~fedhypevae.dp_step.PendingBatch`'s,
exactly what the trainer's ledger digest covers.

``check_sensitivity`` runs the block holding a client from the trainer's current state for a few steps on D,
records the released history, replays it on D minus record j and compares, step by step,

* the client's clipped pre-noise sum over everything that is privatized (strict mode: psi_i, v_i and Phi
  jointly; paper mode: Phi only) — must differ by at most C;
* its part of the block's release as it enters the communicator's flat buffer (weighted and divided by the
  public normalizer q * n_declared) — must differ by at most w_i C / (q n_declared);
* every other client's sums — must not move at all.

A negative control is a stage override mixed into the step (:class:`BatchNormInputs`: a batch-normalized
loss, which couples the samples, must be reported as a violation).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..aggregation import flat_phi
from ..dp_step import DIAG_KEYS, DPStep, Draw, Sums
from ..errors import PrivacyError
from ..rng import STREAM_STEP, SeedTag, derive_seed
from .trust import AGGREGATOR_ID


class SensitivityProbe:
    """Mixin over a :class:`~fedhypevae.dp_step.DPStep` class (put first in the bases): the stage overrides
    the sensitivity check needs. Settings are instance attributes set by :func:`probe`."""

    drop: tuple | None = None  # (client position in the block, record index): D minus one record
    history: Sums | None = None  # a released history entry to continue from instead of the own release
    update: bool = True  # apply the local update of psi_i and v_i
    own: Sums | None = None  # set by `released`: this step's own noisy release

    def sample(self, gens):
        draws = super().sample(gens)  # every coin and noise row drawn as on D
        if self.drop is not None:
            pos, j = self.drop
            d = draws[pos]
            keep = d.idx != int(j)
            draws[pos] = Draw(d.idx[keep], d.eps[keep], d.syn)
        return draws

    def released(self, pending, noisy):
        noisy = super().released(pending, noisy)
        self.own = noisy.clone()
        if self.history is None:
            return noisy
        h = self.history.clone()
        if pending.strict:  # every coordinate the step continues from was noised: all of it is the history
            return h
        # paper mode (and privacy off): psi_i and v_i follow their own un-noised gradient, recomputed on D - j
        return Sums(noisy.enc, noisy.code, h.phi, noisy.layout)

    def local_update(self, enc_grads, code_grad):
        if self.update:
            super().local_update(enc_grads, code_grad)


class BatchNormInputs:
    """NEGATIVE CONTROL, not a DP step (a mixin over a DPStep class): every client's batch inputs are
    standardized with its realized batch's mean and standard deviation before the per-sample gradients are
    taken (a batch-norm layer over the Poisson batch). Every sample's gradient then depends on every other
    record of the batch, so removing one record moves the clipped sum by more than C: the check must say so.
    The rest is the step's own: its per-sample, clip and noise stages."""

    def per_sample(self, hyper, batch):
        x = batch.x.clone()
        for i, n in enumerate(batch.counts):
            if n:
                rows = batch.client_rows(i)
                xi = batch.x[rows]
                sd = (xi.var(0, keepdim=True, unbiased=False) + 1e-5).sqrt()  # torch.nn.BatchNorm1d's normalization
                x[rows] = (xi - xi.mean(0, keepdim=True)) / sd
        return super().per_sample(hyper, dataclasses.replace(batch, x=x))


class Unclipped:
    """NEGATIVE CONTROL (a mixin over a DPStep class): the clip stage sums the per-sample gradients unclipped."""

    def clip_and_accumulate(self, rows):
        p = self.cfg.privacy
        norms = rows.norms(p.mode == "strict")
        return self.accumulate(rows, torch.ones_like(norms)), norms


_PROBES: dict = {}


def probe(
    step: DPStep,
    *,
    drop: tuple | None = None,
    released: Sums | None = None,
    update: bool = True,
    control: type | None = None,
) -> DPStep:
    """`step`'s own class with the :class:`SensitivityProbe` stages (and a negative `control` mixin), on the same
    block with the same weights and per-sample form."""
    base = type(step)
    key = (base, control)
    cls = _PROBES.get(key)
    if cls is None:
        bases = (SensitivityProbe,) + ((control,) if control is not None else ()) + (base,)
        cls = _PROBES[key] = type(f"Probed{base.__name__}", bases, {})
    out = cls.__new__(cls)
    out.__dict__.update(step.__dict__)  # the same block, weights, per-sample form (and the noise buffers)
    out.drop, out.history, out.update = drop, released, update
    return out


@dataclass
class StepDifference:
    record: int
    step: int
    in_batch: bool  # whether the removed record was in the realized Poisson batch on D
    payload_diff: float  # ||payload(D) - payload(D - j)|| of the client, over everything privatized
    phi_diff: float  # the same over the Phi part only
    buffer_diff: float  # difference of this client's contribution to the communicator buffer
    buffer_bound: float  # w_i C / (q n_declared)


@dataclass
class SensitivityReport:
    clip_norm: float
    mode: str
    aggregation: str
    steps: int
    weight: float
    client: int = -1
    engine: str = ""
    trust_model: str = "local"
    rows: list = field(default_factory=list)
    # the largest change of ANY other client's sums in the block, and the largest of those sums: the change must
    # stay within float32 rounding of them (`others_bound`). The batched per-sample kernels may round a row
    # differently when the rows before it change (another client's realized batch: measured up to 1.5e-8 on an
    # AVX-512 machine, seed-dependent, in every trust model); anything larger is a real dependence
    others_moved: float = 0.0
    others_scale: float = 0.0
    # how far the Phi the block steps on strayed, on D - j, from its trajectory on D when the D - j release went
    # through the rule: 0 when everything released is a function of the released history (strict mode); the
    # replay then continues from the D trajectory of the shared Phi (the public history) in any case
    replay_drift: float = 0.0
    tolerance: float = 1e-4

    @property
    def max_payload_diff(self) -> float:
        return max((r.payload_diff for r in self.rows), default=0.0)

    @property
    def max_phi_diff(self) -> float:
        return max((r.phi_diff for r in self.rows), default=0.0)

    @property
    def max_buffer_ratio(self) -> float:
        """Largest buffer difference as a multiple of its bound w_i C / (q n_declared)."""
        return max((r.buffer_diff / r.buffer_bound for r in self.rows), default=0.0)

    @property
    def others_bound(self) -> float:
        """What float32 rounding can move another client's sums by: 16 ulps of the largest of them."""
        return 16 * 2.0**-24 * self.others_scale

    @property
    def ok(self) -> bool:
        """Every step's pre-noise payload moved by at most C (and the buffer by at most its bound), and no other
        client's moved beyond float32 rounding."""
        c = self.clip_norm * (1 + self.tolerance)
        return (
            self.max_payload_diff <= c
            and self.max_phi_diff <= c
            and self.max_buffer_ratio <= 1 + self.tolerance
            and self.others_moved <= self.others_bound
        )

    def to_dict(self) -> dict:
        return {
            "clip_norm": self.clip_norm,
            "mode": self.mode,
            "aggregation": self.aggregation,
            "trust_model": self.trust_model,
            "steps": self.steps,
            "weight": self.weight,
            "client": self.client,
            "engine": self.engine,
            "ok": self.ok,
            "max_payload_diff": self.max_payload_diff,
            "max_phi_diff": self.max_phi_diff,
            "max_buffer_ratio": self.max_buffer_ratio,
            "others_moved": self.others_moved,
            "others_bound": self.others_bound,
            "replay_drift": self.replay_drift,
            "rows": [asdict(r) for r in self.rows],
        }


def _block_of(tr, client: int):
    for st in tr.steps:
        if client in st.block.ids:
            return st, st.block.ids.index(client)
    raise PrivacyError(f"client {client} is not hosted here (clients {[c.id for c in tr.clients]})")


def _snapshot(tr, st) -> dict:
    rule = {k: v for k, v in tr.aggregation.__dict__.items() if k != "tr"}
    return {
        "hyper": copy.deepcopy(tr.hyper.state_dict()),
        "opt": copy.deepcopy(tr.opt.state_dict()),
        "block": {k: t.detach().clone() for k, t in st.block.state().items()},
        "rule": copy.deepcopy(rule),
    }


def _restore(tr, st, snap: dict) -> None:
    tr.hyper.load_state_dict(snap["hyper"])
    tr.opt.load_state_dict(copy.deepcopy(snap["opt"]))
    with torch.no_grad():
        for k, t in st.block.state().items():
            t.copy_(snap["block"][k])
    tr.aggregation.__dict__.update(copy.deepcopy(snap["rule"]))


def _through_the_rule(tr, st, phi: torch.Tensor, aggregator: torch.Generator) -> torch.Tensor:
    """The block's release applied to Phi by the trainer's aggregation rule and trust model (central: with the
    aggregator's draw from `aggregator`, the same in both passes); returns the Phi the block steps on next (flat)."""
    agg = tr.aggregation
    buf = agg.new_step_buffer(len(DIAG_KEYS))
    agg.add_release(buf, st.block, phi)
    tr.trust.begin_release(STREAM_STEP, 0, 0, 0, generator=aggregator)
    agg.apply_step(agg.reduce_step(buf))
    return flat_phi(agg.step_hyper(st.block))


def check_sensitivity(
    tr, client: int, *, remove: Sequence[int], steps: int = 1, seed: int = 0, control: type | None = None
) -> SensitivityReport:
    """Measure, for every j in `remove`, how far record j of `client` moves the pre-noise payload of each of
    `steps` steps of the trainer's real step (the block holding the client, its class and per-sample form, the
    trainer's noise placement and aggregation rule; a single process: the rule's reduce is the trainer's, through
    its trust model: under central with the aggregator's draw keyed per step, the same in both passes).

    From the trainer's current state (restored before every pass and at the end), `steps` steps run on D with
    per-client generators seeded from (`seed`, step, client) — the same sampling coins, reparameterization
    noise and DP noise in both passes; the released history of the D pass (the noisy values, and through the
    rule the Phi trajectory they produce) is replayed on D - j, whose local state (psi_i, v_i, and under
    `delta` the private copy of Phi) is recomputed along it. `control`: a negative-control mixin
    (:class:`BatchNormInputs`, :class:`Unclipped`) that the check must catch.
    """
    cfg = tr.cfg
    if not cfg.privacy.enabled:
        raise PrivacyError("the sensitivity check needs privacy.enabled: true (there is no clipped payload otherwise)")
    if steps < 1:
        raise PrivacyError(f"steps must be >= 1; got {steps}")
    st, pos = _block_of(tr, client)
    n = st.block.sizes[pos]
    bad = [j for j in remove if not 0 <= int(j) < n]
    if bad:
        raise PrivacyError(f"records {bad} are not in client {client}'s data (0..{n - 1})")
    sigma, _ = tr.step_noise()
    agg, C = tr.aggregation, cfg.privacy.clip_norm
    coef, divisor = float(st.phi_coef[pos]), st.phi_divisor  # public: Phi sum = sum_i coef_i * clipped_i
    strict = cfg.privacy.mode == "strict"
    report = SensitivityReport(
        clip_norm=C,
        mode=cfg.privacy.mode,
        aggregation=cfg.federation.aggregation,
        steps=steps,
        weight=float(st.weights[pos]),
        client=client,
        engine=st.per_sample_kind,
        trust_model=tr.trust.name,
    )

    def gens(s):
        return [
            torch.Generator().manual_seed(derive_seed(seed, SeedTag.SENSITIVITY_PROBE, s, cid)) for cid in st.block.ids
        ]

    def run(s, **kw):
        pr = probe(st, control=control, **kw)
        pend = pr.prepare(agg.step_hyper(st.block), 0, s, gens=gens(s))
        before = pend.sums.clone()
        rel = pr.release(pend, sigma=sigma, features=tr.features)
        aggregator = torch.Generator().manual_seed(derive_seed(seed, SeedTag.SENSITIVITY_PROBE, s, AGGREGATOR_ID))
        return pr, pend, before, _through_the_rule(tr, st, rel.phi, aggregator)

    snap = _snapshot(tr, st)
    try:
        _restore(tr, st, snap)
        agg.begin_round(0)
        hist = []
        for s in range(steps):  # D: the released history
            pr, pend, sums, path = run(s)
            public = (copy.deepcopy(tr.hyper.state_dict()), copy.deepcopy(tr.opt.state_dict()))
            hist.append((pr.own, sums, pend.draws[pos].idx, path, public))
        for j in remove:  # D - j: same coins minus record j, the same released history, local state recomputed
            _restore(tr, st, snap)
            agg.begin_round(0)
            for s in range(steps):
                released, d_sums, d_idx, d_path, (hyper_state, opt_state) = hist[s]
                _, _, sums, path = run(s, drop=(pos, int(j)), released=released)
                report.replay_drift = max(report.replay_drift, float((path - d_path).abs().max()))
                if agg.step_hyper(st.block) is tr.hyper:  # the shared Phi follows the public history
                    tr.hyper.load_state_dict(hyper_state)
                    tr.opt.load_state_dict(copy.deepcopy(opt_state))
                dphi = float((d_sums.phi - sums.phi).norm())
                own2 = (dphi / coef) ** 2
                for a, b in zip([*d_sums.enc, d_sums.code], [*sums.enc, sums.code]):
                    diff = (a - b).reshape(a.shape[0], -1).double()
                    if strict:
                        own2 += float(diff[pos].pow(2).sum())
                    rest = torch.cat([diff[:pos], diff[pos + 1 :]])
                    if rest.numel():
                        flat = a.reshape(a.shape[0], -1)
                        report.others_moved = max(report.others_moved, float(rest.abs().max()))
                        report.others_scale = max(
                            report.others_scale, float(torch.cat([flat[:pos], flat[pos + 1 :]]).abs().max())
                        )
                report.rows.append(
                    StepDifference(
                        record=int(j),
                        step=s,
                        in_batch=bool((d_idx == int(j)).any()),
                        payload_diff=own2**0.5,
                        phi_diff=dphi / coef,
                        buffer_diff=dphi / divisor,
                        buffer_bound=coef * C / divisor,
                    )
                )
    finally:
        _restore(tr, st, snap)
    return report
