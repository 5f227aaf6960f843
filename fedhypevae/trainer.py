"""Federated training (Algorithm 1) over a Communicator: every rank hosts a block of clients.

One round, for every hosted client: Poisson batch -> per-sample gradients over (psi_i, v_i, Phi)
-> clip -> noise -> scale (strict mode); the client updates psi_i, v_i locally and contributes
w_i * (noisy Phi gradient) to ONE flat buffer (with diagnostics); one all-reduce; every rank
applies the identical optimizer step to its replica of Phi, then the spectral-norm projection.
`delta` aggregation runs the local steps on a private copy of Phi and reduces weighted deltas.

Single process:   fedhypevae train --config configs/default.yaml --out runs/default
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from hpc import Communicator, LocalCommunicator, place_clients
from hpc.placement import PlacementError

from . import checkpoint as ckpt
from .client import DIAG_KEYS, Client
from .config import Config, save_config
from .data import build_federation, is_shard_dir, read_manifest
from .engine import BatchedEngine, engine_fallback_reason
from .errors import CheckpointError, ConfigError, FedHypeVAEError
from .metrics import MetricWriter
from .model import HyperNetwork
from .privacy import Mechanism, PrivacyLedger, PrivacyPlan, RandomFeatures, plan_budget
from .provenance import provenance
from .rng import derive_seed

# settings a resume must not change: they define the data, the model or the privacy plan
RESUME_LOCKED = ("seed", "data", "partition", "model", "federation", "train.rounds", "train.local_steps", "privacy")
RESUME_FREE_PRIVACY = ("diagnostics",)


class ReplicaDivergence(FedHypeVAEError):
    """The replicas of Phi differ across ranks."""


@dataclass
class TrainState:
    round: int = 0  # rounds completed
    steps: int = 0  # DP-SGD steps completed
    stopped: Optional[str] = None
    interrupted: bool = False  # a stop signal arrived: checkpoint and exit, resumable
    history: list = field(default_factory=list)


def planned_steps(cfg: Config) -> int:
    return cfg.train.rounds * cfg.train.local_steps


def make_plan(cfg: Config, *, use_mmd: bool) -> Optional[PrivacyPlan]:
    p = cfg.privacy
    if not p.enabled:
        return None
    if math.isinf(p.target_epsilon):
        # no budget: no noise anywhere unless a noise multiplier is given (the "sigma = 0" reference)
        sigma = p.noise_multiplier or 0.0
        mechs = [Mechanism("dp-sgd", sigma, p.sample_rate, planned_steps(cfg)), Mechanism("class-stats", 0.0, 1.0, 1)]
        if use_mmd:
            mechs.append(Mechanism("mmd-embeddings", 0.0, 1.0, 1))
        return PrivacyPlan(sigma=sigma, sigma_stats=0.0, sigma_mmd=0.0 if use_mmd else None, sample_rate=p.sample_rate,
                           steps=planned_steps(cfg), delta=p.delta, accountant=p.accountant,
                           target_epsilon=p.target_epsilon, planned_epsilon=math.inf, mechanisms=mechs)
    return plan_budget(target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=p.sample_rate,
                       steps=planned_steps(cfg), accountant=p.accountant,
                       stats_fraction=p.stats_epsilon_fraction, mmd_fraction=p.mmd_epsilon_fraction,
                       use_stats=True, use_mmd=use_mmd, noise_multiplier=p.noise_multiplier)


class Trainer:
    def __init__(self, cfg: Config, out_dir: Path, comm: Optional[Communicator] = None, *,
                 resume: bool = False, progress: bool = True, launcher: str = "none", device: str = "cpu"):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.comm = comm or LocalCommunicator()
        self.resume = resume
        self.progress = progress and self.comm.is_root
        self.launcher = launcher
        self.device = device
        self.torch_device = torch.device(device)  # GPU path untested here (no GPU on the development machine)
        self.t0 = time.perf_counter()
        self.comm_seconds = 0.0
        self.stop_signal: Optional[int] = None  # set by a signal handler; acted on at the next step

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, comm = self.cfg, self.comm
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self._check_out_dir()
        if is_shard_dir(cfg.data.path):
            # a shard directory: place clients from the manifest's public sizes, then read only ours
            declared = self._declared_sizes_from(read_manifest(cfg.data.path)["declared_sizes"])
            self._place(declared)
            fed = build_federation(cfg.data, cfg.partition, cfg.seed, client_ids=self.placement[comm.rank])
        else:
            # one source file: every rank partitions it identically (public seed) and keeps its clients
            fed = build_federation(cfg.data, cfg.partition, cfg.seed)
            declared = self._declared_sizes_from(fed.declared_sizes)
            self._place(declared)
        self.fed = fed
        mine = set(self.placement[comm.rank])
        total = float(sum(declared))
        m = fed.num_clients
        self.weights = {i: (declared[i] / total if cfg.federation.weights == "declared" else 1.0 / m) for i in range(m)}

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, 0xF1))  # Phi: the same on every rank
            mc = cfg.model
            self.hyper = HyperNetwork(fed.dim, fed.num_classes, latent_dim=mc.latent_dim, code_dim=mc.code_dim,
                                      hidden=mc.hidden, hyper_hidden=mc.hyper_hidden, label_embed_dim=mc.label_embed_dim)
        self.hyper.to(self.torch_device)
        if mc.lipschitz is not None:
            self.hyper.project_spectral(mc.lipschitz)
        self.phi_names = [n for n, _ in self.hyper.named_parameters()]
        self.phi_numel = sum(p.numel() for p in self.hyper.parameters())
        opt_cls = torch.optim.Adam if cfg.train.optimizer == "adam" else torch.optim.SGD
        self.opt = opt_cls(self.hyper.parameters(), lr=cfg.train.lr)

        # diagnostics are functions of private data (outside the guarantee): with privacy.diagnostics
        # false they never leave the client; only the public client count travels
        self.send_diagnostics = cfg.privacy.diagnostics or not cfg.privacy.enabled
        self._public_diag = torch.zeros(len(DIAG_KEYS), dtype=torch.float64)
        self._public_diag[DIAG_KEYS.index("clients")] = 1.0
        self.use_mmd_release = cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "merf"
        self.plan = make_plan(cfg, use_mmd=self.use_mmd_release)
        self.features = None
        if cfg.model.lambda_mmd > 0 and cfg.model.mmd_kind == "merf":
            bws = [b * math.sqrt(fed.dim) for b in cfg.model.mmd_bandwidths]
            self.features = RandomFeatures(bandwidths=bws, features_per_bandwidth=cfg.model.mmd_features,
                                           dim=fed.dim, seed=derive_seed(cfg.seed, 0xFEA7))

        self.clients: list[Client] = []
        for cd in fed.clients:
            if cd.client_id not in mine:
                continue
            # opening an existing ledger file continues it: what was charged stays charged
            ledger = PrivacyLedger(path=self._ledger_path(cd.client_id))
            self.clients.append(Client(cd, cfg=cfg, num_classes=fed.num_classes, dim=fed.dim, ledger=ledger,
                                       device=self.torch_device))
        self.state = TrainState()
        start = ckpt.latest_complete(self.out) if self.resume else None
        if self.resume:  # refuse before anything is written or released
            saved = yaml.safe_load((self.out / "config.yaml").read_text())
            self._check_resume_config(saved)
        if comm.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.writer = MetricWriter(self.out, enabled=comm.is_root)
        if start is not None:
            self._restore(start)
        else:
            self._release_mmd_embeddings()
            self.save_checkpoint()  # round 0: the one-shot releases are never redone
        self._setup_engine()

    def _setup_engine(self) -> None:
        """train.engine=batched: one batched computation for all clients of this rank (after any
        restore, so that it stacks the restored client states); some settings need the reference."""
        self.engine: Optional[BatchedEngine] = None
        self.engine_note: Optional[str] = None
        if self.cfg.train.engine != "batched":
            return
        reason = engine_fallback_reason(self.cfg)
        if reason is not None:
            self.engine_note = f"train.engine=batched fell back to the reference loop: {reason}"
            return
        self.engine = BatchedEngine(self.clients, self.cfg, weights=[self.weights[c.id] for c in self.clients],
                                    device=self.torch_device)

    def _check_out_dir(self) -> None:
        if self.resume:
            if not (self.out / "config.yaml").is_file():
                raise CheckpointError(f"--resume: {self.out} holds no run (no config.yaml); start without --resume")
            return
        if (self.out / "checkpoints").exists() or (self.out / "clients").exists():
            raise ConfigError(f"{self.out} already holds a run: pass --resume to continue it, or choose another --out")

    def _declared_sizes_from(self, sizes: list[int]) -> list[int]:
        ds = self.cfg.federation.declared_sizes
        if ds is None:
            return [int(s) for s in sizes]
        if len(ds) != len(sizes) or any((not isinstance(s, int)) or s < 1 for s in ds):
            raise ConfigError(f"federation.declared_sizes must list {len(sizes)} positive integers; got {ds}")
        return list(ds)

    def _place(self, declared: list[int]) -> None:
        try:
            self.placement = place_clients(declared, self.comm.world_size)
        except PlacementError as exc:
            raise ConfigError(str(exc)) from None
        self.declared = declared

    def _ledger_path(self, cid: int) -> Path:
        return self.out / "clients" / f"client_{cid:05d}" / "ledger.jsonl"

    # ---------------------------------------------------------------- privacy helpers
    @property
    def sigma(self) -> float:
        return self.plan.sigma if self.plan is not None else 0.0

    def _charge(self, client: Client, name: str, sigma: float, q: float, key: str) -> None:
        """Appended to the client's ledger file BEFORE the release it pays for."""
        if self.plan is None:
            return
        client.ledger.charge(name, sigma, q, key, replayable=client.rng.reproducible)

    def _release_mmd_embeddings(self) -> None:
        if self.features is None:
            return
        sigma = self.plan.sigma_mmd if self.plan is not None else 0.0
        for c in self.clients:
            c.release_mmd_embeddings(self.features, noise_multiplier=sigma, charge=self._charge)

    def epsilon_spent(self) -> float:
        if self.plan is None:
            return 0.0
        # all clients share one history when nothing was interrupted; report the worst one
        seen, worst = {}, 0.0
        for c in self.clients:
            key = json.dumps([m.to_dict() for m in c.ledger.mechanisms()], sort_keys=True)
            if key not in seen:
                seen[key] = c.ledger.epsilon(delta=self.cfg.privacy.delta, accountant=self.cfg.privacy.accountant)
            worst = max(worst, seen[key])
        buf = torch.tensor([worst], dtype=torch.float64)
        return float(self._allreduce(buf, op="max")[0])

    def _step_fits(self, key: str) -> bool:
        """One small collective before every step: may every hosted client afford it? Every rank
        takes the same decision (ledgers can differ after an interrupted round). A replay of a
        release already in a client's ledger (reproducible noise, after a resume) costs nothing."""
        ok = True
        if self.plan is not None:
            ok = all(self.release_fits(c, "dp-sgd", self.plan.sigma, self.cfg.privacy.sample_rate, key)
                     for c in self.clients)
        flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)
        return float(self._allreduce(flag, op="max")[0]) == 0.0

    def release_fits(self, client: Client, name: str, sigma: float, q: float, key: str) -> bool:
        if client.rng.reproducible and client.ledger.already_charged(name, sigma, q, key):
            return True  # an identical replay: nothing new is released
        return client.ledger.would_fit([Mechanism(name, sigma, q, 1)], self.plan)

    def _agree_stop(self) -> bool:
        """Has any rank been asked to stop (SIGTERM/SIGUSR2)? Checked collectively at round ends,
        so that every rank checkpoints the same round and none is left in a collective."""
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], dtype=torch.float64)
        return float(self._allreduce(flag, op="max")[0]) > 0

    def check_replicas(self) -> None:
        """Every rank must hold the same Phi: compare a checksum (sum and weighted sum) by max/min reduce."""
        if self.comm.world_size == 1:
            return
        v = self.flat_phi(self.hyper)
        w = torch.arange(1, v.numel() + 1, dtype=torch.float64) / v.numel()
        c = torch.stack([v.sum(), (v * w).sum()])
        hi, lo = self._allreduce(c.clone(), op="max"), -self._allreduce(-c.clone(), op="max")
        if not torch.allclose(hi, lo, rtol=1e-9, atol=1e-9):
            raise ReplicaDivergence(f"rank {self.comm.rank}: the replicas of Phi diverged after {self.state.steps} steps "
                                    f"(checksums range {lo.tolist()} .. {hi.tolist()}); stopping. This points to a "
                                    "non-deterministic kernel or a corrupted all-reduce; resume from the last checkpoint.")

    def _allreduce(self, buf: torch.Tensor, op: str = "sum") -> torch.Tensor:
        t = time.perf_counter()
        out = self.comm.allreduce(buf, op=op)
        self.comm_seconds += time.perf_counter() - t
        return out

    # ---------------------------------------------------------------- training
    def flat_phi(self, hyper: HyperNetwork) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).double() for p in hyper.parameters()]).cpu()

    def _apply_flat_grad(self, flat: torch.Tensor) -> None:
        off = 0
        for p in self.hyper.parameters():
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).to(device=p.device, dtype=p.dtype).clone()
            off += n
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._project(self.hyper)

    def _project(self, hyper: HyperNetwork) -> None:
        if self.cfg.model.lipschitz is not None:
            # small SVDs: one thread. Multithreaded MKL LAPACK on these shapes was measured 10-200x slower
            # on a loaded 2-core machine (OpenMP threads waiting for busy cores), 2 ms vs up to 0.5 s per step
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                hyper.project_spectral(self.cfg.model.lipschitz)
            finally:
                torch.set_num_threads(n)

    def _phi_vector(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[n].reshape(-1).double() for n in self.phi_names]).cpu()  # host buffer

    def run_round(self, r: int) -> dict:
        cfg = self.cfg
        P, D = self.phi_numel, len(DIAG_KEYS)
        diag_total = torch.zeros(D, dtype=torch.float64)
        delta_mode = cfg.federation.aggregation == "delta"
        t_round = time.perf_counter()
        comm_before = self.comm_seconds
        if delta_mode:
            start = self.flat_phi(self.hyper)
            local = {c.id: copy.deepcopy(self.hyper) for c in self.clients}
        steps_done = 0
        for s in range(cfg.train.local_steps):
            if not self._step_fits(f"round={r}/step={s}"):
                self.state.stopped = (f"budget guard: one more step would exceed epsilon={cfg.privacy.target_epsilon} "
                                      f"(stopped at round {r}, step {s})")
                break
            buf = torch.zeros(P + D, dtype=torch.float64)
            for c in self.clients:  # every client's ledger, before anything is released (same key as the check)
                self._charge(c, "dp-sgd", self.sigma, cfg.privacy.sample_rate, f"round={r}/step={s}")
            if self.engine is not None:  # never set for delta aggregation (engine_fallback_reason)
                phi, diag = self.engine.step(self.hyper, r, s, sigma=self.sigma, features=self.features)
                buf[:P] += phi
                buf[P:] += diag if self.send_diagnostics else len(self.clients) * self._public_diag
            else:
                for c in self.clients:
                    hyper = local[c.id] if delta_mode else self.hyper
                    out = c.step(hyper, r, s, sigma=self.sigma, features=self.features)
                    if delta_mode:
                        self._local_phi_step(hyper, out.phi_grad)
                    else:
                        buf[:P] += self.weights[c.id] * self._phi_vector(out.phi_grad)
                    buf[P:] += out.diag if self.send_diagnostics else self._public_diag
            if not delta_mode:
                self._allreduce(buf)  # the one collective of a step: noisy gradients + diagnostics
                self._apply_flat_grad(buf[:P])
                diag_total += buf[P:]
            else:
                diag_total += self._allreduce(buf[P:].clone())
            steps_done += 1
            self.state.steps += 1
            every = cfg.train.replica_check_every
            if every and self.state.steps % every == 0:
                self.check_replicas()
        if delta_mode and steps_done > 0:
            buf = torch.zeros(P, dtype=torch.float64)
            for c in self.clients:
                buf += self.weights[c.id] * (self.flat_phi(local[c.id]) - start)
            self._allreduce(buf)
            new = start + cfg.federation.server_lr * buf
            torch.nn.utils.vector_to_parameters(new.float().to(self.torch_device), self.hyper.parameters())
            self._project(self.hyper)
        metrics = {"time/round(s)": time.perf_counter() - t_round,
                   "comm/all_reduce(ms)": 1e3 * (self.comm_seconds - comm_before),
                   "privacy/epsilon": self.epsilon_spent(),
                   "train/steps": float(self.state.steps)}
        if self.send_diagnostics:
            d = dict(zip(DIAG_KEYS, diag_total.tolist()))
            n = max(d["batch"], 1.0)
            metrics.update({"diagnostics/recon_nll": d["nll_sum"] / n, "diagnostics/kl": d["kl_sum"] / n,
                            "diagnostics/loss": (d["nll_sum"] + d["kl_sum"]) / n,
                            "diagnostics/clip_fraction": d["clipped"] / n,
                            "diagnostics/batch_size": d["batch"] / max(d["clients"], 1.0)})
            if cfg.model.lambda_mmd > 0:
                metrics["diagnostics/mmd"] = d["mmd"] / max(d["clients"], 1.0)
        return metrics

    def _local_phi_step(self, hyper: HyperNetwork, grads: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in hyper.named_parameters():
                p.sub_(self.cfg.train.local_lr * grads[n])
        self._project(hyper)

    def train(self) -> None:
        cfg = self.cfg
        rounds = range(self.state.round, cfg.train.rounds)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.train.rounds, initial=self.state.round, desc="rounds", unit="round", dynamic_ncols=True)
        try:
            for r in rounds:
                metrics = self.run_round(r)
                self.state.round = r + 1
                self.state.history.append({"round": r + 1, **metrics})
                self.writer.log(r + 1, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(eps=f"{metrics['privacy/epsilon']:.3f}",
                                    loss=f"{metrics.get('diagnostics/loss', float('nan')):.1f}")
                every = cfg.train.checkpoint_every
                self.state.interrupted = self._agree_stop()
                if (self.state.stopped or self.state.interrupted or (every and (r + 1) % every == 0)
                        or r + 1 == cfg.train.rounds):
                    self.save_checkpoint()  # collective: every rank saves its own clients
                if self.state.stopped or self.state.interrupted:
                    break
        finally:
            if bar is not None:
                bar.close()

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        d = ckpt.checkpoint_dir(self.out, self.state.round)
        for c in self.clients:  # every rank saves its own clients' private state
            ckpt.atomic_torch_save(c.state_dict(), ckpt.client_path(d, c.id))
        if self.comm.is_root:
            ckpt.atomic_torch_save({"hyper": self.hyper.state_dict(), "opt": self.opt.state_dict(),
                                    "round": self.state.round, "steps": self.state.steps,
                                    "stopped": self.state.stopped, "history": self.state.history,
                                    "config": self.cfg.to_dict(),
                                    "plan": self.plan.to_dict() if self.plan else None}, d / "shared.pt")
        self.comm.barrier()  # COMPLETE only once every rank's files are in place
        if self.comm.is_root:
            ckpt.mark_complete(d)
            ckpt.prune(self.out, self.cfg.train.keep_checkpoints)
        self.comm.barrier()
        return d

    def _restore(self, d: Path) -> None:
        shared = ckpt.load(d / "shared.pt", "shared checkpoint")
        self._check_resume_config(shared["config"])
        self.hyper.load_state_dict(shared["hyper"])  # load_state_dict copies onto our device
        self.opt.load_state_dict(shared["opt"])
        self.state = TrainState(round=shared["round"], steps=shared["steps"], stopped=shared.get("stopped"),
                                history=shared.get("history", []))
        for c in self.clients:
            c.load_state_dict(ckpt.load(ckpt.client_path(d, c.id), f"client {c.id} checkpoint"))

    def _check_resume_config(self, saved: dict) -> None:
        now = self.cfg.to_dict()
        changed = []
        for key in RESUME_LOCKED:
            parts = key.split(".")
            a, b = saved, now
            for p in parts:
                a, b = a.get(p), b.get(p)
            if isinstance(a, dict):
                a = {k: v for k, v in a.items() if not (key == "privacy" and k in RESUME_FREE_PRIVACY)}
                b = {k: v for k, v in b.items() if not (key == "privacy" and k in RESUME_FREE_PRIVACY)}
                changed += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                changed.append(key)
        if changed:
            raise CheckpointError("cannot resume: these settings differ from the interrupted run: "
                                  + ", ".join(changed) + ". Resume with the run's own config.yaml, or start a new --out.")

    # ---------------------------------------------------------------- results
    def finish(self, extra: dict) -> dict:
        cfg, p = self.cfg, self.cfg.privacy
        eps = self.epsilon_spent()
        reproducible = p.noise_seed is not None
        last = self.state.history[-1] if self.state.history else {}
        privacy = {
            "enabled": p.enabled, "mode": p.mode if p.enabled else None,
            "epsilon_spent": eps, "target_epsilon": p.target_epsilon if p.enabled else None, "delta": p.delta if p.enabled else None,
            "noise_multiplier": self.sigma, "sample_rate": p.sample_rate, "clip_norm": p.clip_norm,
            "steps": self.state.steps, "planned_steps": planned_steps(cfg), "accountant": p.accountant,
            "plan": self.plan.to_dict() if self.plan else None,
            "formal_guarantee": bool(p.enabled and p.mode == "strict"),
            "guarantee": guarantee_text(cfg),
            "noise": ("reproducible from privacy.noise_seed: NOT suitable for a real release" if reproducible
                      else "securely seeded per client (operating-system entropy)"),
            "reproducible_noise": reproducible,
            "weights": cfg.federation.weights + (" (declared public sizes)" if cfg.federation.weights == "declared" else ""),
            "ledger": self.clients[0].ledger.summary(delta=p.delta, accountant=p.accountant) if (self.plan and self.clients) else [],
            "diagnostics_outside_guarantee": bool(p.diagnostics),
        }
        results = {
            "privacy": privacy,
            "training": {"rounds": self.state.round, "stopped_early": self.state.stopped,
                         "engine": "batched" if self.engine is not None else "reference",
                         "engine_note": self.engine_note,
                         "wall_time_s": time.perf_counter() - self.t0,
                         "comm_time_s": self.comm_seconds,
                         "final": {k: v for k, v in last.items() if k.startswith("diagnostics/")}},
            "data": {"source": self.fed.source, "clients": self.fed.num_clients, "classes": self.fed.num_classes,
                     "dim": self.fed.dim, "transform": self.fed.transform, "declared_sizes": self.declared},
            "provenance": provenance(self.cfg, launcher=self.launcher, comm=self.comm, device=self.device),
            **extra,
        }
        if self.comm.is_root:
            ckpt.atomic_write_text(self.out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
        self.writer.close()
        return results


def guarantee_text(cfg: Config) -> str:
    p = cfg.privacy
    if not p.enabled:
        return "none: privacy.enabled is false (non-private reference run)"
    unit = f"one record of one client's training split, (epsilon, delta) = ({p.target_epsilon}, {p.delta}) per client"
    if p.mode == "strict":
        return (f"formal: every value a client releases (noisy Phi gradients or deltas, DP statistics, DP mean "
                f"embeddings) and everything derived from them (Phi, meta-code, synthetic set) is DP for {unit}. "
                f"Training diagnostics, when enabled, are outside the guarantee.")
    return (f"NOT a formal guarantee (paper mode): only Phi-gradients are clipped and noised while the encoder and "
            f"client code are trained on the same data without noise, so the epsilon printed for {unit} does not bound "
            f"what the released gradients reveal.")
