"""The main job end to end: train -> DP class statistics -> meta-code(s) -> synthetic set -> results.

from fedhypevae.run import run_training
results = run_training(load_config("configs/tiny.yaml"), Path("runs/tiny"))
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from fedhypevae.hpc import Communicator
from fedhypevae.hpc.watchdog import EXIT_STEP_TIMEOUT, Watchdog

from . import checkpoint as ckpt
from .atomic import atomic_savez, atomic_torch_save, atomic_write_text
from .config import Config
from .data import invert_transform, is_invertible, output_units
from .errors import ConfigError, FedHypeVAEError
from .generator import GENERATOR_FILE, generator_metadata
from .metacode import ClassMoments, class_counts, fit_metacode, generate, mixture_weights
from .privacy import CLASS_STATS, class_stat_sums, finalize_class_stats, noise_class_stats
from .privacy.stats import stats_scales
from .rng import STREAM_STATS_RELEASE, SeedTag, public_generator
from .trainer import Trainer, no_heartbeat
from .validate import stats_clip_norm  # noqa: F401  (re-exported: C_x of the statistics release)

EXIT_PARTIAL = 3  # the run ended without its statistics release or meta-code fit (results.json says what)
LOG_FILE = "run.log"
log = logging.getLogger("fedhypevae.run")
FILE_ONLY = {"console": False}  # `extra` of a record the console handler skips (the CLI prints it itself)

# the released class statistics, kept as soon as they arrive (a resume reads them back)
STATS_FILE = "class_stats.pt"

# what a training run writes into its directory (a directory holding anything else is not a run)
RUN_ENTRIES = {
    "config.yaml",
    "results.json",
    "metrics.jsonl",
    "events.jsonl",
    "tb",
    "checkpoints",
    "ledger",
    "clients",
    "hypernetwork.pt",
    "meta_codes.pt",
    "synthetic.npz",
    STATS_FILE,
    GENERATOR_FILE,
    LOG_FILE,
    "evaluation.json",
}


def _flatten(stats: dict) -> tuple[torch.Tensor, list]:
    keys = sorted(stats)
    layout = [(k, stats[k].shape) for k in keys]
    return torch.cat([stats[k].reshape(-1).double().cpu() for k in keys]), layout


def _unflatten(vec: torch.Tensor, layout: list) -> dict:
    out, off = {}, 0
    for k, shape in layout:
        n = int(np.prod(shape)) if len(shape) else 1
        out[k] = vec[off : off + n].reshape(shape)
        off += n
    return out


def release_statistics(tr: Trainer, clip: float) -> tuple[list[ClassMoments] | None, str | None]:
    """Every client releases DP per-class statistics of its TRAIN split (through the release guard:
    charged first); one all-reduce sums them per meta-code domain. Returns (the finalized moments per
    domain, the last entry being the pooled federation; None and why, if nothing was released: no
    budget left, or a stop signal)."""
    cfg = tr.cfg
    tr.hooks.heartbeat("the class-statistics release")
    codes = cfg.meta.codes
    sigma = tr.plan.noise_multiplier(CLASS_STATS) if tr.plan is not None else 0.0
    K, cov = tr.fed.num_classes, cfg.stats.covariance
    center, split = cfg.privacy.stats_center, cfg.privacy.stats_split
    sums = [class_stat_sums(c.x, c.y, num_classes=K, clip_norm=clip, covariance=cov, center=center) for c in tr.clients]
    d = tr.guarded_release(
        CLASS_STATS,
        sigma,
        1.0,
        "stats",
        lambda epoch: sums,
        lambda pend: [t for s in pend for t in (s[k] for k in sorted(s))],
        stoppable=True,
        parts=lambda pend, g: [t for i in tr.group_positions(g) for t in (pend[i][k] for k in sorted(pend[i]))],
    )
    if d.status == "budget":
        return None, (
            "class statistics: the budget has no room left for their release (epsilon spent "
            f"{tr.epsilon_spent():.4f} of {cfg.privacy.target_epsilon}), so the meta-code was not fitted"
        )
    if d.status == "signal":
        return None, "signal"
    layout, buf = None, None
    m = tr.fed.num_clients
    for c, s, g in zip(tr.clients, sums, tr.release_generators(STREAM_STATS_RELEASE, d.epoch)):
        # the trust model's share of the noise (local: sigma; distributed: calibrated to the clients of the
        # client's domain; central: none, the aggregator adds it)
        share = tr.trust.stats_multiplier(sigma, c.id)
        rel = (
            s
            if share == 0
            else noise_class_stats(  # central: the aggregator adds the noise
                s,
                clip_norm=clip,
                noise_multiplier=share,
                covariance=cov,
                generator=g,
                split=split,
            )
        )
        vec, layout = _flatten(rel)
        if buf is None:
            buf = torch.zeros(codes, vec.numel(), dtype=torch.float64)
        buf[c.id * codes // m] += vec
    if buf is None:  # defensive: placement guarantees every rank hosts a client
        raise RuntimeError("no client on this rank")

    def aggregator_noise(k, vec, g):  # central: one draw per domain sum, sigma at the statistics' sensitivity
        return _flatten(
            noise_class_stats(
                _unflatten(vec, layout),
                clip_norm=clip,
                noise_multiplier=sigma,
                covariance=cov,
                generator=g,
                split=split,
            )
        )[0]

    tr.trust.begin_release(STREAM_STATS_RELEASE, 0, 0, d.epoch)
    tr.trust.reduce_stats(tr, buf, aggregator_noise, stats_scales(layout, clip, split))
    domains = [_unflatten(buf[k], layout) for k in range(codes)]
    pooled = _unflatten(buf.sum(0), layout)
    out = []
    for dom in domains + ([pooled] if codes > 1 else []):
        fin = finalize_class_stats(dom, covariance=cov, rank=cfg.stats.rank, center=center)
        out.append(
            ClassMoments(means=fin["means"], counts=fin["counts"], cov=fin.get("covariances"), var=fin.get("variances"))
        )
    return out, None


def class_statistics(tr: Trainer, clip: float) -> tuple[list[ClassMoments] | None, str | None]:
    """The run's DP class statistics: released once (`release_statistics`) and kept in OUT/class_stats.pt at once,
    so that a run interrupted after the release reads them back on resume instead of paying for them again (with
    secure noise a second release would be charged anew, and the plan leaves no room for it). Returns what
    `release_statistics` returns."""
    f = tr.out / STATS_FILE
    if f.is_file():
        return [ClassMoments(**d) for d in torch.load(f, weights_only=True)], None
    moments, why = release_statistics(tr, clip)
    if moments is not None:
        if tr.comm.is_root:
            atomic_torch_save([dict(vars(m)) for m in moments], f, fsync=True)
        tr.barrier()  # every rank reads the same file on a resume
    return moments, why


def anchor_means(pooled: ClassMoments) -> torch.Tensor:
    """a_y: the released class means; a class whose noisy count is below one record gets the count-weighted mean
    of the others (zeros if no class has one). Post-processing of the release."""
    valid, means = pooled.valid, pooled.means.double()
    if not bool(valid.any()):
        return torch.zeros_like(means)
    w = pooled.counts.double().clamp(min=0) * valid
    fill = (means * w[:, None]).sum(0) / w.sum().clamp(min=1e-12)
    return torch.where(valid[:, None], means, fill)


def anchor_statistics(tr: Trainer, clip: float) -> tuple[list[ClassMoments] | None, str | None]:
    """model.class_anchor: the class statistics released BEFORE training (`class_statistics`: read back on resume,
    never released twice), and the decoder's anchor a_y set to their pooled means. The meta-code fit after training
    reuses these moments."""
    moments, why = class_statistics(tr, clip)
    if moments is None:
        return None, why
    with torch.no_grad():
        tr.hyper.class_anchor.copy_(anchor_means(moments[-1]).to(tr.hyper.class_anchor.dtype))
    log.info("decoder anchored to the released class means (model.class_anchor)")
    return moments, None


def synthesize(tr: Trainer, moments: list[ClassMoments] | None) -> dict:
    """Rank 0: fit the meta-code(s) with Phi frozen, generate, write outputs. Post-processing only."""
    cfg, hyper = tr.cfg, tr.hyper
    K = cfg.meta.codes
    g = public_generator(cfg.seed, SeedTag.METACODE_FIT)
    if moments is None:
        codes = torch.zeros(1, hyper.code_dim, device=tr.torch_device)
        weights = torch.ones(1, dtype=torch.float64)
        traces, total_counts = [], torch.ones(hyper.num_classes)
    else:
        domains = moments[:K]
        fitted = [
            fit_metacode(
                hyper,
                d,
                steps=cfg.meta.steps,
                lr=cfg.meta.lr,
                beta=cfg.meta.beta,
                samples_per_class=cfg.meta.samples_per_class,
                radius=cfg.model.code_radius,
                output_noise=cfg.synth.output_noise,
                generator=g,
            )
            for d in domains
        ]
        codes = torch.stack([f[0] for f in fitted])
        traces = [f[1] for f in fitted]
        weights = mixture_weights(domains)
        total_counts = moments[-1].counts
    counts = class_counts(total_counts, samples_per_class=cfg.synth.samples_per_class, balance=cfg.synth.class_balance)
    x, y = generate(
        hyper,
        codes,
        weights,
        counts,
        output_noise=cfg.synth.output_noise,
        generator=public_generator(cfg.seed, SeedTag.SYNTH_DRAW),
    )
    x, y = x.cpu(), y.cpu()
    x_out = invert_transform(x.numpy(), tr.fed.transform, tr.fed.value_range).astype(np.float32)
    atomic_savez(tr.out / "synthetic.npz", {"x": x_out, "y": y.numpy().astype(np.int64)})
    atomic_torch_save(hyper.state_dict(), tr.out / "hypernetwork.pt", fsync=True)
    atomic_torch_save({"codes": codes, "weights": weights}, tr.out / "meta_codes.pt", fsync=True)
    # what `fedhypevae generate` needs to rebuild Phi: public metadata only (shapes, settings, the value range
    # the format or data.value_range declares, the DP class counts already released); no statistic of the data
    atomic_write_text(
        tr.out / GENERATOR_FILE,
        ckpt.dumps_json(
            generator_metadata(
                cfg,
                dim=tr.fed.dim,
                num_classes=tr.fed.num_classes,
                transform=tr.fed.transform,
                value_range=tr.fed.value_range,
                dp_class_counts=None if moments is None else moments[-1].counts,
                fitted=moments is not None,
            ),
            indent=2,
        )
        + "\n",
    )
    return {
        "meta": {
            "codes": K,
            "weights": weights.tolist(),
            "final_fit_loss": [t[-1] if t else None for t in traces],
            "fitted": moments is not None,
        },
        "synthetic": {
            "path": str(tr.out / "synthetic.npz"),
            "samples": int(len(y)),
            "per_class": counts,
            "units": output_units(tr.fed.transform, tr.fed.value_range),
            "in_input_units": is_invertible(tr.fed.transform),
        },
    }


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def _catch_stop_signals(tr: Trainer, *, second_interrupt: str | None = None):
    """The first SIGTERM, SIGUSR2 or SIGINT (Ctrl-C; mpiexec forwards it to every rank) asks every rank to
    checkpoint together at the next step boundary; a second SIGINT (Ctrl-C pressed again) aborts at once
    (KeyboardInterrupt). A TERM or USR2 while a stop is already on its way changes nothing: srun's double
    Ctrl-C sends SIGINT, then SIGTERM, then SIGKILL after the cluster's KillWait, and the checkpoint must
    not be abandoned at the SIGTERM."""
    previous = {}

    def handler(signum, frame):
        if tr.stop_signal is not None:
            if signum != signal.SIGINT:
                return  # the stop already asked for is on its way
            for sig, h in previous.items():  # Ctrl-C again: stop now, whatever is in progress
                signal.signal(sig, h)
            raise KeyboardInterrupt
        tr.stop_signal = signum  # acted on before the next release, on every rank together
        if tr.comm.is_root:
            print(
                f"\nfedhypevae: {signal.Signals(signum).name} received: every rank checkpoints at the next step "
                "boundary, then the run stops (Ctrl-C again to abort at once)",
                file=sys.stderr,
                flush=True,
            )

    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, handler)

    def abort_now(signum, frame):
        # Ctrl-C again once the stop has checkpointed: the process is on its way out, so end it now, as a second
        # Ctrl-C during the stop does (the default handler would end the interpreter's shutdown with a traceback)
        if tr.comm.is_root:
            print(f"fedhypevae: {second_interrupt}", file=sys.stderr, flush=True)
        os._exit(130)

    def restore():
        # `second_interrupt` (a command line's own process, which exits after the run): after a stop, a further
        # SIGINT ends the process with that message and status 130; a TERM or USR2 (SLURM's sequence) changes
        # nothing, as during the stop
        after_stop = second_interrupt is not None and tr.stop_signal is not None
        for sig, h in previous.items():
            if after_stop:
                h = abort_now if sig == signal.SIGINT else signal.SIG_IGN
            signal.signal(sig, h)

    return restore


def spent_note(tr: Trainer) -> str:
    """What a failed run already spent (charges stay) and how to continue the same directory."""
    try:
        eps = tr.ledger.epsilon(delta=tr.cfg.privacy.accounting_delta, accountant=tr.cfg.privacy.accountant)
    except Exception:  # noqa: BLE001 - the note must not hide the original error
        return ""
    if not tr.ledger.records:
        return ""
    return (
        f" [{tr.out} has already spent epsilon {eps:.4f} of {tr.cfg.privacy.target_epsilon} on the releases in "
        f"its ledger ({tr.out / 'ledger'}); those charges stay. Fix the cause and continue this run with "
        f"`fedhypevae train --resume --out {tr.out}`]"
    )


def foreign_entries(out: Path) -> list[str]:
    """Entries of `out` that no training run writes (a directory holding them is not a run directory)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))


def check_run_dir(out: Path, *, resume: bool) -> None:
    """A new run goes to a new or empty directory, or one that only holds what a run writes (a run that
    failed before its first release); files of anything else there could be overwritten."""
    if resume:
        return
    other = foreign_entries(out)
    if other:
        shown = ", ".join(other[:5]) + (f", ... ({len(other)} entries)" if len(other) > 5 else "")
        raise ConfigError(
            f"--out {out} holds other files ({shown}), so it is not a run directory; a run goes to a new "
            "or empty directory: choose another --out"
        )


def finished_run(out: Path, cfg: Config) -> dict | None:
    """The results of the finished run in `out` when it was run with `cfg`'s settings (training it again would
    be a second release on the same data and spend epsilon again); ConfigError when it was run with other
    settings; None when `out` holds no finished run."""
    out = Path(out)
    res = out / "results.json"
    if not res.is_file():
        return None
    try:
        results = json.loads(res.read_text())
    except (OSError, ValueError):
        return None  # the trainer's own checks report a damaged run
    if results.get("status") != "complete" or results.get("interrupted"):
        return None
    from .config import load_config
    from .trainer import flatten_config

    try:
        saved = load_config(str(out / "config.yaml")).to_dict()
    except FedHypeVAEError:
        saved = {}
    a, b = flatten_config(saved), flatten_config(cfg.to_dict())
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if changed:
        said = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(
            f"--out {out} holds a finished run with other settings: {said}{more}; a new run goes to "
            "another --out (a second run on the same data spends epsilon again)"
        )
    return results


def attach_log_file(out: Path, level: str = "info") -> logging.Handler | None:
    """RUN/run.log: the run's log, one line per event (the console shows warnings; the progress bar stays)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / LOG_FILE, encoding="utf-8")
    except OSError:
        return None
    handler.setLevel(getattr(logging, level.upper(), logging.INFO))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedhypevae")
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, handler.level))
    return handler


def _detach_log_file(out: Path) -> None:
    root = logging.getLogger("fedhypevae")
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == Path(out).resolve():
            root.removeHandler(h)
            h.close()


def run_training(
    cfg: Config,
    out: Path,
    comm: Communicator | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    launcher: str = "none",
    device: str = "cpu",
    catch_signals: bool = False,
    log_level: str = "info",
    second_interrupt: str | None = None,
) -> dict:
    """Train, release statistics, fit the meta-code and write the outputs. With `catch_signals`, the first
    SIGTERM/SIGUSR2/SIGINT makes every rank checkpoint together at the next step boundary and return
    {"interrupted": True, ...}; `resume=True` then continues from that checkpoint. `second_interrupt` (a command
    line's own process, which exits after the run): after such a stop, a further SIGINT writes this message
    and ends the process with status 130, and SIGTERM/SIGUSR2 are ignored. A run that could not release its
    statistics (no budget left) returns results with "status": "partial" (exit code 3).
    A run that fails before its first release leaves no directory behind (when it created it); after a
    release everything stays (the ledger keeps every charge) and --resume continues."""
    out = Path(out)
    check_run_dir(out, resume=resume)
    existed = out.exists()
    tr = Trainer(cfg, out, comm, resume=resume, progress=progress, launcher=launcher, device=device)
    restore = _catch_stop_signals(tr, second_interrupt=second_interrupt) if catch_signals else None
    if tr.comm.is_root:
        tr.hooks.on(
            "round_end",
            lambda r, metrics: log.info(
                "round %d: %s",
                r + 1,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None),
            ),
        )
    try:
        try:
            results = _run(tr, cfg, resume, log_level)
            log.info(
                "run %s: %s", "interrupted" if results.get("interrupted") else results.get("status", "complete"), out
            )
            return results
        except FedHypeVAEError as exc:
            log.error("%s", exc, extra=FILE_ONLY)  # the command line prints it
            note = spent_note(tr) if hasattr(tr, "ledger") else ""
            if note:
                raise type(exc)(f"{exc}{note}") from None
            _discard_unreleased(tr, out, existed)
            raise
        except BaseException as exc:
            log.error("the run failed: %s: %s", type(exc).__name__, exc, extra=FILE_ONLY)
            note = spent_note(tr) if hasattr(tr, "ledger") else ""
            if note:
                print(f"fedhypevae: the run failed after releasing data:{note}", file=sys.stderr, flush=True)
            else:
                _discard_unreleased(tr, out, existed)
            raise
    finally:
        _detach_log_file(out)
        if restore:
            restore()


def _discard_unreleased(tr: Trainer, out: Path, existed: bool) -> None:
    """Remove the directory a single-process run created when it failed before anything was released (nothing
    there is worth keeping, and a retry can then use the same --out). Several ranks: left as it is (another
    rank may be writing)."""
    if existed or tr.comm.world_size != 1 or not out.is_dir():
        return
    ledger = getattr(tr, "ledger", None)
    if ledger is not None and ledger.records:
        return
    _detach_log_file(out)
    try:
        if ledger is not None:
            ledger.close()
        writer = getattr(tr, "writer", None)
        if writer is not None:
            writer.close()
    except Exception:  # noqa: BLE001 - closing what failed must not hide the original error
        pass
    shutil.rmtree(out, ignore_errors=True)


def _interrupted(tr: Trainer) -> dict:
    tr.writer.close()
    tr.ledger.close()
    last = ckpt.latest_complete(tr.out)
    # every rank is here together (the stop is collective): the per-rank costs, with diagnostics as in results.json
    costs = {"ranks": tr.rank_costs()} if tr.cfg.privacy.diagnostics else {}
    if tr.comm.is_root:
        from .metrics import append_event

        append_event(
            tr.out,
            {
                "event": "interrupted",
                "signal": tr.stop_signal,
                "round": tr.state.round,
                "step": tr.state.step,
                "checkpoint": str(last),
                **costs,
            },
        )
    return {
        "interrupted": True,
        "signal": tr.stop_signal,
        "round": tr.state.round,
        "step": tr.state.step,
        "epsilon_spent": tr.epsilon_spent(),
        "checkpoint": str(last),
        "out": str(tr.out),
    }


class StepWatch:
    """The step watchdog of a run of several ranks (hpc/watchdog.py), armed while the ranks work in step.

        with StepWatch(tr) as watch:   # armed: the statistics releases, training, checkpoints, the results
            ...
            with watch.paused():       # rank 0's own work (meta-code fit, synthesis) and the barrier around it
                ...

    The trainer beats it (TrainerHooks.heartbeat) at every DP step, checkpoint and collective. A rank that gets
    no beat for train.step_timeout_s writes one line naming its rank, host and step and ends itself with status
    EXIT_STEP_TIMEOUT (124), which ends the job (a peer cut off from the network would leave it waiting for
    ever). While armed the torch back-end's collectives time out a little after the watchdog would fire (it
    reports); paused, and outside the block, they have the communicator's own long timeout again (`--timeout`,
    a sweep's comm_timeout_s), so a meta-code fit longer than the step timeout does not trip the barrier the
    other ranks wait in. One process, or train.step_timeout_s 0: no watchdog, nothing changed."""

    def __init__(self, tr: Trainer):
        self.tr = tr
        t = tr.cfg.train.step_timeout_s
        self.dog = Watchdog(t, self._line) if t > 0 and tr.comm.world_size > 1 else None

    def _line(self, where: str, silent: float) -> str:
        tr = self.tr
        return (
            f"fedhypevae: error: [rank {tr.comm.rank}/{tr.comm.world_size} on host {socket.gethostname()}] "
            f"{where} did not finish within train.step_timeout_s={tr.cfg.train.step_timeout_s:g} s (no progress for "
            f"{silent:.1f} s): a peer rank is unreachable or stuck; ending this rank (exit status {EXIT_STEP_TIMEOUT}) "
            f"so that the job ends; `fedhypevae train --resume --out {tr.out}` continues from the last complete "
            "checkpoint"
        )

    def _step_timeouts(self) -> None:
        self.tr.comm.set_timeout(self.dog.timeout_s + self.dog.grace_s)

    def __enter__(self) -> StepWatch:
        if self.dog is not None:
            self.tr.hooks.heartbeat = self.dog.beat
            self._step_timeouts()
            self.dog.arm("the first collective after set-up")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.dog is not None:
            self.dog.close()
            self.tr.hooks.heartbeat = no_heartbeat
            try:
                self.tr.comm.set_timeout(None)
            except Exception:  # noqa: BLE001 - a failed back-end must not hide the exception on its way out
                if exc_type is None:
                    raise
        return False

    @contextmanager
    def paused(self):
        """Not watched inside the block, and the collectives' long timeout; armed again after it."""
        if self.dog is None:
            yield
            return
        with self.dog.paused():
            self.tr.comm.set_timeout(None)
            try:
                yield
            finally:
                self._step_timeouts()


def _run(tr: Trainer, cfg: Config, resume: bool, log_level: str = "info") -> dict:
    tr.setup()
    if tr.comm.is_root:  # after setup: a run refused there leaves no file behind
        attach_log_file(tr.out, log_level)
    log.info(
        "%s %s: %d clients on %d rank(s), %d rounds x %d steps, privacy %s",
        "resumed" if resume else "started",
        tr.out,
        cfg.partition.clients,
        tr.comm.world_size,
        cfg.train.rounds,
        cfg.train.local_steps,
        f"{cfg.privacy.mode}, target epsilon {cfg.privacy.target_epsilon}, sigma {tr.sigma:.4g}"
        if cfg.privacy.enabled
        else "disabled",
    )
    done = tr.out / "results.json"
    if resume and done.is_file() and (tr.state.round >= cfg.train.rounds or tr.state.stopped):
        previous = json.loads(done.read_text())
        if previous.get("status", "complete") == "complete":
            # a finished run: releasing the statistics again would spend more epsilon for nothing
            tr.writer.close()
            tr.ledger.close()
            return previous
    with StepWatch(tr) as watch:  # from here to the end every rank works in step, but for rank 0's own work
        return _release_train_synthesize(tr, cfg, watch)


def _release_train_synthesize(tr: Trainer, cfg: Config, watch: StepWatch) -> dict:
    clip = tr.stats_clip  # checked in setup, before anything was written or released
    anchored = None
    if cfg.model.class_anchor:
        anchored, why = anchor_statistics(tr, clip)
        if why == "signal":
            tr.state.interrupted = True
            return _interrupted(tr)
        if anchored is None:
            raise ConfigError(f"model.class_anchor: {why}")
    tr.train()
    if tr.state.interrupted:
        log.warning("stopped by signal %s at round %d; checkpointed", tr.stop_signal, tr.state.round)
        return _interrupted(tr)
    # (epsilon_spent() is not called here: it is a collective, and every collective is a declared release)
    log.info("training done: %d rounds, %d DP-SGD steps", tr.state.round, tr.state.steps)
    needs_code = cfg.model.uses_code  # a model without heads generates the same records from any code
    if anchored is not None:  # released before training: reused, not released again
        moments, why = (anchored if needs_code else None), None
    elif not needs_code:
        moments, why = None, None
        log.info("class statistics: not released (the model has no heads, so a meta-code would change nothing)")
    elif cfg.privacy.enabled and cfg.privacy.stats_epsilon_fraction == 0:
        why = "class statistics: not released (privacy.stats_epsilon_fraction is 0), so the meta-code was not fitted"
        moments = None
    else:
        moments, why = class_statistics(tr, clip)
    if why and why != "signal":
        log.warning("%s", why)
    elif moments is not None and anchored is None:
        log.info("class statistics released (stats.covariance=%s)", cfg.stats.covariance)
    if why == "signal":
        tr.state.interrupted = True
        return _interrupted(tr)
    missing = [why] if why else []
    extra = {}
    if tr.comm.is_root:
        with watch.paused():  # rank 0's own work (the meta-code fit, synthesis): not watched
            extra = synthesize(tr, moments)
        if moments is None and needs_code:
            missing.append(
                "meta-code: not fitted (no class statistics); synthetic.npz was generated from the "
                "untrained zero code and is not a result"
            )
        extra["outputs"] = {
            name: str(tr.out / name)
            for name in (
                "config.yaml",
                "results.json",
                "metrics.jsonl",
                "events.jsonl",
                "tb",
                "hypernetwork.pt",
                "synthetic.npz",
                "checkpoints",
                "ledger",
            )
        }
        if (tr.out / STATS_FILE).is_file():  # the released class statistics (absent when none were released)
            extra["outputs"][STATS_FILE] = str(tr.out / STATS_FILE)
        extra["stats_release"] = {
            "clip_norm": clip,
            "covariance": cfg.stats.covariance,
            "noise_multiplier": (tr.plan.noise_multiplier(CLASS_STATS) or 0.0) if tr.plan else 0.0,
            "released": moments is not None or anchored is not None,
            "when": "before training (model.class_anchor)" if anchored is not None else "after training",
        }
    elif moments is None and needs_code:
        missing.append("meta-code: not fitted (no class statistics)")
    with watch.paused():  # not watched, and with the long collective timeout (a barrier under gloo would trip)
        tr.comm.barrier()  # other ranks wait while rank 0 fits the meta-code
    tr.hooks.heartbeat("the run's final collectives (results)")
    return tr.finish(extra, missing=missing)
