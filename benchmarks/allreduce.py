"""What one all-reduce costs through the product's communicators, and what share of a round it takes.

    python -m benchmarks.allreduce --out runs/bench-allreduce            # full: ~2 min on 2 shared cores
    python -m benchmarks.allreduce --out /tmp/b --quick                  # ~1.5 min (training runs dominate)
    python -m benchmarks.allreduce --out /tmp/b --ranks 2 --backends mpi --sizes 1K,1M

1. Micro-benchmark. For every back-end x ranks the parent starts a job of workers
       mpiexec -n R python -m mpi4py -m benchmarks.allreduce --worker SPEC       (mpi)
       python -m torch.distributed.run --standalone --nproc_per_node R -m benchmarks.allreduce --worker SPEC  (gloo)
   Each worker builds its communicator with `hpc.backend.make_communicator`, so the timed call is the
   product's `Communicator.allreduce` on one flat float64 CPU tensor. Per payload: one checked call
   (ones must sum to R), warm-up calls, then N repetitions, each after a barrier. A repetition's time is
   the MAX over ranks (one extra reduction after the timed loop): the time until every rank holds the sum.
   Rank 0's own median is kept too. Besides the requested sizes, two the trainer really sends are added:
   the per-step buffer (Phi's parameters + diagnostics, read from the 1-rank training run) and the 16-byte
   release-guard flags (budget bit and stop bit).
2. Share of a round spent communicating, in real runs of the default config under mpiexec at 1 (reference)
   and R ranks: sum of `comm/all_reduce(ms)` over sum of `time/round(s)` from metrics.jsonl. The trainer times
   its all-reduce calls on rank 0, so that time includes waiting for the slowest rank to arrive.

Writes OUT/allreduce.{csv,md,png,json} and prints the Markdown. The machine may be shared: read ratios
measured in one run, not absolute numbers across runs. Nothing here asserts anything about speed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedhypevae.hpc.launcher import venv_tool

from fedhypevae.checkpoint import dumps_json

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/: mpiexec and the fedhypevae console script live here
BACKENDS = {"mpi": "mpi", "gloo": "torch"}  # benchmark name -> hpc.backend name
FULL_SIZES = "1K,4K,16K,64K,256K,1M,4M,16M"
QUICK_SIZES = "1K,64K,1M,16M"
FLAG_BYTES = 16  # Trainer.guarded_release: two float64 (budget bit, stop bit), reduced with max before every step


# ------------------------------------------------------------------------------------------ worker
def worker(spec_path: str) -> int:
    """One rank of a micro-benchmark job; rank 0 writes the result file named in the spec."""
    import torch
    from fedhypevae.hpc.backend import make_communicator

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)  # reductions here are memory-bound; more threads only oversubscribe 2 cores
    comm = make_communicator(spec["backend"], timeout_s=spec["timeout_s"])
    for elems in spec["elems"]:  # first calls set up connections and buffers: not part of any size's timing
        comm.allreduce(torch.ones(elems, dtype=torch.float64))
    rows = []
    for elems, reps in zip(spec["elems"], spec["reps"]):
        buf = torch.ones(elems, dtype=torch.float64)
        comm.allreduce(buf)
        bad = torch.tensor([0.0 if bool(torch.all(buf == comm.world_size)) else 1.0], dtype=torch.float64)
        for _ in range(spec["warmup"]):
            comm.barrier()
            comm.allreduce(buf)
        own = torch.empty(reps, dtype=torch.float64)
        for i in range(reps):
            buf.fill_(1.0)  # outside the timed window; keeps values finite over many repetitions
            comm.barrier()
            t = time.perf_counter()
            comm.allreduce(buf)
            own[i] = time.perf_counter() - t
        slowest = comm.allreduce(own.clone(), op="max")  # per repetition: until the last rank is done
        comm.allreduce(bad, op="max")
        rows.append(
            {
                "elems": elems,
                "bytes": 8 * elems,
                "reps": reps,
                "correct": bad.item() == 0.0,
                "max_over_ranks_s": slowest.tolist(),
                "rank0_s": own.tolist(),
            }
        )
    if comm.is_root:
        info = {**comm.describe(), "rows": rows}
        if spec["backend"] == "mpi":
            from mpi4py import MPI

            info["library"] = MPI.Get_library_version().splitlines()[0].strip()
        Path(spec["result"]).write_text(json.dumps(info) + "\n")
    comm.barrier()
    comm.close()
    return 0


# ------------------------------------------------------------------------------------------ helpers
def parse_sizes(text: str) -> list[int]:
    """'1K,64K,1M' (K = 1024 bytes) -> byte counts, each a whole number of float64 values."""
    units = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2}
    out = []
    for item in filter(None, (s.strip().upper() for s in text.split(","))):
        num = item.rstrip("KMIB")
        unit = item[len(num) :]
        if unit not in units or not num:
            raise SystemExit(f"--sizes: cannot read {item!r}; use bytes with an optional K or M, e.g. 1K,64K,1M")
        out.append(max(8, int(float(num) * units[unit]) // 8 * 8))
    return out


def fmt_bytes(n: int) -> str:
    for unit, k in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= k:
            return f"{n / k:.4g} {unit}"
    return f"{n} B"


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    pos = 0.9 * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # R ranks x torch's default threads would oversubscribe the cores
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def shown(cmd: list[str], tmp: str | None = None) -> str:
    """A command as the report prints it: paths relative to the repository, the scratch folder as TMP."""
    text = " ".join(cmd).replace(str(REPO) + "/", "")
    return text.replace(tmp, "TMP") if tmp else text


def tool(name: str) -> str:
    """The venv's own executable when there is one (its mpiexec matches its mpi4py), else the PATH's."""
    return venv_tool(name) or name


def run(cmd: list[str], timeout: float) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def launch_cmd(backend: str, ranks: int, module_args: list[str]) -> list[str]:
    if backend == "mpi":
        # -m mpi4py: an exception on one rank aborts every rank instead of leaving them in a collective
        return [
            tool("mpiexec"),
            "-n",
            str(ranks),
            sys.executable,
            "-m",
            "mpi4py",
            "-m",
            "benchmarks.allreduce",
            *module_args,
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        "-m",
        "benchmarks.allreduce",
        *module_args,
    ]


# ------------------------------------------------------------------------------------------ part 2
def train_share(ranks: int, rounds: int, tmp: str) -> dict:
    out = Path(tmp) / f"train_{ranks}"
    exe = [tool("fedhypevae")] if (BIN / "fedhypevae").exists() else [sys.executable, "-m", "fedhypevae.cli"]
    cmd = [
        tool("mpiexec"),
        "-n",
        str(ranks),
        *exe,
        "train",
        "--config",
        "default",
        "--out",
        str(out),
        "--no-progress",
        "--quiet",
        "--set",
        f"train.rounds={rounds}",
    ]
    wall = run(cmd, timeout=900)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    round_s = [r["time/round(s)"] for r in rows]
    comm_ms = [r["comm/all_reduce(ms)"] for r in rows]
    import torch
    import yaml

    from fedhypevae.client import DIAG_KEYS

    steps = yaml.safe_load((out / "config.yaml").read_text())["train"]["local_steps"]
    phi = sum(v.numel() for v in torch.load(out / "hypernetwork.pt", weights_only=True).values())  # Phi's parameters
    return {
        "ranks": ranks,
        "rounds": len(rows),
        "local_steps": steps,
        "command": shown(cmd, tmp),
        "wall_s": wall,
        "round_s": round_s,
        "comm_ms": comm_ms,
        "share": sum(comm_ms) / 1e3 / sum(round_s),
        "median_round_s": statistics.median(round_s),
        "median_comm_ms": statistics.median(comm_ms),
        "step_payload_bytes": 8 * (phi + len(DIAG_KEYS)),
    }


# ------------------------------------------------------------------------------------------ part 1
def micro(backend: str, ranks: int, sizes: list[int], *, quick: bool, reps: int | None, tmp: str) -> dict:
    small_reps, big_reps = (10, 5) if quick else (50, 20)
    spec = {
        "backend": BACKENDS[backend],
        "elems": [b // 8 for b in sizes],
        "warmup": 2 if quick else 5,
        "reps": [reps or (small_reps if b <= 1024**2 else big_reps) for b in sizes],
        "result": str(Path(tmp) / f"micro_{backend}_{ranks}.json"),
        "timeout_s": 120.0,
    }
    spec_path = Path(tmp) / f"spec_{backend}_{ranks}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = launch_cmd(backend, ranks, ["--worker", str(spec_path)])
    wall = run(cmd, timeout=600)
    res = json.loads(Path(spec["result"]).read_text())
    if res["world_size"] != ranks:
        raise RuntimeError(f"{backend}: asked for {ranks} ranks, the communicator saw {res['world_size']}")
    rows = []
    for r in res["rows"]:
        mx, r0 = r["max_over_ranks_s"], r["rank0_s"]
        rows.append(
            {
                "backend": backend,
                "comm": res["backend"],
                "ranks": ranks,
                "bytes": r["bytes"],
                "elems": r["elems"],
                "reps": r["reps"],
                "correct": r["correct"],
                "median_ms": 1e3 * statistics.median(mx),
                "p90_ms": 1e3 * p90(mx),
                "min_ms": 1e3 * min(mx),
                "rank0_median_ms": 1e3 * statistics.median(r0),
                "max_over_ranks_ms": [1e3 * x for x in mx],
            }
        )
    return {
        "backend": backend,
        "ranks": ranks,
        "command": shown(cmd, tmp),
        "wall_s": wall,
        "library": res.get("library"),
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------ report
def machine_info() -> dict:
    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": ver("torch"),
        "mpi4py": ver("mpi4py"),
        "mpich": ver("mpich"),
        "loadavg_start": list(os.getloadavg()),
        "omp_num_threads": child_env()["OMP_NUM_THREADS"],
    }


def label(size: int, extras: dict) -> str:
    return fmt_bytes(size) + (f" ({extras[size]})" if size in extras else "")


def markdown(res: dict) -> str:
    m, extras = res["machine"], {int(k): v for k, v in res["extra_sizes"].items()}
    out = [
        "# All-reduce benchmark",
        "",
        f"{m['usable_cores']} usable cores ({m['platform']}), Python {m['python']}, torch {m['torch']}, "
        f"mpi4py {m['mpi4py']}, MPICH wheel {m['mpich']}; OMP_NUM_THREADS={m['omp_num_threads']}; "
        f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end. "
        f"{'Quick mode. ' if res['quick'] else ''}Total wall time {res['wall_s']:.0f} s.",
        "",
        "## 1. All-reduce latency against payload (float64, `Communicator.allreduce`)",
        "",
        "Median (p90) in ms of each repetition's time **max over ranks** (a barrier before each repetition); "
        "ratio columns compare medians measured in this run.",
        "",
    ]
    jobs = res["micro"]
    ok = [j for j in jobs if "rows" in j]
    if ok:
        cols = [f"{j['backend']} x{j['ranks']}" for j in ok]
        ratios = [
            (a, b)
            for a in ok
            for b in ok
            if a["backend"] == "gloo" and b["backend"] == "mpi" and a["ranks"] == b["ranks"]
        ]
        head = ["payload", *cols, *[f"gloo/mpi x{a['ranks']}" for a, _ in ratios]]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, row in enumerate(ok[0]["rows"]):
            cells = [label(row["bytes"], extras)]
            cells += [f"{j['rows'][i]['median_ms']:.3f} ({j['rows'][i]['p90_ms']:.3f})" for j in ok]
            cells += [f"{a['rows'][i]['median_ms'] / b['rows'][i]['median_ms']:.1f}" for a, b in ratios]
            out.append("| " + " | ".join(cells) + " |")
        bad = [
            f"{j['backend']} x{j['ranks']} {fmt_bytes(r['bytes'])}" for j in ok for r in j["rows"] if not r["correct"]
        ]
        out += ["", "Every checked sum was correct." if not bad else "WRONG SUMS: " + ", ".join(bad)]
        over = sorted({j["ranks"] for j in ok if j["ranks"] > (m["usable_cores"] or 1)})
        if over:
            out[-1] += (
                f" With {', '.join(map(str, over))} ranks on {m['usable_cores']} cores the ranks share cores: "
                "a waiting MPICH rank busy-polls, so those columns measure scheduling as much as the reduction."
            )
        out += [
            "",
            "Rank 0's own median (ms), for comparison: "
            + "; ".join(
                f"{j['backend']} x{j['ranks']}: " + ", ".join(f"{r['rank0_median_ms']:.3f}" for r in j["rows"])
                for j in ok
            ),
        ]
    for j in jobs:
        if "error" in j:
            out.append(f"\n**{j['backend']} x{j['ranks']} FAILED**: {j['error'].splitlines()[0]}")
    tr = res["train"]
    if tr:
        out += [
            "",
            "## 2. Share of a training round spent in all-reduce (default config, mpiexec, mpi back-end)",
            "",
            "share = sum of `comm/all_reduce(ms)` / sum of `time/round(s)` over all rounds of metrics.jsonl. "
            "The trainer times its calls on rank 0, so comm time **includes waiting for the slowest rank** "
            "(load imbalance between ranks' clients, and ranks sharing cores), not only data movement. "
            "The micro estimate is local_steps x (median all-reduce of the step payload + of the 16 B guard flags) "
            "from part 1 at the same rank count: the part of comm that is the reduction itself.",
            "",
            "| ranks | rounds | median round (s) | median comm / round (ms) | share "
            "| micro estimate (ms / round) | run wall (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in tr:
            if "error" in t:
                out.append(f"| {t['ranks']} | FAILED: {t['error'].splitlines()[0]} | | | | | |")
                continue
            est = t.get("micro_estimate_ms")
            out.append(
                f"| {t['ranks']} | {t['rounds']} | {t['median_round_s']:.3f} | {t['median_comm_ms']:.1f} | "
                f"{100 * t['share']:.1f} % | {'-' if est is None else f'{est:.2f}'} | {t['wall_s']:.1f} |"
            )
    out += ["", "## Commands", "", "```", f"python -m benchmarks.allreduce {' '.join(res['argv'])}"]
    out += [t["command"] for t in tr if "command" in t] + [j["command"] for j in jobs if "command" in j]
    out += [
        "```",
        "",
        "TMP is a scratch folder; TMP/spec_*.json is written by the parent (sizes, repetitions, warm-up). "
        "Micro runs: " + ", ".join(f"{j['backend']} x{j['ranks']} {j['wall_s']:.1f} s" for j in ok) + ".",
    ]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j in res["micro"]:
        if "rows" not in j:
            continue
        rows = sorted(j["rows"], key=lambda r: r["bytes"])
        x = [r["bytes"] for r in rows]
        (line,) = ax.plot(x, [r["median_ms"] for r in rows], marker="o", label=f"{j['backend']} x{j['ranks']} ranks")
        ax.fill_between(
            x, [r["median_ms"] for r in rows], [r["p90_ms"] for r in rows], color=line.get_color(), alpha=0.15
        )
    for b, what in res["extra_sizes"].items():
        if what.startswith("step"):
            ax.axvline(int(b), color="grey", ls=":", lw=1)
            ax.text(int(b), ax.get_ylim()[1], " training step", va="top", fontsize=8, color="grey")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="payload (bytes, float64)",
        ylabel="all-reduce time (ms)",
        title="Communicator.allreduce: median (band to p90), max over ranks",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(res: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "allreduce.json").write_text(dumps_json(res, indent=2) + "\n")
    fields = [
        "backend",
        "comm",
        "ranks",
        "bytes",
        "elems",
        "reps",
        "correct",
        "median_ms",
        "p90_ms",
        "min_ms",
        "rank0_median_ms",
        "note",
    ]
    with open(out / "allreduce.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for j in res["micro"]:
            for r in j.get("rows", []):
                w.writerow({**r, "note": res["extra_sizes"].get(str(r["bytes"]), "")})
    plot(res, out / "allreduce.png")
    text = markdown(res)
    (out / "allreduce.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.allreduce", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for allreduce.{csv,md,png,json}")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, fewer repetitions, 3 training rounds")
    ap.add_argument("--ranks", default="2,4", help="rank counts, comma-separated")
    ap.add_argument("--backends", default="mpi,gloo", help=f"comma-separated: {', '.join(BACKENDS)}")
    ap.add_argument("--sizes", help=f"payloads in bytes, K/M suffixes (default {FULL_SIZES}; --quick {QUICK_SIZES})")
    ap.add_argument("--reps", type=int, help="timed repetitions per size (default by size and mode)")
    ap.add_argument("--rounds", type=int, help="training rounds in part 2 (default 8; --quick 3); 0 skips part 2")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; valid: {', '.join(BACKENDS)}")
    ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    if not ranks or min(ranks) < 2:
        ap.error("--ranks: all-reduce needs at least 2 ranks (1 rank is run as the training reference anyway)")
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 8)

    t0 = time.perf_counter()
    res = {
        "argv": argv,
        "quick": args.quick,
        "machine": machine_info(),
        "extra_sizes": {str(FLAG_BYTES): "flag"},
        "micro": [],
        "train": [],
        "timing": "per repetition, the max over ranks of perf_counter around "
        "Communicator.allreduce, after a barrier; medians and p90 over repetitions",
    }
    with tempfile.TemporaryDirectory(prefix="bench_allreduce_") as tmp:
        # part 2 first: the 1-rank run tells the real per-step payload, which part 1 then also measures
        for r in [1, *ranks] if rounds > 0 else []:
            try:
                res["train"].append(train_share(r, rounds, tmp))
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                res["train"].append({"ranks": r, "error": str(exc)})
        payload = next((t["step_payload_bytes"] for t in res["train"] if "step_payload_bytes" in t), None)
        if payload:
            res["extra_sizes"][str(payload)] = "step payload"
        all_sizes = sorted(set(sizes) | {int(b) for b in res["extra_sizes"]})
        for b in backends:
            for r in ranks:
                try:
                    res["micro"].append(micro(b, r, all_sizes, quick=args.quick, reps=args.reps, tmp=tmp))
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                    res["micro"].append({"backend": b, "ranks": r, "error": str(exc)})
    for t in res["train"]:
        job = next(
            (j for j in res["micro"] if j["backend"] == "mpi" and j["ranks"] == t["ranks"] and "rows" in j), None
        )
        if job and payload:
            med = {row["bytes"]: row["median_ms"] for row in job["rows"]}
            t["micro_estimate_ms"] = t["local_steps"] * (med[payload] + med[FLAG_BYTES])
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["wall_s"] = time.perf_counter() - t0
    print(write_outputs(res, Path(args.out)), end="")
    failed = [j for j in res["micro"] + res["train"] if "error" in j]
    for j in failed:
        print(f"benchmarks.allreduce: {j.get('backend', 'train')} x{j['ranks']} failed:\n{j['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
