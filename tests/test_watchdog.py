"""The step watchdog (hpc/watchdog.py, train.step_timeout_s): a rank whose peer stalls ends itself, and the job.

A peer killed outright is noticed at once (its sockets close); one cut off from the network is not, and the
ranks waiting for it would sit in a collective for ever. A stopped process (SIGSTOP) keeps its sockets open
exactly like a partitioned node, so the end-to-end tests stop one rank mid-training:

  * unit (each in its own process, so that the exit itself is observed): the watchdog fires once the timeout
    passes without a beat (status 124, one line on stderr, stdout flushed first, at about the timeout), not
    while beaten, not while disarmed or paused;
  * it fires while the main thread is blocked in an MPI collective (mpi4py) and in a gloo collective
    (torch.distributed): both release the GIL there; the torch back-end's `set_timeout` narrows and restores
    its collective timeout;
  * `mpiexec -n 2 fedhypevae train` with train.step_timeout_s=5 and rank 1 stopped: the job ends with 124
    within the timeout and a few seconds, rank 0's line names the timeout, and `--resume` finishes the run with
    the planned epsilon (MPI and the torch back-end);
  * a meta-code fit (rank 0 alone) longer than the step timeout does not end a normal run: the other ranks
    wait unwatched, and under gloo with the long collective timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import free_port, launcher_free_env, metric_rows, process_running

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
FEDHYPEVAE = BIN / "fedhypevae"
EXIT_STEP_TIMEOUT = 124

needs_mpiexec = pytest.mark.skipif(
    not (MPIEXEC.is_file() and FEDHYPEVAE.is_file()), reason=f"needs mpiexec and fedhypevae in {BIN}"
)


def child(code: str, timeout: float = 60, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run `code` in a fresh interpreter; (the finished process, its wall seconds from start to exit)."""
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=launcher_free_env(**{"PYTHONUNBUFFERED": "", **env}),  # stdout block-buffered, as on a pipe
    )
    return p, time.monotonic() - t0


# the child prints when it armed (CLOCK_MONOTONIC is one clock for every process of the machine)
PRELUDE = """
import sys, time
from fedhypevae.hpc.watchdog import Watchdog
def line(where, silent):
    return f"test: error: {where} made no progress for {silent:.3f} s"
"""


# --------------------------------------------------------------------------------------------- unit
def test_the_watchdog_fires_once_the_timeout_passes_without_a_beat():
    p, _ = child(
        PRELUDE
        + """
dog = Watchdog(1.0, line)
sys.stdout.write("not yet flushed")  # a pipe: block-buffered until the watchdog flushes it
dog.arm("phase A")
armed = time.monotonic()
sys.stderr.write(f"armed at {armed!r}\\n"); sys.stderr.flush()
time.sleep(30)
print("the watchdog did not fire", flush=True)
"""
    )
    ended = time.monotonic()
    assert p.returncode == EXIT_STEP_TIMEOUT, (p.returncode, p.stderr)
    assert p.stdout == "not yet flushed"  # flushed before the exit
    first, *rest = p.stderr.splitlines()
    armed = float(first.split("armed at ")[1])
    assert len(rest) == 1, p.stderr  # ONE line
    assert rest[0].startswith("test: error: phase A made no progress for "), rest
    silent = float(rest[0].split("for ")[1].split(" s")[0])
    assert 1.0 <= silent < 1.0 + 0.2, silent  # one poll (0.1 s) late at most
    assert 1.0 < ended - armed < 1.0 + 1.5, ended - armed  # + the exit grace and the process's exit


def test_the_watchdog_does_not_fire_while_beaten_nor_while_disarmed_or_paused():
    p, seconds = child(
        PRELUDE
        + """
dog = Watchdog(0.5, line)
dog.arm("beaten")
for _ in range(15):  # 1.5 s of beats every 0.1 s: three timeouts long
    time.sleep(0.1)
    dog.beat()
with dog.paused():  # legitimate long work: not watched
    time.sleep(1.0)
assert dog.armed
time.sleep(0.3)  # re-armed with a fresh beat: no instant fire for the paused time
dog.disarm()
time.sleep(1.0)
dog.arm("again")
dog.beat("last")
time.sleep(0.3)
dog.close()
time.sleep(0.7)  # closed: nothing watches
print("survived", flush=True)
"""
    )
    assert p.returncode == 0 and p.stdout.strip() == "survived", (p.returncode, p.stderr)
    assert p.stderr == ""
    assert seconds > 4.5


def test_the_watchdog_names_the_last_place_it_was_told():
    p, _ = child(
        PRELUDE
        + """
dog = Watchdog(0.3, line)
with dog:
    dog.beat("step 1")
    dog.beat()
    dog.beat("step 2")
    time.sleep(10)
"""
    )
    assert p.returncode == EXIT_STEP_TIMEOUT
    assert p.stderr.startswith("test: error: step 2 made no progress") and p.stderr.count("\n") == 1, p.stderr


# ---------------------------------------------------------------------- blocked in a real collective
@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(90)
def test_the_watchdog_fires_while_the_main_thread_waits_in_an_mpi_collective():
    """mpi4py releases the GIL inside MPI_Allreduce: the thread runs while rank 0 waits for rank 1."""
    code = (
        PRELUDE
        + """
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
comm.Barrier()
if comm.rank == 1:
    time.sleep(60)  # a stuck peer
dog = Watchdog(1.0, lambda where, silent: f"rank 0: {where} stuck for {silent:.2f} s")
dog.arm("the allreduce")
comm.Allreduce(MPI.IN_PLACE, np.zeros(4))
print("the allreduce returned", flush=True)
"""
    )
    t0 = time.monotonic()
    p = subprocess.run(
        [str(MPIEXEC), "-n", "2", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=launcher_free_env(BIN),
    )
    seconds = time.monotonic() - t0
    assert p.returncode == EXIT_STEP_TIMEOUT, (p.returncode, p.stdout, p.stderr)
    assert "rank 0: the allreduce stuck for 1." in p.stderr, p.stderr
    assert "returned" not in p.stdout
    assert seconds < 20, seconds  # Hydra ends rank 1 once rank 0 exits non-zero


TORCH_RANK = """
import datetime, os
import torch
from fedhypevae.hpc.backend import make_communicator
from fedhypevae.hpc.launcher import LaunchInfo
rank = int(os.environ["RANK"])
comm = make_communicator("torch", LaunchInfo("torchrun", rank, 2, 0), timeout_s=60.0)
buf = torch.zeros(4, dtype=torch.float64)
comm.allreduce(buf)
"""


def torch_pair(code: str, timeout: float = 90) -> list[tuple[int, str, str, float]]:
    """Two processes of a gloo group on this machine running `code`: [(status, stdout, stderr, seconds)] by rank."""
    port = str(free_port())
    procs, t0 = [], time.monotonic()
    for rank in range(2):
        env = launcher_free_env(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            out.append((p.returncode, so, se, time.monotonic() - t0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.timeout(120)
def test_the_watchdog_fires_while_the_main_thread_waits_in_a_gloo_collective():
    """torch.distributed releases the GIL inside a gloo all_reduce: the thread runs while rank 0 waits (the group's
    own timeout is 60 s, so only the watchdog can end it within the test's bound)."""
    (rc0, _, err0, _), (rc1, _, _, _) = torch_pair(
        PRELUDE
        + TORCH_RANK
        + """
if rank == 1:
    time.sleep(4)  # a stuck peer; then it leaves (its partner is gone by then)
    os._exit(0)
dog = Watchdog(1.0, lambda where, silent: f"rank 0: {where} stuck for {silent:.2f} s")
dog.arm("the gloo allreduce")
t0 = time.monotonic()
comm.allreduce(buf)
print("the allreduce returned", flush=True)
"""
    )
    assert rc0 == EXIT_STEP_TIMEOUT, err0
    assert "rank 0: the gloo allreduce stuck for 1." in err0, err0
    assert rc1 == 0


@pytest.mark.timeout(120)
def test_set_timeout_narrows_and_restores_the_gloo_collective_timeout():
    (rc0, out0, err0, _), (rc1, out1, err1, _) = torch_pair(
        TORCH_RANK
        + """
import time
if rank == 1:
    time.sleep(3)  # late for the first allreduce: the restored 60 s timeout waits for it
comm.set_timeout(1.0)
comm.set_timeout(None)
t0 = time.monotonic()
comm.allreduce(buf)
print(f"waited {time.monotonic() - t0:.1f} s", flush=True)
if rank == 1:
    time.sleep(3)  # late for the second one, which rank 0 waits for 1 s only
    os._exit(0)
comm.set_timeout(1.0)
t0 = time.monotonic()
try:
    comm.allreduce(buf)
except RuntimeError as exc:
    print(f"timed out after {time.monotonic() - t0:.1f} s", flush=True)
os._exit(0)
"""
    )
    assert rc0 == 0 and rc1 == 0, (err0, err1)
    first, second = out0.splitlines()
    assert 2.0 < float(first.split()[1]) < 10, out0  # waited for rank 1 (about 3 s)
    assert second.startswith("timed out after ") and 0.9 < float(second.split()[3]) < 3.0, out0


# ---------------------------------------------------------------------------------- 2 ranks, a stall
TRAIN = ["--config", "tiny", "--no-progress", "--quiet"]
STALL = [
    "--set",
    "train.step_timeout_s=5",
    "--set",
    "train.rounds=60",  # a tiny round takes ~0.05 s: still training when a rank is stopped, quick to resume
    "--set",
    "privacy.noise_seed=13",  # replayed steps are identical: the resumed run spends exactly the planned epsilon
]


def rank_pids(launcher: int) -> dict[int, int]:
    from test_distributed import rank_processes

    return rank_processes(launcher, "PMI_RANK")


@pytest.mark.mpi
@pytest.mark.slow
@needs_mpiexec
@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_a_stalled_rank_ends_the_job_within_the_step_timeout_and_resume_finishes(tmp_path, backend):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    env = launcher_free_env(BIN, MASTER_PORT=str(free_port()))
    cmd = [str(MPIEXEC), "-n", "2", str(FEDHYPEVAE), "train", *TRAIN, *STALL, "--backend", backend, "--out", str(out)]
    with open(logs / "err", "w") as err_f, open(logs / "out", "w") as out_f:
        job = subprocess.Popen(
            cmd, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    victim = None
    try:
        t_end = time.monotonic() + 120
        while metric_rows(out) < 2:  # training is under way
            assert job.poll() is None, (logs / "err").read_text()
            assert time.monotonic() < t_end, "no round 2 within 120 s"
            time.sleep(0.05)
        ranks = rank_pids(job.pid)
        assert sorted(ranks) == [0, 1], ranks
        victim = ranks[1]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGSTOP)  # sockets open, no progress: a partitioned node as its peers see it
        while process_running(ranks[0]) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        rank0_s = time.monotonic() - t0
        if backend == "torch":
            # without PMI, Hydra does not end the other ranks of a job when one fails (srun --kill-on-bad-exit and
            # torchrun do); a partitioned rank's own watchdog would end it, but a stopped one cannot run: it is ended
            # here (let run again, it could fail its collective on the closed connection before its watchdog fires)
            os.kill(victim, signal.SIGKILL)
        rc = job.wait(30)
        job_s = time.monotonic() - t0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(10)
        if victim is not None and process_running(victim):
            os.kill(victim, signal.SIGKILL)
    err = (logs / "err").read_text()
    print(f"{backend}: rank 0 ended {rank0_s:.1f} s after rank 1 stopped, the job {job_s:.1f} s after")
    if backend == "torch":
        assert rc != 0, (rc, err)  # the stopped rank was killed here: Hydra reports that with rank 0's 124
    else:
        assert rc == EXIT_STEP_TIMEOUT, (rc, err)
    assert 4.5 < rank0_s < 5.0 + 4, rank0_s  # 5 s after rank 0's last beat, which came just before the stop
    assert job_s < 5.0 + 8, job_s
    lines = [line for line in err.splitlines() if "did not finish within" in line]
    assert lines and lines[0].startswith("fedhypevae: error: [rank 0/2 on host "), err
    assert "did not finish within train.step_timeout_s=5 s" in lines[0] and "peer rank" in lines[0], lines
    assert f"--resume --out {out}" in lines[0]
    assert len([line for line in lines if "[rank 0/2" in line]) == 1, err  # one line per rank
    assert "Traceback" not in err, err
    assert not (out / "results.json").exists()

    res = subprocess.run(
        [str(MPIEXEC), "-n", "2", str(FEDHYPEVAE), "train", "--resume", "--out", str(out), *TRAIN[2:]]
        + ["--backend", backend],
        capture_output=True,
        text=True,
        timeout=150,
        env=launcher_free_env(BIN, MASTER_PORT=str(free_port())),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((out / "results.json").read_text())
    p = got["privacy"]
    assert got["status"] == "complete" and got["training"]["rounds"] == 60 and p["steps"] == 120
    assert p["replays"]["charged_again"] == 0  # a replayed step was the identical release: not paid twice
    assert p["epsilon_spent"] == pytest.approx(p["plan"]["planned_epsilon"], rel=1e-12)  # nothing lost or refunded


@pytest.mark.mpi
@pytest.mark.slow
@needs_mpiexec
@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_a_meta_code_fit_longer_than_the_step_timeout_does_not_end_the_run(tmp_path, backend):
    """Rank 0 fits the meta-code alone (about 5 s with meta.steps=2000) while rank 1 waits in a barrier: the wait is
    not watched, and under gloo it has the long collective timeout, not train.step_timeout_s."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = subprocess.run(
        [str(MPIEXEC), "-n", "2", str(FEDHYPEVAE), "train", *TRAIN, "--backend", backend, "--out", str(out)]
        + ["--set", "train.step_timeout_s=1.5", "--set", "meta.steps=2000"],
        capture_output=True,
        text=True,
        timeout=150,
        env=launcher_free_env(BIN, MASTER_PORT=str(free_port())),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "did not finish" not in res.stderr
    log = (out / "run.log").read_text().splitlines()
    stamp = [line[:23] for line in log if "class statistics released" in line or "run complete" in line]
    from datetime import datetime

    fit = datetime.fromisoformat(stamp[-1].replace(",", ".")) - datetime.fromisoformat(stamp[0].replace(",", "."))
    assert fit.total_seconds() > 1.5 + 1.5, (fit, time.monotonic() - t0)  # longer than the timeout and its grace
