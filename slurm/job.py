"""One sweep point as a job: train (every task a rank) -> evaluate -> SWEEP/points/<id>/result.json.

    python -m fedhypevae.slurm.job SWEEP/points/<id>        # what every srun task (or mpiexec rank) runs

The point directory holds `spec.json` (written by `fedhypevae.slurm.sweep`), the training run under `run/`,
`events.jsonl` (start / interrupted / finished or partial, written by rank 0) and, once done,
`result.json`, whose "status" is "complete" or "partial".

A job finds its own latest complete checkpoint at start and resumes from it, whether it was
requeued by submitit, by the plain sbatch script or by SLURM itself after a preemption; the
privacy ledger continues (a resume never refunds epsilon). On USR2 (submitit's signal before the
time limit, or `scancel --signal=USR2`), TERM or INT, every rank stops at the next step boundary
and checkpoints together; under submitit, rank 0 then hands over to submitit, which requeues the job.

A partial point: the run ended without releasing its class statistics (no budget left for them,
e.g. after a job died between charging that release and writing its results) and so without
fitting the meta-code. Its synthetic set is not a result and is not evaluated: result.json has
"status": "partial", "missing" (what the run could not produce, in words), the privacy facts
and "rows": [] (no accuracy). Such a point is final: it is not retried or requeued, because
another attempt would be refused the same release (its epsilon is spent). How it ends:
  * under submitit (SLURM, local and debug clusters) the job returns normally with
    {"status": "partial", ...}: SLURM records it COMPLETED, submitit neither retries nor
    requeues it (it requeues only on its USR2/timeout checkpoint), and `fedhypevae.slurm.sweep` reads
    result.json and reports the point as "partial (not retried: ...)";
  * `python -m fedhypevae.slurm.job` (the plain sbatch script, or a rank under mpiexec) exits with 3, the
    status of a partial `fedhypevae train` (fedhypevae.run.EXIT_PARTIAL), so that sacct shows it
    apart from a success (0) and an error (2); the sbatch script requeues only on 140/143;
  * `run_with_mpiexec` takes the ranks' status 3 (with result.json saying partial) as a partial
    point, not a failure.
A job started again for a point that already has a result.json (complete or partial), e.g. SLURM
requeueing it after it wrote the file, does not run the point again: it exits at once with the
point's status (0 complete, 3 partial). Delete result.json to run a point again.

Exit statuses of `python -m fedhypevae.slurm.job`: 0 complete, 3 partial, 2 error (the message says what to
change), 128+N stopped by signal N after every rank checkpointed (140 USR2, 143 TERM, 130 INT).

Every JSON file written here is strict JSON (fedhypevae.checkpoint.dumps_json: no Infinity/NaN
tokens; other non-finite numbers become null). A target epsilon of infinity ("epsilon", and the
sweep's "epsilons") is written as the string "inf", which `read_json` reads back as float("inf").
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit
from fedhypevae.hpc.launcher import venv_tool

from fedhypevae.atomic import atomic_write_text
from fedhypevae.checkpoint import dumps_json
from fedhypevae.methods import get_method
from fedhypevae.metrics import append_event as append_run_event
from fedhypevae.metrics import read_events  # noqa: F401  (re-exported: a point's events)

EXIT_INTERRUPTED = {
    signal.SIGUSR2: 128 + signal.SIGUSR2,
    signal.SIGTERM: 128 + signal.SIGTERM,
    signal.SIGINT: 128 + signal.SIGINT,
}
EXIT_PARTIAL = 3  # = fedhypevae.run.EXIT_PARTIAL (not imported: that pulls in torch; a test keeps them equal)
EPSILON_KEYS = ("epsilon", "epsilons")  # target epsilons: infinity written as "inf", read back as inf


class SweepError(RuntimeError):
    """A sweep or one of its points cannot run as asked; the message says what to change."""


def _encode_epsilons(obj):
    if isinstance(obj, dict):
        return {k: (_eps_out(v) if k in EPSILON_KEYS else _encode_epsilons(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_epsilons(v) for v in obj]
    return obj


def _eps_out(v):
    if isinstance(v, (list, tuple)):
        return [_eps_out(e) for e in v]
    return "inf" if isinstance(v, float) and math.isinf(v) and v > 0 else v


def _decode_epsilons(obj):
    if isinstance(obj, dict):
        return {k: (_eps_in(v) if k in EPSILON_KEYS else _decode_epsilons(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_epsilons(v) for v in obj]
    return obj


def _eps_in(v):
    if isinstance(v, list):
        return [_eps_in(e) for e in v]
    return float("inf") if v == "inf" else v


def read_json(path: Path) -> dict:
    return _decode_epsilons(json.loads(Path(path).read_text()))


def write_json(path: Path, obj) -> None:
    atomic_write_text(Path(path), dumps_json(_encode_epsilons(obj), indent=2) + "\n")


def append_event(point: Path, event: dict) -> None:
    """A point's event (events.jsonl, the format of a run's own), stamped with the SLURM job."""
    append_run_event(point, {"slurm_job_id": _slurm_job_id(), **event})


def result_status(result: dict) -> str:
    """ "complete" or "partial" (a result.json written before statuses existed is complete)."""
    return result.get("status", "complete")


def missing_text(result: dict) -> str:
    """What a partial point could not produce, in one line."""
    return "; ".join(result.get("missing") or ["(result.json does not say)"])


def _slurm_job_id():
    a, t = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{a}_{t}" if a and t else os.environ.get("SLURM_JOB_ID")


# ------------------------------------------------------------------------------------------- the work
def existing_result(point: Path):
    """The point's result.json, if it has one (then the point is not run again), else None."""
    f = Path(point) / "result.json"
    return read_json(f) if f.is_file() else None


def run_point_here(point: Path) -> dict:
    """Run the point in this process, which is one rank of the job (or the only one)."""
    from fedhypevae.hpc.launch import Launch
    from fedhypevae.hpc.launcher import detect_launcher

    from fedhypevae.errors import FedHypeVAEError

    point = Path(point)
    spec = read_json(point / "spec.json")
    info = detect_launcher()
    done = existing_result(point)
    if done is not None:
        # e.g. SLURM requeued the job after it wrote its result: every rank sees the same file and
        # stops before any collective; a partial point would be refused its statistics again
        status = result_status(done)
        if info.rank == 0:
            why = f": {missing_text(done)}" if status == "partial" else ""
            print(
                f"fedhypevae.slurm.job: point {spec['id']} already has a {status} result "
                f"({point / 'result.json'}){why}; "
                "not run again (delete result.json to run it again)",
                file=sys.stderr,
                flush=True,
            )
        return _outcome(spec, status, done.get("missing", []))
    ranks = Launch(
        backend="auto",
        device=spec.get("device", "auto"),
        timeout_s=float(spec.get("comm_timeout_s", 600)),
        prog="fedhypevae.slurm.job",
        user_errors=(SweepError, FedHypeVAEError),
        setup_error=lambda message: SweepError(f"point {spec['id']}: {message}"),
        ranks=spec["ranks"],  # a launcher that gives every task a world of one must fail the job
        info=info,
    )
    with ranks:
        comm, device = ranks.comm, str(ranks.device)
        if get_method(spec["method"]).trains_fedhypevae:  # ConfigError for a method no longer registered
            return _run_fedhypevae(point, spec, comm, info, device)
        return _run_baseline(point, spec, comm)


def _outcome(spec: dict, status: str, missing=()) -> dict:
    """What a job returns (to submitit, and to `main`) for a point that ended: complete or partial."""
    out = {"interrupted": False, "point": spec["id"], "status": status}
    if status == "partial":
        out["missing"] = list(missing)
    return out


def _run_fedhypevae(point: Path, spec: dict, comm, info, device: str) -> dict:
    from fedhypevae import checkpoint as ckpt
    from fedhypevae.config import load_config
    from fedhypevae.run import run_training

    cfg = load_config(spec["config"], spec["overrides"])
    run_dir = point / "run"
    resume = (run_dir / "config.yaml").is_file()
    start_round, start_step = 0, 0
    if resume:
        latest = ckpt.latest_complete(run_dir)
        if latest is not None:  # round_RRRRRR or round_RRRRRR_step_SSSSS (a stop between two steps)
            start_round, start_step = ckpt.checkpoint_position(latest)
    if comm.is_root:
        append_event(
            point,
            {
                "event": "start",
                "resume": resume,
                "resume_from_round": start_round,
                "resume_from_step": start_step,
                "world_size": comm.world_size,
                "launcher": info.launcher,
            },
        )
    t0 = time.perf_counter()
    results = run_training(
        cfg, run_dir, comm, resume=resume, progress=False, launcher=info.launcher, device=device, catch_signals=True
    )
    if results.get("interrupted"):
        if comm.is_root:
            append_event(
                point,
                {
                    "event": "interrupted",
                    "signal": int(results["signal"]),
                    "round": results["round"],
                    "step": results.get("step", 0),
                    "epsilon_spent": results["epsilon_spent"],
                    "checkpoint": results["checkpoint"],
                },
            )
        _end_collectively(comm)
        return results
    p = results.get("privacy") or {}
    extra = {"training": results.get("training"), "provenance": results.get("provenance")}
    if results.get("status") == "partial":
        # no statistics release, no fitted meta-code: the synthetic set is not a result and is not scored
        missing = list(results.get("missing") or [])
        if comm.is_root:
            _finish(
                point,
                spec,
                None,
                epsilon_spent=p.get("epsilon_spent"),
                formal=p.get("formal_guarantee"),
                seconds=time.perf_counter() - t0,
                missing=missing,
                extra={**extra, "run_results": str(run_dir / "results.json")},
            )
            print(
                f"fedhypevae.slurm.job: point {spec['id']} is PARTIAL (not retried): {'; '.join(missing)}",
                file=sys.stderr,
                flush=True,
            )
        comm.barrier()  # Launch closes the back-end
        return _outcome(spec, "partial", missing)
    if comm.is_root:
        from fedhypevae.data import build_federation
        from fedhypevae.methods import score_run

        fed = build_federation(cfg.data, cfg.partition, cfg.seed)
        rows = score_run(run_dir, fed, protocol=spec["protocol"], seed=spec["seed"])
        _finish(
            point,
            spec,
            rows,
            epsilon_spent=p.get("epsilon_spent"),
            formal=p.get("formal_guarantee"),
            seconds=time.perf_counter() - t0,
            extra=extra,
        )
    comm.barrier()  # Launch closes the back-end
    return _outcome(spec, "complete")


def _end_collectively(comm) -> None:
    """Every rank has checkpointed: wait for all of them. The back-end is then shut down on every rank
    (hpc.launch.Launch closes it when run_point_here returns) before anyone requeues: a step killed by
    the requeue while MPI is still up leaves MPICH's shared-memory segment behind, and the requeued
    job's step (same job and step id, same segment name) then fails in MPI_Init."""
    comm.barrier()


def _run_baseline(point: Path, spec: dict, comm) -> dict:
    """Baselines run on rank 0 (the sweep gives them one rank); a re-run repeats them with the same seed.
    They release nothing in stages, so they always end complete."""
    if comm.is_root:
        from fedhypevae.config import load_config
        from fedhypevae.data import build_federation
        from fedhypevae.methods import result_rows, run_baseline

        cfg = load_config(spec["config"], spec["overrides"])
        fed = build_federation(cfg.data, cfg.partition, cfg.seed)
        append_event(
            point,
            {
                "event": "start",
                "resume": False,
                "resume_from_round": 0,
                "resume_from_step": 0,
                "world_size": comm.world_size,
            },
        )
        t0 = time.perf_counter()
        eps = spec["epsilon"] if spec["epsilon"] is not None else 1.0
        res = run_baseline(
            spec["method"],
            fed,
            seed=spec["seed"],
            epsilon=eps,
            delta=cfg.privacy.delta,
            protocol=spec["protocol"],
            **spec.get("baseline_settings", {}),
        )
        rows = result_rows(res)
        priv = res.get("privacy") or {}
        _finish(
            point,
            spec,
            rows,
            epsilon_spent=priv.get("epsilon_spent"),
            formal=priv.get("formal_guarantee"),
            seconds=time.perf_counter() - t0,
        )
    comm.barrier()  # Launch closes the back-end
    return _outcome(spec, "complete")


def _finish(point: Path, spec: dict, rows, *, epsilon_spent, formal, seconds: float, missing=None, extra=None) -> None:
    """result.json: complete (rows = the per-client scores, and their means) or partial (`missing` given:
    rows [] and no accuracy; an unfitted synthetic set is not scored)."""
    events = read_events(point)
    starts = [e for e in events if e["event"] == "start"]
    result = {k: spec[k] for k in ("id", "method", "partition", "epsilon", "seed", "ranks")}
    result.update({"status": "partial" if missing else "complete", "missing": list(missing or [])})
    result["rows"] = list(rows or [])
    if not missing:
        result.update(
            {
                "accuracy": sum(r["accuracy"] for r in rows) / len(rows),
                "balanced_accuracy": sum(r["balanced_accuracy"] for r in rows) / len(rows),
            }
        )
    result.update(
        {
            "epsilon_spent": epsilon_spent,
            "formal_guarantee": formal,
            "seconds": seconds,
            "starts": len(starts),
            "resumed_from_rounds": [e["resume_from_round"] for e in starts if e.get("resume")],
            "resumed_from_steps": [e.get("resume_from_step", 0) for e in starts if e.get("resume")],
            **(extra or {}),
        }
    )
    if missing:
        append_event(point, {"event": "partial", "missing": list(missing), "epsilon_spent": epsilon_spent})
    else:
        append_event(point, {"event": "finished", "epsilon_spent": epsilon_spent})
    write_json(point / "result.json", result)


# ------------------------------------------------------------------------------------ the submitit callable
class PointJob(submitit.helpers.Checkpointable):
    """What submitit runs: on SLURM every task of the job calls it (the tasks are the MPI ranks). On the
    `local` and `debug` clusters there is one process, which starts the ranks with mpiexec. A partial point
    returns normally ({"status": "partial", ...}): submitit neither retries nor requeues it."""

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
        # the job resumes from its own latest checkpoint: requeue the same callable. A point that already
        # has a result.json (complete or partial) is not run again by the requeued job (run_point_here).
        return submitit.helpers.DelayedSubmission(PointJob(self.point, self.launch))


def _is_rank0() -> bool:
    try:
        return submitit.JobEnvironment().global_rank == 0
    except RuntimeError:  # not under submitit
        return True


def mpiexec_path() -> str:
    found = venv_tool("mpiexec")
    if not found:
        raise SweepError(
            "a point with more than one rank needs mpiexec on the local and debug clusters: "
            "pip install mpich (or use --ranks 1)"
        )
    return found


def run_with_mpiexec(point: Path) -> dict:
    """Start the point's ranks with mpiexec and wait; USR2/TERM are passed on to them (they checkpoint).
    The ranks' status 3 is a partial point (result.json says what is missing), not a failure."""
    spec = read_json(point / "spec.json")
    cmd = [mpiexec_path(), "-n", str(spec["ranks"]), sys.executable, "-m", "fedhypevae.slurm.job", str(point)]
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
    if rc == EXIT_PARTIAL:
        done = existing_result(point)
        if done is not None and result_status(done) == "partial":
            return _outcome(spec, "partial", done.get("missing", []))
        raise SweepError(
            f"point {spec['id']}: mpiexec exited with status {rc} (partial) but {point / 'result.json'} "
            "does not say partial (see the log above)"
        )
    if rc != 0:
        raise SweepError(f"point {spec['id']}: mpiexec exited with status {rc} (see the log above)")
    done = existing_result(point)
    return (
        _outcome(spec, result_status(done), done.get("missing", []))
        if done is not None
        else {"interrupted": False, "point": spec["id"]}
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m fedhypevae.slurm.job POINT_DIR   "
            "(one rank of a sweep point; see python -m fedhypevae.slurm.sweep --help)\n"
            "exit status: 0 complete, 3 partial (result.json says what is missing; not retried), 2 error, "
            "128+N stopped by signal N after a checkpoint (140 USR2 and 143 TERM: the sbatch script requeues)"
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from fedhypevae.errors import FedHypeVAEError

    try:
        out = run_point_here(Path(argv[0]))
    except (SweepError, FedHypeVAEError) as exc:
        print(f"fedhypevae.slurm.job: error: {exc}", file=sys.stderr)
        return 2
    if out.get("interrupted"):
        return 128 + int(out["signal"])  # 140 (USR2) / 143 (TERM): the sbatch script requeues the job
    if out.get("status") == "partial":
        return EXIT_PARTIAL  # final: neither the sbatch script nor the sweep runs it again
    return 0


if __name__ == "__main__":
    sys.exit(main())
