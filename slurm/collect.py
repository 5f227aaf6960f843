"""Collect a sweep into a table and a privacy-utility plot.

    python -m fedhypevae.slurm.collect SWEEP [--out DIR] [--rescore PROTOCOL]

Reads SWEEP/points/*/result.json and writes summary.csv (one row per method, partition and epsilon:
mean and population std (ddof=0) over seeds of the client-averaged accuracy and balanced accuracy),
points.csv (one row per point and client), summary.md, summary.json and privacy_utility.png (accuracy and balanced
accuracy against epsilon, log x axis, one line per method with error bars; methods that do not
depend on epsilon are horizontal bands). Points without a result are listed as missing. Partial
points (result.json "status": "partial": the run ended without its statistics release, so without
a fitted meta-code, and was not scored) are listed in their own section with what they miss and
the epsilon they spent; they are left out of the means, stds, CSV files and the plot.

`--rescore PROTOCOL` scores every FedHypeVAE point's synthetic set (SWEEP/points/<id>/run/synthetic.npz) again
under another evaluation protocol (e.g. synthetic-only, for a sweep scored with augment) and collects those
scores instead; points without a synthetic set (the baselines) are left out. Nothing is trained again.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

from fedhypevae.evaluation.metrics import population_std
from fedhypevae.methods import METHODS

from .job import missing_text, read_json, result_status, write_json


def load_points(sweep: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(complete results, partial results, specs of the points without a result)."""
    results, partial, missing = [], [], []
    for d in sorted((sweep / "points").glob("*")):
        if not (d / "spec.json").is_file():
            continue
        if (d / "result.json").is_file():
            res = read_json(d / "result.json")
            (partial if result_status(res) == "partial" else results).append(res)
        else:
            missing.append(read_json(d / "spec.json"))
    return results, partial, missing


def rescore(sweep: Path, results: list[dict], protocol: str) -> list[dict]:
    """The complete FedHypeVAE points with their synthetic sets scored under `protocol` (rows and means replaced);
    the splits are rebuilt from each run's own config.yaml."""
    from fedhypevae.config import load_config
    from fedhypevae.data import build_federation
    from fedhypevae.methods import score_run

    out = []
    for r in results:
        run = sweep / "points" / r["id"] / "run"
        m = METHODS.get(r["method"])
        if m is None or not m.trains_fedhypevae or not (run / "synthetic.npz").is_file():
            continue
        cfg = load_config(str(run / "config.yaml"))
        rows = score_run(run, build_federation(cfg.data, cfg.partition, cfg.seed), protocol=protocol, seed=r["seed"])
        out.append(
            {
                **r,
                "rows": rows,
                "protocol": protocol,
                "accuracy": sum(c["accuracy"] for c in rows) / len(rows),
                "balanced_accuracy": sum(c["balanced_accuracy"] for c in rows) / len(rows),
            }
        )
    return out


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs):
    """The package's std convention: population std (ddof=0) over seeds, 0 for one seed."""
    return population_std(xs) if xs else 0.0


def _label_of(method: str) -> str | None:
    """The registry's label of a point's method (None for a name the registry no longer has)."""
    m = METHODS.get(method)
    return None if m is None else m.label


def summarize(results: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in results:
        groups.setdefault((r["method"], r["partition"], r["epsilon"]), []).append(r)
    rows = []
    for (method, part, eps), rs in groups.items():
        acc = [100 * r["accuracy"] for r in rs]
        bacc = [100 * r["balanced_accuracy"] for r in rs]
        spent = [r["epsilon_spent"] for r in rs if r.get("epsilon_spent") is not None]
        rows.append(
            {
                "method": method,
                "partition": part,
                "epsilon": eps,
                "seeds": len(rs),
                "accuracy_mean": _mean(acc),
                "accuracy_std": _std(acc),
                "balanced_accuracy_mean": _mean(bacc),
                "balanced_accuracy_std": _std(bacc),
                "epsilon_spent_max": max(spent) if spent else None,
                "formal_guarantee": all(bool(r.get("formal_guarantee")) for r in rs) if spent else None,
                "resumed_points": sum(bool(r.get("resumed_from_rounds")) for r in rs),
            }
        )
    key = lambda r: (r["partition"], r["method"], -1 if r["epsilon"] is None else r["epsilon"])  # noqa: E731
    return sorted(rows, key=key)


def _eps(e) -> str:
    return "–" if e is None else ("∞" if math.isinf(e) else f"{e:g}")


def markdown(
    rows: list[dict], missing: list[dict], sweep: Path, partial: list[dict] = (), protocol: str | None = None
) -> str:
    lines = [
        f"# Sweep {sweep.name}" + (f" (synthetic sets re-scored with protocol {protocol})" if protocol else ""),
        "",
        "Mean ± population std (ddof=0) over seeds of the client-averaged metric (%). ε: the target of the "
        "point (– for methods that do not use one); ε spent: the largest over its seeds. *Paper mode is not a "
        "formal guarantee.",
        "",
    ]
    for part in sorted({r["partition"] for r in rows}):
        lines += [
            f"## Partition {part}",
            "",
            "| Method | ε | seeds | ACC (%) | BACC (%) | ε spent | resumed |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["partition"] == part):
            spent = "–" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.3f}"
            lines.append(
                f"| {_label_of(r['method']) or r['method']} | {_eps(r['epsilon'])} | {r['seeds']} | "
                f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
                f"{r['balanced_accuracy_mean']:.2f} ± {r['balanced_accuracy_std']:.2f} | {spent} | "
                f"{r['resumed_points']} |"
            )
        lines.append("")
    if partial:
        lines += [
            f"## Partial ({len(partial)} point(s))",
            "",
            "Ended without releasing their class statistics, so without a fitted meta-code: not scored, not in "
            "the table or the plot, and not retried (another attempt would be refused the same release).",
            "",
        ]
        for r in partial:
            spent = "" if r.get("epsilon_spent") is None else f" (ε spent {r['epsilon_spent']:.3f})"
            lines.append(f"- {r['id']}{spent} — missing: {missing_text(r)}")
        lines.append("")
    if missing:
        lines += [f"## Missing ({len(missing)} point(s) without a result)", ""]
        lines += [f"- {m['id']}" for m in missing]
        lines.append("")
    return "\n".join(lines)


def partition_words(part: str) -> str:
    """A sweep's partition token in words: iid -> 'IID', dirichlet0.3 -> 'Dirichlet α = 0.3 (label skew)'."""
    if part == "iid":
        return "IID"
    if part.startswith("dirichlet"):
        alpha = part[len("dirichlet") :]
        return f"Dirichlet α = {alpha} (label skew)" if alpha else "Dirichlet (label skew)"
    return part


def plot(rows: list[dict], path: Path, protocol: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    parts = sorted({r["partition"] for r in rows})
    eps_all = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None and not math.isinf(r["epsilon"])})
    fig, axes = plt.subplots(2, len(parts), figsize=(5.0 * len(parts) + 2.8, 7.0), squeeze=False, sharex=True)
    for j, part in enumerate(parts):
        for i, (metric, name) in enumerate([("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")]):
            ax = axes[i][j]
            bands = iter([("0.25", "--"), ("0.45", ":"), ("0.6", "-."), ("0.1", (0, (1, 1)))] * 3)
            for method in sorted({r["method"] for r in rows if r["partition"] == part}):
                rs = [r for r in rows if r["partition"] == part and r["method"] == method]
                label = _label_of(method) or method
                finite = sorted(
                    (r for r in rs if r["epsilon"] is not None and not math.isinf(r["epsilon"])),
                    key=lambda r: r["epsilon"],
                )
                if finite:
                    ax.errorbar(
                        [r["epsilon"] for r in finite],
                        [r[f"{metric}_mean"] for r in finite],
                        yerr=[r[f"{metric}_std"] for r in finite],
                        marker="o",
                        capsize=3,
                        label=label,
                    )
                for r in rs:
                    if r["epsilon"] is None or math.isinf(r["epsilon"]):  # no budget: a horizontal band
                        m, s = r[f"{metric}_mean"], r[f"{metric}_std"]
                        grey, style = next(bands)  # greys: kept apart from the ε-dependent lines' colours
                        ax.axhline(
                            m,
                            color=grey,
                            linestyle=style,
                            linewidth=1.2,
                            label=label + (" (ε=∞)" if r["epsilon"] else ""),
                        )
                        if s > 0:
                            ax.axhspan(m - s, m + s, alpha=0.12, color=grey)
            ax.set_xscale("log")
            if eps_all:
                ax.set_xticks(eps_all, [f"{e:g}" for e in eps_all])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{partition_words(part)}: {name}", fontsize=10)
            ax.set_ylabel(f"{name} (%)")
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("target ε (log scale)")
    seen: dict = {}
    for ax in axes.flat:  # every method once, whichever panel drew it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    # one legend in a column of its own on the right: it covers no curve and leaves no empty band
    width = 2.8 / fig.get_figwidth()
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen.keys()),
            loc="center left",
            bbox_to_anchor=(1 - width + 0.01, 0.5),
            fontsize=8,
            frameon=False,
            title="method (ε-independent ones\nas horizontal bands ± population std)",
            title_fontsize=8,
        )
    if protocol:  # what the synthetic-data methods' points were scored by
        fig.suptitle(f"synthetic sets scored by protocol {protocol}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - width, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # long method names: the legend column is kept whole
    plt.close(fig)


def collect(sweep: Path, out: Path | None = None, *, rescore_protocol: str | None = None) -> dict:
    sweep = Path(sweep)
    if not (sweep / "points").is_dir():
        raise FileNotFoundError(
            f"{sweep} holds no sweep (no points/ directory); run python -m fedhypevae.slurm.sweep first"
        )
    out = Path(out or sweep)
    out.mkdir(parents=True, exist_ok=True)
    results, partial, missing = load_points(sweep)
    if rescore_protocol:
        results = rescore(sweep, results, rescore_protocol)
    rows = summarize(results)
    fields = [
        "method",
        "partition",
        "epsilon",
        "seeds",
        "accuracy_mean",
        "accuracy_std",
        "balanced_accuracy_mean",
        "balanced_accuracy_std",
        "epsilon_spent_max",
        "formal_guarantee",
        "resumed_points",
    ]
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
    with open(out / "points.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "point",
                "method",
                "partition",
                "epsilon",
                "seed",
                "client",
                "accuracy",
                "balanced_accuracy",
                "epsilon_spent",
                "ranks",
                "starts",
            ]
        )
        for r in results:
            for c in r["rows"]:
                w.writerow(
                    [
                        r["id"],
                        r["method"],
                        r["partition"],
                        "" if r["epsilon"] is None else r["epsilon"],
                        r["seed"],
                        c["client"],
                        c["accuracy"],
                        c["balanced_accuracy"],
                        r.get("epsilon_spent"),
                        r["ranks"],
                        r.get("starts"),
                    ]
                )
    (out / "summary.md").write_text(markdown(rows, missing, sweep, partial, rescore_protocol))
    if rows:
        sweep_protocol = (read_json(sweep / "sweep.json") if (sweep / "sweep.json").is_file() else {}).get("protocol")
        plot(rows, out / "privacy_utility.png", rescore_protocol or sweep_protocol)
    summary = {
        "sweep": str(sweep),
        "points": len(results) + len(partial) + len(missing),
        "finished": len(results),
        "partial": [
            {"id": r["id"], "missing": list(r.get("missing") or []), "epsilon_spent": r.get("epsilon_spent")}
            for r in partial
        ],
        "missing": [m["id"] for m in missing],
        "summary": rows,
        "rescored_protocol": rescore_protocol,
    }
    write_json(out / "summary.json", summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedhypevae.slurm.collect", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="the sweep directory (--out of python -m fedhypevae.slurm.sweep)")
    ap.add_argument("--out", help="where to write the outputs (default: the sweep directory)")
    ap.add_argument(
        "--rescore",
        metavar="PROTOCOL",
        help="score the FedHypeVAE points' synthetic sets again under this evaluation protocol (e.g. synthetic-only)",
    )
    args = ap.parse_args(argv)
    try:
        s = collect(Path(args.sweep), Path(args.out) if args.out else None, rescore_protocol=args.rescore)
    except FileNotFoundError as exc:
        print(f"fedhypevae.slurm.collect: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or args.sweep)
    print((out / "summary.md").read_text())
    partial = f", {len(s['partial'])} partial (not in the table: see summary.md)" if s["partial"] else ""
    print(
        f"{s['finished']} of {s['points']} point(s) collected{partial} -> {out}/summary.csv, summary.md, "
        f"{'privacy_utility.png, ' if s['summary'] else ''}summary.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
