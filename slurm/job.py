"""One sweep point as a job: train (every task a rank) -> evaluate -> SWEEP/points/<id>/result.json.

    python -m slurm.job SWEEP/points/<id>        # what every srun task (or mpiexec rank) runs

The point directory holds `spec.json` (written by `slurm.sweep`), the training run under `run/`,
`events.jsonl` (start / interrupted / finished, written by rank 0) and, once done, `result.json`.

A job finds its own latest complete checkpoint at start and resumes from it, whether it was
requeued by submitit, by the plain sbatch script or by SLURM itself after a preemption; the
privacy ledger continues (a resume never refunds epsilon). On USR2 (submitit's signal before the
time limit, or `scancel --signal=USR2`) or TERM, every rank finishes its round and checkpoints
together; under submitit, rank 0 then hands over to submitit, which requeues the job.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from fedhypevae.checkpoint import atomic_write_text
from fedhypevae.table import FEDHYPEVAE_METHODS
from hpc.launcher import venv_tool

EXIT_INTERRUPTED = {signal.SIGUSR2: 128 + signal.SIGUSR2, signal.SIGTERM: 128 + signal.SIGTERM}


class SweepError(RuntimeError):
    """A sweep or one of its points cannot run as asked; the message says what to change."""


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str) + "\n")


def append_event(point: Path, event: dict) -> None:
    event = {"time": time.time(), "slurm_job_id": _slurm_job_id(), **event}
    with open(Path(point) / "events.jsonl", "a") as fh:
        fh.write(json.dumps(event, default=str) + "\n")


def read_events(point: Path) -> list[dict]:
    f = Path(point) / "events.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _slurm_job_id():
    a, t = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{a}_{t}" if a and t else os.environ.get("SLURM_JOB_ID")


# ------------------------------------------------------------------------------------------- the work
def run_point_here(point: Path) -> dict:
    """Run the point in this process, which is one rank of the job (or the only one)."""
    from fedhypevae.errors import FedHypeVAEError
    from hpc.backend import BackendError, install_failfast, make_communicator
    from hpc.device import choose_device
    from hpc.launcher import detect_launcher

    point = Path(point)
    spec = read_json(point / "spec.json")
    info = detect_launcher()
    try:
        device = choose_device(info.local_rank, spec.get("device", "auto"))  # cuda:LOCAL_RANK on GPU nodes
        comm = make_communicator("auto", info, device=device, timeout_s=float(spec.get("comm_timeout_s", 600)))
    except (BackendError, RuntimeError) as exc:
        raise SweepError(f"point {spec['id']}: {exc}") from None
    # the job asked for `ranks` tasks: a launcher that gives every task a world of one must fail the job
    if comm.world_size != spec["ranks"]:
        raise SweepError(f"point {spec['id']} asked for {spec['ranks']} ranks but this task sees a world of "
                         f"{comm.world_size} (launcher {info.launcher}): with MPICH use srun --mpi=pmi2, with Open MPI "
                         "srun --mpi=pmix, or start the ranks with mpiexec")
    install_failfast(comm)
    try:
        if spec["method"] in FEDHYPEVAE_METHODS:
            return _run_fedhypevae(point, spec, comm, info, str(device))
        return _run_baseline(point, spec, comm)
    except FedHypeVAEError as exc:
        if comm.world_size > 1:
            print(f"slurm.job: error: [rank {comm.rank}/{comm.world_size}] {exc}", file=sys.stderr, flush=True)
            comm.abort(2)
        raise


def _run_fedhypevae(point: Path, spec: dict, comm, info, device: str) -> dict:
    from fedhypevae import checkpoint as ckpt
    from fedhypevae.config import load_config
    from fedhypevae.run import run_training

    cfg = load_config(spec["config"], spec["overrides"])
    run_dir = point / "run"
    resume = (run_dir / "config.yaml").is_file()
    start_round = 0
    if resume:
        latest = ckpt.latest_complete(run_dir)
        start_round = int(latest.name.split("_")[-1]) if latest is not None else 0
    if comm.is_root:
        append_event(point, {"event": "start", "resume": resume, "resume_from_round": start_round,
                             "world_size": comm.world_size, "launcher": info.launcher})
    t0 = time.perf_counter()
    results = run_training(cfg, run_dir, comm, resume=resume, progress=False, launcher=info.launcher,
                           device=device, catch_signals=True)
    if results.get("interrupted"):
        if comm.is_root:
            append_event(point, {"event": "interrupted", "signal": int(results["signal"]), "round": results["round"],
                                 "epsilon_spent": results["epsilon_spent"], "checkpoint": results["checkpoint"]})
        _end_collectively(comm)
        return results
    if comm.is_root:
        from fedhypevae.data import build_federation
        from fedhypevae.table import run_rows

        fed = build_federation(cfg.data, cfg.partition, cfg.seed)
        rows = run_rows(run_dir, fed, protocol=spec["protocol"], seed=spec["seed"])
        p = results["privacy"]
        _finish(point, spec, rows, epsilon_spent=p.get("epsilon_spent"), formal=p.get("formal_guarantee"),
                seconds=time.perf_counter() - t0, extra={"training": results["training"], "provenance": results["provenance"]})
    comm.barrier()
    comm.close()
    return {"interrupted": False, "point": spec["id"]}


def _end_collectively(comm) -> None:
    """Every rank has checkpointed: shut the back-end down on all ranks before anyone requeues. A step
    killed by the requeue while MPI is still up leaves MPICH's shared-memory segment behind, and the
    requeued job's step (same job and step id, same segment name) then fails in MPI_Init."""
    comm.barrier()
    comm.close()


def _run_baseline(point: Path, spec: dict, comm) -> dict:
    """Baselines run on rank 0 (the sweep gives them one rank); a re-run repeats them with the same seed."""
    if comm.is_root:
        from fedhypevae.baselines import run_baseline
        from fedhypevae.config import load_config
        from fedhypevae.data import build_federation
        from fedhypevae.table import baseline_rows

        cfg = load_config(spec["config"], spec["overrides"])
        fed = build_federation(cfg.data, cfg.partition, cfg.seed)
        append_event(point, {"event": "start", "resume": False, "resume_from_round": 0, "world_size": comm.world_size})
        t0 = time.perf_counter()
        eps = spec["epsilon"] if spec["epsilon"] is not None else 1.0
        res = run_baseline(spec["method"], fed, seed=spec["seed"], epsilon=eps, delta=cfg.privacy.delta,
                           **spec.get("baseline_settings", {}))
        rows = baseline_rows(spec["method"], res, fed, protocol=spec["protocol"], seed=spec["seed"])
        priv = res.get("privacy") or {}
        _finish(point, spec, rows, epsilon_spent=priv.get("epsilon_spent"), formal=priv.get("formal_guarantee"),
                seconds=time.perf_counter() - t0)
    comm.barrier()
    comm.close()
    return {"interrupted": False, "point": spec["id"]}


def _finish(point: Path, spec: dict, rows: list[dict], *, epsilon_spent, formal, seconds: float, extra=None) -> None:
    events = read_events(point)
    result = {k: spec[k] for k in ("id", "method", "partition", "epsilon", "seed", "ranks")}
    result.update({
        "rows": rows,
        "accuracy": sum(r["accuracy"] for r in rows) / len(rows),
        "balanced_accuracy": sum(r["balanced_accuracy"] for r in rows) / len(rows),
        "epsilon_spent": epsilon_spent, "formal_guarantee": formal, "seconds": seconds,
        "starts": sum(e["event"] == "start" for e in events),
        "resumed_from_rounds": [e["resume_from_round"] for e in events if e["event"] == "start" and e.get("resume")],
        **(extra or {}),
    })
    append_event(point, {"event": "finished", "epsilon_spent": epsilon_spent})
    write_json(point / "result.json", result)


# ------------------------------------------------------------------------------------ the submitit callable
class PointJob(submitit.helpers.Checkpointable):
    """What submitit runs: on SLURM every task of the job calls it (the tasks are the MPI ranks). On the
    `local` and `debug` clusters there is one process, which starts the ranks with mpiexec."""

    def __init__(self, point: str, launch: str):
        self.point = str(point)
        self.launch = launch  # "tasks": this process is a rank; "mpiexec": start the ranks here

    def __call__(self) -> dict:
        point = Path(self.point)
        if self.launch == "mpiexec":
            return run_with_mpiexec(point)
        out = run_point_here(point)
        if out.get("interrupted") and out.get("signal") == signal.SIGUSR2 and _is_rank0():
            # every rank has checkpointed: hand over to submitit's own USR2 handler, which calls
            # checkpoint() below and requeues the job (on rank 0 only)
            signal.raise_signal(signal.SIGUSR2)
        return out

    def checkpoint(self, *args, **kwargs):
        # the job resumes from its own latest checkpoint: requeue the same callable
        return submitit.helpers.DelayedSubmission(PointJob(self.point, self.launch))


def _is_rank0() -> bool:
    try:
        return submitit.JobEnvironment().global_rank == 0
    except RuntimeError:  # not under submitit
        return True


def mpiexec_path() -> str:
    found = venv_tool("mpiexec")
    if not found:
        raise SweepError("a point with more than one rank needs mpiexec on the local and debug clusters: "
                         "pip install mpich (or use --ranks 1)")
    return found


def run_with_mpiexec(point: Path) -> dict:
    """Start the point's ranks with mpiexec and wait; USR2/TERM are passed on to them (they checkpoint)."""
    spec = read_json(point / "spec.json")
    cmd = [mpiexec_path(), "-n", str(spec["ranks"]), sys.executable, "-m", "slurm.job", str(point)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env)
    previous = {}

    def forward(signum, frame):
        # SIGINT (submitit cancelling a local job, e.g. when the sweep command is interrupted) becomes TERM:
        # the ranks checkpoint together and stop instead of being orphaned and training on
        proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, forward)
    try:
        rc = proc.wait()
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if rc in EXIT_INTERRUPTED.values():
        return {"interrupted": True, "signal": rc - 128, "point": spec["id"]}
    if rc != 0:
        raise SweepError(f"point {spec['id']}: mpiexec exited with status {rc} (see the log above)")
    return {"interrupted": False, "point": spec["id"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m slurm.job POINT_DIR   (one rank of a sweep point; see python -m slurm.sweep --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from fedhypevae.errors import FedHypeVAEError

    try:
        out = run_point_here(Path(argv[0]))
    except (SweepError, FedHypeVAEError) as exc:
        print(f"slurm.job: error: {exc}", file=sys.stderr)
        return 2
    if out.get("interrupted"):
        return 128 + int(out["signal"])  # 140 (USR2) / 143 (TERM): the sbatch script requeues the job
    return 0


if __name__ == "__main__":
    sys.exit(main())
