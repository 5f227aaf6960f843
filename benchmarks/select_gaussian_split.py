"""Choose the DP Gaussian sampler's budget split on digits' validation splits (data.holdout: validation).

    python benchmarks/select_gaussian_split.py [--seeds 0 1 2] [--epsilon 1] [--centering]

Digits is the public development set: every number this prints is a balanced accuracy on validation records
carved from each client's TRAIN split (the test splits are never loaded). For each candidate split of the one
release's budget between (class sums, counts, squared norms) it runs the sampler with local and central noise on
IID and Dirichlet(0.3) partitions of 10 clients and scores the synthetic set alone (protocol synthetic-only),
then prints the mean over partitions, seeds and --repeats noise draws (the spread of one draw is larger than the
differences between splits). The chosen split is frozen as fedhypevae.baselines.gaussian.BUDGET_SPLIT and used
unchanged on every other data set. The draws use noise_seed 0..repeats-1: reproducible, for choosing a setting
only (a release takes secure noise).
"""

from __future__ import annotations

import argparse
import statistics

from fedhypevae.config import load_config
from fedhypevae.data import build_federation
from fedhypevae.methods import run_baseline

CANDIDATES = [
    (1 / 3, 1 / 3, 1 / 3),
    (0.6, 0.2, 0.2),
    (0.7, 0.2, 0.1),
    (0.8, 0.1, 0.1),
    (0.8, 0.15, 0.05),
    (0.9, 0.05, 0.05),
]
# (center, clip) of the records at the chosen split (--centering): a public point subtracted before the clip, so that
# a smaller clip keeps more of each record (digits mapped to [0, 1]: sqrt(64)/2 = 4 is the uncentred rule)
CENTERING = [(0.0, 4.0), (0.0, 3.0), (0.3, 3.5), (0.3, 3.0), (0.3, 2.5), (0.3, 2.0), (0.5, 2.5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="partition seeds (default 0 1 2)")
    ap.add_argument("--epsilon", type=float, default=1.0, help="target epsilon of the release (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="noise draws per (partition, seed) (default 5)")
    ap.add_argument(
        "--centering",
        action="store_true",
        help="compare (center, clip) pairs of the records at the frozen split instead of the splits",
    )
    args = ap.parse_args()
    feds = []
    for kind in ("iid", "dirichlet"):
        for seed in args.seeds:
            cfg = load_config("default", [f"partition.kind={kind}", f"seed={seed}", "data.holdout=validation"])
            feds.append((kind, seed, build_federation(cfg.data, cfg.partition, cfg.seed)))
    if args.centering:
        print("| method | center, clip | validation BACC (%), mean ± std of the mean |")
        rows = [(f"{c:g}, {k:g}", {"center": c, "clip_norm": k}) for c, k in CENTERING]
    else:
        print("| method | split (sums, counts, squared norms) | validation BACC (%), mean ± std of the mean |")
        rows = [(", ".join(f"{v:.2f}" for v in split), {"budget_split": split}) for split in CANDIDATES]
    print("|---|---|---|")
    for method in ("gaussian", "gaussian-central"):
        for label, kw in rows:
            vals = []
            for _, seed, fed in feds:
                for r in range(args.repeats):
                    res = run_baseline(
                        method, fed, seed=seed, epsilon=args.epsilon, protocol="synthetic-only", noise_seed=r, **kw
                    )
                    vals.append(100 * res["summary"]["balanced_accuracy_mean"])
            sem = statistics.stdev(vals) / len(vals) ** 0.5
            print(f"| {method} | {label} | {statistics.fmean(vals):.2f} ± {sem:.2f} |", flush=True)


if __name__ == "__main__":
    main()
