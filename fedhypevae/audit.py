"""One-run privacy audit (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run").

M canaries, each included in the audited client's data with probability 1/2 (fair coins from a
fixed seed); ONE training run; every canary gets a score; the auditor guesses "included" for the
k_in highest scores and "excluded" for the k_out lowest, abstaining on the rest. If the run is
(eps, delta)-DP with respect to each canary, the number of correct guesses among r = k_in + k_out
is stochastically dominated as in the paper's main theorem, so

    P[ >= v correct ] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v]
                         + 2 M delta * max_{1 <= i <= v} P[v - i <= Binomial(r, .) < v] / i.

``epsilon_lower_bound`` returns the largest eps for which observing v correct guesses still has
a p-value below the level (0.05: 95 % confidence): the run is NOT (eps, delta)-DP for any smaller
eps, with that confidence. An audit can refute a privacy claim, never prove it.

Two audits:

* white-box (``audit_white_box``): gradient canaries. The audited client is a real client inside a
  real :class:`~fedhypevae.trainer.Trainer` run with the sigma planned for the config (the trainer's
  ``step_type`` seam gives it its own step class, and so a block of its own); only one stage of
  its DP step is extended (:class:`CanaryStep`, a :class:`~fedhypevae.dp_step.DPStep` whose
  ``per_sample`` stage is overridden): every included canary, like any other record, joins each
  step's Poisson batch with probability q and contributes a "Dirac" per-sample gradient (sign * 2C on
  one coordinate of Phi) that goes through the same ``clip_and_accumulate``, ``add_noise`` (real
  sigma) and ``scale`` stages as the data.
  A canary's score is the inner product with its direction of the client's released Phi gradients
  (what crosses the rank boundary) minus what a white-box adversary who knows every other record can
  compute (the clipped sum of the client's own batch, the post-noise terms), summed over all steps.
  The audit runs the config's form of the per-sample stage (``train.engine``: ghost norms by default,
  torch.func with ``reference``); the audited client has a block of its own. Each sabotage overrides one more
  stage: ``sabotage="no-clip"`` the clip stage, which then sums unclipped (and the canaries are
  1000 C long); ``sabotage="no-noise"`` the noise stage, which then adds nothing while the ledger
  still charges the planned sigma: both must be caught.
* black-box (``audit_black_box``): canary records (uniform out-of-distribution points with random
  labels) are appended to one client's training split through a shard directory, the real
  ``run_training`` runs, and each canary is scored by its ELBO (negative loss) under that client's
  final model. Only the final model is used, so this test is much weaker: expect a bound near 0.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import dumps_json
from .config import AUDIT_MODES, AUDIT_SABOTAGE, Config, config_from_dict
from .dp_step import DPStep, noise_blocks
from .errors import ConfigError
from .privacy.trust import CentralTrust
from .rng import SeedTag, derive_seed
from .rows import ExtraRows

LEVEL = 0.05  # 95 % confidence
SABOTAGE = tuple(AUDIT_SABOTAGE)
# what each sabotage breaks, for the outputs (the ledger is charged the planned sigma in every case)
SABOTAGE_TEXT = {k: v for k, v in AUDIT_SABOTAGE.items() if k != "none"}
MODES = AUDIT_MODES
CANARY_NORM = 2.0  # white-box canary length in units of C (>= C: clipping brings it to exactly C)
NO_CLIP_CANARY_NORM = 1000.0  # without clipping nothing bounds a record's gradient: a long canary
DEFAULT_CANARIES = {"white-box": 1000, "black-box": 200}


# ------------------------------------------------------------------------------------------ the bound


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ConfigError(
            f"audit counts must satisfy 0 <= correct <= guesses <= canaries; got correct={v}, guesses={r}, canaries={m}"
        )


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least v correct guesses out of r (m canaries) under (epsilon, delta)-DP.

    The first term is the exact binomial tail of epsilon-DP randomized response; the second is the
    paper's delta correction, 2 m delta max_i P[v - i <= Binomial(r, q) < v] / i.
    """
    _check_counts(m, r, v)
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ConfigError(f"need epsilon >= 0 and delta in [0, 1]; got epsilon={epsilon}, delta={delta}")
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))  # P[B >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v - i], i = 1..v
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, level: float = LEVEL, tol: float = 1e-9) -> float:
    """Largest epsilon >= 0 whose p-value for v correct out of r guesses is below `level` (0 if none)."""
    _check_counts(m, r, v)
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1); got {level}")

    def p(e):
        return audit_p_value(m, r, v, e, delta)

    if r == 0 or p(0.0) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p(hi) < level:  # p -> 1 as epsilon grows whenever v <= r, so this ends
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            return lo
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if p(mid) < level:
            lo = mid
        else:
            hi = mid
    return lo


def max_epsilon_lower_bound(m: int, r: int, delta: float, level: float = LEVEL) -> float:
    """Power check: the bound when every one of the r guesses is right — no audit with these
    settings can report more, whatever the mechanism does."""
    return epsilon_lower_bound(m, r, r, delta, level)


def closed_form_max(r: int, level: float = LEVEL) -> float:
    """logit(level^(1/r)): the all-correct bound without the delta term."""
    if r < 1:
        return 0.0
    q = level ** (1.0 / r)
    return math.log(q / (1.0 - q))


def guess(scores: np.ndarray, k_in: int, k_out: int) -> np.ndarray:
    """+1 (included) for the k_in highest scores, -1 (excluded) for the k_out lowest, 0 otherwise.
    Ties are broken by canary index (stable sort), never by membership."""
    scores = np.asarray(scores, dtype=float)
    m = len(scores)
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ConfigError(f"need 0 <= k_in, k_out and k_in + k_out <= canaries ({m}); got {k_in}, {k_out}")
    order = np.argsort(-scores, kind="stable")
    g = np.zeros(m, dtype=int)
    g[order[:k_in]] = 1
    if k_out:
        g[order[m - k_out :]] = -1
    return g


def score_guesses(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> dict:
    g = guess(scores, k_in, k_out)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    made = g != 0
    return {
        "guesses": int(made.sum()),
        "correct": int((g[made] == truth[made]).sum()),
        "correct_in": int(((g == 1) & (truth == 1)).sum()),
        "correct_out": int(((g == -1) & (truth == -1)).sum()),
    }


# ------------------------------------------------------------------------------------------ white-box


class Canaries:
    """The white-box audit's gradient canaries of one client: each a Dirac gradient (sign * `scale` on one flat
    coordinate of Phi, parameter order), included by a fair coin; their scores and how often each was sampled.

    The auditor is white-box: it knows everything except which canaries were included. Before scoring it
    subtracts from the released Phi gradient what it can compute without the canaries — the clipped sum of the
    client's own records in this step's batch (the same clip stage) — so that a canary's score is its own
    clipped contribution plus the noise (the post-noise terms, which the auditor can also compute, are added
    after the scoring). DP must hold against exactly such an adversary (one who knows all other records), and
    each step stays a subsampled Gaussian mechanism for every canary given that knowledge."""

    def __init__(
        self,
        *,
        coords: torch.Tensor,
        signs: torch.Tensor,
        included: torch.Tensor,
        seed: int,
        scale: float,
        phi_numel: int,
        sample_rate: float,
    ):
        self.coords, self.signs, self.included = coords.long(), signs.double(), included.bool()
        self.seed, self.scale, self.phi_numel, self.sample_rate = int(seed), float(scale), int(phi_numel), sample_rate
        self.scores = torch.zeros(len(coords), dtype=torch.float64)
        self.appearances = torch.zeros(len(coords), dtype=torch.long)
        self.key = (0, 0)  # (round, step) of the step being computed

    def sampled(self) -> torch.Tensor:
        """Included canaries in this step's Poisson batch: each with probability q, like every record (coins from
        the audit's own generator: the client's sampling and noise streams are untouched)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, SeedTag.AUDIT_SAMPLE, *self.key))
        coins = torch.rand(len(self.coords), generator=g) < self.sample_rate
        sampled = torch.nonzero(coins & self.included).flatten()
        self.appearances[sampled] += 1
        return sampled

    def rows(self, sampled: torch.Tensor, device) -> torch.Tensor:
        """(k, P): one Dirac gradient over Phi per sampled canary."""
        rows = torch.zeros(len(sampled), self.phi_numel, dtype=torch.float32, device=device)
        rows[torch.arange(len(sampled)), self.coords[sampled]] = (self.signs[sampled] * self.scale).float().to(device)
        return rows

    def score(self, released_minus_known: torch.Tensor) -> None:
        self.scores += self.signs * released_minus_known.double()[self.coords]


class CanaryStep(DPStep):
    """The DP step with ONE stage extended, once given its `canaries`: :meth:`per_sample` appends, after the
    records' rows, a "Dirac" gradient row for every included canary in this step's Poisson batch, so that
    canaries go through ``clip_and_accumulate``, ``add_noise`` (the planned sigma) and ``scale`` exactly like
    records, on either form of the per-sample stage (ghost norms or torch.func). It also notes what the
    white-box auditor knows without the canaries (the records' clipped sum, through the same clip stage) and
    scores every canary at the ``released`` stage; those notes change nothing that is computed or released.
    The audited client has a block (and so a step object) of its own: the trainer groups clients by step class.
    Without canaries it is the plain step."""

    canaries: Canaries | None = None
    score_on = "own"  # own: the client's own release (local); aggregate: the aggregate the replicas apply

    def __init__(self, block, **kw):
        if block.M != 1:
            raise ValueError(f"the canary step audits one client: its block holds {block.M}")
        super().__init__(block, **kw)

    def prepare(self, hyper, round_, step, **kw):
        if self.canaries is not None:
            self.canaries.key = (round_, step)  # the canary coins are keyed by the step (a note, not a stage)
        return super().prepare(hyper, round_, step, **kw)

    def per_sample(self, hyper, batch):
        rows = super().per_sample(hyper, batch)
        if self.canaries is None:
            return rows
        self.known = self.clip_and_accumulate(rows)[0]  # the client's own records: known to the auditor
        sampled = self.canaries.sampled()
        if len(sampled):  # records and canaries: one Poisson batch
            rows = ExtraRows(
                rows, torch.zeros(len(sampled), dtype=torch.long), self.canaries.rows(sampled, self.block.device)
            )
        return rows

    def released(self, pending, noisy):
        noisy = super().released(pending, noisy)
        if self.canaries is not None:
            known = self.scale(self.known).phi
            if self.score_on == "aggregate":  # scored on the aggregate by the observed rule (distributed, central)
                self.known_scaled, self.noisy_phi = known, noisy.phi.clone()
            else:
                # score: <released noisy Phi gradient - what the auditor knows, canary direction>, in units of the
                # client's own release (the block's release carries the client's public weight)
                self.canaries.score((noisy.phi - known) / float(self.weights[0]))
        return noisy


class NoClipCanaryStep(CanaryStep):
    """SABOTAGE (``--sabotage no-clip``): the clip stage sums the per-sample gradients unclipped."""

    def clip_and_accumulate(self, rows):
        norms = rows.norms(self.cfg.privacy.mode == "strict")
        return self.accumulate(rows, torch.ones_like(norms)), norms


class NoNoiseCanaryStep(CanaryStep):
    """SABOTAGE (``--sabotage no-noise``): the noise stage adds nothing (and draws nothing) while the
    ledger is still charged for the planned sigma."""

    def add_noise(self, sums, *, sigma, gens):
        return sums


class SharesSabotage:
    """SABOTAGE mixin (``--sabotage no-shares`` / ``share-over-m``) over a DPStep class: the noise stage puts the
    multiplier ``sabotage_phi`` (set by the audit on its own subclasses once sigma is known: 0, or sigma / M) on
    the Phi part instead of the one the trust model prescribes, while the ledger is still charged the planned
    sigma. The client's own psi_i, v_i block keeps its noise."""

    sabotage_phi: float | None = None

    def add_noise(self, sums, *, sigma, gens):
        if self.sabotage_phi is None:
            raise RuntimeError("the shares sabotage needs its multiplier (set by audit_white_box after setup)")
        blocks = dict(noise_blocks(sigma))
        blocks["phi"] = float(self.sabotage_phi)
        return super().add_noise(sums, sigma=blocks, gens=gens)


class SharesCanaryStep(SharesSabotage, CanaryStep):
    """The canary step whose Phi noise is sabotaged (SharesSabotage)."""


CANARY_STEPS = {
    "none": CanaryStep,
    "no-clip": NoClipCanaryStep,
    "no-noise": NoNoiseCanaryStep,
    "no-shares": SharesCanaryStep,
    "share-over-m": SharesCanaryStep,
}


class ObservedStep(DPStep):
    """A non-audited client's own step in an aggregate audit (trust model distributed or central), observed: it
    notes the block's pre-noise Phi sum (known to the white-box auditor, who knows every record) and its noisy
    release at the ``released`` stage. It changes nothing that is computed or released."""

    def add_noise(self, sums, *, sigma, gens):
        self.pre = sums.phi.clone()
        return super().add_noise(sums, sigma=sigma, gens=gens)

    def released(self, pending, noisy):
        noisy = super().released(pending, noisy)
        self.known_scaled, self.noisy_phi = self.pre / self.phi_divisor, noisy.phi.clone()
        return noisy


class ColluderStep(ObservedStep):
    """The step of the clients that pool their noise shares with the auditor (privacy.collusion of them): their
    own block, so that the coalition's shares are known exactly."""


class SharesObservedStep(SharesSabotage, ObservedStep):
    pass


class SharesColluderStep(SharesSabotage, ColluderStep):
    pass


def canary_length(sabotage: str, clip_norm: float) -> float:
    """A canary's length: 2 C (clipping brings it to exactly C); without clipping, 1000 C."""
    return (NO_CLIP_CANARY_NORM if sabotage == "no-clip" else CANARY_NORM) * clip_norm


@dataclass
class AuditSetup:
    canaries: int
    k_in: int
    k_out: int
    seed: int
    client: int
    sabotage: str
    mode: str


def _coins(seed: int, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, SeedTag.AUDIT_COINS))
    return torch.rand(m, generator=g) < 0.5


class SabotagedAggregator(CentralTrust):
    """SABOTAGE (central, ``--sabotage no-shares`` / ``share-over-m``): the aggregator's draw at ``factor`` times
    the calibrated standard deviation (0, or 1/(M sigma) of it: sigma C / M at the sensitivity), while the ledger
    is still charged the planned sigma."""

    factor = 1.0

    def draw(self, width, std, generator):
        return super().draw(width, std * self.factor, generator)


def _colluders(tr, audited: int) -> list:
    """The privacy.collusion clients (party = client) that pool their shares with the auditor: the non-audited
    clients with the largest coefficients a_i (the most noise mass removed), ties by id."""
    t = tr.trust.collusion if tr.trust.name == "distributed" else 0
    coefs = tr.trust.fed.coefs
    others = sorted((i for i in range(len(coefs)) if i != audited), key=lambda i: (-coefs[i], i))
    return others[:t]


def _observe_aggregate(tr, canaries: Canaries) -> None:
    """Replace the trainer's rule by the same rule observed: every block's release is noted and, before the
    reduced aggregate is applied, the canaries are scored on it: the aggregate minus what the white-box auditor
    knows (every block's pre-noise sum of records and its post-noise terms, the coalition's noise shares), in
    units of the audited client's release. What remains is the canaries' clipped contributions plus the noise the
    trust model's adversary does not know (the other shares; the aggregator's draw)."""
    base = type(tr.aggregation)

    class Observed(base):
        def __init__(self, rule):  # the rule as it is (its state, not a fresh one), plus this step's releases
            self.__dict__.update(rule.__dict__)
            self.released = {}

        def add_release(self, buf, block, phi):
            self.released[id(block)] = phi.clone()
            super().add_release(buf, block, phi)

        def apply_step(self, reduced):
            resid = reduced[: self.step_width].clone()
            w = None
            for st in tr.steps:
                rel = self.released.pop(id(st.block))
                resid -= (rel - st.noisy_phi) + st.known_scaled  # post-noise terms and the records' sum
                if isinstance(st, ColluderStep):
                    resid -= st.noisy_phi - st.known_scaled  # the coalition's own shares
                if isinstance(st, CanaryStep):
                    w = float(st.weights[0])
            canaries.score(resid / w)
            super().apply_step(reduced)

    tr.aggregation = Observed(tr.aggregation)


def audit_white_box(cfg: Config, run_dir: Path, setup: AuditSetup, *, progress: bool = True) -> dict:
    from .trainer import Trainer

    if setup.sabotage not in CANARY_STEPS:
        raise ConfigError(f"--sabotage must be one of {', '.join(SABOTAGE)}; got {setup.sabotage!r}")
    aggregate = cfg.privacy.trust_model != "local"
    shares = setup.sabotage in ("no-shares", "share-over-m")
    central = cfg.privacy.trust_model == "central"
    secure = cfg.privacy.enabled and cfg.privacy.secure_aggregation  # the Phi noise: one Skellam share per rank
    # the step classes of this audit (the sabotage is a stage override, not a flag); for the shares sabotage,
    # subclasses of its own, so that its multiplier, known once sigma is, is set on them and nowhere else
    audited, observed, colluding = CANARY_STEPS[setup.sabotage], ObservedStep, ColluderStep
    if shares and (central or secure):  # the clients add no Phi noise: the aggregator's draw / rank's share is
        audited = CanaryStep
    elif shares:
        audited = type("SharesCanaryStep", (SharesCanaryStep,), {})
        observed = type("SharesObservedStep", (SharesObservedStep,), {})
        colluding = type("SharesColluderStep", (SharesColluderStep,), {})
    tr, colluders = None, None  # the colluding clients: from the trust model, bound in setup before the blocks

    def step_type(cid: int):
        """The trainer builds every client's step by its class, in blocks of one class: the audited client's
        canary step (a block of its own); under distributed/central the other clients observed, the colluders in
        a block of their own (their shares are known exactly). Called in setup, after the trust model is bound."""
        if cid == setup.client:
            return audited
        if not aggregate:
            return DPStep
        nonlocal colluders
        if colluders is None:
            colluders = _colluders(tr, setup.client)
        return colluding if cid in colluders else observed

    tr = Trainer(cfg, run_dir, progress=progress, step_type=step_type)
    tr.setup()
    if setup.canaries > tr.phi_numel:
        raise ConfigError(
            f"--canaries {setup.canaries}: the white-box audit puts each canary on its own coordinate of "
            f"Phi, which has only {tr.phi_numel}; use at most that many"
        )
    steps = [st for st in tr.steps if setup.client in st.block.ids]
    if not steps:
        raise ConfigError(f"--client {setup.client} is not in the federation (clients 0..{tr.fed.num_clients - 1})")
    g = torch.Generator().manual_seed(derive_seed(setup.seed, SeedTag.AUDIT_LAYOUT))
    coords = torch.randperm(tr.phi_numel, generator=g)[: setup.canaries]
    signs = torch.where(torch.rand(setup.canaries, generator=g) < 0.5, -1.0, 1.0)
    included = _coins(setup.seed, setup.canaries)
    canaries = steps[0].canaries = Canaries(
        coords=coords,
        signs=signs,
        included=included,
        seed=setup.seed,
        scale=canary_length(setup.sabotage, cfg.privacy.clip_norm),
        phi_numel=tr.phi_numel,
        sample_rate=cfg.privacy.sample_rate,
    )
    M = tr.fed.num_clients
    if shares:  # every Phi noise source at 0 or sigma / M; the ledger still charges the planned sigma
        if secure:  # the rank's Skellam share (the sum of its clients' shares) scaled alike
            tr.trust.share_factor = 0.0 if setup.sabotage == "no-shares" else 1.0 / M
        elif central:
            sab = SabotagedAggregator(noise_seed=cfg.privacy.noise_seed, backend=tr.comm.backend)
            sab.factor = 0.0 if setup.sabotage == "no-shares" else 1.0 / M
            tr.trust = sab.bind(tr.trust.fed, world_size=tr.trust.world_size)
        else:
            for cls in (audited, observed, colluding):  # this audit's own subclasses
                cls.sabotage_phi = 0.0 if setup.sabotage == "no-shares" else tr.sigma / M
    colluders = colluders or []  # computed while the trainer built its blocks (none under local)
    if aggregate:
        steps[0].score_on = "aggregate"
        _observe_aggregate(tr, canaries)
    tr.train()
    tr.writer.close()
    return {
        "scores": canaries.scores.numpy(),
        "included": included.numpy(),
        "steps": tr.state.steps,
        "engine": f"{tr.engine} (the DP step with the canary stage, on the audited client's own block)",
        "sigma": tr.sigma,
        "plan": tr.plan,
        "colluders": colluders,
        "scored_on": (
            "the aggregate every replica applies (what this trust model's adversary sees), minus the "
            f"shares of the {len(colluders)} colluding client(s) {colluders}"
            if aggregate
            else "the audited client's own release"
        ),
        "stopped_early": tr.state.stopped,
        "ledger_epsilon": tr.ledger.epsilon(delta=cfg.privacy.delta, accountant=cfg.privacy.accountant),
        "canary": {
            "kind": "gradient (Dirac: one coordinate of Phi each, random sign)",
            "length": f"{canaries.scale / cfg.privacy.clip_norm:g} C",
            "mean_appearances_included": (
                float(canaries.appearances[included].double().mean()) if included.any() else 0.0
            ),
            "score": (
                "sum over steps of <released noisy Phi gradient minus what the white-box auditor "
                "knows without the canaries (the clipped sum of the client's own batch, the "
                "post-noise terms), canary direction>"
                if not aggregate
                else "sum over steps of <the aggregate every replica applies minus what the white-box "
                "auditor knows without the canaries (every client's clipped sum of its batch, the "
                "post-noise terms, the colluding clients' noise shares), canary direction>, in units "
                "of the audited client's release"
            ),
        },
    }


# ------------------------------------------------------------------------------------------ black-box


def _canary_records(fed, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-distribution records: uniform in the box of the (transformed) feature range, random labels."""
    xs = np.concatenate([c.x_train for c in fed.clients])
    lo, hi = (0.0, 1.0) if fed.transform == "range" else (float(xs.min()), float(xs.max()))
    rng = np.random.default_rng(derive_seed(seed, SeedTag.AUDIT_LAYOUT))
    x = rng.uniform(lo, hi, size=(m, fed.dim)).astype(np.float32)
    if fed.transform == "l2":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, fed.num_classes, size=m).astype(np.int64)
    return x, y


@torch.no_grad()
def _elbo_scores(
    cfg: Config, run_dir: Path, fed, client_id: int, x: np.ndarray, y: np.ndarray, seed: int, draws: int = 16
) -> np.ndarray:
    from . import checkpoint as ckpt
    from .model import Encoder, HyperNetwork, elbo_terms

    mc = cfg.model
    hyper = HyperNetwork.from_config(fed.dim, fed.num_classes, mc)
    hyper.load_state_dict(torch.load(run_dir / "hypernetwork.pt", weights_only=True))
    last = ckpt.latest_complete(run_dir)
    enc = Encoder.from_config(fed.dim, fed.num_classes, mc)
    state = ckpt.client_state(last, client_id, [n for n, _ in enc.named_parameters()])
    enc.load_state_dict(state["encoder"])
    code = state["code"].float()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    g = torch.Generator().manual_seed(derive_seed(seed, SeedTag.AUDIT_SCORE))
    total = torch.zeros(len(xt), dtype=torch.float64)
    for _ in range(draws):
        eps = torch.randn(len(xt), mc.latent_dim, generator=g)
        nll, kl = elbo_terms(enc, code, hyper, xt, yt, eps)
        total -= (nll + kl).double()
    return (total / draws).numpy()  # ELBO: high for records the model was trained on


def audit_black_box(cfg: Config, out: Path, setup: AuditSetup, *, progress: bool = True) -> dict:
    from .data import build_federation, write_shards
    from .run import run_training

    fed = build_federation(cfg.data, cfg.partition, cfg.seed)
    if not 0 <= setup.client < fed.num_clients:
        raise ConfigError(f"--client {setup.client} is not in the federation (clients 0..{fed.num_clients - 1})")
    x, y = _canary_records(fed, setup.canaries, setup.seed)
    included = _coins(setup.seed, setup.canaries).numpy()
    c = fed.client(setup.client)
    c.x_train = np.concatenate([c.x_train, x[included]])
    c.y_train = np.concatenate([c.y_train, y[included]])
    # the declared (public) size must not depend on the coins: the expected number of canaries
    c.declared_size = int(c.declared_size) + setup.canaries // 2
    fed.declared_sizes = list(fed.declared_sizes)
    fed.declared_sizes[setup.client] = c.declared_size
    data_dir = write_shards(fed, out / "data")
    tree = cfg.to_dict()
    tree["data"].update(
        {"path": str(data_dir), "transform": "auto", "group_column": None, "site_column": None, "metadata_path": None}
    )
    cfg2 = config_from_dict(tree)
    res = run_training(cfg2, out / "run", progress=progress)
    scores = _elbo_scores(cfg2, out / "run", fed, setup.client, x, y, setup.seed)
    plan = res["privacy"]["plan"]
    from .privacy import PrivacyPlan

    return {
        "scores": scores,
        "included": included,
        "steps": res["privacy"]["steps"],
        "sigma": res["privacy"]["noise_multiplier"],
        "plan": PrivacyPlan.from_dict(plan) if plan else None,
        "stopped_early": res["training"]["stopped_early"],
        "ledger_epsilon": res["privacy"]["epsilon_spent"],
        "engine": res["training"].get("engine", "reference"),
        "canary": {
            "kind": "records: uniform out-of-distribution points with random labels, appended to the "
            "client's training split (shard directory " + str(data_dir) + ")",
            "score": "ELBO (negative loss) under the client's final encoder, code and Phi, mean of 16 draws",
        },
    }


# ------------------------------------------------------------------------------------------ driver


def validate(cfg: Config, setup: AuditSetup) -> None:
    p = cfg.privacy
    if setup.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}; got {setup.mode!r}")
    if setup.sabotage not in SABOTAGE:
        raise ConfigError(f"--sabotage must be one of {', '.join(SABOTAGE)}; got {setup.sabotage!r}")
    if not p.enabled:
        raise ConfigError(
            "privacy.enabled is false: there is no privacy claim to audit"
            + (" and nothing to sabotage" if setup.sabotage != "none" else "")
            + "; audit a private configuration"
        )
    if math.isinf(p.target_epsilon):
        raise ConfigError(
            "privacy.target_epsilon is infinite: there is no claimed epsilon to audit; set a finite target"
        )
    if setup.canaries < 2:
        raise ConfigError(f"--canaries must be >= 2 (each is included with probability 1/2); got {setup.canaries}")
    if setup.k_in < 0 or setup.k_out < 0 or setup.k_in + setup.k_out < 1 or setup.k_in + setup.k_out > setup.canaries:
        raise ConfigError(
            f"guesses: need k_in, k_out >= 0, at least one guess and k_in + k_out <= canaries "
            f"({setup.canaries}); got k_in={setup.k_in}, k_out={setup.k_out}"
        )
    if not 0 <= setup.client < cfg.partition.clients:
        raise ConfigError(f"--client {setup.client} is not in the federation (clients 0..{cfg.partition.clients - 1})")
    if setup.mode == "black-box" and setup.sabotage != "none":
        raise ConfigError(
            "--sabotage applies to the white-box audit (it breaks the DP step the canaries go through); "
            "use --mode white-box"
        )


def run_audit(
    cfg: Config,
    out: Path,
    *,
    mode: str = "white-box",
    canaries: int | None = None,
    guesses: int | None = None,
    sabotage: str = "none",
    seed: int | None = None,
    client: int = 0,
    progress: bool = True,
    level: float = LEVEL,
    command: str = "",
) -> dict:
    """Run the audit, write OUT/results.json and return the results."""
    from fedhypevae.hpc import LocalCommunicator

    from .privacy import DP_SGD, epsilon_of
    from .provenance import provenance

    m = int(canaries if canaries is not None else DEFAULT_CANARIES.get(mode, 1000))
    k = int(guesses if guesses is not None else max(1, m // 10))
    setup = AuditSetup(
        canaries=m,
        k_in=k,
        k_out=k,
        seed=int(seed if seed is not None else derive_seed(cfg.seed, SeedTag.AUDIT)),
        client=int(client),
        sabotage=sabotage,
        mode=mode,
    )
    validate(cfg, setup)
    out = Path(out)
    run_dir = out / "run"
    if run_dir.exists():
        raise ConfigError(f"{run_dir} already exists: choose another --out (an audit run is never resumed)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    p = cfg.privacy
    raw = (
        audit_white_box(cfg, run_dir, setup, progress=progress)
        if mode == "white-box"
        else audit_black_box(cfg, out, setup, progress=progress)
    )
    counts = score_guesses(raw["scores"], raw["included"], setup.k_in, setup.k_out)
    r, v = counts["guesses"], counts["correct"]
    eps_lb = epsilon_lower_bound(m, r, v, p.delta, level)
    eps_max = max_epsilon_lower_bound(m, r, p.delta, level)
    plan = raw["plan"]
    dp_sgd_alone = (
        epsilon_of(
            # the plan's DP-SGD mechanism (Gaussian, or Skellam on secure aggregation's path) over the steps run
            [dataclasses.replace(next(m for m in plan.mechanisms if m.name == DP_SGD), steps=raw["steps"])],
            delta=p.accounting_delta,
            accountant=p.accountant,
        )
        if plan is not None
        else None
    )
    claimed = float(p.target_epsilon)
    if eps_lb > claimed:
        verdict = (
            f"VIOLATION: the empirical lower bound {eps_lb:.3f} exceeds the claimed epsilon {claimed:g} "
            f"at {100 * (1 - level):.0f}% confidence: this run is not ({claimed:g}, {p.delta:g})-DP"
        )
    elif eps_max <= claimed:
        verdict = (
            f"INCONCLUSIVE: with {m} canaries and {r} guesses no audit can report more than {eps_max:.3f} "
            f"<= claimed {claimed:g}; use more canaries and guesses"
        )
    else:
        verdict = (
            f"consistent: the lower bound {eps_lb:.3f} does not exceed the claimed epsilon {claimed:g} "
            "(an audit can refute a privacy claim, never prove it)"
        )
    included = np.asarray(raw["included"], dtype=bool)
    scores = np.asarray(raw["scores"], dtype=float)
    results = {
        "audit": {
            "method": "one-run audit (Steinke, Nasr & Jagielski 2023): exact binomial-tail test with the delta term",
            "mode": mode,
            "sabotage": sabotage,
            "privacy_mode": p.mode,
            "aggregation": cfg.federation.aggregation,
            "trust_model": p.trust_model,
            "collusion": p.collusion if p.trust_model == "distributed" else None,
            "sabotaged": SABOTAGE_TEXT.get(sabotage),
            "scored_on": raw.get("scored_on"),
            "colluders": raw.get("colluders", []),
            "claimed_epsilon": claimed,
            "claimed_epsilon_source": "privacy.target_epsilon",
            "epsilon_lower_bound": eps_lb,
            "confidence": 1 - level,
            "delta": p.delta,
            "canaries": m,
            "included": int(included.sum()),
            "guesses_in": setup.k_in,
            "guesses_out": setup.k_out,
            "guesses": r,
            "correct": v,
            "correct_in": counts["correct_in"],
            "correct_out": counts["correct_out"],
            "max_epsilon_lower_bound": eps_max,
            "closed_form_max": closed_form_max(r, level),
            "power_ok": eps_max > claimed,
            "verdict": verdict,
            "violation": eps_lb > claimed,
            "epsilon_dp_sgd_alone": dp_sgd_alone,
            "ledger_epsilon": raw["ledger_epsilon"],
            "noise_multiplier": raw["sigma"] if sabotage != "no-noise" else 0.0,
            "planned_noise_multiplier": raw["sigma"],
            "sample_rate": p.sample_rate,
            "clip_norm": p.clip_norm,
            "steps": raw["steps"],
            "stopped_early": raw["stopped_early"],
            "client": setup.client,
            "canary": raw["canary"],
            "engine": raw.get("engine"),
            "mean_score_included": float(scores[included].mean()) if included.any() else None,
            "mean_score_excluded": float(scores[~included].mean()) if (~included).any() else None,
            "seeds": {"seed": cfg.seed, "audit_seed": setup.seed, "noise_seed": p.noise_seed},
            "noise": (
                "reproducible from privacy.noise_seed"
                if p.noise_seed is not None
                else "securely seeded per client: this audit cannot be replayed exactly"
            ),
            "wall_time_s": time.perf_counter() - t0,
            "run_dir": str(run_dir),
            "command": command,
        },
        "provenance": provenance(cfg, launcher="none", comm=LocalCommunicator(), device="cpu"),
    }
    (out / "results.json").write_text(dumps_json(results, indent=2) + "\n")
    return results


def format_audit(results: dict) -> str:
    a = results["audit"]
    desc = (
        "white-box gradient canaries through the client's real clip-and-noise step"
        if a["mode"] == "white-box"
        else "black-box canary records, final model only (a weaker test: expect a bound near 0)"
    )
    lines = [
        "",
        f"FedHypeVAE privacy audit: {desc}",
        f"  mechanism : {a['privacy_mode']} mode, {a['aggregation']} aggregation, trust model "
        f"{a.get('trust_model', 'local')}"
        + (f" (collusion {a['collusion']})" if a.get("collusion") else "")
        + f", sigma={a['planned_noise_multiplier']:.4f}"
        f"{' (SABOTAGED: no noise added)' if a['sabotage'] == 'no-noise' else ''}, q={a['sample_rate']}, "
        f"C={a['clip_norm']}{' (SABOTAGED: clipping skipped)' if a['sabotage'] == 'no-clip' else ''}, "
        f"steps={a['steps']}, delta={a['delta']}"
        + (f" (SABOTAGED: {a['sabotaged']})" if a["sabotage"] in ("no-shares", "share-over-m") else ""),
        *([f"  step      : {a['engine']}"] if a.get("engine") else []),
        *([f"  scored on : {a['scored_on']}"] if a.get("scored_on") else []),
        f"  canaries  : M={a['canaries']} ({a['included']} included by fair coins, "
        f"audit seed {a['seeds']['audit_seed']}), "
        f"client {a['client']}",
        f"  guesses   : {a['guesses_in']} 'in' (top scores) + {a['guesses_out']} 'out' (bottom scores) = "
        f"{a['guesses']}, correct {a['correct']}",
        f"  epsilon   : claimed {a['claimed_epsilon']:g} (privacy.target_epsilon"
        + (f"; DP-SGD alone {a['epsilon_dp_sgd_alone']:.3f}" if a["epsilon_dp_sgd_alone"] is not None else "")
        + f"), empirical lower bound {a['epsilon_lower_bound']:.3f} at {100 * a['confidence']:.0f}% confidence",
        f"  power     : the largest bound these settings can give (all {a['guesses']} guesses right) is "
        f"{a['max_epsilon_lower_bound']:.3f} (closed form without delta: {a['closed_form_max']:.3f}); "
        + (
            "above the claim, so a violation can be detected"
            if a["power_ok"]
            else "NOT above the claim: this audit cannot refute it"
        ),
        f"  verdict   : {a['verdict']}",
        f"  noise     : {a['noise']}",
    ]
    return "\n".join(lines)
