"""The measurements behind docs/PRIVACY.md section 9.1: the sensitivity check on both forms of the per-sample
stage, strict and paper mode, grad and delta aggregation, and its negative controls. Prints the table's figures.

    python -m benchmarks.sensitivity_table [--out DIR]    (about 6 minutes on 2 cores)

Every check starts from one round of `configs/tiny.yaml` trained, checkpointed and resumed, with a record at the
top of the declared range (every pixel white) added to client 0's data; it removes that edge record and records
0, 7 and 42 (tests/test_sensitivity.py asserts on the same calls).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

import torch

from fedhypevae.config import load_config
from fedhypevae.privacy.sensitivity import BatchNormInputs, Unclipped, check_sensitivity
from fedhypevae.run import run_training
from fedhypevae.trainer import Trainer

ENGINES = ("reference", "batched")
RUNS = (("strict", "grad"), ("paper", "grad"), ("strict", "delta"))
SEEDS = (1, 3, 4, 6)


def train_runs(root: Path) -> dict:
    runs = {}
    for engine in ENGINES:
        for mode, agg in RUNS:
            cfg = load_config(
                "tiny",
                [
                    "train.rounds=1",
                    "privacy.noise_seed=3",
                    f"train.engine={engine}",
                    f"privacy.mode={mode}",
                    f"federation.aggregation={agg}",
                ],
            )
            out = root / f"{engine}-{mode}-{agg}" / "run"
            shutil.rmtree(out.parent, ignore_errors=True)
            run_training(cfg, out, progress=False)
            runs[engine, mode, agg] = (cfg, out)
    return runs


def saved(runs: dict, engine: str, mode: str, agg: str = "grad", lr: float | None = None):
    """A trainer resumed from the run, its client 0 with the edge record added (every client at `lr`)."""
    cfg, run = runs[engine, mode, agg]
    tr = Trainer(copy.deepcopy(cfg), run, resume=True, progress=False)
    tr.setup()
    if lr is not None:
        for b in tr.blocks:
            b.set_lr(encoder=lr, code=lr)
    c = tr.clients[0]
    c.set_data(torch.cat([c.x, torch.ones(1, c.x.shape[1])]), torch.cat([c.y, torch.tensor([3])]))
    return tr, c


def removals(c) -> list:
    return [len(c.y) - 1, 0, 7, 42]


def measure(runs: dict, engine: str) -> None:
    print(f"== train.engine={engine}")
    for agg in ("grad", "delta"):
        tr, c = saved(runs, engine, "strict", agg)
        rep = check_sensitivity(tr, c.id, remove=removals(c), steps=8, seed=1)
        inside = [r.payload_diff for r in rep.rows if r.in_batch]
        outside = [r.payload_diff for r in rep.rows if not r.in_batch]
        print(
            f"strict {agg}, 8 steps, seed 1: ok={rep.ok} max in batch {max(inside):.7f} C, max outside "
            f"{max(outside):.3g} C, buffer ratio {rep.max_buffer_ratio:.4f}, others moved {rep.others_moved}, "
            f"replay drift {rep.replay_drift}"
        )
    for seed in SEEDS:
        tr, c = saved(runs, engine, "paper")
        j = len(c.y) - 1
        rows = check_sensitivity(tr, c.id, remove=[j], steps=8, seed=seed).rows
        first = next((i for i, r in enumerate(rows) if r.in_batch), None)
        later = [r.payload_diff for r in rows[first + 1 :] if not r.in_batch] if first is not None else []
        tr, c = saved(runs, engine, "paper", lr=0.1)
        fast = check_sensitivity(tr, c.id, remove=[j], steps=6, seed=seed)
        tr, c = saved(runs, engine, "strict", lr=0.1)
        strict = check_sensitivity(tr, c.id, remove=[j], steps=6, seed=seed)
        print(
            f"paper seed {seed}: later steps without j {min(later, default=0):.3g}-{max(later, default=0):.3g} C, "
            f"max {max(r.payload_diff for r in rows):.4f} C | lr 0.1: paper max {fast.max_payload_diff:.2f} C, "
            f"strict max {strict.max_payload_diff:.4f} C (ok={strict.ok})"
        )
    for control in (BatchNormInputs, Unclipped):
        tr, c = saved(runs, engine, "strict")
        rep = check_sensitivity(tr, c.id, remove=removals(c), steps=3, seed=3, control=control)
        by = {
            j: max([r.payload_diff for r in rep.rows if r.record == j and r.in_batch], default=None)
            for j in removals(c)
        }
        print(f"{control.__name__}, 3 steps, seed 3: ok={rep.ok}, max per removed record (in batch) {by}")


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sensitivity_table", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sensitivity_table", help="folder for the trained runs (replaced)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    runs = train_runs(Path(args.out))
    for engine in ENGINES:
        measure(runs, engine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
