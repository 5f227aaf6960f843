"""The main job end to end: train -> DP class statistics -> meta-code(s) -> synthetic set -> results.

    from fedhypevae.run import run_training
    results = run_training(load_config("configs/tiny.yaml"), Path("runs/tiny"))
"""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hpc import Communicator

from . import checkpoint as ckpt
from .config import Config
from .data import invert_transform
from .errors import ConfigError
from .metacode import ClassMoments, class_counts, fit_metacode, generate, mixture_weights
from .privacy import finalize_class_stats, release_class_stats
from .rng import STREAM_STATS_RELEASE, public_generator
from .trainer import Trainer


def stats_clip_norm(cfg: Config, transform: str, dim: int) -> float:
    """C_x for the statistics release: public, never derived from the data."""
    if cfg.privacy.stats_clip_norm is not None:
        return float(cfg.privacy.stats_clip_norm)
    if transform == "range":
        return math.sqrt(dim)  # records lie in [0, 1]^d: nothing is clipped
    if transform == "l2":
        return 1.0
    raise ConfigError("privacy.stats_clip_norm must be set when data.transform is none: the statistics release "
                      "clips each embedding to this L2 norm (pick a bound from what you know about the embedding "
                      "model, not from the private data), or use data.transform=l2")


def _flatten(stats: dict) -> tuple[torch.Tensor, list]:
    keys = sorted(stats)
    layout = [(k, stats[k].shape) for k in keys]
    return torch.cat([stats[k].reshape(-1).double().cpu() for k in keys]), layout


def _unflatten(vec: torch.Tensor, layout: list) -> dict:
    out, off = {}, 0
    for k, shape in layout:
        n = int(np.prod(shape)) if len(shape) else 1
        out[k] = vec[off:off + n].reshape(shape)
        off += n
    return out


def release_statistics(tr: Trainer, clip: float) -> Optional[list[ClassMoments]]:
    """Every client releases DP per-class statistics of its TRAIN split (charged first); one
    all-reduce sums them per meta-code domain. Returns the finalized moments per domain
    (the last entry is the pooled federation), or None if the budget has no room left."""
    cfg = tr.cfg
    codes = cfg.meta.codes
    sigma = tr.plan.sigma_stats if tr.plan is not None else 0.0
    fits = True
    if tr.plan is not None:
        fits = all(tr.release_fits(c, "class-stats", sigma, 1.0, "stats") for c in tr.clients)
    flag = tr._allreduce(torch.tensor([0.0 if fits else 1.0], dtype=torch.float64), op="max")
    if float(flag[0]) > 0:
        return None
    layout, buf = None, None
    m = tr.fed.num_clients
    for c in tr.clients:
        tr._charge(c, "class-stats", sigma, 1.0, "stats")
        rel = release_class_stats(c.x, c.y, num_classes=tr.fed.num_classes, clip_norm=clip, noise_multiplier=sigma,
                                  covariance=cfg.stats.covariance, generator=c.rng.generator(STREAM_STATS_RELEASE))
        vec, layout = _flatten(rel)
        if buf is None:
            buf = torch.zeros(codes, vec.numel(), dtype=torch.float64)
        buf[c.id * codes // m] += vec
    if buf is None:  # defensive: placement guarantees every rank hosts a client
        raise RuntimeError("no client on this rank")
    tr._allreduce(buf.view(-1))
    domains = [_unflatten(buf[k], layout) for k in range(codes)]
    pooled = _unflatten(buf.sum(0), layout)
    out = []
    for d in domains + ([pooled] if codes > 1 else []):
        fin = finalize_class_stats(d, covariance=cfg.stats.covariance, rank=cfg.stats.rank)
        out.append(ClassMoments(means=fin["means"], counts=fin["counts"], cov=fin.get("covariances"), var=fin.get("variances")))
    return out


def synthesize(tr: Trainer, moments: Optional[list[ClassMoments]]) -> dict:
    """Rank 0: fit the meta-code(s) with Phi frozen, generate, write outputs. Post-processing only."""
    cfg, hyper = tr.cfg, tr.hyper
    K = cfg.meta.codes
    g = public_generator(cfg.seed, 0x3E7A)
    if moments is None:
        codes = torch.zeros(1, hyper.code_dim, device=tr.torch_device)
        weights = torch.ones(1, dtype=torch.float64)
        traces, total_counts = [], torch.ones(hyper.num_classes)
    else:
        domains = moments[:K]
        fitted = [fit_metacode(hyper, d, steps=cfg.meta.steps, lr=cfg.meta.lr, beta=cfg.meta.beta,
                               samples_per_class=cfg.meta.samples_per_class, radius=cfg.model.code_radius,
                               output_noise=cfg.synth.output_noise, generator=g) for d in domains]
        codes = torch.stack([f[0] for f in fitted])
        traces = [f[1] for f in fitted]
        weights = mixture_weights(domains)
        total_counts = moments[-1].counts
    counts = class_counts(total_counts, samples_per_class=cfg.synth.samples_per_class, balance=cfg.synth.class_balance)
    x, y = generate(hyper, codes, weights, counts, output_noise=cfg.synth.output_noise,
                    generator=public_generator(cfg.seed, 0x5A7))
    x, y = x.cpu(), y.cpu()
    x_out = invert_transform(x.numpy(), tr.fed.transform, tr.fed.value_range).astype(np.float32)
    _save_npz(tr.out / "synthetic.npz", x=x_out, y=y.numpy().astype(np.int64))
    ckpt.atomic_torch_save(hyper.state_dict(), tr.out / "hypernetwork.pt")
    ckpt.atomic_torch_save({"codes": codes, "weights": weights}, tr.out / "meta_codes.pt")
    return {"meta": {"codes": K, "weights": weights.tolist(),
                     "final_fit_loss": [t[-1] if t else None for t in traces],
                     "fitted": moments is not None},
            "synthetic": {"path": str(tr.out / "synthetic.npz"), "samples": int(len(y)), "per_class": counts,
                          "units": "the input data's units (public transform inverted)"}}


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _catch_stop_signals(tr: Trainer):
    previous = {}

    def handler(signum, frame):
        tr.stop_signal = signum  # acted on at the end of the current round, on every rank together

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        previous[sig] = signal.signal(sig, handler)

    def restore():
        for sig, h in previous.items():
            signal.signal(sig, h)
    return restore


def run_training(cfg: Config, out: Path, comm: Optional[Communicator] = None, *, resume: bool = False,
                 progress: bool = True, launcher: str = "none", device: str = "cpu",
                 catch_signals: bool = False) -> dict:
    """Train, release statistics, fit the meta-code and write the outputs. With `catch_signals`,
    SIGTERM/SIGUSR2 make every rank finish its round, checkpoint collectively and return
    {"interrupted": True, ...}; `resume=True` then continues from that checkpoint."""
    tr = Trainer(cfg, Path(out), comm, resume=resume, progress=progress, launcher=launcher, device=device)
    restore = _catch_stop_signals(tr) if catch_signals else None
    try:
        tr.setup()
        done = tr.out / "results.json"
        if resume and done.is_file() and (tr.state.round >= cfg.train.rounds or tr.state.stopped):
            # a finished run: releasing the statistics again would spend more epsilon for nothing
            tr.writer.close()
            return json.loads(done.read_text())
        clip = stats_clip_norm(cfg, tr.fed.transform, tr.fed.dim)  # fail before training, not after
        tr.train()
    finally:
        if restore:
            restore()
    if tr.state.interrupted:
        tr.writer.close()
        return {"interrupted": True, "signal": tr.stop_signal, "round": tr.state.round,
                "epsilon_spent": tr.epsilon_spent(), "checkpoint": str(ckpt.latest_complete(tr.out))}
    moments = release_statistics(tr, clip)
    extra = {}
    if tr.comm.is_root:
        extra = synthesize(tr, moments)
        extra["outputs"] = {name: str(tr.out / name) for name in
                            ("config.yaml", "results.json", "metrics.jsonl", "tb", "hypernetwork.pt", "synthetic.npz", "checkpoints")}
        extra["stats_release"] = {"clip_norm": clip, "covariance": cfg.stats.covariance,
                                  "noise_multiplier": tr.plan.sigma_stats if tr.plan else 0.0,
                                  "released": moments is not None}
    tr.comm.barrier()  # other ranks wait while rank 0 fits the meta-code
    return tr.finish(extra)
