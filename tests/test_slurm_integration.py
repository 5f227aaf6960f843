"""A real one-node SLURM, started by the test itself (tests/slurm/cluster.sh installs slurm-wlm and munge
with apt-get when they are missing): a sweep of 2 epsilons x 1 seed, 2 MPI ranks per job (srun
--mpi=pmi2), one running job interrupted with USR2 (what submitit's time-limit signal and a
preemption send), requeued, resumed from its checkpoint with its privacy ledger continuing, and
the sweep collected. Skips, saying why, when SLURM cannot be installed or started here.
"""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedhypevae.slurm.job import read_events
from helpers import rel_diff, sh, wait_for

from fedhypevae.privacy import PrivacyLedger
from fedhypevae.privacy.ledger import read_client_releases

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
    cmd = [
        sys.executable,
        "-m",
        "fedhypevae.slurm.sweep",
        "--config",
        "tiny",
        "--set",
        "train.rounds=30",
        "--epsilons",
        "1,4",
        "--seeds",
        "0",
        "--partitions",
        "iid",
        "--methods",
        "fedhypevae-strict",
        "--ranks",
        "2",
        "--cluster",
        "slurm",
        "--param",
        "timeout_min=30",
        "--param",
        "slurm_max_num_timeout=3",
        "--out",
        str(out),
    ]
    r = sh(cmd, env)
    assert "submitted 2 point(s) with 2 rank(s) each" in r.stdout, r.stdout
    target = out / "points" / "fedhypevae-strict__iid__eps1__seed0"
    job_id = json.loads((target / "job.json").read_text())["submissions"][-1]["job_id"]

    # interrupt the eps=1 job once it has trained a round and checkpointed (USR2 to every task, as submitit's
    # time-limit signal): every rank checkpoints, rank 0 requeues through submitit
    def trained_a_round():  # a checkpoint after round 1 or later (round 0's is written before training)
        done = list((target / "run" / "checkpoints").glob("round_*/COMPLETE"))
        return any(d.parent.name != "round_000000" for d in done) and job_state(job_id, env) == "RUNNING"

    wait_for(trained_a_round, 180, "the first checkpoint after a trained round of the running job", lambda: logs(out))
    sh(["scancel", "--signal=USR2", job_id], env)
    wait_for(
        lambda: any(e["event"] == "interrupted" for e in read_events(target)),
        60,
        "the collective checkpoint",
        lambda: logs(out),
    )

    # re-running the sweep while the jobs are queued or running submits nothing
    again = sh(cmd, env)
    assert "nothing to submit" in again.stdout and "queued or running, not resubmitted" in again.stdout, again.stdout
    assert "submitted 1 point" not in again.stdout and "submitted 2 point" not in again.stdout

    wait_for(
        lambda: all(
            (out / "points" / p / "result.json").is_file()
            for p in ("fedhypevae-strict__iid__eps1__seed0", "fedhypevae-strict__iid__eps4__seed0")
        ),
        300,
        "both points to finish",
        lambda: logs(out) + sh(["squeue"], env, check=False).stdout,
    )

    events = read_events(target)
    kinds = [e["event"] for e in events]
    assert kinds == ["start", "interrupted", "start", "finished"], events
    stopped_at = events[1]["round"]  # every rank stopped at the next step boundary: (round, step)
    assert stopped_at >= 1 and events[0]["world_size"] == 2 and events[0]["launcher"] == "srun"
    assert events[2]["resume"] is True and events[2]["resume_from_round"] == stopped_at  # not from round 0
    assert events[2]["resume_from_step"] == events[1]["step"]
    assert events[0]["slurm_job_id"] == events[2]["slurm_job_id"] == job_id  # the same job, requeued
    result = json.loads((target / "result.json").read_text())
    assert result["resumed_from_rounds"] == [stopped_at] and result["starts"] == 2
    # epsilon continued: the final spend includes the rounds before the interruption and stays within the target
    assert events[1]["epsilon_spent"] > 0
    assert events[1]["epsilon_spent"] < result["epsilon_spent"] <= 1.0 + 1e-9
    clients = PrivacyLedger(None, run_dir=target / "run").ids.tolist()
    assert len(clients) == 4 and len(list((target / "run" / "ledger").glob("rank_*.jsonl"))) == 2
    for cid in clients:
        keys = [e["key"] for e in read_client_releases(target / "run", cid)]
        steps = [k for k in keys if k.startswith("round=")]
        assert len(steps) == len(set(steps)) == 30 * 2, cid  # every step charged once, none refunded or lost
        assert steps[0] == "round=0/step=0" and steps[-1] == "round=29/step=1"
        assert keys.count("stats") == 1
    other = json.loads((out / "points" / "fedhypevae-strict__iid__eps4__seed0" / "result.json").read_text())
    assert other["starts"] == 1 and other["resumed_from_rounds"] == [] and other["epsilon_spent"] <= 4.0 + 1e-9

    done = sh(cmd, env)
    assert "2 finished" in done.stdout and "nothing to submit" in done.stdout

    col = sh([sys.executable, "-m", "fedhypevae.slurm.collect", str(out)], env)
    assert "2 of 2 point(s) collected" in col.stdout
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert sorted(float(r["epsilon"]) for r in rows) == [1.0, 4.0]
    assert [r["resumed_points"] for r in sorted(rows, key=lambda r: float(r["epsilon"]))] == ["1", "0"]
    assert (out / "privacy_utility.png").stat().st_size > 10_000


def test_a_job_whose_ranks_each_see_a_world_of_one_fails(slurm_env, tmp_path):
    """srun without a PMI plugin: MPICH gives every task a world of one. The job must fail, not run twice."""
    env = slurm_env
    out = tmp_path / "sweep"
    sh(
        [
            sys.executable,
            "-m",
            "fedhypevae.slurm.sweep",
            "--config",
            "tiny",
            "--seeds",
            "0",
            "--partitions",
            "iid",
            "--epsilons",
            "1",
            "--ranks",
            "2",
            "--cluster",
            "slurm",
            "--out",
            str(out),
            "--dry-run",
        ],
        env,
    )
    point = out / "points" / "fedhypevae-strict__iid__eps1__seed0"
    r = sh(
        [
            "srun",
            "-n",
            "2",
            "--mpi=none",
            "--kill-on-bad-exit=1",
            sys.executable,
            "-m",
            "fedhypevae.slurm.job",
            str(point),
        ],
        env,
        timeout=180,
        check=False,
    )
    assert r.returncode != 0
    assert "world of 1" in r.stderr, r.stderr[-2000:]
    assert not (point / "result.json").exists() and not (point / "run" / "checkpoints").exists()


def test_plain_sbatch_script_of_a_point_runs(slurm_env, tmp_path):
    """The script written by --dry-run, for people who do not use submitit, runs the point under sbatch."""
    env = slurm_env
    out = tmp_path / "sweep"
    sh(
        [
            sys.executable,
            "-m",
            "fedhypevae.slurm.sweep",
            "--config",
            "tiny",
            "--seeds",
            "0",
            "--partitions",
            "iid",
            "--epsilons",
            "2",
            "--ranks",
            "2",
            "--cluster",
            "slurm",
            "--param",
            "timeout_min=10",
            "--out",
            str(out),
            "--dry-run",
        ],
        env,
    )
    point = out / "points" / "fedhypevae-strict__iid__eps2__seed0"
    r = sh(["sbatch", "--parsable", str(point / "job.sbatch")], env)
    job_id = r.stdout.strip().split(";")[0]
    wait_for(
        lambda: (point / "result.json").is_file() or job_state(job_id, env) == "",
        240,
        "the sbatch job",
        lambda: "\n".join(p.read_text()[-2000:] for p in point.glob("slurm-*.out")),
    )
    assert (point / "result.json").is_file(), "\n".join(p.read_text()[-2000:] for p in point.glob("slurm-*.out"))
    starts = [e for e in read_events(point) if e["event"] == "start"]
    assert starts[0]["world_size"] == 2 and starts[0]["launcher"] == "srun"


# ------------------------------------------------------------------------------- Ctrl-C under srun
CTRL_C_ROUNDS = 40
CTRL_C_TRAIN = [
    "--config",
    "tiny",
    "--no-progress",
    "--quiet",
    "--set",
    f"train.rounds={CTRL_C_ROUNDS}",
    "--set",
    "train.checkpoint_every=0",
    "--set",
    "privacy.noise_seed=3",
]
FEDHYPEVAE = BIN / "fedhypevae"

# one SIGINT handler per task: how many SIGINTs reached it (a duplicate would arrive within the 2 s grace)
SIGINT_PROBE = """\
import os, signal, sys, time
from pathlib import Path
d, rank, got = Path(sys.argv[1]), os.environ["SLURM_PROCID"], []
signal.signal(signal.SIGINT, lambda s, f: got.append(time.time()))
(d / f"ready_{rank}").write_text(str(os.getpid()))
t0 = time.time()
while not got and time.time() - t0 < 120:
    time.sleep(0.05)
time.sleep(2.0)
(d / f"sigint_{rank}").write_text(str(len(got)))
sys.exit(130 if got else 1)
"""


class BatchJob:
    """An sbatch script running one 2-task srun step in `d`; the batch shell records srun's exit status
    (no sacct here) and any signal that reaches the shell itself."""

    def __init__(self, d: Path, name: str, step: list, env: dict, mpi: str = "pmi2"):
        d.mkdir(parents=True, exist_ok=True)
        self.d, self.name, self.env = d, name, env
        self.out, self.err, self.rc_file = d / f"{name}.out", d / f"{name}.err", d / f"{name}.rc"
        self.shell_signals = d / f"{name}.shell_signals"
        script = d / f"{name}.sbatch"
        script.write_text(
            "\n".join(
                [
                    "#!/bin/bash",
                    f"#SBATCH --job-name={name}",
                    "#SBATCH --nodes=1",
                    "#SBATCH --ntasks=2",
                    f"#SBATCH --output={self.out}",
                    f"#SBATCH --error={self.err}",
                    f"trap 'echo INT >> {self.shell_signals}' INT",
                    f"trap 'echo TERM >> {self.shell_signals}' TERM",
                    f"cd {shlex.quote(str(REPO))}",
                    f"srun --nodes=1 --ntasks=2 --mpi={mpi} {shlex.join(str(a) for a in step)}",
                    f"echo $? > {self.rc_file}",
                    "",
                ]
            )
        )
        r = sh(["sbatch", "--parsable", str(script)], env)
        self.job_id = r.stdout.strip().split(";")[0]
        assert self.job_id.isdigit(), r.stdout

    def logs(self) -> str:
        parts = [f"job {self.job_id} ({self.name}), squeue: {job_state(self.job_id, self.env)!r}"]
        for f in (self.out, self.err, self.rc_file, self.shell_signals):
            if f.is_file():
                parts.append(f"== {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
            else:
                parts.append(f"== {f}: absent")
        return "\n".join(parts)

    def finished(self) -> bool:
        """srun's status recorded, or the job gone from squeue (an squeue that fails says nothing)."""
        if self.rc_file.is_file() and self.rc_file.read_text().strip():
            return True
        r = sh(["squeue", "-h", "-j", self.job_id, "-o", "%T"], self.env, check=False)
        return r.returncode == 0 and r.stdout.strip() == ""

    def wait(self, timeout: float) -> int:
        wait_for(self.finished, timeout, f"job {self.job_id} ({self.name}) to end", self.logs)
        wait_for(
            lambda: self.rc_file.is_file() and self.rc_file.read_text().strip(),
            10,
            f"the exit status of job {self.job_id}'s srun",
            self.logs,
        )
        return int(self.rc_file.read_text())

    def task_exits(self) -> dict:
        """{task: exit code} from srun's 'task(s) 0-1: Exited with exit code N' lines (it prints none for 0)."""
        exits = {}
        for tasks, code in re.findall(r"tasks? ([\d,\-]+): Exited with exit code (\d+)", self.err.read_text()):
            for part in tasks.split(","):
                lo, _, hi = part.partition("-")
                for t in range(int(lo), int(hi or lo) + 1):
                    exits[t] = int(code)
        return exits

    def cancel(self) -> None:
        subprocess.run(["scancel", self.job_id], env=self.env, capture_output=True)


def metric_rows(out: Path) -> list:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return rows


@pytest.mark.timeout(900)
def test_sigint_to_srun_tasks_checkpoints_and_resumes_without_double_charging(slurm_env, tmp_path):
    """Ctrl-C semantics under srun: `scancel --signal=INT` (what an operator, or a user's script, sends to a
    job's tasks) makes both ranks checkpoint at a DP step boundary and exit 130 with the resume command; the
    resumed job finishes like a run that was never interrupted, every DP step charged exactly once."""
    import torch

    env = dict(slurm_env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    jobs: list[BatchJob] = []
    try:
        # 1. what `scancel --signal=INT JOB` delivers here: one SIGINT to each task of the step, none to the
        #    batch shell (scancel's default without --batch/--full)
        probe_dir = tmp_path / "probe"
        probe_dir.mkdir()
        (probe_dir / "probe.py").write_text(SIGINT_PROBE)
        probe = BatchJob(probe_dir, "probe", [sys.executable, probe_dir / "probe.py", probe_dir], env, mpi="none")
        jobs.append(probe)
        wait_for(
            lambda: all((probe_dir / f"ready_{t}").is_file() for t in (0, 1)),
            180,
            "both probe tasks to start",
            probe.logs,
        )
        sh(["scancel", "--signal=INT", probe.job_id], env)
        assert probe.wait(60) == 130, probe.logs()
        got = {t: (probe_dir / f"sigint_{t}").read_text() for t in (0, 1) if (probe_dir / f"sigint_{t}").is_file()}
        assert got == {0: "1", 1: "1"}, f"SIGINTs received per task: {got}\n{probe.logs()}"
        assert probe.task_exits() == {0: 130, 1: 130}, probe.logs()
        assert not probe.shell_signals.exists(), probe.logs()

        # 2. the uninterrupted reference: plain `fedhypevae train`, one process, no launcher
        ref = tmp_path / "ref"
        r = sh([FEDHYPEVAE, "train", *CTRL_C_TRAIN, "--out", ref], env, timeout=300, check=False)
        assert r.returncode == 0, f"reference run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        want = json.loads((ref / "results.json").read_text())
        assert want["training"]["rounds"] == CTRL_C_ROUNDS
        local_steps = want["privacy"]["steps"] // CTRL_C_ROUNDS
        assert local_steps * CTRL_C_ROUNDS == want["privacy"]["steps"] and local_steps >= 1, want["privacy"]
        all_steps = [f"round={r_}/step={s}" for r_ in range(CTRL_C_ROUNDS) for s in range(local_steps)]

        # 3. two ranks under srun, interrupted once training is under way
        out = tmp_path / "run"
        jd = tmp_path / "jobs"
        train = BatchJob(jd, "train", [FEDHYPEVAE, "train", *CTRL_C_TRAIN, "--out", out], env)
        jobs.append(train)
        t0 = last_squeue = time.time()
        while len(metric_rows(out)) < 3:  # a fast poll (40 tiny rounds take a few seconds), squeue once a second
            ended = train.rc_file.is_file()
            if not ended and time.time() - last_squeue > 1:
                ended, last_squeue = train.finished(), time.time()
            if ended or time.time() - t0 > 240:
                raise AssertionError(
                    f"the training job did not reach round 3 while running "
                    f"({len(metric_rows(out))} rounds logged)\n{train.logs()}"
                )
            time.sleep(0.05)
        assert job_state(train.job_id, env) == "RUNNING", train.logs()
        sh(["scancel", "--signal=INT", train.job_id], env)
        signalled_after = len(metric_rows(out))
        rc = train.wait(180)
        err = train.err.read_text(errors="replace")
        assert not (out / "results.json").exists(), (
            f"the run finished before the SIGINT took effect (signalled after {signalled_after} rounds)\n{train.logs()}"
        )
        assert rc == 130, f"srun exited {rc}, not 130\n{train.logs()}"
        assert train.task_exits() == {0: 130, 1: 130}, train.logs()
        assert "SIGINT received" in err and "stopped by signal 2" in err, train.logs()
        assert "aborted by a second interrupt" not in err and "Traceback" not in err, train.logs()
        assert f"Continue with: fedhypevae train --resume --out {out}" in err, train.logs()
        assert not train.shell_signals.exists(), train.logs()

        complete = sorted(p.parent for p in (out / "checkpoints").glob("round_*/COMPLETE"))
        assert complete, f"no complete checkpoint in {out / 'checkpoints'}\n{train.logs()}"
        last = complete[-1]
        m = re.fullmatch(r"round_(\d{6})(?:_step_(\d{5}))?", last.name)
        assert m, last
        stop_round, stop_step = int(m.group(1)), int(m.group(2) or 0)
        assert 1 <= stop_round < CTRL_C_ROUNDS and stop_step < local_steps, last
        assert f"checkpoint {last};" in err, train.logs()
        events = read_events(out)
        assert [e["event"] for e in events] == ["start", "interrupted"], events
        assert events[0]["world_size"] == 2 and events[0]["launcher"] == "srun", events
        assert events[1]["signal"] == 2 and (events[1]["round"], events[1]["step"]) == (stop_round, stop_step), events
        assert events[1]["checkpoint"] == str(last), events

        # the ledger stops exactly at the checkpoint: no release charged twice, none charged beyond it
        rel = read_client_releases(out, 0)
        keys = [x["key"] for x in rel]
        assert len(keys) == len(set(keys)), f"client 0 charged twice for a key: {keys}"
        steps_done = stop_round * local_steps + stop_step
        assert [k for k in keys if k.startswith("round=")] == all_steps[:steps_done], keys
        assert all(x["epoch"] == 0 for x in rel), rel
        eps_at_stop = PrivacyLedger(None, run_dir=out).epsilon(
            delta=want["privacy"]["delta"], accountant=want["privacy"]["accountant"]
        )
        printed = float(re.search(r"epsilon spent so far ([0-9]+\.[0-9]+)", err).group(1))
        assert eps_at_stop > 0 and abs(eps_at_stop - printed) < 1e-4, (eps_at_stop, printed)
        assert eps_at_stop < want["privacy"]["epsilon_spent"]

        # 4. resume with another srun job: the same settings, --resume
        resume = BatchJob(jd, "resume", [FEDHYPEVAE, "train", *CTRL_C_TRAIN, "--resume", "--out", out], env)
        jobs.append(resume)
        rc = resume.wait(300)
        assert rc == 0, f"the resumed job's srun exited {rc}\n{resume.logs()}"
        assert resume.task_exits() == {}, resume.logs()
        assert "Traceback" not in resume.err.read_text(errors="replace"), resume.logs()
        got = json.loads((out / "results.json").read_text())
        assert got["status"] == "complete", got.get("status")
        assert got["training"]["rounds"] == CTRL_C_ROUNDS
        events = read_events(out)
        assert [e["event"] for e in events] == ["start", "interrupted", "resumed", "finished"], events
        assert events[2]["from_checkpoint"] == str(last) and events[2]["world_size"] == 2, events
        assert (events[2]["round"], events[2]["step"]) == (stop_round, stop_step), events

        rel = read_client_releases(out, 0)
        keys = [x["key"] for x in rel]
        assert len(keys) == len(set(keys)), f"client 0 charged twice for a key: {keys}"
        assert [k for k in keys if k.startswith("round=")] == all_steps, keys  # each step once, in order
        assert keys.count("stats") == 1 and keys.count("mmd") == 1, keys
        assert all(x["epoch"] == 0 for x in rel), [x for x in rel if x["epoch"] != 0]
        assert got["privacy"].get("replays", {}).get("charged_again", 0) == 0, got["privacy"].get("replays")

        # 5. the same as never interrupted: epsilon per round (it did not reset), final epsilon, hypernetwork
        assert got["privacy"]["epsilon_spent"] == want["privacy"]["epsilon_spent"]
        assert got["privacy"]["steps"] == want["privacy"]["steps"]
        eps_got = {row["round"]: row["privacy/epsilon"] for row in metric_rows(out)}
        eps_want = {row["round"]: row["privacy/epsilon"] for row in metric_rows(ref)}
        assert sorted(eps_got) == sorted(eps_want) == list(range(1, CTRL_C_ROUNDS + 1)), sorted(eps_got)
        assert all(eps_got[k] == pytest.approx(eps_want[k], rel=1e-9) for k in eps_want), (eps_got, eps_want)
        phi_ref = torch.load(ref / "hypernetwork.pt", map_location="cpu", weights_only=True)
        phi_got = torch.load(out / "hypernetwork.pt", map_location="cpu", weights_only=True)
        assert rel_diff(phi_ref, phi_got) <= 1e-5
    finally:
        for job in jobs:
            job.cancel()
