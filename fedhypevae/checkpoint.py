"""Checkpoints: shared state once (rank 0), private state in one shard per rank, atomically.

Layout under RUN/checkpoints/round_000010/ (after 10 rounds) or round_000010_step_00003/ (a stop in
the middle of round 11, after 3 of its steps):
  shared.pt            Phi, its optimizer, position (round, step), resolved config, privacy plan
  rank_00000.pt        the rank's clients' private state: per block, the client ids and the stacks of
                       psi_i, v_i, their Adam moments and counts, the DP-MERF embeddings (shard format 2),
                       plus the aggregation rule's per-client state (delta: the private copy of Phi)
  COMPLETE             written last, by rank 0 after every rank has saved
Each file is written to a temporary name and renamed (fedhypevae/atomic.py; the .pt files flushed to disk first),
so a crash leaves either the old file or the new one. A checkpoint without COMPLETE is ignored on resume. Names
sort in training order.
A resume reads its clients' rows from every shard (memory-mapped: only those rows are read), so it may
run on another number of ranks. Checkpoints of shard format 1 (``clients/client_NNNNN.pt``, one file per
client) are still read.
The privacy ledger is not in checkpoints: it lives in append-only files that are written before each
release, so that a resume never refunds epsilon (fedhypevae/privacy/ledger.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .atomic import atomic_torch_save, atomic_write_text
from .errors import CheckpointError

MARKER = "COMPLETE"


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
    """A client's file in a checkpoint of shard format 1 (one file per client)."""
    return ckpt / "clients" / f"client_{client_id:05d}.pt"


SHARD_FORMAT = 2  # one file per rank; 1: one file per client


def shard_path(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_{rank:05d}.pt"


def save_shard(ckpt: Path, rank: int, blocks: list, extra: dict) -> Path:
    """The rank's shard: `blocks` = [(client ids, {name: (M, ...) stack})] written as they are (no copy),
    `extra` = {"rule": {client id: {name: tensor}}}."""
    path = shard_path(ckpt, rank)
    atomic_torch_save(
        {
            "format": SHARD_FORMAT,
            "rank": int(rank),
            "blocks": [{"ids": torch.as_tensor(list(ids), dtype=torch.long), "state": state} for ids, state in blocks],
            "extra": extra,
        },
        path,
        fsync=True,
        crc32=False,  # 3x the write's own time at 700 MB; a torn shard is caught by its zip structure and COMPLETE
    )
    return path


def shards(ckpt: Path) -> list:
    """Every rank's shard of a checkpoint of shard format 2, memory-mapped (a tensor's bytes are read when used)."""
    out = []
    for path in sorted(Path(ckpt).glob("rank_*.pt")):
        shard = load(path, f"checkpoint shard {path.name}", mmap=True)
        if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
            raise CheckpointError(
                f"{path} is not a checkpoint shard of format {SHARD_FORMAT} (format "
                f"{shard.get('format') if isinstance(shard, dict) else '?'}); delete that "
                "checkpoint directory to resume from an earlier one"
            )
        out.append((path, shard))
    return out


_MADV_DONTNEED = 4


def _file_mapping(lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies inside one private mapping of a file (/proc/self/maps): never the heap or anonymous
    memory, whose pages MADV_DONTNEED would zero."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if start <= lo and hi <= end:
                    return len(parts) == 6 and parts[5].startswith("/") and parts[1].endswith("p") and parts[4] != "0"
    except (OSError, ValueError, IndexError):
        pass
    return False


def release_pages(t: torch.Tensor) -> None:
    """Unmap the pages behind `t` (rows of a memory-mapped shard's stack, already copied), so that a resume's
    resident set holds the rows it copied, not the shards it read (a 100,000-client resume on one rank: 15.5 GB
    peak before, for 6.7 GB of state). madvise(MADV_DONTNEED) on a private mapping of a file that was never written
    drops only this process's mapping: a page read again comes back from the file (page cache), nothing is lost, and
    ranks that map the same shard keep theirs. Anything else (heap memory, a shared or anonymous mapping, another OS)
    is left alone."""
    global _madvise
    if _madvise is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise or t.device.type != "cpu":
        return
    import mmap

    if not t.is_contiguous():
        return
    page = mmap.PAGESIZE
    lo = -(-t.data_ptr() // page) * page  # whole pages inside t's bytes only
    hi = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if hi > lo and _file_mapping(lo, hi):
        _madvise(lo, hi - lo, _MADV_DONTNEED)


_madvise = None


def client_state(ckpt: Path, client_id: int, enc_names: list) -> dict:
    """One client's encoder and code from a checkpoint (either shard format): {"encoder": {name: tensor},
    "code": tensor} (tools that look at one client, such as the black-box audit)."""
    ckpt = Path(ckpt)
    if (ckpt / "clients").is_dir():
        state = load(client_path(ckpt, client_id), f"client {client_id} checkpoint")
        return {"encoder": state["encoder"], "code": state["code"]}
    for _path, shard in shards(ckpt):
        for entry in shard["blocks"]:
            hit = (entry["ids"] == int(client_id)).nonzero().flatten()
            if len(hit):
                k = int(hit[0])
                st = entry["state"]
                return {"encoder": {n: st[f"enc.{n}"][k].clone() for n in enc_names}, "code": st["codes"][k].clone()}
    raise CheckpointError(f"client {client_id} is in no shard of {ckpt}; the checkpoint is incomplete")


def mark_complete(ckpt: Path) -> None:
    atomic_write_text(ckpt / MARKER, "ok\n")


def latest_complete(run_dir: Path) -> Path | None:
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


def load(path: Path, what: str, *, mmap: bool = False):
    try:
        if mmap:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(
            f"{what} missing: {path}. The checkpoint is incomplete; delete it to resume from an earlier one."
        ) from None
    except Exception as exc:  # truncated or corrupt pickle/zip
        raise CheckpointError(
            f"{what} at {path} cannot be read ({type(exc).__name__}: {exc}); "
            "delete that checkpoint directory to resume from an earlier one."
        ) from None
