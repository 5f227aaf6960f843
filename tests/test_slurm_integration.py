"""A real one-node SLURM, started by the test itself (tests/slurm/cluster.sh installs slurm-wlm and munge
with apt-get when they are missing): a sweep of 2 epsilons x 1 seed, 2 MPI ranks per job (srun
--mpi=pmi2), one running job interrupted with USR2 (what submitit's time-limit signal and a
preemption send), requeued, resumed from its checkpoint with its privacy ledger continuing, and
the sweep collected. Skips, saying why, when SLURM cannot be installed or started here.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.job import read_events

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.mpi]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def slurm_env():
    if os.geteuid() != 0:
        pytest.skip("the SLURM integration test installs and runs slurmctld/slurmd as root; not root here")
    if not (BIN / "mpiexec").exists():
        pytest.skip("needs the PyPI mpich wheel in this environment (pip install -e '.[mpi]')")
    try:
        r = subprocess.run(["bash", str(CLUSTER)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM could not be installed or started within 10 minutes")
    if r.returncode != 0:
        pytest.skip(f"SLURM could not be installed or started here: {(r.stdout + r.stderr)[-800:]}")
    conf = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MPI_", "HYDRA_"))}
    env["SLURM_CONF"] = conf
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True)


def sh(cmd, env, timeout=120, check=True):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(pred, timeout, what, on_fail=lambda: ""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return time.time() - t0
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_fail()}")


def job_state(job_id, env):
    return sh(["squeue", "-h", "-j", job_id, "-o", "%T"], env, check=False).stdout.strip()


def logs(sweep_dir: Path) -> str:
    out = []
    for f in sorted((sweep_dir / "submitit").glob("*/*_log.err")):
        out.append(f"== {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)


def test_sweep_on_real_slurm_interrupt_resume_and_collect(slurm_env, tmp_path):
    env = slurm_env
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "slurm.sweep", "--config", "tiny", "--set", "train.rounds=30", "--epsilons", "1,4",
           "--seeds", "0", "--partitions", "iid", "--methods", "fedhypevae-strict", "--ranks", "2", "--cluster", "slurm",
           "--param", "timeout_min=30", "--param", "slurm_max_num_timeout=3", "--out", str(out)]
    r = sh(cmd, env)
    assert "submitted 2 point(s) with 2 rank(s) each" in r.stdout, r.stdout
    target = out / "points" / "fedhypevae-strict__iid__eps1__seed0"
    job_id = json.loads((target / "job.json").read_text())["submissions"][-1]["job_id"]

    # interrupt the eps=1 job once it has trained a round and checkpointed (USR2 to every task, as submitit's
    # time-limit signal): every rank checkpoints, rank 0 requeues through submitit
    wait_for(lambda: (target / "run" / "checkpoints").is_dir() and job_state(job_id, env) == "RUNNING", 180,
             "the first checkpoint of the running job", lambda: logs(out))
    sh(["scancel", "--signal=USR2", job_id], env)
    wait_for(lambda: any(e["event"] == "interrupted" for e in read_events(target)), 60, "the collective checkpoint",
             lambda: logs(out))

    # re-running the sweep while the jobs are queued or running submits nothing
    again = sh(cmd, env)
    assert "nothing to submit" in again.stdout and "queued or running, not resubmitted" in again.stdout, again.stdout
    assert "submitted 1 point" not in again.stdout and "submitted 2 point" not in again.stdout

    wait_for(lambda: all((out / "points" / p / "result.json").is_file()
                         for p in ("fedhypevae-strict__iid__eps1__seed0", "fedhypevae-strict__iid__eps4__seed0")),
             300, "both points to finish", lambda: logs(out) + sh(["squeue"], env, check=False).stdout)

    events = read_events(target)
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "interrupted", "start", "finished"], events
    stopped_at = events[1]["round"]
    assert stopped_at >= 1 and events[0]["world_size"] == 2 and events[0]["launcher"] == "srun"
    assert events[2]["resume"] is True and events[2]["resume_from_round"] == stopped_at  # not from round 0
    assert events[0]["slurm_job_id"] == events[2]["slurm_job_id"] == job_id  # the same job, requeued
    result = json.loads((target / "result.json").read_text())
    assert result["resumed_from_rounds"] == [stopped_at] and result["starts"] == 2
    # epsilon continued: the final spend includes the rounds before the interruption and stays within the target
    assert events[1]["epsilon_spent"] > 0
    assert events[1]["epsilon_spent"] < result["epsilon_spent"] <= 1.0 + 1e-9
    for ledger in sorted((target / "run" / "clients").glob("client_*/ledger.jsonl")):
        keys = [json.loads(line)["key"] for line in ledger.read_text().splitlines()]
        steps = [k for k in keys if k.startswith("round=")]
        assert len(steps) == len(set(steps)) == 30 * 2, ledger  # every step charged once, none refunded or lost
        assert steps[0] == "round=0/step=0" and steps[-1] == "round=29/step=1"
        assert keys.count("stats") == 1
    other = json.loads((out / "points" / "fedhypevae-strict__iid__eps4__seed0" / "result.json").read_text())
    assert other["starts"] == 1 and other["resumed_from_rounds"] == [] and other["epsilon_spent"] <= 4.0 + 1e-9

    done = sh(cmd, env)
    assert "2 finished" in done.stdout and "nothing to submit" in done.stdout

    col = sh([sys.executable, "-m", "slurm.collect", str(out)], env)
    assert "2 of 2 point(s) collected" in col.stdout
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert sorted(float(r["epsilon"]) for r in rows) == [1.0, 4.0]
    assert [r["resumed_points"] for r in sorted(rows, key=lambda r: float(r["epsilon"]))] == ["1", "0"]
    assert (out / "privacy_utility.png").stat().st_size > 10_000


def test_a_job_whose_ranks_each_see_a_world_of_one_fails(slurm_env, tmp_path):
    """srun without a PMI plugin: MPICH gives every task a world of one. The job must fail, not run twice."""
    env = slurm_env
    out = tmp_path / "sweep"
    sh([sys.executable, "-m", "slurm.sweep", "--config", "tiny", "--seeds", "0", "--partitions", "iid", "--epsilons", "1",
        "--ranks", "2", "--cluster", "slurm", "--out", str(out), "--dry-run"], env)
    point = out / "points" / "fedhypevae-strict__iid__eps1__seed0"
    r = sh(["srun", "-n", "2", "--mpi=none", "--kill-on-bad-exit=1", sys.executable, "-m", "slurm.job", str(point)], env,
           timeout=180, check=False)
    assert r.returncode != 0
    assert "world of 1" in r.stderr, r.stderr[-2000:]
    assert not (point / "result.json").exists() and not (point / "run" / "checkpoints").exists()


def test_plain_sbatch_script_of_a_point_runs(slurm_env, tmp_path):
    """The script written by --dry-run, for people who do not use submitit, runs the point under sbatch."""
    env = slurm_env
    out = tmp_path / "sweep"
    sh([sys.executable, "-m", "slurm.sweep", "--config", "tiny", "--seeds", "0", "--partitions", "iid", "--epsilons", "2",
        "--ranks", "2", "--cluster", "slurm", "--param", "timeout_min=10", "--out", str(out), "--dry-run"], env)
    point = out / "points" / "fedhypevae-strict__iid__eps2__seed0"
    r = sh(["sbatch", "--parsable", str(point / "job.sbatch")], env)
    job_id = r.stdout.strip().split(";")[0]
    wait_for(lambda: (point / "result.json").is_file() or job_state(job_id, env) == "", 240, "the sbatch job",
             lambda: "\n".join(p.read_text()[-2000:] for p in point.glob("slurm-*.out")))
    assert (point / "result.json").is_file(), "\n".join(p.read_text()[-2000:] for p in point.glob("slurm-*.out"))
    starts = [e for e in read_events(point) if e["event"] == "start"]
    assert starts[0]["world_size"] == 2 and starts[0]["launcher"] == "srun"
