"""Table 1 of the paper: methods x {IID, Dirichlet} x seeds, per-client accuracy and balanced accuracy.

    fedhypevae table --config configs/table1_digits.yaml --out results/table1_digits

Every method sees identical splits: the federation is rebuilt from (data, partition, seed) for
each cell. Each finished cell is saved under OUT/cells/ and skipped when the command is run
again, so an interrupted table continues where it stopped. Outputs: table.md, table.csv (one row
per method, partition, seed and client), table.json and per_client_bacc.png.

The methods, their labels, how each runs and how it is scored come from the registry
(fedhypevae.methods); this module only lays the cells out and writes the outputs.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .checkpoint import dumps_json
from .config import load_config, resolve_config_path
from .errors import ConfigError
from .evaluation.metrics import population_std
from .methods import (
    METHODS,
    PROTOCOLS,
    check_methods,
    method_overrides,
    result_rows,
    run_baseline,
    score_run,
    score_synthetic,
)


@dataclass
class TableConfig:
    # name used in titles and file names
    name: str
    # FedHypeVAE base config (a shipped name or a path); data/partition/seed/privacy are set per cell
    train_config: str = "default"
    # dotted overrides applied to every FedHypeVAE run (e.g. a data set's public statistics clip)
    overrides: list = field(default_factory=list)
    # dotted overrides applied after `overrides` to the private runs on the FedHypeVAE engine only (FedHypeVAE strict,
    # paper mode, its trust-model variants, DP-CVAE; not the non-private ceiling): the private recipe. A method's own
    # settings (e.g. DP-CVAE's) still win over them
    private_overrides: list = field(default_factory=list)
    # data section (as in a train config)
    data: dict = field(default_factory=lambda: {"path": "digits"})
    # partitions: iid and/or dirichlet
    partitions: list = field(default_factory=lambda: ["iid", "dirichlet"])
    alpha: float = 0.3
    clients: int = 10
    min_client_size: int = 20
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    epsilon: float = 1.0
    delta: float = 1e-4
    # method names of fedhypevae.methods.METHODS (default: those it lists for a table)
    methods: list = field(default_factory=lambda: [n for n, m in METHODS.items() if m.in_default_table])
    # how a synthetic set is scored (fedhypevae.methods.PROTOCOLS), one table row per protocol for every method
    # with a synthetic output: synthetic-only (the synthetic set alone), augment (real train + synthetic),
    # lambda-mix (local and synthetic classifiers mixed, lambda chosen on a validation split of the train split)
    protocols: list = field(default_factory=lambda: ["augment", "lambda-mix"])
    # settings per baseline name, passed to fedhypevae.methods.run_baseline
    baselines: dict = field(default_factory=dict)
    # free text printed beside the table (e.g. what was reduced and why)
    notes: str = ""

    def __post_init__(self):
        check_methods(self.methods)
        bad = (
            [p for p in self.protocols if p not in PROTOCOLS or p == "local"] if isinstance(self.protocols, list) else 0
        )
        trained = sorted(k for k in self.baselines if k in METHODS and METHODS[k].trains_fedhypevae)
        if trained:
            raise ConfigError(
                f"baselines: {', '.join(trained)} train(s) on the FedHypeVAE engine and take(s) the train config "
                "(train_config, overrides), not baseline settings"
            )
        if bad or not self.protocols or not isinstance(self.protocols, list):
            raise ConfigError(
                f"protocols must be a non-empty list of {', '.join(p for p in PROTOCOLS if p != 'local')} (local-only "
                f"is the method `local`); got {self.protocols!r}"
            )
        bad = [p for p in self.partitions if p not in ("iid", "dirichlet")]
        if bad:
            raise ConfigError(f"partitions must be iid or dirichlet; got {bad}")


def load_table_config(path: str) -> TableConfig:
    p = resolve_config_path(path)
    tree = yaml.safe_load(p.read_text()) or {}
    valid = set(TableConfig.__dataclass_fields__)
    unknown = sorted(set(tree) - valid)
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {unknown}; valid: {', '.join(sorted(valid))}")
    # data paths in a shipped table config are relative to the repository (configs/..)
    for key in ("path", "metadata_path"):
        v = (tree.get("data") or {}).get(key)
        if isinstance(v, str) and not Path(v).exists() and (p.parent.parent / v).exists():
            tree["data"][key] = str((p.parent.parent / v).resolve())
    return TableConfig(**tree)


def cell_train_config(
    tc: TableConfig, partition: str, seed: int, mode: str | None = None, *, method: str | None = None
):
    """The FedHypeVAE config of one cell; its data/partition/seed also define the splits every method uses.
    `method`: a FedHypeVAE method, whose privacy settings (method_overrides) replace `mode`."""
    ov = [
        *tc.overrides,
        f"seed={seed}",
        f"partition.kind={partition}",
        f"partition.alpha={tc.alpha}",
        f"partition.clients={tc.clients}",
        f"partition.min_client_size={tc.min_client_size}",
        f"privacy.target_epsilon={tc.epsilon}",
        f"privacy.delta={tc.delta}",
    ]
    for k, v in tc.data.items():
        ov.append(f"data.{k}={'null' if v is None else v}")
    if method is not None and METHODS[method].trains_fedhypevae:
        ov += method_overrides(method, tc.private_overrides)
    elif mode:
        ov.append(f"privacy.mode={mode}")
    return load_config(tc.train_config, ov)


def run_cell(tc: TableConfig, method: str, partition: str, seed: int, out: Path) -> dict:
    """One method on one (partition, seed): per-client rows scored on each client's own test split; a method
    with a synthetic output is scored once per protocol of the table ("scores": protocol -> rows)."""
    from .data import build_federation

    cfg = cell_train_config(tc, partition, seed, method=method)
    fed = build_federation(cfg.data, cfg.partition, cfg.seed)
    t0 = time.perf_counter()
    privacy = None
    m = METHODS[method]
    scores = None
    if m.trains_fedhypevae:
        from .run import finished_run, run_training

        run_dir = out / "runs" / f"{partition}_s{seed}_{method}"
        resume = (run_dir / "config.yaml").is_file()
        # a finished run is reused only under the cell's settings (finished_run refuses other ones, naming them: a
        # deleted cells/ folder must not score runs trained under another table's settings)
        if finished_run(run_dir, cfg) is None:
            run_training(cfg, run_dir, resume=resume, progress=False)
        trained = time.perf_counter()
        results = json.loads((run_dir / "results.json").read_text())
        privacy = results["privacy"]
        scores = {p: score_run(run_dir, fed, protocol=p, seed=seed) for p in tc.protocols}
    else:
        settings = tc.baselines.get(method, {})
        first = tc.protocols[0]
        res = run_baseline(method, fed, seed=seed, epsilon=tc.epsilon, delta=tc.delta, protocol=first, **settings)
        trained = t0 + res["wall_s"]
        privacy = res.get("privacy")
        if m.output == "synthetic":
            scores = {first: result_rows(res)}
            for p in tc.protocols[1:]:
                scores[p] = score_synthetic(fed, res["x_syn"], res["y_syn"], protocol=p, seed=seed)
    if privacy and privacy.get("enabled") is False:  # a non-private FedHypeVAE run spends nothing
        privacy = None
    eps = None if not privacy else privacy.get("epsilon_spent")
    formal = None if not privacy else privacy.get("formal_guarantee")
    cell = {
        "method": method,
        "partition": partition,
        "seed": seed,
        "epsilon_spent": eps,
        "formal_guarantee": formal,
        # the method's own time (training, or the baseline's run and its first scoring), then all of it
        "train_seconds": trained - t0,
        "seconds": time.perf_counter() - t0,
    }
    if scores is None:
        cell["rows"] = result_rows(res)
    else:
        cell["scores"] = scores
    return cell


def cell_entries(cell: dict) -> list:
    """A cell's table rows: [((method, protocol), per-client rows)]; protocol None for a method that predicts
    itself (one row), one entry per protocol for a method with a synthetic output."""
    if "scores" in cell:
        return [((cell["method"], p), rows) for p, rows in cell["scores"].items()]
    return [((cell["method"], None), cell["rows"])]


def row_keys(tc: TableConfig) -> list:
    """The table's rows in order: (method, protocol) as ``cell_entries`` names them."""
    return [(m, p) for m in tc.methods for p in ((None,) if METHODS[m].output == "predictions" else tc.protocols)]


_PROTOCOL_LABEL = {"synthetic-only": "synthetic only", "augment": "augment", "lambda-mix": "λ-mix"}


def row_label(key: tuple) -> str:
    m, p = key
    return METHODS[m].label if p is None else f"{METHODS[m].label} · {_PROTOCOL_LABEL.get(p, p)}"


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs):
    return population_std(xs) if xs else 0.0


def aggregate(cells: list[dict]) -> dict:
    """Per (row key, partition) (row key: (method, protocol), ``cell_entries``): the client-mean per seed, then
    mean and population std (ddof=0) over seeds (in %), the population std over all (seed, client) pairs, the
    mean chosen lambda (lambda-mix) and the method's median seconds per cell."""
    out: dict = {}
    for c in cells:
        for key, rows in cell_entries(c):
            d = out.setdefault(
                (key, c["partition"]), {"acc": [], "bacc": [], "acc_all": [], "bacc_all": [], "eps": [], "lam": []}
            )
            d["acc"].append(_mean([r["accuracy"] for r in rows]))
            d["bacc"].append(_mean([r["balanced_accuracy"] for r in rows]))
            d["acc_all"] += [r["accuracy"] for r in rows]
            d["bacc_all"] += [r["balanced_accuracy"] for r in rows]
            d["lam"] += [r["lambda"] for r in rows if r.get("lambda") is not None]
            sec = c.get("train_seconds", c.get("seconds"))  # cells written by older code may have neither
            d.setdefault("seconds", []).extend([] if sec is None else [sec])
            if c["epsilon_spent"] is not None:
                d["eps"].append(c["epsilon_spent"])
    return {
        k: {
            "acc_mean": 100 * _mean(v["acc"]),
            "acc_std": 100 * _std(v["acc"]),
            "bacc_mean": 100 * _mean(v["bacc"]),
            "bacc_std": 100 * _std(v["bacc"]),
            "acc_client_std": 100 * _std(v["acc_all"]),
            "bacc_client_std": 100 * _std(v["bacc_all"]),
            "seeds": len(v["acc"]),
            "epsilon_max": max(v["eps"]) if v["eps"] else None,
            "lambda_mean": _mean(v["lam"]) if v["lam"] else None,
            "seconds_median": statistics.median(v["seconds"]) if v["seconds"] else None,
        }
        for k, v in out.items()
    }


def _pm(mean: float, std: float, n: int) -> str:
    """mean ± std over seeds; one seed has no spread to show, so no ±."""
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def markdown(tc: TableConfig, agg: dict, command: str) -> str:
    parts = list(tc.partitions)
    head = (
        "| Method | "
        + " | ".join(f"{_pname(p, tc)} ACC (%) | {_pname(p, tc)} BACC (%)" for p in parts)
        + " | ε spent (max) | s / cell (median) |"
    )
    sep = "|---" * (1 + 2 * len(parts)) + "|---|---|"
    where = (
        ", scored on VALIDATION splits carved from each client's train split (data.holdout: validation)"
        if (tc.data or {}).get("holdout") == "validation"
        else ""
    )
    lines = [
        f"### {tc.name}: {tc.clients} clients, ε = {tc.epsilon}, δ = {tc.delta}, seeds {tc.seeds}{where}",
        "",
        head,
        sep,
    ]
    keys = row_keys(tc)
    best = {
        p: max((agg[(k, p)]["bacc_mean"] for k in keys if (k, p) in agg and k[0] != "pooled"), default=None)
        for p in parts
    }
    for k in keys:
        cells, eps, secs = [], None, []
        for p in parts:
            a = agg.get((k, p))
            if a is None:
                cells += ["–", "–"]
                continue
            b = _pm(a["bacc_mean"], a["bacc_std"], a["seeds"])
            if best[p] is not None and k[0] != "pooled" and abs(a["bacc_mean"] - best[p]) < 1e-9:
                b = f"**{b}**"
            if a["lambda_mean"] is not None:
                b += f" (λ̄ {a['lambda_mean']:.2f})"
            cells += [_pm(a["acc_mean"], a["acc_std"], a["seeds"]), b]
            if a["epsilon_max"] is not None:
                eps = max(eps or 0.0, a["epsilon_max"])
            if a["seconds_median"] is not None:
                secs.append(a["seconds_median"])
        sec = f"{statistics.median(secs):.1f}" if secs else "–"
        lines.append(
            f"| {row_label(k)} | " + " | ".join(cells) + f" | {'–' if eps is None else f'{eps:.3f}'} | {sec} |"
        )
    lines += [""] + verdicts(tc, agg)
    spread = (
        "Mean ± population std (ddof=0) over seeds of the client-averaged metric"
        if len(tc.seeds) > 1
        else "The client-averaged metric of one seed (no spread over seeds to show)"
    )
    lines += [
        "",
        spread + "; bold: best balanced accuracy among the methods that do not pool data. A generative method has "
        "one row per way its synthetic set is scored: synthetic only (a classifier on the synthetic set alone), "
        "augment (each client's train split plus the synthetic set), λ-mix (a local and a synthetic classifier "
        "mixed, λ chosen per client on a validation split of its train split; λ̄ is the mean chosen λ, and λ = 1 "
        "is local-only). Seconds: the method's own run per cell (training or the baseline), median over cells. "
        "*Paper mode: the encoder and client code train on private data without noise, so its ε is not a formal "
        "guarantee.",
        "",
    ]
    if tc.notes:
        lines += [tc.notes.strip(), ""]
    lines += [f"Command: `{command}`", ""]
    return "\n".join(lines)


def verdicts(tc: TableConfig, agg: dict) -> list[str]:
    """Plain statements of where FedHypeVAE (strict) stands against each comparison (balanced accuracy), under
    each protocol: against the private baselines scored the same way (or predicting themselves) and local-only."""
    out = []
    m = "fedhypevae-strict"
    # the private baselines (a formal guarantee at the same epsilon), in registry order
    private = [k for k, v in METHODS.items() if v.privacy == "dp" and not v.trains_fedhypevae and k in tc.methods]
    for p in tc.partitions:
        for proto in tc.protocols:
            a = agg.get(((m, proto), p))
            if a is None:
                continue
            said = []
            others = [
                ((o, None if METHODS[o].output == "predictions" else proto), f"{row_label((o, None))} (same ε)")
                for o in private
            ]
            for key, what in others + [(("local", None), "local-only training")]:
                b = agg.get((key, p))
                if b is None:
                    continue
                diff = a["bacc_mean"] - b["bacc_mean"]
                if abs(diff) < 0.005:
                    said.append(f"ties with {what}")
                else:
                    said.append(f"is {abs(diff):.2f} points {'above' if diff > 0 else 'BELOW'} {what}")
            if said:
                out.append(
                    f"- {_pname(p, tc)}, {_PROTOCOL_LABEL.get(proto, proto)}: FedHypeVAE (strict) "
                    + "; ".join(said)
                    + "."
                )
    return out


def _pname(p: str, tc: TableConfig) -> str:
    return "IID" if p == "iid" else f"α={tc.alpha}"


# how each method treats privacy (fedhypevae.methods.Method.privacy), for the plot's colours
_KIND_STYLE = {
    "dp": ("#4c72b0", "private (DP, formal guarantee)"),
    "paper": ("#8172b2", "paper mode (DP on Phi only, not formal)"),
    "none": ("#c8c8c8", "non-private"),
}


def plot(tc: TableConfig, cells: list[dict], path: Path) -> dict:
    """One panel per partition: a horizontal box per table row (a method, or a generative method under one
    protocol) over every (seed, client) balanced accuracy, each client a dot (so no outlier marker is drawn
    twice), boxes coloured by how the method treats privacy; rows read top to bottom in the table's order.
    Returns what was drawn (legend labels, whether each panel labels its accuracy axis, outlier markers) for the
    tests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    parts = tc.partitions
    keys = row_keys(tc)
    fig, axes = plt.subplots(
        1, len(parts), figsize=(4.2 * len(parts) + 4.0, 0.32 * len(keys) + 2.2), squeeze=False, sharey=True
    )
    kinds_used = []
    for j, (ax, p) in enumerate(zip(axes[0], parts)):
        data, labels, kinds = [], [], []
        for k in keys:
            vals = [
                100 * r["balanced_accuracy"]
                for c in cells
                if c["partition"] == p
                for key, rows in cell_entries(c)
                if key == k
                for r in rows
            ]
            data.append(vals)
            labels.append(row_label(k))
            kinds.append(METHODS[k[0]].privacy)
        pos = np.arange(len(keys), 0, -1)  # the table's first row on top
        shown = [i for i, v in enumerate(data) if v]
        if shown:
            box = ax.boxplot(
                [data[i] for i in shown],
                positions=pos[shown],
                vert=False,
                showmeans=True,
                showfliers=False,
                patch_artist=True,
                widths=0.6,
                medianprops={"color": "black", "linewidth": 1.5},
                meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 5},
            )
            for patch, i in zip(box["boxes"], shown):
                patch.set_facecolor(_KIND_STYLE[kinds[i]][0])
                patch.set_alpha(0.55)
            for i in shown:
                jitter = np.random.default_rng(i).uniform(-0.18, 0.18, len(data[i]))
                ax.scatter(data[i], pos[i] + jitter, s=9, color="#333333", alpha=0.55, zorder=3, linewidths=0)
            kinds_used += [kinds[i] for i in shown if kinds[i] not in kinds_used]
        ax.set_yticks(pos, labels, fontsize=8)
        ax.set_ylim(0.4, len(keys) + 0.6)
        ax.set_title(f"{tc.name}, {'IID' if p == 'iid' else f'Dirichlet α = {tc.alpha}'}")
        ax.tick_params(axis="x", labelbottom=True)  # every panel keeps its own scale labels
        ax.tick_params(axis="y", labelleft=j == 0)
        ax.set_xlim(-2, 102)  # the same scale in every panel
        ax.set_xlabel("balanced accuracy per client (%)")
        ax.grid(axis="x", alpha=0.3)
    handles = [
        Patch(facecolor=_KIND_STYLE[k][0], alpha=0.55, label=_KIND_STYLE[k][1])
        for k in ("dp", "paper", "none")
        if k in kinds_used
    ]
    handles += [
        Line2D([], [], color="black", linewidth=1.5, label="median"),
        Line2D([], [], marker="D", linestyle="none", markerfacecolor="white", markeredgecolor="black", label="mean"),
        Patch(facecolor="white", edgecolor="black", label="box: middle half of clients; whiskers: 1.5 IQR"),
        Line2D(
            [],
            [],
            marker="o",
            linestyle="none",
            color="#333333",
            alpha=0.55,
            markersize=4,
            label="one client (every seed)",
        ),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.75 / (0.32 * len(keys) + 2.2), 1, 1))  # room for the legend (about 0.6 inch)
    fig.savefig(path, dpi=120)
    drawn = {
        "legend": [h.get_label() for h in handles],
        "y_tick_labels": [any(lab.get_visible() and lab.get_text() for lab in ax.get_xticklabels()) for ax in axes[0]],
        "row_labels": [lab.get_text() for lab in axes[0][0].get_yticklabels()],
        "outlier_markers": sum(
            len(line.get_xdata())
            for ax in axes[0]
            for line in ax.lines
            if line.get_marker() not in ("None", "", None, "D")
        ),
    }
    plt.close(fig)
    return drawn


SETTINGS_FILE = "settings.json"
# what selects cells rather than defining them: changing these adds or leaves out cells, never changes one
_SELECTORS = ("name", "partitions", "seeds", "methods", "notes")


def cell_settings(tc: TableConfig) -> dict:
    """Every setting a cell's numbers depend on, the FedHypeVAE base config resolved (a changed
    configs/default.yaml changes the cells too)."""
    settings = {k: v for k, v in tc.__dict__.items() if k not in _SELECTORS}
    if not settings["private_overrides"]:  # none: the settings of a table written before the key existed
        del settings["private_overrides"]
    settings["resolved_train_config"] = load_config(tc.train_config, list(tc.overrides)).to_dict()
    return json.loads(dumps_json(settings))


def check_cached_cells(tc: TableConfig, out: Path) -> dict:
    """Cells under OUT/cells were computed with the settings in OUT/cells/settings.json; reusing them under
    other settings would print new settings over old numbers, so that is refused."""
    settings = cell_settings(tc)
    f = out / "cells" / SETTINGS_FILE
    cached = any((out / "cells").glob("*.json")) if (out / "cells").is_dir() else False
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError):
            old = None
        if old != settings:
            from .trainer import flatten_config

            a, b = flatten_config(old or {}), flatten_config(settings)
            diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            said = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in diff[:4]) + (
                f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            )
            raise ConfigError(
                f"--out {out} holds cells computed with other settings: {said}; use another --out (or "
                f"delete {out / 'cells'} to recompute every cell)"
            )
    elif cached:
        raise ConfigError(
            f"--out {out} holds cells without a record of their settings ({f.name} is missing); use "
            f"another --out (or delete {out / 'cells'} to recompute every cell)"
        )
    return settings


def _cell_worker_init(threads: int, parent: int) -> None:
    """A `--jobs` worker: its share of the cores, so that N cells side by side do not oversubscribe them; and it
    ends with the `table` process that started it (`parent`)."""
    import torch

    torch.set_num_threads(threads)
    _end_with_parent(parent)


def _end_with_parent(parent: int) -> None:
    """SIGTERM to this process when its parent ends (Linux' PR_SET_PDEATHSIG; elsewhere nothing). Without it a worker
    whose `table` process was killed finishes its cell as an orphan, minutes of both cores, and writes into the run
    folder that the re-run command is already resuming. Ended at once instead, its run resumes from its last
    checkpoint when the command is run again."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the call
        os._exit(1)


def _run_cell_job(tc: TableConfig, m: str, p: str, s: int, out: Path) -> dict:
    """One cell in a worker process; its file is written there, so a finished cell survives the parent."""
    from .atomic import atomic_write_text

    cell = run_cell(tc, m, p, s, out)
    atomic_write_text(out / "cells" / f"{p}_s{s}_{m}.json", dumps_json(cell, indent=1))
    return cell


def submission_order(cells: list) -> list:
    """Cells (partition, seed, method) in the order `--jobs` workers take them: the FedHypeVAE-engine cells first (each
    takes minutes; the baselines seconds), otherwise as listed. Longest first: the last cells to finish are short
    ones, so no worker sits idle at the end while another runs a long cell alone."""
    return sorted(cells, key=lambda key: not METHODS[key[2]].trains_fedhypevae)


def job_threads(jobs: int) -> int:
    """Torch threads per `--jobs` worker: the cores this process may use, shared out (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def run_table(tc: TableConfig, out: Path, *, command: str, progress: bool = True, jobs: int = 1) -> dict:
    """Every cell of the table (cached ones are read back), then table.md/.csv/.json and the plot. `jobs` > 1
    runs that many cells at once, each in its own process with cores // jobs torch threads; the cells' numbers
    do not depend on it (each cell is seeded by itself)."""
    settings = check_cached_cells(tc, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(exist_ok=True)
    if not (out / "cells" / SETTINGS_FILE).is_file():
        from .atomic import atomic_write_text

        atomic_write_text(out / "cells" / SETTINGS_FILE, dumps_json(settings, indent=1) + "\n")
    todo = [(p, s, m) for p in tc.partitions for s in tc.seeds for m in tc.methods]
    files = {key: out / "cells" / f"{key[0]}_s{key[1]}_{key[2]}.json" for key in todo}
    done = {key: json.loads(f.read_text()) for key, f in files.items() if f.is_file()}
    missing = [key for key in todo if key not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), initial=len(done), desc=f"table {tc.name}", unit="cell")
    if jobs <= 1 or len(missing) <= 1:
        for p, s, m in missing:
            if bar is not None:  # the cell being computed now
                bar.set_postfix_str(f"{m} {p} seed {s}")
            done[(p, s, m)] = _run_cell_job(tc, m, p, s, out)
            if bar is not None:
                bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # spawn: a forked worker would inherit torch's thread pool and this process' state
        with ProcessPoolExecutor(
            max_workers=min(jobs, len(missing)),
            mp_context=mp.get_context("spawn"),
            initializer=_cell_worker_init,
            initargs=(job_threads(jobs), os.getpid()),
        ) as pool:
            running = {pool.submit(_run_cell_job, tc, m, p, s, out): (p, s, m) for p, s, m in submission_order(missing)}
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        p, s, m = running.pop(fut)
                        done[(p, s, m)] = fut.result()
                        if bar is not None:
                            bar.set_postfix_str(f"done: {m} {p} seed {s}")
                            bar.update(1)
            except BaseException:
                for fut in running:
                    fut.cancel()
                raise
    if bar is not None:
        bar.close()
    cells = [done[key] for key in todo]
    agg = aggregate(cells)
    md = markdown(tc, agg, command)
    (out / "table.md").write_text(md)
    import csv

    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "dataset",
                "method",
                "protocol",
                "partition",
                "seed",
                "client",
                "accuracy",
                "balanced_accuracy",
                "lambda",
                "epsilon_spent",
            ]
        )
        for c in cells:
            for (m, proto), rows in cell_entries(c):
                for r in rows:
                    w.writerow(
                        [
                            tc.name,
                            m,
                            proto or "",
                            c["partition"],
                            c["seed"],
                            r["client"],
                            r["accuracy"],
                            r["balanced_accuracy"],
                            "" if r.get("lambda") is None else r["lambda"],
                            c["epsilon_spent"],
                        ]
                    )
    plot(tc, cells, out / "per_client_bacc.png")
    summary = {
        "name": tc.name,
        "command": command,
        "config": tc.__dict__,
        "table": [{"method": m, "protocol": proto, "partition": p, **v} for ((m, proto), p), v in agg.items()],
        "seconds": {f"{c['partition']}_s{c['seed']}_{c['method']}": c["seconds"] for c in cells},
    }
    (out / "table.json").write_text(dumps_json(summary, indent=2))
    return {"markdown": md, **summary}
