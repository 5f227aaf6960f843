"""How training scales in the number of clients: round time, setup, checkpoint, resume, memory per rank, files.

    python -m benchmarks.scale --out docs/performance [--clients 1000,10000,100000] [--ranks 1,2,4]
                               [--mmd off,on] [--trust local] [--rounds 3] [--timeout 1800] [--no-resume]

The setting (issue-level targets are stated against it): d_x = 64, K = 10 classes, 20 training records per client
(a seeded mixture of class Gaussians, generated here: no download), IID, model.hidden [64], latent_dim 8,
hyper_hidden 32, 5 local steps, q = 0.25, epsilon = 1, grad aggregation, one torch thread per rank. The MMD term is
off, or on with the dataclass defaults (8 synthetic records per class, 128 random features x 3 bandwidths). --trust:
local (the default), distributed (the floating-point simulation) or secure (distributed with
privacy.secure_aggregation: rounded sums, Skellam shares, masked integer all-reduce).

Every configuration is real runs of `fedhypevae train` (under `mpiexec -n R` for R > 1, the venv's MPICH), with
privacy.diagnostics on so that results.json carries every rank's costs:
  1. a run of ROUNDS + 1 rounds is stopped with SIGTERM once ROUNDS rounds are logged (it checkpoints there);
  2. it is resumed on another number of ranks (R + 1, or 1 when R > 1) and finishes its last round.
Reported per row (medians over the rounds of run 1 after its first): round_s; setup_s (process start to the first
step, the slowest rank); checkpoint_s (the slowest rank's write of its shard); resume_s (setup of run 2, checkpoint
read included);
peak_rss_mb per rank (VmHWM of every rank process, polled); state_mb per rank (its clients' private state); files
per checkpoint; phases_s: rank 0's seconds per round by phase (train.time_phases: the step's sample, forward,
backward, norms, clip, noise, post and optimizer, and the trainer's own). Nothing here asserts anything about
speed. Writes scale.json, scale.md and scale.png into --out. `--merge A/scale.json B/scale.json --out DIR` puts
the rows of several runs into one table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHASE = "time/phase/"  # the trainer's per-phase metrics (train.time_phases)
PHASES = ("sample", "forward", "backward", "norms", "clip", "noise", "post", "optimizer")
D, K, PER_CLIENT = 64, 10, 20


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def venv_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def make_data(path: Path, clients: int, seed: int = 0) -> Path:
    """A seeded mixture of K class Gaussians in R^64, enough records for `clients` x 20 training records after the
    per-client 80/20 split."""
    rng = np.random.default_rng(seed)
    n = int(math.ceil(clients * PER_CLIENT / 0.8))
    y = rng.integers(0, K, n)
    means = rng.normal(scale=2.0, size=(K, D)).astype(np.float32)
    x = means[y] + rng.normal(size=(n, D)).astype(np.float32)
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path


TRUST = {
    "local": "",
    "distributed": ", trust_model: distributed",
    "secure": ", trust_model: distributed, secure_aggregation: true",
}


def write_config(path: Path, data: Path, clients: int, rounds: int, mmd: bool, trust: str = "local") -> Path:
    path.write_text(
        "\n".join(
            [
                "seed: 0",
                "threads: 1",
                f"data: {{path: {data}, transform: none, test_fraction: 0.2}}",
                f"partition: {{kind: iid, clients: {clients}, min_client_size: 2}}",
                "model: {hidden: [64], latent_dim: 8, hyper_hidden: 32, "
                + ("lambda_mmd: 1.0, mmd_kind: merf}" if mmd else "lambda_mmd: 0.0}"),
                f"train: {{rounds: {rounds}, local_steps: 5, checkpoint_every: 1, keep_checkpoints: 2, "
                "time_phases: true}",
                "privacy: {target_epsilon: 1.0, delta: 1.0e-5, sample_rate: 0.25, stats_clip_norm: 10.0, "
                f"diagnostics: true{TRUST[trust]}}}",
                "meta: {steps: 5}",
                "synth: {samples_per_class: 5}",
                "",
            ]
        )
    )
    return path


def command(ranks: int, cfg: Path, out: Path, resume: bool = False) -> list:
    train = [venv_bin("fedhypevae"), "train", "--config", str(cfg), "--out", str(out), "--no-progress"]
    if resume:
        train.append("--resume")
    return train if ranks == 1 else [venv_bin("mpiexec"), "-n", str(ranks), *train]


def descendants(pid: int) -> list:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def rank_pids(pid: int) -> list:
    """The training processes under a launcher (or the launched process itself)."""
    pids = [pid] + descendants(pid)
    out = []
    for p in pids:
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"fedhypevae") for a in argv[:2]) and b"train" in argv:
            out.append(p)
    return out


def vmhwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def rounds_logged(out: Path) -> int:
    try:
        return sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def run(cmd: list, *, out: Path, log_path: Path, timeout: float, stop_after: int | None = None) -> dict:
    """Run `cmd`; poll every rank's peak resident memory; with `stop_after`, SIGTERM once that many rounds are
    logged. Returns {"rc", "peak_rss_mb": {pid: MB}, "wall_s"}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        peaks: dict = {}
        stopped = False
        while proc.poll() is None:
            for p in rank_pids(proc.pid):
                peaks[p] = max(peaks.get(p, 0.0), vmhwm_mb(p))
            if stop_after is not None and not stopped and rounds_logged(out) >= stop_after:
                os.kill(proc.pid, signal.SIGTERM)  # mpiexec forwards it to every rank
                stopped = True
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"rc": "timeout", "peak_rss_mb": peaks, "wall_s": time.perf_counter() - t0}
            time.sleep(0.2)
    return {"rc": proc.returncode, "peak_rss_mb": peaks, "wall_s": time.perf_counter() - t0}


def measure(
    clients: int,
    ranks: int,
    mmd: bool,
    rounds: int,
    tmp: Path,
    data: Path,
    timeout: float,
    trust: str = "local",
    resume: bool = True,
) -> dict:
    name = f"c{clients}_r{ranks}_{'mmd' if mmd else 'nommd'}_{trust}"
    work = tmp / name
    work.mkdir(parents=True)
    cfg = write_config(work / "config.yaml", data, clients, rounds + 1, mmd, trust)
    out = work / "run"
    row = {"clients": clients, "ranks": ranks, "mmd": mmd, "trust": trust, "loadavg_start": list(os.getloadavg())}
    first = run(command(ranks, cfg, out), out=out, log_path=work / "first.log", timeout=timeout, stop_after=rounds)
    if first["rc"] == "timeout":
        return {**row, "error": f"timed out after {timeout:.0f} s (run 1)"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    round_s = [r["time/round(s)"] for r in rows]
    later = rows[1:] or rows  # like the round: the rounds after the first
    phases = {k: statistics.median(r[k] for r in later if k in r) for k in rows[0] if k.startswith("time/")}
    ckpts = sorted((out / "checkpoints").glob("round_*"))
    files = len([p for p in ckpts[-1].iterdir()]) if ckpts else 0
    # every rank's setup and checkpoint times: run 1's from its "interrupted" event, run 2's from results.json
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    stop = [e for e in events if e.get("event") == "interrupted"]
    if not stop or "ranks" not in stop[-1]:
        return {
            **row,
            "error": f"run 1 was not stopped by its SIGTERM with costs (rc {first['rc']}; see {work / 'first.log'})",
        }
    row.update(_run1_row(round_s, phases, first, files, stop[-1]["ranks"], clients))
    if not resume:  # run 1 only (the rows' resume columns stay empty)
        return row
    resume_ranks = 1 if ranks > 1 else 2
    second = run(command(resume_ranks, cfg, out, resume=True), out=out, log_path=work / "second.log", timeout=timeout)
    if second["rc"] != 0:
        return {
            **row,
            "error": f"resume on {resume_ranks} rank(s) ended with {second['rc']} (see {work / 'second.log'})",
        }
    res = json.loads((out / "results.json").read_text())
    rk = res["training"]["ranks"]
    row.update(
        {
            "ranks_resumed_on": resume_ranks,
            "resume_s": max(r["setup_s"] for r in rk),
            "resume_checkpoint_s": max(r["checkpoint_s"] for r in rk),
            "resume_peak_rss_mb": sorted(second["peak_rss_mb"].values()),
            "resume_state_mb": [r["state_mb"] for r in rk],
            "wall_run2_s": second["wall_s"],
            "loadavg_end": list(os.getloadavg()),
        }
    )
    return row


def _run1_row(round_s: list, phases: dict, first: dict, files: int, rk1: list, clients: int) -> dict:
    """A row's figures from run 1 (the stopped one): its rounds after the first, its ranks' costs."""
    rs = statistics.median(round_s[1:] if len(round_s) > 1 else round_s)
    return {
        "round_s": rs,
        "round_s_all": round_s,
        "phases_s": phases,
        "ms_per_client_round": 1e3 * rs / clients,
        "peak_rss_mb": sorted(first["peak_rss_mb"].values()),
        "files_per_checkpoint": files,
        "setup_s": max(r["setup_s"] for r in rk1),
        "checkpoint_s": max(r["checkpoint_s"] for r in rk1),
        "state_mb": [r["state_mb"] for r in rk1],
        "clients_per_rank": [r["clients"] for r in rk1],
        "wall_run1_s": first["wall_s"],
        "loadavg_end": list(os.getloadavg()),
    }


NOISE_FLOOR = (
    "noise floor (local, secure noise): {draws_per_client_round} draws per client per round at {ns_per_draw:.2f} ns = "
    "{noise_ms_per_client_round:.3f} ms per client per round; with Phi's noise drawn per client (distributed, or "
    "privacy.noise_seed): {draws_per_client_round_phi_per_client} draws = "
    "{noise_ms_per_client_round_phi_per_client:.3f} ms"
)


def noise_floor(cfg_path: Path, tmp: Path) -> dict:
    """The physics of the noise: the draws per client per round and this machine's ns per N(0, 1) draw of the
    generator the step uses (torch's CPU generator, `normal_` into an fp32 row, one thread), from a 10-client trainer
    of the same model. Local trust with secure noise (the benchmark's `local` rows) draws per step each client's
    psi_i, v_i and ONE Phi noise per chunk of `train.chunk_clients` clients (its summed variance: DPStep._noise);
    a Phi draw per client (`distributed`, or any run with privacy.noise_seed) adds Phi's coordinates per client."""
    import torch

    sys.path.insert(0, str(REPO))
    from fedhypevae.config import load_config
    from fedhypevae.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(str(cfg_path), ["partition.clients=10", "train.rounds=1"])
    tr = Trainer(cfg, tmp / "noise_probe", progress=False)
    tr.setup()
    b = tr.blocks[0]
    private = b.codes[0].numel() + sum(math.prod(s) for s in b.enc_shapes)
    row = private + tr.phi_numel
    g = torch.Generator().manual_seed(1)
    buf = torch.empty(row, dtype=torch.float32)
    reps, times = 2000, []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            buf.normal_(generator=g)
        times.append((time.perf_counter() - t) / (reps * row))
    ns = 1e9 * statistics.median(times)
    steps, chunk = cfg.train.local_steps, max(1, cfg.train.chunk_clients)
    tr.ledger.close()
    tr.writer.close()
    local = steps * (private + tr.phi_numel / chunk)
    return {
        "private_coords": private,
        "phi_coords": tr.phi_numel,
        "chunk_clients": chunk,
        "draws_per_client_round": round(local),
        "draws_per_client_round_phi_per_client": steps * row,
        "ns_per_draw": ns,
        "noise_ms_per_client_round": local * ns * 1e-6,
        "noise_ms_per_client_round_phi_per_client": steps * row * ns * 1e-6,
    }


def disk_write_rate(folder: Path, mb: int = 512) -> float:
    """This disk's sequential write rate in MB/s: `dd` of `mb` MiB of zeros with fdatasync (the checkpoint target
    is stated against it)."""
    target = folder / "dd.bin"
    t = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mb}", "conv=fdatasync"],
        check=True,
        capture_output=True,
    )
    rate = mb * 1.048576 / (time.perf_counter() - t)
    target.unlink()
    return rate


def markdown(res: dict) -> str:
    lines = [
        "| clients | ranks | MMD | trust | round (s) | ms / client / round | setup (s) | checkpoint (s) | files | "
        "resume (s) on ranks; their peak RSS (MB) | peak RSS per rank (MB) | state per rank (MB) | "
        "load avg (1 min, start) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rate = res.get("disk_write_mb_s")
    rates = {r.get("disk_write_mb_s", rate) for r in res["rows"]} - {None}
    for r in res["rows"]:
        head = f"| {r['clients']:,} | {r['ranks']} | {'on' if r['mmd'] else 'off'} | {r.get('trust', 'local')} |"
        if "error" in r:
            lines.append(head + f" {r['error']} |" + " |" * 8)
            continue
        lines.append(
            head + f" {r['round_s']:.2f} | {r['ms_per_client_round']:.3f} | {r['setup_s']:.1f} | "
            f"{r['checkpoint_s']:.2f}"
            + (
                f" ({sum(r['state_mb']) / r.get('disk_write_mb_s', rate):.2f})"
                if r.get("disk_write_mb_s", rate)
                else ""
            )
            + " | "
            f"{r['files_per_checkpoint']} | "
            + (
                f"{r['resume_s']:.1f} on {r['ranks_resumed_on']}; "
                + ", ".join(f"{m:.0f}" for m in r.get("resume_peak_rss_mb", []))
                if "resume_s" in r
                else "not run"
            )
            + f" | {', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} | "
            f"{', '.join(f'{m:.0f}' for m in r['state_mb'])} | {r['loadavg_start'][0]:.2f} |"
        )
    if rates:
        lines.append(
            f"\nDisk: {', '.join(f'{x:.0f}' for x in sorted(rates))} MB/s sequential write (dd, fdatasync, measured "
            "at the start of each benchmark run); a checkpoint's floor (in brackets) is the state of every rank, which "
            "write to this one disk at once, / that rate."
        )
    timed = [r for r in res["rows"] if "error" not in r and any(k.startswith(PHASE) for k in r.get("phases_s", {}))]
    if timed:
        names = [n for n in PHASES if any(f"{PHASE}{n}(s)" in r["phases_s"] for r in timed)]
        lines += [
            "\nSeconds per round by phase (rank 0's, medians over the rounds after the first; `rest`: the ledger, "
            "the budget guard, the all-reduce, Phi's update, the accounting and the engine's bookkeeping between "
            "phases):\n",
            "| clients | ranks | MMD | trust | " + " | ".join(names) + " | rest |",
            "|---|---|---|---|" + "---|" * (len(names) + 1),
        ]
        for r in timed:
            ph = {k[len(PHASE) : -len("(s)")]: v for k, v in r["phases_s"].items() if k.startswith(PHASE)}
            rest = sum(v for k, v in ph.items() if k not in names)
            lines.append(
                f"| {r['clients']:,} | {r['ranks']} | {'on' if r['mmd'] else 'off'} | {r.get('trust', 'local')} | "
                + " | ".join(f"{ph.get(n, 0.0):.2f}" for n in names)
                + f" | {rest:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ranks, mmd, trust in sorted({(r["ranks"], r["mmd"], r.get("trust", "local")) for r in rows}):
        rs = sorted(
            (r for r in rows if (r["ranks"], r["mmd"], r.get("trust", "local")) == (ranks, mmd, trust)),
            key=lambda r: r["clients"],
        )
        label = f"{ranks} rank{'s' if ranks > 1 else ''}, MMD {'on' if mmd else 'off'}" + (
            f", {trust}" if trust != "local" else ""
        )
        style = "-" if mmd else "--"
        a.plot([r["clients"] for r in rs], [r["round_s"] for r in rs], style, marker="o", label=label)
        b.plot([r["clients"] for r in rs], [max(r["peak_rss_mb"]) / 1024 for r in rs], style, marker="o", label=label)
    for ax, title, unit in ((a, "seconds per round (median)", "s"), (b, "peak resident memory, largest rank", "GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    fig.suptitle(
        f"FedHypeVAE training at scale ({res['cpu_count']}-core machine, 1 torch thread per rank)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(paths: list, out: Path) -> dict:
    """The rows of several scale.json files (runs of this benchmark with other settings) in one table: sorted by
    clients, MMD, ranks and trust, each row keeping its own run's disk rate; the first file's setting and noise
    floor, every file's command line under `merged_from`."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res = {k: v for k, v in parts[0].items() if k not in ("rows", "argv")}
    res["merged_from"] = [
        {"file": str(p), "argv": part.get("argv"), "noise": part.get("noise")} for p, part in zip(paths, parts)
    ]
    res["rows"] = sorted(
        ({"disk_write_mb_s": part.get("disk_write_mb_s"), **row} for part in parts for row in part["rows"]),
        key=lambda r: (r["clients"], r["mmd"], r["ranks"], r.get("trust", "local")),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "scale.md").write_text(markdown(res))
    if any("error" not in r for r in res["rows"]):
        plot(res, out / "scale.png")
    return res


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for scale.json, scale.md, scale.png")
    ap.add_argument("--merge", nargs="+", metavar="SCALE_JSON", help="only merge these runs' scale.json into --out")
    ap.add_argument("--clients", default="1000,10000,100000", help="client counts (comma-separated)")
    ap.add_argument("--ranks", default="1,2,4", help="MPI ranks (comma-separated)")
    ap.add_argument("--mmd", default="off,on", help="MMD term: off, on, or both")
    ap.add_argument("--trust", default="local", help="trust models: local, distributed, secure (comma-separated)")
    ap.add_argument("--no-resume", action="store_true", help="measure run 1 only (no resume on another world size)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds before the stop (median of these)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if args.merge:
        print(markdown(merge(args.merge, out)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    res = {
        "argv": sys.argv,
        "setting": {
            "d_x": D,
            "classes": K,
            "records_per_client": PER_CLIENT,
            "hidden": [64],
            "latent_dim": 8,
            "hyper_hidden": 32,
            "local_steps": 5,
            "sample_rate": 0.25,
            "epsilon": 1.0,
            "aggregation": "grad",
            "threads_per_rank": 1,
        },
        "cpu_count": os.cpu_count(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmpd:
        tmp = Path(tmpd)
        res["disk_write_mb_s"] = disk_write_rate(tmp)
        log(f"disk: {res['disk_write_mb_s']:.0f} MB/s sequential write (dd, fdatasync)")
        probe = make_data(tmp / "data_probe.npz", 10)
        res["noise"] = noise_floor(write_config(tmp / "probe.yaml", probe, 10, 1, False), tmp)
        log(NOISE_FLOOR.format(**res["noise"]))
        for clients in [int(c) for c in args.clients.split(",")]:
            data = make_data(tmp / f"data_{clients}.npz", clients)
            for mmd, ranks, trust in [
                (m == "on", int(r), t)
                for m in args.mmd.split(",")
                for r in args.ranks.split(",")
                for t in args.trust.split(",")
            ]:
                if trust not in TRUST:
                    ap.error(f"--trust: {trust!r} is not one of {', '.join(TRUST)}")
                log(f"{clients} clients, {ranks} rank(s), MMD {'on' if mmd else 'off'}, trust {trust}")
                row = measure(clients, ranks, mmd, args.rounds, tmp, data, args.timeout, trust, not args.no_resume)
                row["disk_write_mb_s"] = res["disk_write_mb_s"]
                res["rows"].append(row)
                log(
                    "  "
                    + (
                        row.get("error")
                        or f"round {row['round_s']:.2f} s, setup {row['setup_s']:.1f} s, "
                        + (f"resume {row['resume_s']:.1f} s, " if "resume_s" in row else "")
                        + f"checkpoint {row['checkpoint_s']:.2f} s, peak RSS {max(row['peak_rss_mb']):.0f} MB, "
                        f"{row['files_per_checkpoint']} files"
                    )
                )
                (out / "scale.json").write_text(json.dumps(res, indent=2) + "\n")
                (out / "scale.md").write_text(markdown(res))
    if any("error" not in r for r in res["rows"]):
        plot(res, out / "scale.png")
    print(markdown(res))
    print(NOISE_FLOOR.format(**res["noise"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
