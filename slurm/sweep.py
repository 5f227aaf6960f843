"""Sweeps over privacy budgets: epsilon x seed x partition x method, one job per grid point.

    python -m fedhypevae.slurm.sweep --config configs/default.yaml --epsilons 0.5,1,2,4,8 --seeds 0,1,2 \\
        --partitions iid,dirichlet0.3 --methods fedhypevae-strict,dpcvae,local --ranks 4 --out sweeps/eps
    python -m fedhypevae.slurm.collect sweeps/eps          # summary.csv, summary.md, privacy_utility.png

On SLURM (`--cluster slurm`, the default where `sbatch` exists) the points go out as one submitit job
array; every job is a multi-task MPI job whose tasks are the ranks (srun --mpi=pmi2 for MPICH,
--mpi=pmix for Open MPI). Jobs checkpoint on submitit's USR2 (before the time limit, or a
preemption) and requeue; a requeued or restarted job resumes from its own checkpoint and its privacy
ledger continues. The `local` cluster runs the points as local processes (ranks via mpiexec), the
`debug` cluster in this process; both wait for the points to finish.

Running the same command again skips finished points, resubmits unfinished ones (they resume from
their checkpoints) and never resubmits points still queued or running; points whose last job ended
without a result are listed with their log files.

A partial point (its run could not release its class statistics, e.g. no budget left after a job died
between that release's charge and its results, so its meta-code was not fitted; result.json has
"status": "partial" and says what is missing) is final: it is listed as "partial (not retried: ...)",
never resubmitted or requeued (another attempt would be refused the same release), and `fedhypevae.slurm.collect`
reports it apart from the results. Rerun such a point in a new sweep (another --out).

Exit status: 0 when every point this command waited for finished (or nothing was to be done), 1 when
some ended without a result (listed with their logs), 3 when none failed but some ended partial, 2 for
an error in the command, 130 when the command itself was interrupted (submitted points keep running).

Cluster parameters use submitit's names (`timeout_min`, `nodes`, `tasks_per_node`, `cpus_per_task`,
`gpus_per_node`, `mem_gb`, `slurm_partition`, `slurm_account`, `slurm_qos`, ...), given as
`--param NAME=VALUE` or in a YAML file (`--cluster-config`); an unknown name fails with the list.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from fedhypevae.hpc.device import DEVICES
from fedhypevae.hpc.launcher import MPI_FLAVOURS, mpi_flavour

from fedhypevae.methods import METHODS, method_overrides

from .job import PointJob, SweepError, missing_text, read_events, read_json, result_status, write_json

CLUSTERS = ("auto", "slurm", "local", "debug")
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
    "STOPPED",
}


# ------------------------------------------------------------------------------------------ parameters
def valid_parameters() -> dict[str, str]:
    """submitit's parameter names for AutoExecutor: generic ones, `slurm_*` and `local_*`.

    submitit has no public list of them: its executors' `_valid_parameters` classmethods are what its own
    `update_parameters` checks names against. pyproject.toml pins submitit's minor version, and
    tests/test_sweep.py checks that the names read here are those the public `update_parameters` accepts."""
    from submitit import AutoExecutor, LocalExecutor, SlurmExecutor

    groups = (("", "generic", AutoExecutor), ("slurm_", "slurm", SlurmExecutor), ("local_", "local", LocalExecutor))
    out = {
        f"{prefix}{name}": group
        for prefix, group, executor in groups
        for name in executor._valid_parameters()  # noqa: SLF001 - submitit lists the names nowhere public
    }
    out["slurm_max_num_timeout"] = "slurm"  # submitit's requeue budget for time-outs (AutoExecutor keyword)
    return out


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def check_parameters(params: dict) -> dict:
    valid = valid_parameters()
    unknown = sorted(k for k in params if k not in valid)
    if unknown:
        names = ", ".join(sorted(valid))
        raise SweepError(f"unknown cluster parameter(s) {', '.join(unknown)}; submitit's valid names: {names}")
    return params


def parse_list(text: str, kind, what: str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SweepError(f"--{what}: give a comma-separated list")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise SweepError(f"--{what}: cannot read {text!r} as a list of {kind.__name__}") from None


def parse_partition(name: str) -> tuple[str, float | None]:
    """iid | site | dirichlet (the config's alpha) | dirichlet<alpha>, e.g. dirichlet0.3."""
    if name in ("iid", "site", "dirichlet"):
        return name, None
    if name.startswith("dirichlet"):
        try:
            alpha = float(name[len("dirichlet") :])
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return "dirichlet", alpha
    raise SweepError(f"partition {name!r}: use iid, site, dirichlet or dirichlet<alpha> (e.g. dirichlet0.3)")


# ------------------------------------------------------------------------------------------ the grid
@dataclass
class Point:
    id: str
    method: str
    partition: str
    epsilon: float | None
    seed: int
    ranks: int
    overrides: list

    def spec(self, sweep: dict) -> dict:
        return {
            "id": self.id,
            "method": self.method,
            "partition": self.partition,
            "epsilon": self.epsilon,
            "seed": self.seed,
            "ranks": self.ranks,
            "config": sweep["config"],
            "overrides": self.overrides,
            "protocol": sweep["protocol"],
            "comm_timeout_s": sweep["comm_timeout_s"],
            "device": sweep["device"],
            "baseline_settings": sweep["baselines"].get(self.method, {}),
        }


def _eps_name(eps: float | None) -> str:
    return "none" if eps is None else ("inf" if math.isinf(eps) else f"{eps:g}")


def build_grid(sweep: dict) -> list[Point]:
    points = []
    for method in sweep["methods"]:
        if method not in METHODS:
            raise SweepError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        m = METHODS[method]
        for part in sweep["partitions"]:
            kind, alpha = parse_partition(part)
            for seed in sweep["seeds"]:
                # a method that does not use epsilon runs once per (partition, seed)
                epsilons = sweep["epsilons"] if m.uses_epsilon else [None]
                for eps in epsilons:
                    ov = list(sweep["overrides"]) + [f"seed={seed}", f"partition.kind={kind}"]
                    if alpha is not None:
                        ov.append(f"partition.alpha={alpha}")
                    if eps is not None:
                        ov.append(f"privacy.target_epsilon={eps}")
                    if m.trains_fedhypevae:  # mode, and the trust model of fedhypevae-distributed / -central
                        ov += method_overrides(method, sweep.get("private_overrides") or ())
                    ranks = sweep["ranks"] if m.trains_fedhypevae else 1  # a baseline runs on one rank
                    pid = f"{method}__{part}__eps{_eps_name(eps)}__seed{seed}"
                    points.append(Point(pid, method, part, eps, seed, ranks, ov))
    return points


# ------------------------------------------------------------------------------------------ state of points
def job_record(point_dir: Path) -> dict | None:
    f = point_dir / "job.json"
    return read_json(f) if f.is_file() else None


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """States of the jobs SLURM still lists (one squeue call; array tasks one per line)."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def slurm_state(job_id: str) -> str | None:
    """The job's state while SLURM still knows it (squeue, then scontrol), else None."""
    state = slurm_states([job_id]).get(job_id)
    if state:
        return state
    try:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for tok in out.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return None


def point_status(point_dir: Path, states: dict | None = None) -> tuple[str, dict | None]:
    """finished | partial (ended without its statistics release / meta-code fit: final, not retried) |
    active (queued or running) | failed (a job ended without a result) | interrupted | new.
    The second item: the point's result.json for a partial point, else its last submission (or None).
    `states`: SLURM job states already queried for many points at once."""
    if (point_dir / "result.json").is_file():
        res = read_json(point_dir / "result.json")
        if result_status(res) == "partial":
            return "partial", res
        return "finished", None
    rec = job_record(point_dir)
    if rec is None:
        return "new", None
    last = rec["submissions"][-1]
    if last["cluster"] == "slurm":
        state = states.get(last["job_id"]) if states is not None else slurm_state(last["job_id"])
        if state in ACTIVE_STATES:
            return "active", last
    elif last["cluster"] == "local" and last.get("pid") and _pid_alive(last["pid"]):
        return "active", last
    events = read_events(point_dir)
    if events and events[-1]["event"] == "interrupted":
        return "interrupted", last
    return "failed", last


def partial_note(result: dict) -> str:
    """How a partial point is shown: partial (not retried: what is missing)."""
    return f"partial (not retried: {missing_text(result)})"


def _slurm_job_ids(out: Path, points) -> list[str]:
    ids = []
    for pt in points:
        rec = job_record(out / "points" / pt.id)
        if (
            rec
            and rec["submissions"][-1]["cluster"] == "slurm"
            and not (out / "points" / pt.id / "result.json").is_file()
        ):
            ids.append(rec["submissions"][-1]["job_id"])
    return ids


def _pid_alive(pid: int) -> bool:
    """A local job's process is still running (and is still a submitit job, not a reused pid)."""
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    try:
        return b"submitit" in Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except OSError:
        return True


def local_pid(job) -> int:
    """The process of a job of submitit's local executor: its job id is the pid of the job's controller."""
    return int(job.job_id)


def log_tail(path: str | None, lines: int = 3) -> str:
    """The error lines of a job's log (ours name the rank and what to change), else its last lines."""
    if not path or not Path(path).is_file():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()
    ours = [
        t
        for t in text
        if t.startswith(("fedhypevae.slurm.job: error:", "fedhypevae: error:"))
        or "Error:" in t
        and not t.startswith(" ")
    ]
    picked = list(dict.fromkeys(ours))[-lines:] if ours else text[-lines:]
    return "\n".join("      " + t for t in picked)


# ------------------------------------------------------------------------------------------ executors
def resolve_cluster(name: str) -> str:
    if name != "auto":
        return name
    return "slurm" if shutil.which("sbatch") else "local"


def executor_parameters(sweep: dict) -> dict:
    """submitit parameters of the jobs: the user's, plus what a multi-rank checkpointable job needs."""
    params = dict(sweep["params"])
    ranks = sweep["ranks"]
    nodes = int(params.get("nodes", 1))
    if "tasks_per_node" in params and int(params["tasks_per_node"]) * nodes != ranks and sweep["ranks_given"]:
        raise SweepError(f"--ranks {ranks} disagrees with nodes={nodes} x tasks_per_node={params['tasks_per_node']}")
    if "tasks_per_node" not in params:
        if ranks % nodes:
            raise SweepError(f"--ranks {ranks} is not a multiple of nodes={nodes}")
        params["tasks_per_node"] = ranks // nodes
    sweep["ranks"] = int(params["tasks_per_node"]) * nodes
    params.setdefault("timeout_min", 60)
    params.setdefault("cpus_per_task", 1)
    params.setdefault("name", f"fedhypevae-{Path(sweep['out']).name}")
    return params


def task_layout(params: dict, ranks: int) -> dict:
    """nodes and tasks_per_node of a job with `ranks` ranks (one-rank jobs: one node, one task)."""
    if ranks == 1:
        return {"nodes": 1, "tasks_per_node": 1}
    nodes = int(params.get("nodes", 1))
    return {"nodes": nodes, "tasks_per_node": ranks // nodes}


def make_executor(sweep: dict, cluster: str, params: dict, *, ranks: int):
    import submitit

    folder = Path(sweep["out"]) / "submitit" / "%j"
    kwargs = {}
    if "slurm_max_num_timeout" in params:
        kwargs["slurm_max_num_timeout"] = int(params["slurm_max_num_timeout"])
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, **kwargs)
    p = {k: v for k, v in params.items() if k != "slurm_max_num_timeout"}
    if cluster == "slurm":
        srun = list(p.pop("slurm_srun_args", []) or [])
        if not any(a.startswith("--mpi") for a in srun):
            srun.insert(0, f"--mpi={sweep['mpi_plugin']}")
        if "--kill-on-bad-exit=1" not in srun:
            srun.append("--kill-on-bad-exit=1")  # a dead rank ends the job instead of hanging the others
        p["slurm_srun_args"] = srun
        setup = list(p.pop("slurm_setup", []) or [])
        setup.insert(0, "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}")
        setup[:0] = [f"export {k}={v}" for k, v in mpi_flavour(sweep["mpi"]).env.items()]
        p["slurm_setup"] = setup
        p.update(task_layout(params, ranks))
    else:
        p["tasks_per_node"] = 1  # one process per point; it starts the ranks with mpiexec
        p["nodes"] = 1
    try:
        ex.update_parameters(**p)
    except (NameError, ValueError, TypeError) as exc:
        raise SweepError(f"cluster parameters: {exc}") from None
    return ex


# ------------------------------------------------------------------------------------------ the command
def load_sweep(args) -> dict:
    """The sweep definition: YAML (--sweep-config) overridden by the command line."""
    tree = {}
    if args.sweep_config:
        tree = yaml.safe_load(Path(args.sweep_config).read_text()) or {}
        valid = {
            "config",
            "set",
            "private_set",
            "epsilons",
            "seeds",
            "partitions",
            "methods",
            "ranks",
            "cluster",
            "mpi",
            "protocol",
            "params",
            "baselines",
            "comm_timeout_s",
            "device",
        }
        unknown = sorted(set(tree) - valid)
        if unknown:
            raise SweepError(f"{args.sweep_config}: unknown key(s) {unknown}; valid: {', '.join(sorted(valid))}")
    cluster_params = dict(tree.get("params") or {})
    if args.cluster_config:
        cluster_params.update(yaml.safe_load(Path(args.cluster_config).read_text()) or {})
    for item in args.param:
        if "=" not in item:
            raise SweepError(f"--param {item!r}: use NAME=VALUE with submitit's names (e.g. slurm_partition=gpu)")
        k, v = item.split("=", 1)
        cluster_params[k.strip()] = _parse_value(v)
    check_parameters(cluster_params)

    def pick(name, default):
        v = getattr(args, name)
        return v if v is not None else tree.get(name, default)

    config = pick("config", None)
    if config is None:
        raise SweepError("--config is required (a training config such as configs/default.yaml)")
    from fedhypevae.config import load_config, resolve_config_path

    cfg_path = str(resolve_config_path(config).resolve())
    overrides = list(tree.get("set") or []) + list(args.overrides)
    private_set = list(tree.get("private_set") or []) + list(args.private_overrides)
    load_config(cfg_path, overrides + private_set)  # fail now, not in a job
    epsilons = pick("epsilons", "1")
    seeds = pick("seeds", "0")
    partitions = pick("partitions", "dirichlet")
    methods = pick("methods", "fedhypevae-strict")
    as_text = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    eps = parse_list(as_text(epsilons), float, "epsilons")
    if any(e <= 0 for e in eps):
        raise SweepError("--epsilons must be positive (inf for no budget)")
    mpi = pick("mpi", "mpich")
    if mpi not in MPI_FLAVOURS:
        raise SweepError(f"--mpi must be {' or '.join(MPI_FLAVOURS)}")
    ranks = pick("ranks", None)
    sweep = {
        "config": cfg_path,
        "overrides": overrides,
        "private_overrides": private_set,
        "epsilons": eps,
        "seeds": parse_list(as_text(seeds), int, "seeds"),
        "partitions": parse_list(as_text(partitions), str, "partitions"),
        "methods": parse_list(as_text(methods), str, "methods"),
        "ranks": int(ranks)
        if ranks is not None
        else int(cluster_params.get("tasks_per_node", 1)) * int(cluster_params.get("nodes", 1)),
        "ranks_given": ranks is not None,
        "cluster": pick("cluster", "auto"),
        "mpi": mpi,
        "mpi_plugin": mpi_flavour(mpi).srun_plugin,
        "protocol": pick("protocol", "augment"),
        "params": cluster_params,
        "device": pick("device", "auto"),
        "baselines": dict(tree.get("baselines") or {}),
        "comm_timeout_s": float(tree.get("comm_timeout_s", 600)),
        "out": str(Path(args.out).resolve()),
    }
    if sweep["ranks"] < 1:
        raise SweepError("--ranks must be at least 1")
    if sweep["cluster"] not in CLUSTERS:
        raise SweepError(f"--cluster must be one of {', '.join(CLUSTERS)}")
    return sweep


def prepare_points(sweep: dict, points: list[Point]) -> None:
    """Write each point's spec.json; refuse a point whose settings changed since it was created."""
    for pt in points:
        d = Path(sweep["out"]) / "points" / pt.id
        spec = pt.spec(sweep)
        f = d / "spec.json"
        if f.is_file():
            old = read_json(f)
            keys = ("config", "overrides", "ranks", "protocol", "baseline_settings")
            changed = [k for k in keys if old.get(k) != spec.get(k)]
            if changed:
                raise SweepError(
                    f"point {pt.id} exists in {sweep['out']} with different {', '.join(changed)}; "
                    "use another --out for a different sweep"
                )
            continue
        d.mkdir(parents=True, exist_ok=True)
        write_json(f, spec)


def run_sweep(args) -> int:
    sweep = load_sweep(args)
    cluster = resolve_cluster(sweep["cluster"])
    params = executor_parameters(sweep)
    points = build_grid(sweep)
    out = Path(sweep["out"])
    out.mkdir(parents=True, exist_ok=True)

    states = slurm_states(_slurm_job_ids(out, points)) if shutil.which("squeue") else None
    status = {pt.id: point_status(out / "points" / pt.id, states) for pt in points}
    counts = {}
    for s, _ in status.values():
        counts[s] = counts.get(s, 0) + 1
    todo = [pt for pt in points if status[pt.id][0] in ("new", "failed", "interrupted")]
    print(
        f"sweep {out}: {len(points)} points ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
        f"cluster {cluster}, {sweep['ranks']} rank(s) per FedHypeVAE point"
    )
    failed = [(pt, status[pt.id][1]) for pt in points if status[pt.id][0] == "failed"]
    if failed:
        print(
            f"{len(failed)} point(s) whose last job ended without a result (they are resubmitted and resume "
            "from their checkpoints):"
        )
        for pt, last in failed:
            print(f"  {pt.id}  job {last.get('job_id')}  stderr: {last.get('stderr')}")
            tail = log_tail(last.get("stderr"))
            if tail:
                print(tail)
    active = [pt.id for pt in points if status[pt.id][0] == "active"]
    if active:
        print(
            f"{len(active)} point(s) queued or running, not resubmitted: "
            f"{', '.join(active[:5])}{' ...' if len(active) > 5 else ''}"
        )
    partial = [(pt, status[pt.id][1]) for pt in points if status[pt.id][0] == "partial"]
    if partial and not args.dry_run:  # the dry run lists them with its actions
        print(f"{len(partial)} point(s) ended partial, without a result (not resubmitted):")
        for pt, res in partial:
            print(f"  {pt.id}  {partial_note(res)}")

    if args.dry_run:
        return _dry_run(sweep, cluster, params, points, todo, status)
    if not todo:
        print("nothing to submit" + ("" if active else f"; collect with: python -m fedhypevae.slurm.collect {out}"))
        return 0
    prepare_points(sweep, points)
    write_json(
        out / "sweep.json",
        {
            **sweep,
            "cluster_resolved": cluster,
            "executor_params": params,
            "command": " ".join(map(shlex.quote, sys.argv)),
            "points": [p.id for p in points],
        },
    )
    return _submit(sweep, cluster, params, todo, wait=args.wait or cluster in ("local", "debug"))


def _dry_run(sweep, cluster, params, points, todo, status) -> int:
    out = Path(sweep["out"])
    print(f"dry run: would submit {len(todo)} of {len(points)} point(s) to cluster {cluster} with parameters:")
    for k, v in sorted(params.items()):
        print(f"  {k} = {v}")
    from .sbatch import point_script

    for pt in points:
        state, info = status[pt.id]
        action = {
            "new": "submit",
            "failed": "resubmit (resume)",
            "interrupted": "resubmit (resume)",
            "finished": "skip (finished)",
            "active": "skip (queued or running)",
        }.get(state)
        if state == "partial":
            action = "skip: " + partial_note(info)
        print(f"  {pt.id:<55s} ranks={pt.ranks}  {action}")
    # plain sbatch equivalents, for people who do not use submitit
    prepare_points(sweep, points)
    for pt in todo:
        d = out / "points" / pt.id
        script = point_script(
            d,
            python=sys.executable,
            mpi=sweep["mpi"],
            params={**params, **task_layout(params, pt.ranks)},
            job_name=f"fhv-{pt.id}"[:64],
        )
        (d / "job.sbatch").write_text(script)
    if todo:
        print(f"plain sbatch scripts (no submitit): {out}/points/<point>/job.sbatch")
    return 0


def _submit(sweep, cluster, params, todo: list[Point], *, wait: bool) -> int:
    out = Path(sweep["out"])
    jobs = []
    # FedHypeVAE points and one-rank baselines need different task counts: one job array per rank count
    for ranks in sorted({pt.ranks for pt in todo}):
        group = [pt for pt in todo if pt.ranks == ranks]
        ex = make_executor(sweep, cluster, params, ranks=ranks)
        launch = "tasks" if cluster == "slurm" or ranks == 1 else "mpiexec"
        calls = [PointJob(str(out / "points" / pt.id), launch) for pt in group]
        if cluster == "debug":
            submitted = [ex.submit(c) for c in calls]  # debug jobs run when their result is asked for
        else:
            try:
                with ex.batch():
                    submitted = [ex.submit(c) for c in calls]
            except Exception as exc:  # sbatch refused: say why, nothing was submitted
                raise SweepError(f"submission failed: {exc}") from None
        for pt, job in zip(group, submitted):
            rec = job_record(out / "points" / pt.id) or {"submissions": []}
            entry = {"cluster": cluster, "job_id": str(job.job_id), "time": time.time(), "ranks": ranks}
            if cluster != "debug":  # debug jobs run in this process: their output is this terminal's
                entry.update({"stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})
            if cluster == "local":
                entry["pid"] = local_pid(job)
            rec["submissions"].append(entry)
            write_json(out / "points" / pt.id / "job.json", rec)
            jobs.append((pt, job))
        print(
            f"submitted {len(group)} point(s) with {ranks} rank(s) each: job ids "
            f"{', '.join(str(j.job_id) for _, j in jobs[-len(group) :][:4])}{' ...' if len(group) > 4 else ''}"
        )
    if not wait:
        print(
            f"follow with: squeue --me; re-run this command to resubmit unfinished points; "
            f"collect with: python -m fedhypevae.slurm.collect {out}"
        )
        return 0
    return _wait(out, jobs, cluster)


def _wait(out: Path, jobs, cluster: str) -> int:
    from tqdm.auto import tqdm

    bad = []
    bar = tqdm(total=len(jobs), desc="sweep", unit="point")
    if cluster == "debug":
        for pt, job in jobs:
            try:
                job.result()
            except Exception as exc:  # noqa: BLE001 - reported with the point below
                bad.append((pt, str(exc).splitlines()[-1] if str(exc) else type(exc).__name__))
            bar.update(1)
    else:
        pending = list(jobs)
        while pending:
            still = []
            states = slurm_states([str(j.job_id) for _, j in pending]) if cluster == "slurm" else None
            for pt, job in pending:
                done = (out / "points" / pt.id / "result.json").is_file()
                if not done and states is not None and str(job.job_id) not in states:
                    states[str(job.job_id)] = slurm_state(str(job.job_id)) or ""  # just ended: ask scontrol
                if not done and point_status(out / "points" / pt.id, states)[0] == "active":
                    still.append((pt, job))
                    continue
                if not done:
                    bad.append((pt, "ended without a result"))
                bar.update(1)
            pending = still
            if pending:
                time.sleep(2.0)
    bar.close()
    ended = {pt.id: point_status(out / "points" / pt.id, {}) for pt, _ in jobs}
    finished = sum(ended[pt.id][0] == "finished" for pt, _ in jobs)
    partial = [(pt, ended[pt.id][1]) for pt, _ in jobs if ended[pt.id][0] == "partial"]
    print(f"{finished} of {len(jobs)} point(s) finished" + (f", {len(partial)} partial" if partial else ""))
    for pt, res in partial:
        print(f"  PARTIAL {pt.id}: {partial_note(res)}")
    for pt, why in bad:
        rec = job_record(out / "points" / pt.id) or {"submissions": [{}]}
        last = rec["submissions"][-1]
        print(f"  FAILED {pt.id}: {why}; log: {last.get('stderr', '(in this terminal)')}")
        tail = log_tail(last.get("stderr"))
        if tail:
            print(tail)
    print(f"collect with: python -m fedhypevae.slurm.collect {out}")
    return 1 if bad else (3 if partial else 0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fedhypevae.slurm.sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="training config (a file, or a shipped name such as default)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training config key for every point (repeatable)",
    )
    ap.add_argument(
        "--private-set",
        dest="private_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training config key for the private FedHypeVAE-engine points only (FedHypeVAE strict, "
        "paper mode, DP-CVAE; not the non-private ceiling), after --set: the private recipe (repeatable)",
    )
    ap.add_argument("--epsilons", help="comma-separated target epsilons, e.g. 0.5,1,2,4,8 (default 1)")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0)")
    ap.add_argument("--partitions", help="comma-separated: iid, site, dirichlet, dirichlet<alpha> (default dirichlet)")
    ap.add_argument("--methods", help=f"comma-separated, from: {', '.join(METHODS)} (default fedhypevae-strict)")
    ap.add_argument(
        "--ranks", type=int, help="MPI ranks per FedHypeVAE point (= nodes x tasks_per_node; baselines use 1)"
    )
    ap.add_argument("--out", required=True, help="sweep directory (re-running with the same --out continues it)")
    ap.add_argument(
        "--cluster", choices=CLUSTERS, help="slurm, local or debug (default auto: slurm where sbatch exists)"
    )
    ap.add_argument(
        "--mpi",
        choices=tuple(MPI_FLAVOURS),
        help="MPI library of the jobs: "
        + " or ".join(f"srun --mpi={f.srun_plugin} ({name})" for name, f in MPI_FLAVOURS.items())
        + "; default mpich",
    )
    ap.add_argument(
        "--device",
        choices=DEVICES,
        help="device of every rank: cuda:LOCAL_RANK where CUDA is present (auto, default), or cpu",
    )
    ap.add_argument(
        "--protocol", help="how synthetic sets are scored (augment, lambda-mix, synthetic-only; default augment)"
    )
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a submitit cluster parameter (timeout_min, nodes, tasks_per_node, cpus_per_task, gpus_per_node, "
        "mem_gb, slurm_partition, slurm_account, slurm_qos, ...); repeatable",
    )
    ap.add_argument("--cluster-config", help="YAML mapping of submitit cluster parameters")
    ap.add_argument(
        "--sweep-config",
        help="YAML with any of: config, set, epsilons, seeds, partitions, methods, ranks, "
        "cluster, mpi, protocol, params, baselines (the command line wins)",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="show what would be submitted and write plain sbatch scripts"
    )
    ap.add_argument("--wait", action="store_true", help="on SLURM, wait until every submitted point has ended")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fedhypevae.errors import FedHypeVAEError

    try:
        return run_sweep(args)
    except (SweepError, FedHypeVAEError) as exc:
        print(f"fedhypevae.slurm.sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nslurm.sweep: interrupted. Submitted points keep running (SLURM jobs, and local points in the "
            "background); run the same command again to follow them. A point that was stopped resumes from its "
            "last checkpoint, its epsilon still charged.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
