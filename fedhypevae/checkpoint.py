"""Checkpoints: shared state once (rank 0), private state per client (its own rank), atomically.

Layout under RUN/checkpoints/round_000010/ (after 10 rounds) or round_000010_step_00003/ (a stop in
the middle of round 11, after 3 of its steps):
  shared.pt            Phi, its optimizer, position (round, step), resolved config, privacy plan
  clients/client_00003.pt   psi_i, v_i, their optimizers, the client's DP releases
  COMPLETE             written last, by rank 0 after every rank has saved
Each file is written to a temporary name, flushed and renamed, so a crash leaves either the old
file or the new one. A checkpoint without COMPLETE is ignored on resume. Names sort in training order.
The privacy ledger is not in checkpoints: it lives in append-only files that are written before each
release, so that a resume never refunds epsilon (fedhypevae/privacy/ledger.py).
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
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def strict_json(obj):
    """`obj` with every non-finite float (inf, nan) replaced by None, so that `json.dumps(...,
    allow_nan=False)` writes strict JSON (no Infinity/NaN tokens, which most parsers reject). Where a
    value may be infinite, the output says so in words next to it (e.g. privacy.guarantee)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps_json(obj, **kw) -> str:
    """Strict JSON text of `obj` (see strict_json); objects json cannot write become strings."""
    import json

    return json.dumps(strict_json(_plain(obj)), allow_nan=False, **kw)


def _plain(obj):
    """Numbers from numpy/torch and paths as plain Python values (json's `default=str` would turn a
    numpy float into a string, hiding an infinity from strict_json)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None)):  # numpy / torch scalars
        return obj.item()
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return _plain(tolist())
    return str(obj)


def checkpoint_dir(run_dir: Path, round_: int, step: int = 0) -> Path:
    """Rounds completed, and steps of the next round completed (a stop between two steps)."""
    name = f"round_{round_:06d}" + (f"_step_{step:05d}" if step else "")
    return run_dir / "checkpoints" / name


def checkpoint_position(ckpt: Path) -> tuple[int, int]:
    """(rounds completed, steps of the next round completed) from a checkpoint directory's name."""
    parts = Path(ckpt).name.split("_")
    try:
        return int(parts[1]), (int(parts[3]) if len(parts) > 3 else 0)
    except (IndexError, ValueError):
        raise CheckpointError(f"{ckpt} is not a checkpoint directory (round_RRRRRR[_step_SSSSS])") from None


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
