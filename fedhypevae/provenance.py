"""Where a result came from: code version, packages, config, launcher, world, device."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata

from .config import REPO_ROOT, Config


def git_commit() -> str:
    """The checkout's commit (+dirty); "unknown" for an installed package (its version is in `packages`):
    git is asked only inside the source tree, never in site-packages (which may sit inside another repository)."""
    if not (REPO_ROOT / ".git").exists() or not (REPO_ROOT / "pyproject.toml").is_file():
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("fedhypevae-hpc", "torch", "opacus", "numpy", "mpi4py", "submitit", "tensorboard"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(cfg: Config, *, launcher: str, comm, device: str) -> dict:
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "config_hash": cfg.hash(),
        "launcher": launcher,
        "backend": comm.backend,
        "world_size": comm.world_size,
        "clients": cfg.partition.clients,
        "device": device,
        "host": platform.node(),
    }
