"""Checkpoints: shared state once (rank 0), private state per client (its own rank), atomically.

Layout under RUN/checkpoints/round_000010/:
  shared.pt            Phi, its optimizer, round, resolved config, privacy plan
  clients/client_00003.pt   psi_i, v_i, their optimizers, the client's DP releases
  COMPLETE             written last, by rank 0 after every rank has saved
Each file is written to a temporary name, flushed and renamed, so a crash leaves either the old
file or the new one. A checkpoint without COMPLETE is ignored on resume.
The privacy ledgers are not in checkpoints: they live in append-only files that are written
before each release, so that a resume never refunds epsilon.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from .errors import CheckpointError

MARKER = "COMPLETE"


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_dir(run_dir: Path, round_: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_:06d}"


def client_path(ckpt: Path, client_id: int) -> Path:
    return ckpt / "clients" / f"client_{client_id:05d}.pt"


def mark_complete(ckpt: Path) -> None:
    atomic_write_text(ckpt / MARKER, "ok\n")


def latest_complete(run_dir: Path) -> Optional[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("round_*") if (p / MARKER).is_file())
    return done[-1] if done else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (and any newer incomplete one being written)."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob("round_*") if (p / MARKER).is_file())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{what} missing: {path}. The checkpoint is incomplete; delete it to resume from an earlier one.") from None
    except Exception as exc:  # truncated or corrupt pickle/zip
        raise CheckpointError(f"{what} at {path} cannot be read ({type(exc).__name__}: {exc}); "
                              "delete that checkpoint directory to resume from an earlier one.") from None
