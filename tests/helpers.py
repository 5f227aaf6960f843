"""Helpers several test modules share (pytest puts tests/ on sys.path: `from helpers import ...`)."""
from __future__ import annotations

from pathlib import Path

import torch


def interrupt_after(cfg, out: Path, rounds: int, extra_steps: int = 0, comm=None):
    """Run `rounds` rounds with a checkpoint after each, then `extra_steps` more steps of the next round that
    are released but never checkpointed (a crash). Returns the Trainer."""
    from fedhypevae.trainer import Trainer

    tr = Trainer(cfg, out, comm, progress=False)
    tr.setup()
    for r in range(rounds):
        tr.run_round(r)
        tr.state.round = r + 1
        tr.save_checkpoint()
    if extra_steps:
        saved = cfg.train.local_steps
        cfg.train.local_steps = extra_steps  # a partial round, then the "crash"
        tr.run_round(rounds)
        cfg.train.local_steps = saved
    tr.ledger.close()
    return tr


def load_phi(out: Path) -> dict:
    return torch.load(Path(out) / "hypernetwork.pt", map_location="cpu", weights_only=True)


def rel_diff(a: dict, b: dict) -> float:
    """max over tensors of max|a-b| / max|a| (how hypernetworks of two runs are compared)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert x.shape == y.shape, k
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)))
    return worst
