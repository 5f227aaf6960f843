"""Checks of a whole run that happen before anything is written or released.

A run spends privacy budget at its first release (the MMD embeddings, or the first DP-SGD step), and
a charge is never refunded. So every setting a later stage needs, the memory it will allocate and the
output directory are checked first: a mistake found after training (a missing statistics clip norm,
a covariance that cannot fit in memory) would otherwise cost epsilon and leave a directory that a
corrected retry cannot reuse.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .config import Config
from .errors import ConfigError
from .memory import GB, available_memory  # noqa: F401  (available_memory: re-exported)


def stats_clip_norm(cfg: Config, transform: str, dim: int) -> float:
    """C_x for the statistics release: public, never derived from the data."""
    if cfg.privacy.stats_clip_norm is not None:
        return float(cfg.privacy.stats_clip_norm)
    if transform == "range":
        return math.sqrt(dim)  # records lie in [0, 1]^d: nothing is clipped
    if transform == "l2":
        return 1.0
    raise ConfigError(
        "privacy.stats_clip_norm must be set when data.transform is none: the statistics release "
        "clips each embedding to this L2 norm (pick a bound from what you know about the embedding "
        "model, not from the private data), or use data.transform=l2"
    )


def stage_memory(cfg: Config, *, classes: int, dim: int, clients_here: int) -> dict:
    """Peak bytes of the stages after training, estimated from the shapes they allocate (float64 for the
    statistics, float32 for the model; a factor for autograd and temporaries). Orders of magnitude: the
    check below is there to catch settings that cannot run at all, not to budget memory tightly."""
    K, d = classes, dim
    cov = cfg.stats.covariance
    per_class = {"full": d * d, "diag": d, "none": 0}[cov]
    stat_numel = K * (d + 1 + per_class)
    # one client's clipped rows, its (K, d[, d]) sums and noise, the (codes, numel) buffer, and the
    # eigendecomposition of a full covariance (about 3 copies)
    stats = 8 * (3 * stat_numel + (cfg.meta.codes + 1) * stat_numel + (3 * K * d * d if cov == "full" else 0))
    S = cfg.meta.samples_per_class
    # the meta-code fit always forms the model's (K, d, d) covariance from K x S decoded samples, with
    # autograd through both (float32)
    meta = 4 * 4 * (K * S * d + K * d * d)
    n_syn = cfg.synth.samples_per_class * K
    synth = 4 * 4 * n_syn * d
    return {
        f"class statistics release (stats.covariance={cov})": stats,
        f"meta-code fit (meta.samples_per_class={S}, a ({K}, {d}, {d}) model covariance)": meta,
        f"synthetic set (synth.samples_per_class={cfg.synth.samples_per_class})": synth,
    }


def check_stage_memory(cfg: Config, *, classes: int, dim: int, clients_here: int, available: int | None = None) -> None:
    avail = available if available is not None else available_memory()
    if avail is None:
        return
    for stage, need in stage_memory(cfg, classes=classes, dim=dim, clients_here=clients_here).items():
        if need > avail:
            raise ConfigError(
                f"the {stage} would need about {need / GB:.1f} GB with {classes} classes and {dim} "
                f"features, more than the {avail / GB:.1f} GB this machine has available; lower that "
                "setting (or the embedding dimension) before training spends any privacy budget"
            )


def check_output_path(path, flag: str, *, directory: bool) -> Path:
    """An output path (`flag` names it in messages) that can be created: not empty, no file in the way, a
    writable existing ancestor. Nothing is created here. `directory`: the path is a directory to create or
    reuse; else a file (an existing directory in its place is refused)."""
    if path is None or str(path).strip() == "":
        raise ConfigError(f"{flag} is empty; give a path")
    out = Path(path)
    if out.exists():
        if directory and not out.is_dir():
            raise ConfigError(f"{flag} {out} exists and is not a directory; choose a directory path")
        if not directory and out.is_dir():
            raise ConfigError(f"{flag} {out} is a directory; give a file path")
    # the directory the path will be written in: the path itself for an existing directory, else its parent
    probe = out if (directory and out.is_dir()) else (out.parent if str(out.parent) else Path("."))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{flag} {out}: {probe} is a file, not a directory; choose a path that is not below a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: cannot write in {probe} (permission denied); choose another directory")
    return out


def check_output_dir(out: Path, flag: str = "--out") -> None:
    """The run directory can be created and written (nothing is created here)."""
    check_output_path(out, flag, directory=True)


def check_new_output_dir(out: Path, flag: str = "--out", *, what: str = "output") -> None:
    """A directory this command creates from scratch: it may not exist, or be empty (files already there
    would be mixed with the new ones, or overwritten)."""
    out = check_output_path(out, flag, directory=True)
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
            raise ConfigError(
                f"{flag} {out} already exists and is not empty ({shown}); the {what} goes to a new or "
                "empty directory: choose another path or remove that one"
            )


def validate_run(cfg: Config, *, transform: str, classes: int, dim: int, clients_here: int) -> float:
    """Everything a later stage will need, checked before the first write or release. Returns C_x."""
    clip = stats_clip_norm(cfg, transform, dim)
    check_stage_memory(cfg, classes=classes, dim=dim, clients_here=clients_here)
    return clip
