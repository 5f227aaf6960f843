"""Where epsilon = 1 loses the synthetic data: FedHypeVAE variants on digits' VALIDATION splits.

    python benchmarks/dp_ablation.py --out runs/dp-ablation                    # every variant, seeds 0 1 2
    python benchmarks/dp_ablation.py --out runs/dp-ablation --only B0_paper,A2_anchor_s0.5 --seeds 0

Every variant is `fedhypevae train --config paper` with `data.holdout=validation` (Dirichlet 0.3, 10 clients; the
test splits are never loaded) and the overrides below, then `fedhypevae evaluate` with the synthetic-only and the
lambda-mix protocols. Runs are kept under OUT/runs/<variant>_s<seed> and skipped when already evaluated, so the
command resumes. OUT/dp_ablation.md (and .json) holds one row per variant: the mean and population std over
seeds of the clients' mean balanced accuracy, the local-only reference on the same splits, the last round's
reconstruction NLL and KL (diagnostics), and diagnostics of the synthetic set measured against the pooled
VALIDATION records, in the data's units: the spread of the synthetic class means (mean squared distance of a class
mean to their average; real data: the same of the real class means), the mean squared distance of a synthetic
class mean to its own real class mean, and how many synthetic class means lie nearest their own class's real
mean. Each run takes 0.5-3 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE = ["data.holdout=validation", "threads=1"]
ANCHOR = ["model.class_anchor=true"]
VARIANTS: dict[str, list[str]] = {
    # the reference: configs/paper.yaml at epsilon = 1 (50 rounds x 20 steps, q = 0.25, Adam lr 0.004, stats 0.2)
    "B0_paper": [],
    # number and size of steps at the same epsilon
    "B1_T200": ["train.local_steps=4"],
    "B2_T50_q1": ["train.local_steps=1", "privacy.sample_rate=1.0"],
    "B3_T50_q1_lr0.001": ["train.local_steps=1", "privacy.sample_rate=1.0", "train.lr=0.001"],
    "B9_lr0.001": ["train.lr=0.001"],
    # a smaller model (less noise in total)
    "B4_small": ["model.hidden=[64]", "model.latent_dim=8", "model.hyper_hidden=32"],
    # the clip norm
    "B5_clip0.5": ["privacy.clip_norm=0.5"],
    "B6_clip5": ["privacy.clip_norm=5"],
    # noise on Phi only (the paper's mode: the encoder and codes train without noise; no formal guarantee)
    "B7_papermode": ["privacy.mode=paper"],
    # the class statistics' share
    "B8_stats0.05": ["privacy.stats_epsilon_fraction=0.05"],
    # the decoder anchored to the released class means, at two shares of the statistics
    "A1_anchor": ANCHOR,
    "A2_anchor_s0.5": [*ANCHOR, "privacy.stats_epsilon_fraction=0.5"],
    "A3_anchor_s0.5_T50q1": [
        *ANCHOR,
        "privacy.stats_epsilon_fraction=0.5",
        "train.local_steps=1",
        "privacy.sample_rate=1.0",
    ],
    "A5_anchor_s0.8": [*ANCHOR, "privacy.stats_epsilon_fraction=0.8"],
    # the statistics' records centred on a public point (privacy.stats_center) with a smaller clip: less noise for
    # the same share (chosen with the DP Gaussian sampler on these splits)
    "C1_anchor_center": [*ANCHOR, "privacy.stats_center=0.3", "privacy.stats_clip_norm=2.5"],
    "C5_anchor_s0.8_center": [
        *ANCHOR,
        "privacy.stats_epsilon_fraction=0.8",
        "privacy.stats_center=0.3",
        "privacy.stats_clip_norm=2.5",
    ],
    "C6_anchor_s0.8_center_lr0.001": [
        *ANCHOR,
        "privacy.stats_epsilon_fraction=0.8",
        "privacy.stats_center=0.3",
        "privacy.stats_clip_norm=2.5",
        "train.lr=0.001",
    ],
    "C7_anchor_s0.8_center_T200": [
        *ANCHOR,
        "privacy.stats_epsilon_fraction=0.8",
        "privacy.stats_center=0.3",
        "privacy.stats_clip_norm=2.5",
        "train.local_steps=4",
    ],
    # the sums get most of the statistics' budget (the counts need little), as in the DP Gaussian sampler's split
    "C8_anchor_s0.8_center_split_lr0.001": [
        *ANCHOR,
        "privacy.stats_epsilon_fraction=0.8",
        "privacy.stats_center=0.3",
        "privacy.stats_clip_norm=2.5",
        "privacy.stats_split=[0.85,0.15]",
        "train.lr=0.001",
    ],
    "C9_anchor_s0.9_center_split_lr0.001": [
        *ANCHOR,
        "privacy.stats_epsilon_fraction=0.9",
        "privacy.stats_center=0.3",
        "privacy.stats_clip_norm=2.5",
        "privacy.stats_split=[0.85,0.15]",
        "train.lr=0.001",
    ],
    "C10_anchor_s0.95_center_split_lr0.001": [
        *ANCHOR,
        "privacy.stats_epsilon_fraction=0.95",
        "privacy.stats_center=0.3",
        "privacy.stats_clip_norm=2.5",
        "privacy.stats_split=[0.85,0.15]",
        "train.lr=0.001",
    ],
    "C11_anchor_s0.9_center_split_lr0.0003": [
        *ANCHOR,
        "privacy.stats_epsilon_fraction=0.9",
        "privacy.stats_center=0.3",
        "privacy.stats_clip_norm=2.5",
        "privacy.stats_split=[0.85,0.15]",
        "train.lr=0.0003",
    ],
    # the trust model: distributed noise (the aggregate carries sigma once, not sqrt(M) times)
    "D0_paper_dist": ["privacy.trust_model=distributed"],
    "D2_anchor_s0.5_dist": [*ANCHOR, "privacy.stats_epsilon_fraction=0.5", "privacy.trust_model=distributed"],
    "D3_anchor_s0.8_dist": [*ANCHOR, "privacy.stats_epsilon_fraction=0.8", "privacy.trust_model=distributed"],
    # references
    "E4_paper": ["privacy.target_epsilon=4"],
    "N0_nonprivate": ["privacy.enabled=false"],
    "N1_anchor_nonprivate": [*ANCHOR, "privacy.enabled=false"],
}


def fedhypevae(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "fedhypevae"), *args]


def run_variant(out: Path, name: str, seed: int, extra: tuple = ()) -> Path:
    run = out / "runs" / f"{name}_s{seed}"
    if (run / "eval_lm.json").is_file():
        return run
    if run.exists():  # an unfinished run: start again (a private run's partial spend is not reused)
        import shutil

        shutil.rmtree(run)
    sets = [x for kv in [*BASE, f"seed={seed}", *VARIANTS[name], *extra] for x in ("--set", kv)]
    t0 = time.perf_counter()
    subprocess.run(
        fedhypevae("train", "--config", "paper", *sets, "--out", str(run), "--no-progress", "--quiet"), check=True
    )
    (run / "wall_s").write_text(f"{time.perf_counter() - t0:.1f}\n")
    for proto, tag in (("synthetic-only", "so"), ("lambda-mix", "lm")):
        subprocess.run(
            fedhypevae(
                "evaluate",
                "--run",
                str(run),
                "--protocol",
                proto,
                "--no-quality",
                "--json",
                str(run / f"eval_{tag}.json"),
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return run


def class_mean_diagnostics(run: Path) -> dict:
    """The synthetic class means against the real ones of the pooled validation records (a diagnostic)."""
    import numpy as np

    from fedhypevae.config import load_config
    from fedhypevae.data import build_federation

    cfg = load_config(str(run / "config.yaml"))
    fed = build_federation(cfg.data, cfg.partition, cfg.seed)
    from fedhypevae.data import invert_transform

    # synthetic.npz is in the data's own units: the held-out records are mapped back to them too
    x = invert_transform(np.concatenate([c.x_test for c in fed.clients]), fed.transform, fed.value_range)
    y = np.concatenate([c.y_test for c in fed.clients])
    syn = np.load(run / "synthetic.npz")
    xs = syn["x"].astype(np.float64)
    ys = syn["y"]
    classes = [k for k in range(fed.num_classes) if (y == k).any() and (ys == k).any()]
    real = np.stack([x[y == k].mean(0) for k in classes])
    fake = np.stack([xs[ys == k].mean(0) for k in classes])
    d = ((fake[:, None] - real[None]) ** 2).sum(-1)
    return {
        "syn_spread": float(((fake - fake.mean(0)) ** 2).sum(1).mean()),
        "real_spread": float(((real - real.mean(0)) ** 2).sum(1).mean()),
        "own_nearest": int((d.argmin(1) == np.arange(len(classes))).sum()),
        "own_dist": float(np.diag(d).mean()),
        "classes": len(classes),
    }


def summarize(out: Path, names: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for name in names:
        per = []
        for s in seeds:
            run = out / "runs" / f"{name}_s{s}"
            if not (run / "eval_lm.json").is_file():
                continue
            so = json.loads((run / "eval_so.json").read_text())
            lm = json.loads((run / "eval_lm.json").read_text())
            res = json.loads((run / "results.json").read_text())
            per.append(
                {
                    "so": 100 * so["summary"]["balanced_accuracy"]["mean"],
                    "lm": 100 * lm["summary"]["balanced_accuracy"]["mean"],
                    "local": 100 * lm["reference_local"]["summary"]["balanced_accuracy"]["mean"],
                    "nll": res["training"]["final"].get("diagnostics/recon_nll"),
                    "kl": res["training"]["final"].get("diagnostics/kl"),
                    # a run without privacy spends nothing and guarantees nothing: no epsilon
                    "eps": (res.get("privacy") or {}).get("epsilon_spent")
                    if (res.get("privacy") or {}).get("enabled", True)
                    else None,
                    "wall": float((run / "wall_s").read_text()) if (run / "wall_s").is_file() else None,
                    **class_mean_diagnostics(run),
                }
            )
        if not per:
            continue

        def ms(key, per=per):
            vals = [p[key] for p in per if p[key] is not None]
            return (statistics.mean(vals), statistics.pstdev(vals)) if vals else (None, None)

        rows.append(
            {"variant": name, "overrides": VARIANTS[name], "seeds": len(per), "per_seed": per}
            | {
                k: ms(k)
                for k in (
                    "so",
                    "lm",
                    "local",
                    "nll",
                    "kl",
                    "wall",
                    "syn_spread",
                    "real_spread",
                    "own_nearest",
                    "own_dist",
                )
            }
            | {"eps": max((p["eps"] for p in per if p["eps"] is not None), default=None)}
        )
    return rows


def markdown(rows: list[dict]) -> str:
    def f(v, digits=2):
        return "–" if v[0] is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"

    out = [
        "| variant | synthetic-only BACC % | λ-mix BACC % | local-only % | NLL | KL | syn. class-mean spread (real) "
        "| distance to own real mean | own class nearest | ε | s | overrides |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "–" if r["eps"] is None else f"{r['eps']:.3f}"
        out.append(
            f"| {r['variant']} | {f(r['so'])} | {f(r['lm'])} | {r['local'][0]:.2f} | {r['nll'][0]:.1f} | "
            f"{r['kl'][0]:.2f} | {r['syn_spread'][0]:.0f} ({r['real_spread'][0]:.0f}) | {r['own_dist'][0]:.0f} | "
            f"{r['own_nearest'][0]:.1f} of {r['per_seed'][0]['classes']} | "
            f"{eps} | {r['wall'][0]:.0f} | "
            f"{' '.join('`' + o + '`' for o in r['overrides']) or '(paper.yaml)'} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for runs/ and dp_ablation.{md,json}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ap.add_argument("--only", help="comma-separated variants (default: all)")
    ap.add_argument("--summary-only", action="store_true", help="only summarize the runs already under OUT")
    ap.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="one more override for every run"
    )
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    out = Path(args.out)
    if not args.summary_only:
        for name in names:
            for s in args.seeds:
                run_variant(out, name, s, tuple(args.extra))
                print(f"done {name} seed {s}", file=sys.stderr, flush=True)
    rows = summarize(out, names, args.seeds)
    md = markdown(rows)
    (out / "dp_ablation.md").write_text(md)
    (out / "dp_ablation.json").write_text(json.dumps(rows, indent=1))
    print(md)


if __name__ == "__main__":
    main()
