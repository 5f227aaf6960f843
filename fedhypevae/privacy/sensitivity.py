"""Single-step sensitivity through the client's real DP step (DESIGN §1, §6 "Sensitivity check, precisely").

The DP-SGD argument for one client rests on one claim: from the same state, with the same
released history and the same sampling coins, the pre-noise payload a client computes on D and
on D minus one record (its local state recomputed along that history) differs by at most the
clip norm C. This module measures that difference instead of assuming it.

The check runs the client's OWN step object (``client.dp_step``: its class, with every stage a
subclass of it overrides, e.g. an audited client's) through :func:`trace_step`, which combines that
class with :class:`SensitivityProbe`, a mixin overriding four stages of
:class:`~fedhypevae.dp_step.DPStep` and re-spelling none of the step:

* ``sample``: D minus one record — the same coins (and noise) as on D, that record left out of the
  realized batch;
* ``payload``: optionally replaced by a ``payload_fn`` (a negative control);
* ``released``: records the step's own noisy release and, on D minus one record, substitutes the
  released history of the D pass (the noise is still drawn, so the generator stays in step);
* ``local_update``: optionally skipped.

The pre-noise payload is the :class:`~fedhypevae.dp_step.PendingStep`'s, exactly what the trainer's
ledger digest covers.

``check_sensitivity`` runs a client from one saved state for a few local steps on D, records the
released history, then replays it on D minus record j and compares, step by step,

* the clipped pre-noise sum over everything that is privatized (strict mode: psi_i, v_i and Phi
  jointly; paper mode: Phi only) — must differ by at most C;
* the Phi part of it as it enters the communicator's flat buffer (weighted and divided by the
  public normalizer q * n_declared) — must differ by at most w_i C / (q n_declared).

A ``payload_fn`` can replace the client's clipped sum (a negative control such as a batch-
normalized loss, which couples the samples, must be reported as a violation).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..dp_step import DPStep, poisson_sample
from ..errors import PrivacyError
from ..model import PHI_PREFIX
from ..rng import STREAM_STEP

PayloadFn = Callable  # (client, view, names, batch, syn) -> (summed: dict, norms: Tensor, aux)


@dataclass
class StepTrace:
    """What one DP step computed: the batch, the pre-noise payload and what was released."""

    idx: torch.Tensor  # indices (into the client's data) of the realized Poisson batch, after any drop
    payload: dict  # clipped pre-noise sum over the privatized parameters (ClientView names)
    released: dict  # (payload + noise) / (q n_declared): the noisy release, privatized names
    phi: dict  # what Client.step returns as phi_grad: released Phi part + post-noise terms (HyperNetwork names)
    expected_batch: float  # q * n_declared (public)


class SensitivityProbe:
    """Mixin over a :class:`~fedhypevae.dp_step.DPStep` class (put first in the bases): the stage
    overrides the sensitivity check needs. Settings are instance attributes set by :func:`probe`."""

    drop: Optional[int] = None  # record left out of the realized batch (D minus one record)
    history: Optional[dict] = None  # a released history entry to continue from instead of the own release
    payload_fn: Optional[PayloadFn] = None  # replaces the payload stage (negative controls)
    update: bool = True  # apply the local update of psi_i and v_i
    own: Optional[dict] = None  # set by `released`: this step's own noisy release

    def sample(self, generator):
        idx, eps, syn = super().sample(generator)  # every coin and noise row drawn as on D
        if self.drop is not None:
            keep = idx != int(self.drop)
            idx, eps = idx[keep], eps[keep]
        return idx, eps, syn

    def payload(self, view, names, batch, syn):
        if self.payload_fn is None:
            return super().payload(view, names, batch, syn)
        return self.payload_fn(self.client, view, names, batch, syn)

    def released(self, pending, noisy):
        noisy = super().released(pending, noisy)
        self.own = {n: t.detach().clone() for n, t in noisy.items()}
        if self.history is not None:
            return {n: self.history[n].detach().clone() for n in noisy}
        return noisy

    def local_update(self, grads):
        if self.update:
            super().local_update(grads)


_PROBES: dict = {}


def probe(client, *, drop: Optional[int] = None, released: Optional[dict] = None,
          payload_fn: Optional[PayloadFn] = None, update: bool = True) -> DPStep:
    """`client`'s own step class (``type(client.dp_step)``) with the :class:`SensitivityProbe` stages, bound to it."""
    base = type(client.dp_step)
    cls = _PROBES.get(base)
    if cls is None:
        cls = _PROBES[base] = type(f"Probed{base.__name__}", (SensitivityProbe, base), {})
    step = cls(client)
    step.drop, step.history, step.payload_fn, step.update = drop, released, payload_fn, update
    return step


def trace_step(client, hyper, generator: torch.Generator, *, sigma: float, features=None,
               drop: Optional[int] = None, released: Optional[dict] = None,
               payload_fn: Optional[PayloadFn] = None, update: bool = True) -> StepTrace:
    """One DP step of `client` on `hyper` through the client's own step object, with the probe's stages.

    drop:      a record index of the client's data left out of the realized batch (the same
               coins as on D, minus that record: D minus one record).
    released:  a released history entry (a previous trace's ``released``) to use for the local
               update instead of this step's own noisy values; the noise is still drawn so the
               generator stays in step.
    update:    apply the local update of psi_i and v_i (as Client.step does).
    With the client's own step generator and none of these, it releases exactly what Client.step does.
    """
    if not client.cfg.privacy.enabled:
        raise PrivacyError("the sensitivity check needs privacy.enabled: true (there is no clipped payload otherwise)")
    step = probe(client, drop=drop, released=released, payload_fn=payload_fn, update=update)
    pending = step.prepare(hyper, generator)
    payload = {n: t.detach().clone() for n, t in pending.summed.items()}
    out = step.release(pending, sigma=sigma, features=features)
    return StepTrace(idx=pending.idx, payload=payload, released=step.own if released is None else dict(released),
                     phi={n: t.detach().clone() for n, t in out.phi_grad.items()}, expected_batch=pending.expected)


def _flat(d: dict, names: Sequence[str]) -> torch.Tensor:
    return torch.cat([d[n].detach().reshape(-1).double().cpu() for n in names]) if names else torch.zeros(0, dtype=torch.float64)


@dataclass
class StepDifference:
    record: int
    step: int
    in_batch: bool  # whether the removed record was in the realized Poisson batch on D
    payload_diff: float  # ||payload(D) - payload(D - j)||, over everything privatized
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
    rows: list = field(default_factory=list)
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
    def ok(self) -> bool:
        """Every step's pre-noise payload moved by at most C (and the buffer by at most its bound)."""
        c = self.clip_norm * (1 + self.tolerance)
        return self.max_payload_diff <= c and self.max_phi_diff <= c and self.max_buffer_ratio <= 1 + self.tolerance

    def to_dict(self) -> dict:
        return {"clip_norm": self.clip_norm, "mode": self.mode, "aggregation": self.aggregation, "steps": self.steps,
                "weight": self.weight, "ok": self.ok, "max_payload_diff": self.max_payload_diff,
                "max_phi_diff": self.max_phi_diff, "max_buffer_ratio": self.max_buffer_ratio,
                "rows": [asdict(r) for r in self.rows]}


@dataclass
class EngineSensitivityReport(SensitivityReport):
    """The batched engine's step from one state on D and on D minus one record of one client: the same bounds
    as `SensitivityReport` (rows: one StepDifference per removed record), and no other client's sums may move."""
    client: int = -1
    others_moved: float = 0.0  # the largest change of ANY other client's clipped sums (must be exactly 0)

    @property
    def ok(self) -> bool:
        return super().ok and self.others_moved == 0.0


def check_engine_sensitivity(engine, hyper, *, client: int, remove: Sequence[int], round_: int = 0, step: int = 0,
                             epoch: int = 0) -> EngineSensitivityReport:
    """The single-step claim for the batched engine (the default path): from the engine's current state, the
    pre-noise payload of client `client` on D and on D minus record j (the same coins minus j) differs by at
    most C, its share of the rank's Phi sum (w_i / (q n~_i) times its clipped Phi sum) by at most w_i C / (q n~_i),
    and no other client's clipped sums move at all. `engine.prepare` changes no state, so nothing is restored.

    What the rank releases about Phi is the block sum; client i's part of it is recovered from the difference
    (the other clients' parts are identical in both passes, which `others_moved` checks on their private sums)."""
    cfg = engine.cfg
    if not cfg.privacy.enabled:
        raise PrivacyError("the sensitivity check needs privacy.enabled: true (there is no clipped payload otherwise)")
    ids = [c.id for c in engine.clients]
    if client not in ids:
        raise PrivacyError(f"client {client} is not in this engine (clients {ids})")
    pos = ids.index(client)
    n = engine.sizes[pos]
    bad = [j for j in remove if not 0 <= int(j) < n]
    if bad:
        raise PrivacyError(f"records {bad} are not in client {client}'s data (0..{n - 1})")
    strict = cfg.privacy.mode == "strict"
    coef = float(engine.weights[pos] / engine.expected[pos])  # w_i / (q n~_i): public
    C = cfg.privacy.clip_norm
    report = EngineSensitivityReport(clip_norm=C, mode=cfg.privacy.mode, aggregation=cfg.federation.aggregation,
                                     steps=1, weight=float(engine.weights[pos]), client=client)
    base = engine.prepare(hyper, round_, step, epoch=epoch)
    coins = engine.clients[pos].rng.generator(STREAM_STEP, round_, step, epoch)
    in_batch = set(poisson_sample(n, cfg.privacy.sample_rate, coins).tolist())
    for j in remove:
        other = engine.prepare(hyper, round_, step, epoch=epoch, drop=(pos, int(j)))
        d_phi = (base.phi_vec - other.phi_vec).norm().item()
        own2 = (d_phi / coef) ** 2
        if strict:
            for a, b in zip([*base.enc_sum, base.code_sum], [*other.enc_sum, other.code_sum]):
                diff = (a - b).reshape(a.shape[0], -1).double()
                own2 += float(diff[pos].pow(2).sum())
                rest = torch.cat([diff[:pos], diff[pos + 1:]])
                report.others_moved = max(report.others_moved, float(rest.abs().max()) if rest.numel() else 0.0)
        report.rows.append(StepDifference(record=int(j), step=step, in_batch=int(j) in in_batch,
                                          payload_diff=own2 ** 0.5, phi_diff=d_phi / coef, buffer_diff=d_phi,
                                          buffer_bound=coef * C))
    return report


def _snapshot(client, hyper) -> dict:
    return {"client": copy.deepcopy(client.state_dict()), "hyper": copy.deepcopy(hyper.state_dict())}


def _restore(client, hyper, snap: dict) -> None:
    client.load_state_dict(copy.deepcopy(snap["client"]))
    hyper.load_state_dict(copy.deepcopy(snap["hyper"]))


def _local_phi_step(hyper, grads: dict, lr: float, lipschitz) -> None:
    """delta aggregation: the client's private copy of Phi takes a plain SGD step (as the trainer does)."""
    with torch.no_grad():
        for n, p in hyper.named_parameters():
            p.sub_(lr * grads[n])
    if lipschitz is not None:
        hyper.project_spectral(lipschitz)


def check_sensitivity(client, hyper, *, remove: Sequence[int], steps: int, sigma: float, seed: int = 0,
                      weight: float = 1.0, aggregation: Optional[str] = None, features=None,
                      payload_fn: Optional[PayloadFn] = None) -> SensitivityReport:
    """Measure ||payload(D) - payload(D - j)|| per step for every j in `remove`.

    From the client's and Phi's current state (restored before every pass), `steps` local steps
    run on D with generators seeded from `seed` (the same sampling coins, reparameterization
    noise and DP noise in both passes); the released history of the D pass (the noisy values,
    and in `grad` aggregation the Phi trajectory they produce) is replayed on D - j, whose local
    state (psi_i, v_i, and in `delta` aggregation the private copy of Phi) is recomputed along it.
    ``sigma`` is the noise of that history (it does not enter the pre-noise payload).
    The client and Phi are left in their starting state.
    """
    cfg = client.cfg
    aggregation = aggregation or cfg.federation.aggregation
    if aggregation not in ("grad", "delta"):
        raise PrivacyError(f"aggregation must be grad or delta; got {aggregation!r}")
    if steps < 1:
        raise PrivacyError(f"steps must be >= 1; got {steps}")
    n = len(client.y)
    bad = [j for j in remove if not 0 <= int(j) < n]
    if bad:
        raise PrivacyError(f"records {bad} are not in the client's data (0..{n - 1})")
    snap = _snapshot(client, hyper)
    report = SensitivityReport(clip_norm=cfg.privacy.clip_norm, mode=cfg.privacy.mode, aggregation=aggregation,
                               steps=steps, weight=weight)
    gens = lambda s: torch.Generator().manual_seed(int(seed) * 100_003 + s)
    try:
        for j in remove:
            # D: the released history
            _restore(client, hyper, snap)
            hist, phi_path = [], []
            opt = _phi_optimizer(cfg, hyper) if aggregation == "grad" else None
            for s in range(steps):
                tr = trace_step(client, hyper, gens(s), sigma=sigma, features=features, payload_fn=payload_fn)
                hist.append(tr)
                _advance_phi(cfg, hyper, tr.phi, aggregation, opt)
                phi_path.append(copy.deepcopy(hyper.state_dict()))
            # D - j: same coins minus record j, same released history, local state recomputed
            _restore(client, hyper, snap)
            for s in range(steps):
                tr = trace_step(client, hyper, gens(s), sigma=sigma, features=features, drop=int(j),
                                        released=hist[s].released, payload_fn=payload_fn)
                if aggregation == "grad":
                    hyper.load_state_dict(phi_path[s])  # Phi follows the public (released) history
                else:
                    _local_phi_step(hyper, tr.phi, cfg.train.local_lr, cfg.model.lipschitz)
                d = hist[s]
                names = sorted(d.payload)
                phi_names = [x for x in names if x.startswith(PHI_PREFIX)]
                full = (_flat(d.payload, names) - _flat(tr.payload, names)).norm().item()
                phi = (_flat(d.payload, phi_names) - _flat(tr.payload, phi_names)).norm().item()
                report.rows.append(StepDifference(
                    record=int(j), step=s, in_batch=bool((d.idx == int(j)).any()), payload_diff=full, phi_diff=phi,
                    buffer_diff=weight * phi / d.expected_batch,
                    buffer_bound=weight * cfg.privacy.clip_norm / d.expected_batch))
    finally:
        _restore(client, hyper, snap)
    return report


def _phi_optimizer(cfg, hyper):
    cls = torch.optim.Adam if cfg.train.optimizer == "adam" else torch.optim.SGD
    return cls(hyper.parameters(), lr=cfg.train.lr)


def _advance_phi(cfg, hyper, phi_grad: dict, aggregation: str, opt) -> None:
    if aggregation == "delta":
        _local_phi_step(hyper, phi_grad, cfg.train.local_lr, cfg.model.lipschitz)
        return
    for n, p in hyper.named_parameters():
        p.grad = phi_grad[n].detach().clone()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cfg.model.lipschitz is not None:
        hyper.project_spectral(cfg.model.lipschitz)


def batchnorm_payload(client, view, names, batch, syn):
    """NEGATIVE CONTROL, not a DP step: the batch's inputs are standardized with the realized
    batch's mean and standard deviation before the per-sample gradients are taken (a batch-norm
    layer over the Poisson batch). Every sample's gradient then depends on every other record of
    the batch, so removing one record moves the clipped sum by more than C: the check must say so.
    The rest is the client's own step: its per_sample_grads and clip_and_accumulate stages."""
    x, y, eps = batch
    if len(x) == 0:
        return client.dp_step.payload(view, names, batch, syn)
    mu = x.mean(0, keepdim=True)
    sd = (x.var(0, keepdim=True, unbiased=False) + 1e-5).sqrt()  # torch.nn.BatchNorm1d's normalization
    return client.dp_step.payload(view, names, ((x - mu) / sd, y, eps), syn)
