"""Federated training (Algorithm 1) over a Communicator: every rank hosts a block of clients.

One round, for every hosted client: Poisson batch -> per-sample gradients over (psi_i, v_i, Phi)
-> clip -> noise -> scale (strict mode); the client updates psi_i, v_i locally and contributes
w_i * (noisy Phi gradient) to ONE flat buffer (with diagnostics); one all-reduce; every rank
applies the identical optimizer step to its replica of Phi, then the spectral-norm projection.
`delta` aggregation runs the local steps on a private copy of Phi and reduces weighted deltas. The rule
is an object (fedhypevae/aggregation.py, a registry by name): the trainer calls it and has no branch on it.

Observers hook into the loop through `Trainer.hooks` (TrainerHooks): the events round_begin(r),
step_begin(r, s), step_end(r, s), round_end(r, metrics), the phase timers the trainer wraps around
its own phases (guard, ledger, all_reduce, phi_update, engine, accounting), and the heartbeat it gives at
every step boundary and around every collective (the step watchdog's, hpc/watchdog.py, armed by run.py);
free when nothing listens.

Every release of every kind (the MMD embeddings, each DP-SGD step, the class statistics) goes
through ONE guard, `Trainer.guarded_release`: the payload is computed up to the noise, compared with
what the ledger says was released under the same key (a replay is free only if bit-identical),
checked against the budget on every rank together (with the stop-signal bit), charged to the rank's
durable ledger, and only then noised and released.

Single process:   fedhypevae train --config configs/default.yaml --out runs/default
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from fedhypevae.hpc import Communicator, LocalCommunicator, place_clients
from fedhypevae.hpc.comm import decode_name, encode_name
from fedhypevae.hpc.placement import PlacementError, place_groups

from . import checkpoint as ckpt
from .aggregation import flat_phi as _flat_phi
from .aggregation import make_aggregation, trust_refusal
from .atomic import atomic_torch_save, atomic_write_text
from .block import ClientBlock
from .client import DIAG_KEYS, Client
from .config import Config, config_from_dict, save_config
from .data import build_federation, is_shard_dir, read_manifest
from .dp_step import NOISE_FORMAT, NOISE_FORMATS, PER_SAMPLE, DPStep, NoiseDraws, noise_blocks, summed_phi_noise
from .errors import CheckpointError, ConfigError, FedHypeVAEError, PrivacyError
from .metrics import MetricWriter, append_event, cut_metrics
from .model import HyperNetwork, mmd_bandwidths
from .optim import Optimizer
from .privacy import (
    CLASS_STATS,
    DP_SGD,
    MMD_EMBEDDINGS,
    Mechanism,
    PrivacyLedger,
    PrivacyPlan,
    RandomFeatures,
    epsilon_of,
    has_ledger,
    privacy_plan,
    run_shares,
)
from .privacy.integer import integer_params
from .privacy.ledger import last_session_blocks, payload_digest
from .privacy.stats import stats_components, stats_flat_size
from .privacy.trust import Federation, make_trust_model
from .provenance import provenance
from .rng import STREAM_MMD_RELEASE, STREAM_STEP, SeedTag, derive_seed, secret_key
from .validate import check_output_dir, validate_run

# settings a resume may change: applied from the resume on and reported (results.json "resume", the
# summary, events.jsonl). Every other key defines the data, the partition, the model or the privacy
# plan and is refused. A wildcard covers a whole section. Whatever changes, the release guard's digest
# comparison decides whether a replayed step is free: a different value is charged, never replayed free.
RESUME_MAY_CHANGE = (
    "train.lr",
    "train.encoder_lr",
    "train.code_lr",
    "train.local_lr",
    "train.optimizer",
    "federation.server_lr",
    "threads",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.replica_check_every",
    "train.engine",
    "train.chunk_clients",
    "train.step_timeout_s",
    "train.time_phases",
    "privacy.diagnostics",
    "stats.rank",
    "meta.*",
    "synth.*",
)
# the learning rates and optimizer: they shape the later releases, so a change is said at every resume
RESUME_APPLIED = (
    "train.lr",
    "train.encoder_lr",
    "train.code_lr",
    "train.local_lr",
    "train.optimizer",
    "federation.server_lr",
)


class ReplicaDivergence(FedHypeVAEError):
    """The replicas of Phi differ across ranks."""


@dataclass
class TrainState:
    round: int = 0  # rounds completed
    step: int = 0  # steps of the next round completed (> 0 only at a stop between two steps)
    steps: int = 0  # DP-SGD steps completed (applied to Phi)
    stopped: str | None = None
    interrupted: bool = False  # a stop signal arrived: checkpoint and exit, resumable
    history: list = field(default_factory=list)  # round metrics (in memory; metrics.jsonl is the record)


@dataclass
class Decision:
    """What the release guard decided for one release of this rank's block of clients."""

    status: str  # released | budget | signal
    pending: object = None  # the payload, computed up to the noise
    epoch: int = 0
    free: bool = False  # an identical replay: nothing new released, nothing charged


def planned_steps(cfg: Config) -> int:
    return cfg.train.rounds * cfg.train.local_steps


def step_key(r: int, s: int) -> str:
    return f"round={r}/step={s}"


# the mechanisms a run's plan may hold, in the order `Trainer._agreed_plan` broadcasts their noise multipliers
_PLAN_ORDER = (DP_SGD, CLASS_STATS, MMD_EMBEDDINGS)


def make_plan(
    cfg: Config, *, use_mmd: bool, integer: dict | None = None, calibrated: dict | None = None
) -> PrivacyPlan | None:
    """The run's privacy plan from its list of mechanisms with their budget proportions: DP-SGD first (calibrated
    against the composed history, it takes what the one-shot releases leave), then the class statistics and,
    with the merf MMD term, the mean embeddings. A new mechanism is one more entry in `one_shot`. `calibrated`:
    the noise multipliers another rank's make_plan found for the same config (`plan_mechanisms`)."""
    p = cfg.privacy
    if not p.enabled:
        return None
    # a zero share: the class statistics are not released at all (no meta-code fit; e.g. a model without heads)
    integer = integer or {}  # {mechanism: Mechanism.integer} with secure aggregation
    one_shot = (
        [(CLASS_STATS, p.stats_epsilon_fraction, integer.get(CLASS_STATS, ()))] if p.stats_epsilon_fraction > 0 else []
    )
    if use_mmd:
        one_shot.append((MMD_EMBEDDINGS, p.mmd_epsilon_fraction))
    shares = run_shares(
        sample_rate=p.sample_rate, steps=planned_steps(cfg), one_shot=one_shot, integer=integer.get(DP_SGD, ())
    )
    if math.isinf(p.target_epsilon):
        # no budget: every mechanism gets the fixed noise multiplier (0: no noise anywhere, the "sigma = 0"
        # reference, with no guarantee); the run then reports the epsilon that noise gives
        sigma = p.noise_multiplier or 0.0
        mechs = [Mechanism(s.name, sigma, s.sample_rate, s.releases, s.integer) for s in shares]
        return PrivacyPlan(
            sigma=sigma,
            sample_rate=p.sample_rate,
            steps=planned_steps(cfg),
            delta=p.accounting_delta,
            accountant=p.accountant,
            target_epsilon=p.target_epsilon,
            planned_epsilon=epsilon_of(mechs, delta=p.accounting_delta, accountant=p.accountant),
            mechanisms=mechs,
        )
    return privacy_plan(
        shares,
        target_epsilon=p.target_epsilon,
        delta=p.accounting_delta,
        accountant=p.accountant,
        noise_multiplier=p.noise_multiplier,
        calibrated=calibrated,
    )


def round_pow2(n: int) -> int:
    """The power of two nearest to n (in log scale), at least 1."""
    return 1 << max(0, round(math.log2(max(int(n), 1))))


def flatten_config(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def may_change_on_resume(key: str) -> bool:
    return any(key == pat or (pat.endswith(".*") and key.startswith(pat[:-1])) for pat in RESUME_MAY_CHANGE)


def resume_changes(saved: dict, now: dict) -> dict:
    """{key: [old, new]} of the settings that differ; CheckpointError if any of them may not change. A key the
    saved config predates counts as its default (what that run ran with); a saved config this version cannot
    read at all is compared as written."""
    try:
        saved = config_from_dict(saved).to_dict()
    except FedHypeVAEError:
        pass
    a, b = flatten_config(saved), flatten_config(now)
    changed = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    locked = [k for k in changed if not may_change_on_resume(k)]
    if locked:
        raise CheckpointError(
            "cannot resume: these settings differ from the interrupted run and cannot change in the middle of a run "
            "(they define the data, the partition, the model or the privacy plan): "
            + ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in locked)
            + ". Resume with the run's own config.yaml, or start a new --out."
        )
    return changed


HOOK_EVENTS = ("round_begin", "step_begin", "step_end", "round_end")
TIMED_PHASES = ("guard", "ledger", "all_reduce", "phi_update", "engine", "accounting")
_NO_TIMER = nullcontext()


def no_heartbeat(where: str | None = None) -> None:
    """TrainerHooks.heartbeat when no step watchdog listens."""


class _Timed:
    """One timed phase: its EXCLUSIVE wall time (a phase timed inside it is not counted in it)."""

    __slots__ = ("hooks", "name", "t0")

    def __init__(self, hooks: TrainerHooks, name: str):
        self.hooks, self.name = hooks, name

    def __enter__(self):
        self.hooks._stack.append(0.0)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        stack = self.hooks._stack
        inner = stack.pop()
        if stack:
            stack[-1] += dt
        for timer in self.hooks._timers:
            timer(self.name, dt - inner)
        return False


_RELEASE_GENERATOR_CHUNK = 1024  # clients whose release generators are made at once (Trainer.release_generators)


class TrainerHooks:
    """Observers of the training loop, instead of patching the trainer's methods.

        tr.hooks.on("step_begin", lambda r, s: ...)     # round_begin(r), step_begin(r, s),
        tr.hooks.on("step_end", lambda r, s: ...)       # step_end(r, s), round_end(r, metrics)
        tr.hooks.add_timer(lambda phase, seconds: ...)  # exclusive seconds per timed phase

    step_begin fires before a step's release guard; step_end only once the step is applied to Phi (a
    step_begin without its step_end: the guard stopped there, budget or stop signal). The trainer wraps
    its phases in `timed(phase)` (TIMED_PHASES): guard (the ledger's budget test), ledger (the durable
    charge), all_reduce (every collective), phi_update (applying the reduced release to Phi), engine
    (the batched engine's prepare and release), accounting (epsilon_spent). With no timer registered
    `timed` is a shared no-op context and an event with no listener costs one empty loop. Observers only
    observe: they must issue no collective and change no state (every rank must stay in step).

    `heartbeat(where=None)` is called at the start of every DP step and checkpoint, and before and after every
    collective of the trainer; `where` says what the rank does from then on ("DP step round=R/step=S", ...),
    given where that changes. run.py sets it to its step watchdog's `beat` while the watchdog is armed
    (hpc/watchdog.py: a rank that gets no heartbeat for train.step_timeout_s ends itself); `no_heartbeat`
    otherwise. It must stay cheap: it runs on the hot path."""

    def __init__(self):
        self._on: dict = {e: [] for e in HOOK_EVENTS}
        self._timers: list = []
        self._stack: list = []
        self.heartbeat: Callable[..., None] = no_heartbeat

    def on(self, event: str, fn: Callable) -> Callable:
        if event not in self._on:
            raise ValueError(f"unknown trainer event {event!r}; events: {', '.join(HOOK_EVENTS)}")
        self._on[event].append(fn)
        return fn

    def emit(self, event: str, *args) -> None:
        for fn in self._on[event]:
            fn(*args)

    def add_timer(self, fn: Callable[[str, float], None]) -> Callable[[str, float], None]:
        self._timers.append(fn)
        return fn

    @property
    def timing(self) -> bool:
        return bool(self._timers)

    def timed(self, phase: str):
        return _Timed(self, phase) if self._timers else _NO_TIMER


class Trainer:
    def __init__(
        self,
        cfg: Config,
        out_dir: Path,
        comm: Communicator | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        launcher: str = "none",
        device: str = "cpu",
        step_type: type | Callable[[int], type] | None = None,
    ):
        self.cfg = cfg
        # the DP step's class for every hosted client: one class, or a function of the client id (the seam for a
        # client with an extended step: the white-box audit's canaries); default DPStep. Clients of different
        # classes are in different blocks
        self.step_type_of = (
            step_type
            if callable(step_type) and not isinstance(step_type, type)
            else (lambda cid, t=(step_type or DPStep): t)
        )
        self.out = Path(out_dir)
        self.comm = comm or LocalCommunicator()
        self.resume = resume
        self.progress = progress and self.comm.is_root
        self.launcher = launcher
        self.device = device
        self.torch_device = torch.device(device)  # GPU path untested here (no GPU on the development machine)
        self.t0 = time.perf_counter()
        self.comm_seconds = 0.0
        self.stop_signal: int | None = None  # set by a signal handler; acted on at the next step boundary
        self.resume_info: dict = {}  # what this resume continued from and changed
        self.replays = {"free": 0, "charged_again": 0}  # releases made again after a resume, this session
        self._saved_at: tuple | None = None
        self.costs: dict = {"setup_s": None, "checkpoint_s": []}  # this rank's (diagnostics: depend on data sizes)
        self.hooks = TrainerHooks()
        self._phase_s: dict = {}  # the trainer's own phases' seconds so far (train.time_phases)
        if cfg.train.time_phases:
            self.hooks.add_timer(self._add_phase_time)
        # federation.aggregation: the rule that turns the released steps into Phi's update
        self.aggregation = make_aggregation(cfg.federation.aggregation, self)
        # privacy.trust_model: where the noise is added (fedhypevae/privacy/trust.py); bound to the public
        # federation in setup, before anything is written or released
        p = cfg.privacy
        why = trust_refusal(cfg.federation.aggregation, p.trust_model) if p.enabled else None
        if why:
            raise ConfigError(why)
        secure = p.enabled and p.secure_aggregation
        self.trust = make_trust_model(
            "secure" if secure else (p.trust_model if p.enabled else "local"),
            collusion=p.collusion,
            party=p.party,
            noise_seed=p.noise_seed,
            backend=self.comm.backend,
            **({"bits": p.secure_bits, "grid_ratio": p.secure_grid_ratio} if secure else {}),
        )
        self.integer: dict = {}  # {mechanism: Mechanism.integer (A, dim)} of the releases on secure aggregation's path
        self.groups: list | None = None  # the clients of each group kept whole on a resume (`_keep_groups`)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, comm = self.cfg, self.comm
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self._check_out_dir()
        if self.resume:  # refuse before anything is read, written or released
            saved = yaml.safe_load((self.out / "config.yaml").read_text())
            self.resume_info["changed"] = resume_changes(saved, cfg.to_dict())
        if is_shard_dir(cfg.data.path):
            # a shard directory: place clients from the manifest's public sizes, then read only ours
            declared = self._declared_sizes_from(read_manifest(cfg.data.path)["declared_sizes"])
            self._place(declared)
            fed = build_federation(cfg.data, cfg.partition, cfg.seed, client_ids=self.placement[comm.rank])
        else:
            # one source file: every rank partitions it identically (public seed), places the clients by their
            # public declared sizes and builds only its own (their records selected and transformed)
            def own(sizes: list) -> list:
                self._place(self._declared_sizes_from(sizes))
                return self.placement[comm.rank]

            fed = build_federation(cfg.data, cfg.partition, cfg.seed, client_ids=own)
            declared = self.declared  # set by _place
        self.fed = fed
        mine = self.placement[comm.rank]
        total = float(sum(declared))
        m = fed.num_clients
        self.weights = {i: (declared[i] / total if cfg.federation.weights == "declared" else 1.0 / m) for i in range(m)}
        q = cfg.privacy.sample_rate  # the trust model's refusals (collusion, party) on the public federation
        self.trust.bind(
            Federation(
                tuple(self.weights[i] / (q * declared[i]) for i in range(m)),
                tuple(tuple(p) for p in self.placement),
                cfg.meta.codes,
            ),
            world_size=comm.world_size,
        )

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, SeedTag.PHI_INIT))  # Phi: the same on every rank
            mc = cfg.model
            self.hyper = HyperNetwork.from_config(fed.dim, fed.num_classes, mc)
        self.hyper.to(self.torch_device)
        if mc.lipschitz is not None:
            self.hyper.project_spectral(mc.lipschitz)
        self.phi_names = [n for n, _ in self.hyper.named_parameters()]
        self.phi_numel = sum(p.numel() for p in self.hyper.parameters())
        self.opt = self._make_optimizer()

        # diagnostics are functions of private data (outside the guarantee): with privacy.diagnostics
        # false they never leave the client; only the public client count travels
        self.send_diagnostics = cfg.privacy.diagnostics or not cfg.privacy.enabled
        self._public_diag = torch.zeros(len(DIAG_KEYS), dtype=torch.float64)
        self._public_diag[DIAG_KEYS.index("clients")] = 1.0
        self.use_mmd_release = cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "merf"
        if cfg.privacy.enabled and cfg.privacy.secure_aggregation:
            self.trust.start(self)  # the encoding and the key agreement between ranks (a collective)
            self.integer = integer_params(
                phi_dim=self.phi_numel,
                stats_dim=stats_flat_size(fed.num_classes, fed.dim, cfg.stats.covariance),
                grid_ratio=cfg.privacy.secure_grid_ratio,
            )
        self.plan = self._agreed_plan(cfg)
        if self.integer and self.plan is not None:
            sigma_s = self.plan.noise_multiplier(CLASS_STATS)
            m = stats_components(cfg.stats.covariance)
            stats = (sigma_s, m, int(self.integer[CLASS_STATS][1])) if sigma_s else None
            self.trust.check_overflow(self.sigma, planned_steps(cfg), cfg.privacy.delta, stats)
        self.features = None
        if self.use_mmd_release:
            bws = mmd_bandwidths(cfg.model, fed.dim)
            self.features = RandomFeatures(
                bandwidths=bws,
                features_per_bandwidth=cfg.model.mmd_features,
                dim=fed.dim,
                seed=derive_seed(cfg.seed, SeedTag.MERF_FEATURES),
            )
        by_id = {cd.client_id: cd for cd in fed.clients}
        # every later stage's settings and memory, before anything is written or released
        self.stats_clip = validate_run(
            cfg, transform=fed.transform, classes=fed.num_classes, dim=fed.dim, clients_here=len(mine)
        )
        # the rank's clients in blocks (the rule groups them; a client with its own step class gets its own), each
        # block holding its clients' data and stacked private state. The declared (public) size is the only size
        # any DP computation uses. One secret key for the rank's generators (secure noise; never stored)
        # A group of clients kept whole on a resume (`_keep_groups`) is grouped alone, as the rank that hosted it did.
        key = secret_key()
        self.blocks, self.block_types, self.block_groups = [], [], []
        members = [(i, self.step_type_of(i)) for i in mine]
        grouped = self.aggregation.blocks(members)  # the rule's own checks see every hosted client
        if self.groups is not None:
            owner = {c: k for k, g in enumerate(self.groups) for c in g}
            parts: list = [[] for _ in self.groups]
            for m in members:
                parts[owner[m[0]]].append(m)
            grouped = [b for part in parts for b in self.aggregation.blocks(part)]
        for ids, step_type in grouped:
            self.blocks.append(
                ClientBlock.from_data(
                    [by_id[i] for i in ids],
                    cfg,
                    num_classes=fed.num_classes,
                    dim=fed.dim,
                    declared=[declared[i] for i in ids],
                    device=self.torch_device,
                    key=key,
                )
            )
            self.block_types.append(step_type)
            self.block_groups.append(owner[ids[0]] if self.groups is not None else 0)
        views = {b.ids[k]: b.client(k) for b in self.blocks for k in range(b.M)}
        self.clients: list[Client] = [views[i] for i in mine]  # views of the blocks' rows, placement order

        self.state = TrainState()
        start = ckpt.latest_complete(self.out) if self.resume else None
        # the rank's durable ledger; it reads every rank's file (the run may have had another world size)
        self.ledger = PrivacyLedger(
            [c.id for c in self.clients], run_dir=self.out, rank=comm.rank, world_size=comm.world_size
        )
        if self.groups is not None:  # the ledger's ids of the kept groups, registered once
            self._group_blocks = [self.ledger.sub_block(g) for g in self.groups]
        if self.resume and cfg.privacy.noise_seed is not None:
            self._check_noise_format()
        comm.barrier()  # every rank has read the ledger before any rank appends to it
        if comm.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        position = ckpt.checkpoint_position(start) if start is not None else (0, 0)
        if comm.is_root:
            self.state.history, cut = cut_metrics(self.out, keep_through=position[0]) if self.resume else ([], [])
            if self.resume:
                self.resume_info.update(
                    {
                        "from_checkpoint": str(start) if start else None,
                        "round": position[0],
                        "step": position[1],
                        "cut_rounds": cut,
                    }
                )
        else:
            self.resume_info.update({"round": position[0], "step": position[1]})
        self.writer = MetricWriter(
            self.out, enabled=comm.is_root, purge_step=position[0] + 1 if self.resume else None, fresh=not self.resume
        )
        if comm.is_root:
            append_event(
                self.out,
                {
                    "event": "resumed" if self.resume else "start",
                    "world_size": comm.world_size,
                    "launcher": self.launcher,
                    **self.resume_info,
                },
            )
        if start is not None:
            self._restore(start)
        else:
            self._release_mmd_embeddings()
            self.save_checkpoint()  # round 0: the one-shot releases are never redone
        self._steps: list | None = None  # the DP steps of this rank's blocks, chunk by chunk (at the first step)
        self.costs["setup_s"] = time.perf_counter() - self.t0

    def _check_noise_format(self) -> None:
        """A reproducible-noise resume needs the steps drawn as this version draws them: a replay is free only
        when it releases the same value with the same noise, and noise drawn another way would release a
        different value under a key already charged (it would be charged again: refused instead, said here)."""
        prefix = f"noise{NOISE_FORMAT}:"
        old = [r for r in self.ledger.records if r.mechanism == DP_SGD and r.digest and not r.digest.startswith(prefix)]
        if old:
            found = old[0].digest.split(":")[0] if ":" in old[0].digest else "noise1"
            how = NOISE_FORMATS.get(int(found[5:]) if found[5:].isdigit() else None, "another layout")
            raise CheckpointError(
                f"cannot resume {self.out} with privacy.noise_seed: its DP-SGD steps were drawn by an earlier version "
                f"({found}: {how}) and this version draws {prefix[:-1]} ({NOISE_FORMATS[NOISE_FORMAT]}), so a "
                "replayed step would release a different noisy value. Resume it with the version that started it, or "
                "start a new run with another --out"
            )

    def _agreed_plan(self, cfg: Config) -> PrivacyPlan | None:
        """make_plan, calibrated on rank 0 alone: its noise multipliers (a public function of the config every rank
        holds) are broadcast and the other ranks build the plan from them, computing and checking its composed
        epsilon themselves (one accountant call instead of a calibration's ~30: 0.5-1.5 s of every rank's start,
        paid R times over the cores of a node). Should rank 0's calibration fail (any exception), it still broadcasts
        (NaN) and re-raises, and every other rank runs make_plan itself and fails with the same message. The
        mechanisms are those of `_PLAN_ORDER`: a plan with another one is refused on rank 0 before the broadcast."""
        p, comm = cfg.privacy, self.comm
        kw = dict(use_mmd=self.use_mmd_release, integer=self.integer)
        if comm.world_size == 1 or not p.enabled or math.isinf(p.target_epsilon):
            return make_plan(cfg, **kw)
        buf = torch.full((len(_PLAN_ORDER),), math.nan, dtype=torch.float64)
        plan, error = None, None
        if comm.is_root:
            try:
                plan = make_plan(cfg, **kw)
            except BaseException as exc:  # noqa: BLE001 - whatever it is, the others must not wait in the broadcast
                error = exc
            else:
                extra = sorted({m.name for m in plan.mechanisms} - set(_PLAN_ORDER))
                if extra:
                    error = AssertionError(f"Trainer._agreed_plan: mechanisms {extra} are not in _PLAN_ORDER")
                    plan = None
                else:
                    for k, name in enumerate(_PLAN_ORDER):
                        buf[k] = -1.0 if plan.noise_multiplier(name) is None else plan.noise_multiplier(name)
        comm.broadcast(buf, root=0)
        if error is not None:
            raise error
        if plan is not None:
            return plan
        if bool(torch.isnan(buf).any()):
            return make_plan(cfg, **kw)  # rank 0 could not calibrate: the same error here
        sigmas = {name: float(v) for name, v in zip(_PLAN_ORDER, buf.tolist()) if v >= 0}
        return make_plan(cfg, **kw, calibrated=sigmas)

    def _make_optimizer(self) -> Optimizer:
        # torch.optim.Adam/SGD's own update and state_dict format, without their import of torch._dynamo (1.5 s at
        # every rank's start; fedhypevae.optim). foreach: one kernel per operation over all of Phi's tensors
        # (bit-identical to the per-tensor loop, which is torch's default on the CPU and took 3-5 ms a step for Phi's
        # ~20 tensors)
        return Optimizer(self.hyper.parameters(), kind=self.cfg.train.optimizer, lr=self.cfg.train.lr, foreach=True)

    @property
    def steps(self) -> list:
        """The DP steps of this rank: for every block, its class's `DPStep` on each chunk of at most
        `train.chunk_clients` of its clients (views sharing the block's storage: the working set of a step is one
        chunk's, however many clients the rank hosts). Chunks share one noise scratch. Built at the first step."""
        if self._steps is None:
            per_sample = PER_SAMPLE[self.cfg.train.engine]
            size = self.cfg.train.chunk_clients
            draws = NoiseDraws()
            self._steps, self._step_groups = [], []
            for block, step_type, g in zip(self.blocks, self.block_types, self.block_groups):
                w = [self.aggregation.release_weight(i) for i in block.ids]
                for sub in block.chunks(size if size > 0 else block.M):
                    lo = block.ids.index(sub.ids[0]) if sub is not block else 0
                    self._steps.append(step_type(sub, weights=w[lo : lo + sub.M], per_sample=per_sample, draws=draws))
                    self._step_groups.append(g)
        return self._steps

    @property
    def engine(self) -> str:
        """The per-sample form the steps run: batched (ghost norms) or reference (torch.func)."""
        forms = {st.per_sample_kind for st in self.steps}
        return "batched" if forms == {"ghost"} else "reference"

    @property
    def engine_note(self) -> str | None:
        notes = sorted({st.note for st in self.steps if st.note})
        return (
            (
                "train.engine=batched computes per-sample gradients with torch.func for this configuration: "
                + "; ".join(notes)
            )
            if notes
            else None
        )

    def _check_out_dir(self) -> None:
        check_output_dir(self.out)
        if self.resume:
            if not (self.out / "config.yaml").is_file():
                raise CheckpointError(f"--resume: {self.out} holds no run (no config.yaml); start without --resume")
            return
        if has_ledger(self.out) or ckpt.latest_complete(self.out) is not None:
            raise ConfigError(f"{self.out} already holds a run: pass --resume to continue it, or choose another --out")

    def _declared_sizes_from(self, sizes: list[int]) -> list[int]:
        fc = self.cfg.federation
        ds = fc.declared_sizes
        if ds is None:
            out = [int(s) for s in sizes]
        elif len(ds) != len(sizes) or any((not isinstance(s, int)) or isinstance(s, bool) or s < 1 for s in ds):
            raise ConfigError(f"federation.declared_sizes must list {len(sizes)} positive integers; got {ds}")
        else:
            out = list(ds)
        if fc.declared_size_rounding == "pow2":
            out = [round_pow2(s) for s in out]
        return out

    def _place(self, declared: list[int]) -> None:
        self.declared = declared
        self.groups = None
        kept = self._keep_groups(declared)
        if kept is not None:
            groups, hosted = kept
            self.placement = [sorted(c for k in h for c in groups[k]) for h in hosted]
            self.groups = [groups[k] for k in hosted[self.comm.rank]]
            self.resume_info["placement"] = f"the previous session's {len(groups)} blocks kept whole"
            return
        try:
            self.placement = place_clients(declared, self.comm.world_size)
        except PlacementError as exc:
            raise ConfigError(str(exc)) from None

    def _keep_groups(self, declared: list[int]) -> tuple | None:
        """On a reproducible-noise resume on another world size: the blocks of clients the previous session's ranks
        hosted (its ledger's block lines) and which of them each rank now hosts, whole, when there are at least as
        many as ranks. Each kept group is then its own block here (`setup`), computed as it was, so that a step
        released before the crash and replayed now is the same value under the same noise: free, checked by its
        digest (`guarded_release`). Only with local noise: there a client's noise does not depend on the placement
        (distributed shares and secure aggregation's rank shares do). None: place client by client."""
        p = self.cfg.privacy
        if not (self.resume and p.enabled and p.noise_seed is not None and p.trust_model == "local"):
            return None
        if p.secure_aggregation:
            return None
        groups = last_session_blocks(self.out)
        if len(groups) in (0, self.comm.world_size):
            return None  # the same world size places every client where it was
        flat = [c for g in groups for c in g]
        if sorted(flat) != list(range(len(declared))):
            return None  # not a partition of today's clients
        hosted = place_groups(groups, declared, self.comm.world_size)
        return None if hosted is None else (groups, hosted)

    # ---------------------------------------------------------------- the release guard
    @property
    def sigma(self) -> float:
        return self.plan.sigma if self.plan is not None else 0.0

    @property
    def reproducible(self) -> bool:
        return self.cfg.privacy.noise_seed is not None

    def guarded_release(
        self,
        mechanism: str,
        sigma: float,
        q: float,
        key: str,
        prepare: Callable[[int], object],
        payload: Callable[[object], list],
        *,
        stoppable: bool = False,
        lazy: bool = False,
        draws: str = "",
        parts: Callable[[object, int], list] | None = None,
    ) -> Decision:
        """The one guard every release of this rank's clients goes through (collective: every rank calls it).

        1. `prepare(epoch)` computes the payload up to the noise. With reproducible noise, a key already in
           the ledger for exactly this block is tried under that release's epoch: if the pre-noise payload
           has the digest the ledger recorded, the release is an identical replay (same value, same noise)
           and costs nothing. Otherwise the payload is recomputed under a fresh epoch (fresh coins, fresh
           noise: never the old noise on a new value) and charged. With secure noise every release is new,
           and with `lazy` nothing is computed here: the caller prepares and releases chunk by chunk after
           the charge (`Decision.pending` is None), so the payload of the whole rank is never held at once.
           `draws` names how the noise is drawn (it prefixes the digest): a release drawn another way is never
           an identical replay. A rank that kept an earlier session's blocks whole (`_keep_groups`) decides and
           records group by group instead (`parts(pending, g)`: group g's payload; `_prepare_kept_groups`): a group
           that re-releases its block's recorded value is free, the others are charged.
        2. The budget bit (and, when `stoppable`, the stop-signal bit) are combined across ranks by one
           max all-reduce, so every rank takes the same decision.
        3. The charge is appended to the ledger and fsync'd before the caller releases anything.
        """
        led, private = self.ledger, self.plan is not None
        repro = private and self.reproducible
        integer = self.integer.get(mechanism, ())
        if repro and self.groups is not None and parts is not None:
            epoch, pending, charge = self._prepare_kept_groups(mechanism, sigma, q, key, prepare, parts, draws, integer)
            free, digest = not charge, None
        else:
            candidate = led.latest(mechanism, key) if repro else None
            epoch = candidate.epoch if candidate is not None else led.fresh_epoch(mechanism, key)
            pending = prepare(epoch) if (repro or not lazy) else None
            digest = draws + payload_digest(payload(pending)) if repro else None
            free = led.identical(candidate, sigma, q, digest, integer)
            if candidate is not None and not free:
                epoch = led.fresh_epoch(mechanism, key)
                pending = prepare(epoch)
                digest = draws + payload_digest(payload(pending))
            charge = None  # the whole block
        if (not private) or free:
            fits = True
        else:
            with self.hooks.timed("guard"):
                part = charge is not None and len(charge) < len(self.groups)  # only these groups' clients
                clients = [c for k, _ in charge for c in self.groups[k]] if part else None
                fits = led.fits(mechanism, sigma, q, self.plan, integer, clients=clients)
        flags = torch.tensor(
            [0.0 if fits else 1.0, 1.0 if (stoppable and self.stop_signal) else 0.0], dtype=torch.float64
        )
        flags = self.allreduce(flags, op="max")
        if float(flags[1]) > 0:
            return Decision("signal")
        if float(flags[0]) > 0:
            return Decision("budget")
        if private and not free:
            again = led.released(mechanism, key)
            if again and charge is not None:  # kept groups: did one of the charged ones release it before?
                again = any(led.touched(mechanism, key, None, self.groups[k]) for k, _ in charge)
            if again:
                self.replays["charged_again"] += 1
            elif charge is not None and len(charge) < len(self.groups):
                self.replays["free"] += 1  # some kept groups re-released, the others released for the first time
            with self.hooks.timed("ledger"):
                parts = None if charge is None else [(self._group_blocks[k], d) for k, d in charge]
                led.charge(mechanism, sigma, q, key, epoch=epoch, digest=digest, integer=integer, parts=parts)
        elif free:
            self.replays["free"] += 1
        return Decision("released", pending, epoch, free)

    def _prepare_kept_groups(self, mechanism, sigma, q, key, prepare, parts, draws, integer) -> tuple:
        """The guard's first step on a rank that kept an earlier session's blocks whole (`_keep_groups`): it records
        its releases group by group (each group its block), so a replay is decided group by group. Under the epoch
        of the groups' last releases of `key` (all one epoch, and fresh for the groups that never released it):
        a group whose payload has its record's digest re-releases that value (free), a group without a record
        releases for the first time (charged); any other case, and a group whose digest differs, makes the whole
        rank release under a fresh epoch, every group charged. Returns (epoch, pending, [(group index, digest)] to
        charge)."""
        led, groups = self.ledger, self.groups
        recs = [led.latest(mechanism, key, b) for b in self._group_blocks]
        epochs = {r.epoch for r in recs if r is not None}
        epoch = next(iter(epochs)) if len(epochs) == 1 else None
        if epoch is not None and any(r is None and led.touched(mechanism, key, epoch, g) for r, g in zip(recs, groups)):
            epoch = None  # that epoch's noise was used by a group's clients in another block
        if epoch is not None:
            pending = prepare(epoch)
            digests = [draws + payload_digest(parts(pending, k)) for k in range(len(groups))]
            same = [r is not None and led.identical(r, sigma, q, d, integer) for r, d in zip(recs, digests)]
            if all(ok or r is None for ok, r in zip(same, recs)):
                return epoch, pending, [(k, d) for k, (d, ok) in enumerate(zip(digests, same)) if not ok]
        epoch = led.fresh_epoch(mechanism, key)
        pending = prepare(epoch)
        return epoch, pending, [(k, draws + payload_digest(parts(pending, k))) for k in range(len(groups))]

    def release_generators(self, stream: int, epoch: int = 0):
        """Every hosted client's generator for a one-shot release on `stream` (round 0, step 0), in the order of
        `self.clients` (an iterator): made `_RELEASE_GENERATOR_CHUNK` rows of a block at a time with one vectorized
        call (`ClientBlock.generators`), the same generators as each client's `rng.generator(stream, 0, 0, epoch)`
        (~5 against ~60 us a client: seconds at 50,000 clients a rank; a chunk at a time: a generator holds 5 KB)."""
        n, key = _RELEASE_GENERATOR_CHUNK, None
        for c in self.clients:
            k = (id(c.block), c.index // n)
            if k != key:
                key, lo = k, k[1] * n
                gens = c.block.generators(0, 0, epoch, stream=stream, rows=slice(lo, lo + n))
            yield gens[c.index - lo]

    def group_positions(self, g: int) -> list[int]:
        """Positions in `self.clients` of kept group g's clients, in the group's order."""
        where = {c.id: k for k, c in enumerate(self.clients)}
        return [where[i] for i in self.groups[g]]

    def _release_mmd_embeddings(self) -> None:
        if self.features is None:
            return
        sigma = self.plan.noise_multiplier(MMD_EMBEDDINGS) if self.plan is not None else 0.0
        # pre-noise: no coins, the same on every epoch; computed client by client where they are used (the digest,
        # then the release), never held for every client at once (50,000 clients: 1.5 GB of fp64 sums)
        d = self.guarded_release(
            MMD_EMBEDDINGS,
            sigma,
            1.0,
            "mmd",
            lambda epoch: None,
            lambda pend: (t for c in self.clients for t in c.mmd_sums(self.features)),
            lazy=True,
            parts=lambda pend, g: (t for k in self.group_positions(g) for t in self.clients[k].mmd_sums(self.features)),
        )
        if d.status != "released":
            raise PrivacyError(
                f"the DP mean embeddings of the MMD term cannot be released again within the budget: {self.out} "
                f"already spent epsilon {self.epsilon_spent():.4f} of {self.cfg.privacy.target_epsilon} (an earlier "
                "attempt released them and stopped before its first checkpoint; those charges stay). Start a new "
                "run with another --out"
            )
        for c, g in zip(self.clients, self.release_generators(STREAM_MMD_RELEASE, d.epoch)):
            c.release_mmd_embeddings(c.mmd_sums(self.features), noise_multiplier=sigma, generator=g)

    def epsilon_spent(self) -> float:
        if self.plan is None:
            return 0.0
        with self.hooks.timed("accounting"):
            worst = self.ledger.epsilon(delta=self.cfg.privacy.accounting_delta, accountant=self.cfg.privacy.accountant)
            buf = torch.tensor([worst], dtype=torch.float64)
            return float(self.allreduce(buf, op="max")[0])

    def check_replicas(self) -> None:
        """Every rank must hold the same Phi: compare a checksum (sum and weighted sum) by max/min reduce."""
        if self.comm.world_size == 1:
            return
        v = self.flat_phi(self.hyper)
        w = torch.arange(1, v.numel() + 1, dtype=torch.float64) / v.numel()
        c = torch.stack([v.sum(), (v * w).sum()])
        hi, lo = self.allreduce(c.clone(), op="max"), -self.allreduce(-c.clone(), op="max")
        if not torch.allclose(hi, lo, rtol=1e-9, atol=1e-9):
            raise ReplicaDivergence(
                f"rank {self.comm.rank}: the replicas of Phi diverged after {self.state.steps} steps "
                f"(checksums range {lo.tolist()} .. {hi.tolist()}); stopping. This points to a "
                "non-deterministic kernel or a corrupted all-reduce; resume from the last checkpoint."
            )

    def _collective(self, collective: Callable, *args) -> torch.Tensor | None:
        """`collective(*args)` of the communicator: timed (comm_seconds, the hooks' all_reduce phase), with a
        heartbeat before and after it (the step watchdog's)."""
        beat = self.hooks.heartbeat
        with self.hooks.timed("all_reduce"):
            beat()
            t = time.perf_counter()
            out = collective(*args)
            self.comm_seconds += time.perf_counter() - t
            beat()
        return out

    def allreduce(self, buf: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Every collective of training goes through here (or `gather`, `broadcast`): in place, timed, beaten."""
        return self._collective(self.comm.allreduce, buf, op)

    def gather(self, buf: torch.Tensor, root: int = 0) -> torch.Tensor | None:
        """Every rank's `buf` stacked on `root` (None elsewhere): timed like `allreduce`."""
        return self._collective(self.comm.gather, buf, root)

    def broadcast(self, buf: torch.Tensor, root: int = 0) -> torch.Tensor:
        """`root`'s `buf` on every rank, in place: timed like `allreduce`."""
        return self._collective(self.comm.broadcast, buf, root)

    def barrier(self) -> None:
        """Wait for every rank, with a heartbeat before and after (not timed: a barrier waits for work, not data)."""
        beat = self.hooks.heartbeat
        beat()
        self.comm.barrier()
        beat()

    # ---------------------------------------------------------------- training
    def flat_phi(self, hyper: HyperNetwork) -> torch.Tensor:
        return _flat_phi(hyper)

    def apply_flat_grad(self, flat: torch.Tensor) -> None:
        """Phi's optimizer step with this flat gradient (parameter order), then the projection."""
        off = 0
        for p in self.hyper.parameters():
            n = p.numel()
            p.grad = flat[off : off + n].view_as(p).to(device=p.device, dtype=p.dtype).clone()
            off += n
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.project(self.hyper)

    def project(self, hyper: HyperNetwork) -> None:
        """The spectral-norm projection of a Phi (Lipschitz bound), when model.lipschitz is set."""
        if self.cfg.model.lipschitz is not None:
            # small SVDs: one thread. Multithreaded MKL LAPACK on these shapes was measured 10-200x slower
            # on a loaded 2-core machine (OpenMP threads waiting for busy cores), 2 ms vs up to 0.5 s per step
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                hyper.project_spectral(self.cfg.model.lipschitz)
            finally:
                torch.set_num_threads(n)

    def _prepare_step(self, r: int, s: int, epoch: int) -> list:
        """Every block's step up to the noise (one PendingBatch per block)."""
        agg, steps = self.aggregation, self.steps
        for st in steps:
            st.profile = self.hooks.timing  # per-phase step timings for whoever times the phases
        with self.hooks.timed("engine"):
            return [st.prepare(agg.step_hyper(st.block), r, s, epoch=epoch) for st in steps]

    def step_noise(self) -> tuple:
        """(the noise multiplier per block each client applies, the multiplier the ledger charges) for a DP-SGD step.

        The aggregation rule places the noise (Aggregation.noise_multipliers: the client's own coordinates
        psi_i, v_i and Phi's; by default as the trust model prescribes). The charge is the smallest multiplier over
        what is privatized (strict mode: the own block and the aggregate's Phi noise; paper mode: the latter), the
        Phi noise counted as the trust model's adversary faces it on the aggregate (TrustModel.charged_multiplier):
        local, each client's own; distributed, the shares unknown to a coalition, at the largest per-record
        sensitivity; central, the aggregator's draw. With the joint clipping to C, a Gaussian mechanism whose
        parts carry different noise is at least as private as one with the smallest multiplier everywhere, so the
        ledger never records less than is spent. As prescribed, every trust model is charged the plan's sigma."""
        blocks = noise_blocks(self.aggregation.noise_multipliers(self.sigma))
        return blocks, self.trust.charged_multiplier(blocks, self.sigma, strict=self.cfg.privacy.mode == "strict")

    def _dp_step(self, r: int, s: int) -> str | None:
        """One DP step of every hosted client, through the release guard. Returns None, or why it stopped."""
        cfg, agg, hooks = self.cfg, self.aggregation, self.hooks
        blocks, sigma = self.step_noise()
        d = self.guarded_release(
            DP_SGD,
            sigma,
            cfg.privacy.sample_rate,
            step_key(r, s),
            lambda epoch: self._prepare_step(r, s, epoch),
            lambda pend: [t for p in pend for t in p.payload()],
            stoppable=True,
            lazy=True,
            draws=f"noise{NOISE_FORMAT}:",
            parts=lambda pend, g: [t for p, pg in zip(pend, self._step_groups) if pg == g for t in p.payload()],
        )
        if d.status != "released":
            return d.status
        buf = agg.new_step_buffer(len(DIAG_KEYS))  # [the rule's block | the diagnostics]
        W = agg.step_width
        for k, st in enumerate(self.steps):  # chunk by chunk: prepared here unless the guard needed the payload
            with hooks.timed("engine"):
                st.profile = hooks.timing
                pend = (
                    d.pending[k] if d.pending is not None else st.prepare(agg.step_hyper(st.block), r, s, epoch=d.epoch)
                )
                rel = st.release(pend, sigma=blocks, features=self.features)
            agg.add_release(buf, st.block, rel.phi)
            buf[W:] += rel.diag if self.send_diagnostics else st.block.M * self._public_diag
        # the one collective of a step (central: the aggregator's draw, keyed like the clients' noise)
        self.trust.begin_release(STREAM_STEP, r, s, d.epoch)
        reduced = agg.reduce_step(buf)
        with hooks.timed("phi_update"):
            agg.apply_step(reduced)
        self._round_diag += reduced[W:]
        self.state.steps += 1
        every = cfg.train.replica_check_every
        if every and self.state.steps % every == 0:
            self.check_replicas()
        return None

    def _add_phase_time(self, name: str, seconds: float) -> None:
        self._phase_s[name] = self._phase_s.get(name, 0.0) + seconds

    def phase_times(self) -> dict:
        """Wall seconds so far per phase on this rank (train.time_phases): the DP steps' own (summed over the
        rank's chunks) and the trainer's (exclusive); `engine_other` is the engine's time outside the steps'
        phases (their bookkeeping between phases)."""
        steps: dict = {}
        for st in self.steps:
            for k, v in st.timings.items():
                steps[k] = steps.get(k, 0.0) + v
        out = {k: v for k, v in self._phase_s.items() if k != "engine"}
        out.update(steps)
        out["engine_other"] = self._phase_s.get("engine", 0.0) - sum(steps.values())
        return out

    def run_round(self, r: int, start_step: int = 0) -> dict | None:
        """Round r from step `start_step`. Returns its metrics, or None when a stop signal ended it between
        two steps (state.step then says how many of its steps are done)."""
        cfg, hooks = self.cfg, self.hooks
        t_round = time.perf_counter()
        comm_before = self.comm_seconds
        phases_before = self.phase_times() if cfg.train.time_phases else None
        self._round_diag = torch.zeros(len(DIAG_KEYS), dtype=torch.float64)
        hooks.emit("round_begin", r)
        self.aggregation.begin_round(r)
        steps_done = start_step
        for s in range(start_step, cfg.train.local_steps):
            hooks.heartbeat(f"DP step {step_key(r, s)}")
            hooks.emit("step_begin", r, s)
            why = self._dp_step(r, s)
            if why == "signal":
                self.state.interrupted, self.state.step = True, s
                return None
            if why == "budget":
                self.state.stopped = (
                    f"budget guard: one more step would exceed epsilon={cfg.privacy.target_epsilon} "
                    f"(stopped at round {r}, step {s})"
                )
                break
            hooks.emit("step_end", r, s)
            steps_done += 1
        self.aggregation.end_round(r, steps_done)
        hooks.heartbeat(f"the end of round={r}")
        metrics = {"privacy/epsilon": self.epsilon_spent(), "train/steps": float(self.state.steps)}
        if self.send_diagnostics:
            # timings depend on the realized batch sizes: a side channel, recorded with the diagnostics
            metrics.update(
                {
                    "time/round(s)": time.perf_counter() - t_round,
                    "comm/all_reduce(ms)": 1e3 * (self.comm_seconds - comm_before),
                }
            )
            if phases_before is not None:  # rank 0's phases
                now = self.phase_times()
                metrics.update({f"time/phase/{k}(s)": now[k] - phases_before.get(k, 0.0) for k in sorted(now)})
            d = dict(zip(DIAG_KEYS, self._round_diag.tolist()))
            n = max(d["batch"], 1.0)
            metrics.update(
                {
                    "diagnostics/recon_nll": d["nll_sum"] / n,
                    "diagnostics/kl": d["kl_sum"] / n,
                    "diagnostics/loss": (d["nll_sum"] + d["kl_sum"]) / n,
                    "diagnostics/clip_fraction": d["clipped"] / n,
                    "diagnostics/batch_size": d["batch"] / max(d["clients"], 1.0),
                }
            )
            if cfg.model.lambda_mmd > 0:
                metrics["diagnostics/mmd"] = d["mmd"] / max(d["clients"], 1.0)
        hooks.emit("round_end", r, dict(metrics))  # a copy: observers cannot change what is written
        return metrics

    def train(self) -> None:
        cfg = self.cfg
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.train.rounds, initial=self.state.round, desc="rounds", unit="round", dynamic_ncols=True
            )
        try:
            while self.state.round < cfg.train.rounds and not self.state.stopped:
                r = self.state.round
                metrics = self.run_round(r, start_step=self.state.step)
                if metrics is None:  # a stop signal between two steps: checkpoint there, every rank together
                    self.save_checkpoint()
                    break
                self.state.round, self.state.step = r + 1, 0
                self.state.history.append({"round": r + 1, **metrics})
                self.writer.log(r + 1, metrics)
                if bar is not None:
                    bar.update(1)
                    post = {"eps": f"{metrics['privacy/epsilon']:.3f}"}
                    if "diagnostics/loss" in metrics:
                        post["loss"] = f"{metrics['diagnostics/loss']:.1f}"
                    bar.set_postfix(**post)
                every = cfg.train.checkpoint_every
                if self.state.stopped or (every and (r + 1) % every == 0) or r + 1 == cfg.train.rounds:
                    self.save_checkpoint()  # collective: every rank saves its own clients
        finally:
            if bar is not None:
                bar.close()

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        pos = (self.state.round, self.state.step)
        d = ckpt.checkpoint_dir(self.out, *pos)
        if self._saved_at == pos:  # nothing happened since the last checkpoint (e.g. a stop right after a resume)
            return d
        self.hooks.heartbeat(f"the checkpoint at round={pos[0]}/step={pos[1]}")
        t0 = time.perf_counter()
        mid_round = self.state.step > 0
        # the rank's clients' private state: one shard, the blocks' stacks as they are (no copy)
        rule = {}
        for c in self.clients:
            extra = self.aggregation.client_state(c, mid_round)  # e.g. delta inside a round: the private copy of Phi
            if extra:
                rule[c.id] = extra
        ckpt.save_shard(d, self.comm.rank, [(b.ids, b.state()) for b in self.blocks], {"rule": rule})
        self.costs["checkpoint_s"].append(time.perf_counter() - t0)  # this rank's write (before the barrier)
        if self.comm.is_root:
            # shared outputs hold only public state and post-processing of DP releases: no diagnostics
            atomic_torch_save(
                {
                    "hyper": self.hyper.state_dict(),
                    "opt": self.opt.state_dict(),
                    "optimizer": self.cfg.train.optimizer,
                    "round": self.state.round,
                    "step": self.state.step,
                    "steps": self.state.steps,
                    "stopped": self.state.stopped,
                    "config": self.cfg.to_dict(),
                    "plan": self.plan.to_dict() if self.plan else None,
                },
                d / "shared.pt",
                fsync=True,
            )
        self.barrier()  # COMPLETE only once every rank's files are in place
        if self.comm.is_root:
            ckpt.mark_complete(d)
            ckpt.prune(self.out, self.cfg.train.keep_checkpoints)
        self.barrier()
        self._saved_at = pos
        return d

    def _restore(self, d: Path) -> None:
        shared = ckpt.load(d / "shared.pt", "shared checkpoint")
        self.hyper.load_state_dict(shared["hyper"])  # load_state_dict copies onto our device
        saved_opt = shared.get("optimizer", (shared.get("config") or {}).get("train", {}).get("optimizer"))
        if saved_opt == self.cfg.train.optimizer:
            self.opt.load_state_dict(shared["opt"])
            for g in self.opt.param_groups:  # a changed learning rate applies from here on
                g["lr"] = self.cfg.train.lr
        # else: train.optimizer changed: Phi's new optimizer starts without state (reported as a change)
        self.state = TrainState(
            round=shared["round"],
            step=shared.get("step", 0),
            steps=shared["steps"],
            stopped=shared.get("stopped"),
            history=self.state.history,
        )
        if (d / "clients").is_dir():  # shard format 1: one file per client
            states = {}
            for c in self.clients:
                states[c.id] = state = ckpt.load(ckpt.client_path(d, c.id), f"client {c.id} checkpoint")
                c.load_state_dict(state)
        else:
            states = self._restore_shards(d)
        self.aggregation.restore(states, self.state.step > 0, d)
        self._saved_at = (self.state.round, self.state.step)

    def _restore_shards(self, d: Path) -> dict:
        """This rank's clients' rows from every rank's shard of `d` (any world size wrote them); returns the rule's
        per-client state."""
        where = {cid: (b, k) for b in self.blocks for k, cid in enumerate(b.ids)}
        found, rule = set(), {}
        all_shards = ckpt.shards(d)
        self._check_parties_stay(d, all_shards)
        for path, shard in all_shards:
            for entry in shard["blocks"]:
                ids = entry["ids"].tolist()
                rows: dict = {}  # block -> (positions, rows)
                for row, cid in enumerate(ids):
                    if cid in where:
                        if cid in found:
                            raise CheckpointError(f"{d}: client {cid} is in two shards; the checkpoint is corrupt")
                        b, k = where[cid]
                        pos, src = rows.setdefault(id(b), (b, [], []))[1:]
                        pos.append(k)
                        src.append(row)
                        found.add(cid)
                for b, pos, src in rows.values():
                    try:
                        b.load_rows(pos, entry["state"], src, done=ckpt.release_pages)
                    except (KeyError, RuntimeError) as exc:
                        raise CheckpointError(
                            f"{path}: its state does not fit this run's model ({type(exc).__name__}: "
                            f"{exc}); delete that checkpoint directory to resume from an earlier one"
                        ) from None
            rule.update({cid: st for cid, st in shard.get("extra", {}).get("rule", {}).items() if cid in where})
        missing = sorted(set(where) - found)
        if missing:
            raise CheckpointError(
                f"{d}: no shard holds clients {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                "the checkpoint is incomplete: delete it to resume from an earlier one"
            )
        return rule

    def _check_parties_stay(self, d: Path, shards: list) -> None:
        """Secure aggregation with `privacy.party: rank`: the ranks are the parties (sites), so a resume that places
        clients on other ranks would move their private state to another party. CheckpointError unless every rank
        hosts exactly the clients its shard of `d` holds."""
        p = self.cfg.privacy
        if not (p.enabled and p.secure_aggregation and p.party == "rank"):
            return
        saved = {int(sh["rank"]): sorted(int(i) for e in sh["blocks"] for i in e["ids"].tolist()) for _, sh in shards}
        now = {r: sorted(int(i) for i in ids) for r, ids in enumerate(self.placement)}
        if saved != now:
            raise CheckpointError(
                f"{d}: privacy.party=rank with privacy.secure_aggregation: this checkpoint was written by "
                f"{len(saved)} rank(s) placing the clients otherwise than this run's {len(now)}; resuming would move "
                "clients' private state to another party (rank). Resume with the same number of ranks and placement"
            )

    def rank_costs(self) -> list:
        """Every rank's host and local rank (where the launcher placed it), the stop signal it received, setup time,
        median checkpoint write, peak resident memory and private state (allgathers: collective; diagnostics, since
        the costs depend on data sizes)."""
        import resource
        import statistics

        cps = self.costs["checkpoint_s"]
        mine = torch.tensor(
            [
                float(self.costs["setup_s"] or 0.0),
                statistics.median(cps) if cps else 0.0,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                sum(b.state_bytes() for b in self.blocks) / 2**20,
                float(sum(b.M for b in self.blocks)),
            ],
            dtype=torch.float64,
        )
        rows = self.comm.allgather(mine)
        # where the rank runs: its local rank, the stop signal it received, its host name (one int64 allgather)
        place = torch.tensor([self.comm.local_rank, self.stop_signal or 0], dtype=torch.int64)
        where = self.comm.allgather(torch.cat([place, encode_name(platform.node())]))
        keys = ("setup_s", "checkpoint_s", "peak_rss_mb", "state_mb", "clients")
        return [
            {
                "rank": r,
                "host": decode_name(where[r, 2:]),
                "local_rank": int(where[r, 0]),
                "stop_signal": int(where[r, 1]),  # the stop signal this rank received (0: none; the stop is collective)
                **{k: (int(v) if k == "clients" else float(v)) for k, v in zip(keys, row.tolist())},
            }
            for r, row in enumerate(rows)
        ]

    # ---------------------------------------------------------------- results
    def finish(self, extra: dict, *, missing: list | None = None) -> dict:
        cfg, p = self.cfg, self.cfg.privacy
        eps = self.epsilon_spent()
        reproducible = p.noise_seed is not None
        last = self.state.history[-1] if self.state.history else {}
        noised = self.plan is not None and all(m.noise_multiplier > 0 for m in self.plan.mechanisms)
        privacy = {
            "enabled": p.enabled,
            "mode": p.mode if p.enabled else None,
            "epsilon_spent": eps,
            "target_epsilon": p.target_epsilon if p.enabled else None,
            "delta": p.delta if p.enabled else None,
            "noise_multiplier": self.sigma,
            "sample_rate": p.sample_rate,
            "clip_norm": p.clip_norm,
            "steps": self.state.steps,
            "planned_steps": planned_steps(cfg),
            "accountant": p.accountant,
            "plan": self.plan.to_dict() if self.plan else None,
            "formal_guarantee": bool(p.enabled and p.mode == "strict" and noised and math.isfinite(eps)),
            "guarantee": guarantee_text(cfg, self.plan, eps, trust=self.trust),
            "trust_model": self.trust.describe(self.sigma, p.clip_norm) if p.enabled else None,
            "noise": (
                "reproducible from privacy.noise_seed: NOT suitable for a real release"
                if reproducible
                else "securely seeded per client (operating-system entropy)"
                + (
                    "; Phi's noise of a block of clients drawn as their sum (one Gaussian of the summed variance)"
                    if summed_phi_noise(p)
                    else ""
                )
            ),
            "reproducible_noise": reproducible,
            "weights": cfg.federation.weights
            + (" (declared public sizes)" if cfg.federation.weights == "declared" else ""),
            "declared_sizes": (
                "rounded to powers of two"
                if cfg.federation.declared_size_rounding == "pow2"
                else "as given in federation.declared_sizes"
                if cfg.federation.declared_sizes is not None
                else "the training sizes fixed at partitioning (public by assumption)"
            ),
            "ledger": self.ledger.summary(delta=p.accounting_delta, accountant=p.accountant) if self.plan else [],
            "ledger_format": 2,
            "replays": dict(self.replays),
            "diagnostics_outside_guarantee": bool(p.diagnostics),
        }
        training = {
            "rounds": self.state.round,
            "stopped_early": self.state.stopped,
            "engine": self.engine,
            "engine_note": self.engine_note,
            "final": {k: v for k, v in last.items() if k.startswith("diagnostics/")},
        }
        if self.send_diagnostics:  # wall times depend on batch sizes: diagnostics
            training.update(
                {
                    "wall_time_s": time.perf_counter() - self.t0,
                    "comm_time_s": self.comm_seconds,
                    "ranks": self.rank_costs(),
                }
            )
        results = {
            "status": "partial" if missing else "complete",
            "missing": list(missing or []),
            "privacy": privacy,
            "training": training,
            "data": {
                "source": self.fed.source,
                "clients": self.fed.num_clients,
                "classes": self.fed.num_classes,
                "dim": self.fed.dim,
                "transform": self.fed.transform,
                "declared_sizes": self.declared,
            },
            "provenance": provenance(self.cfg, launcher=self.launcher, comm=self.comm, device=self.device),
            **extra,
        }
        if self.resume:
            results["resume"] = {k: v for k, v in self.resume_info.items() if k != "from_checkpoint"}
        if self.comm.is_root:
            atomic_write_text(self.out / "results.json", ckpt.dumps_json(results, indent=2) + "\n")
            append_event(
                self.out,
                {"event": "partial" if missing else "finished", "missing": list(missing or []), "epsilon_spent": eps},
            )
        self.writer.close()
        self.ledger.close()
        return results


def guarantee_text(cfg: Config, plan: PrivacyPlan | None = None, epsilon: float | None = None, *, trust=None) -> str:
    """results.json's privacy.guarantee: what is guaranteed, for which unit, and (with `trust`, the run's bound trust
    model) against whom."""
    p = cfg.privacy
    if not p.enabled:
        return "none: privacy.enabled is false (non-private reference run)"
    if plan is not None and any(m.noise_multiplier == 0 for m in plan.mechanisms):
        zero = ", ".join(m.name for m in plan.mechanisms if m.noise_multiplier == 0)
        return (
            f"none: no noise is added ({zero} at noise multiplier 0; privacy.target_epsilon is infinite and "
            "privacy.noise_multiplier is 0 or unset), so nothing bounds what the outputs reveal"
        )
    target = (
        "infinite: the epsilon below is what the fixed noise gives"
        if math.isinf(p.target_epsilon)
        else p.target_epsilon
    )
    eps = "" if epsilon is None or not math.isfinite(epsilon) else f", epsilon spent {epsilon:.4g}"
    unit = f"one record of one client's training split, (epsilon, delta) = ({target}, {p.delta}) per client{eps}"
    where = f" {trust.guarantee()}" if trust is not None and trust.fed is not None else ""
    if p.mode == "strict":
        what = (
            "every value a client releases (noisy Phi gradients or deltas, DP statistics, DP mean embeddings) and "
            "everything derived from them"
            if trust is None or trust.name == "local"
            else "the aggregate of the clients' Phi gradients, the class statistics, each client's DP mean embeddings "
            "(full local noise) and everything derived from them"
        )
        return (
            f"formal: {what} (Phi, meta-code, synthetic set) is DP for {unit}.{where} "
            f"Training diagnostics, when enabled, are outside the guarantee."
        )
    return (
        f"NOT a formal guarantee (paper mode): only Phi-gradients are clipped and noised while the encoder and "
        f"client code are trained on the same data without noise, so the epsilon printed for {unit} does not bound "
        f"what the released gradients reveal, whatever the trust model.{where}"
    )
