"""Real multi-process runs of the console script under mpiexec (MPICH) and torchrun.

Nothing is mocked: every test launches `fedhypevae train` as separate OS processes and checks
what a user would see (exit status, wall time, stderr, the files in --out):

  * the trained hypernetwork and epsilon do not depend on the world size or the back-end;
  * more ranks than clients is refused with a one-line message;
  * one rank failing (a corrupt shard only it reads, or SIGKILL) ends the whole job quickly;
  * SIGTERM to mpiexec gives a collective checkpoint that resumes on another world size to the
    same result as an uninterrupted run.

The machine running CI has 2 cores: tiny config, one thread per process, a pytest timeout on
every test. `-m "not mpi"` skips them all; `-m "not slow"` keeps the quick ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fedhypevae.hpc.placement import place_clients
from helpers import free_port, launcher_free_env, load_phi, metric_rows, process_running, rel_diff

REPO = Path(__file__).resolve().parents[1]


def _bin_dir() -> Path:
    for d in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        if (d / "fedhypevae").is_file():
            return d
    return Path(sys.executable).parent


BIN = _bin_dir()
FEDHYPEVAE = str(BIN / "fedhypevae")
MPIEXEC = str(BIN / "mpiexec")
TORCHRUN = str(BIN / "torchrun")

QUIET = ["--config", "tiny", "--no-progress", "--quiet"]
# 7 clients: uneven blocks on 2, 3 and 4 ranks
EQUALITY = ["--set", "privacy.noise_seed=3", "--set", "partition.clients=7", "--set", "partition.min_client_size=10"]
# a run long enough to be interrupted; checkpoint_every large: only round 0, the signal's and the end's
RESUMABLE = [
    "--set",
    "partition.clients=4",
    "--set",
    "train.rounds=40",
    "--set",
    "train.checkpoint_every=100",
    "--set",
    "privacy.noise_seed=5",
]
FAIL_FAST_S = 60.0  # a failing rank must end the job within this


pytestmark = pytest.mark.skipif(
    not (Path(MPIEXEC).is_file() and Path(FEDHYPEVAE).is_file()),
    reason=f"needs mpiexec and the fedhypevae console script in {BIN} (pip install -e '.[mpi]')",
)


def clean_env(**extra: str) -> dict:
    return launcher_free_env(BIN, **extra)


# ------------------------------------------------------------------------------- processes
@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __iter__(self):  # rc, out, err, seconds = run(...)
        return iter((self.returncode, self.stdout, self.stderr, self.seconds))

    def show(self) -> str:
        return (
            f"exit {self.returncode} after {self.seconds:.1f} s\n--- stdout ---\n{self.stdout[-4000:]}"
            f"\n--- stderr ---\n{self.stderr[-4000:]}"
        )


class Launch:
    """One launched command in its own session (so a hung job can be killed whole); output to files."""

    def __init__(self, cmd: list[str], log_dir: Path, name: str, env: dict | None = None, cwd: Path | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.cmd = cmd
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=env or clean_env(),
            cwd=cwd or log_dir,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill_tree(self) -> None:
        if self.running():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def wait(self, timeout: float) -> Result:
        """Wait at most `timeout` s; on expiry kill the whole job and fail the test with its output."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            pytest.fail(f"{' '.join(self.cmd)} did not exit within {timeout} s\n{self.result(-9).show()}")
        return self.result(rc)

    def result(self, rc: int) -> Result:
        seconds = time.monotonic() - self.t0
        for f in (self._out, self._err):
            if not f.closed:
                f.close()
        return Result(rc, self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"), seconds)


@pytest.fixture
def launch(tmp_path):
    """launch(cmd, name=...) -> Launch; every job still alive at teardown is killed with its children."""
    started: list[Launch] = []

    def start(cmd, name: str = "job", **kw) -> Launch:
        job = Launch([str(c) for c in cmd], tmp_path / "logs", f"{name}{len(started)}", **kw)
        started.append(job)
        return job

    yield start
    for job in started:
        job.kill_tree()


@pytest.fixture
def run(launch):
    """run(cmd, timeout=..., name=...) -> Result(returncode, stdout, stderr, seconds)."""

    def go(cmd, timeout: float = 120, name: str = "job", **kw) -> Result:
        return launch(cmd, name=name, **kw).wait(timeout)

    return go


def train_cmd(out: Path, *args: str) -> list[str]:
    return [FEDHYPEVAE, "train", *QUIET, *args, "--out", str(out)]


def mpi(n: int, cmd: list[str]) -> list[str]:
    return [MPIEXEC, "-n", str(n), *cmd]


def torchrun(n: int, cmd: list[str]) -> list[str]:
    return [
        TORCHRUN,
        "--nproc_per_node",
        str(n),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--no-python",
        *cmd,
    ]


def wait_for(predicate, timeout: float, job: Launch | None = None, what: str = "condition") -> float:
    t0 = time.monotonic()
    while not predicate():
        if job is not None and not job.running():
            pytest.fail(f"the job exited before {what}\n{job.result(job.proc.returncode).show()}")
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - t0


# ------------------------------------------------------------------------------- /proc
def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # comm may hold spaces: fields follow the last ')'


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            pp = _ppid(int(d.name))
            if pp is not None:
                children.setdefault(pp, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rank_processes(launcher_pid: int, rank_var: str) -> dict[int, int]:
    """{rank: pid} of the training processes under a launcher (mpiexec -> hydra proxy -> ranks;
    torchrun -> ranks), told apart from proxies by their argv and ranked by the launcher's variable."""
    ranks = {}
    for pid in descendants(launcher_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"train" in argv and any(a.endswith(b"fedhypevae") for a in argv[:2]) and rank_var.encode() in env:
            ranks[int(env[rank_var.encode()])] = pid
    return ranks


# ------------------------------------------------------------------------------- results
def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------- 1. world sizes
@pytest.fixture(scope="module")
def reference_1proc(tmp_path_factory):
    """One plain `fedhypevae train` (no launcher): the reference every world size must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    job = Launch(train_cmd(out, *EQUALITY), out.parent / "logs", "ref")
    try:
        r = job.wait(120)
    finally:
        job.kill_tree()
    assert r.returncode == 0, r.show()
    res = results(out)
    assert res["provenance"]["world_size"] == 1 and res["provenance"]["backend"] == "local"
    assert res["provenance"]["launcher"] == "none"
    return out


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "launcher,n",
    [("mpiexec", 2), ("mpiexec", 3), ("mpiexec", 4), ("torchrun", 2)],
    ids=["mpi2", "mpi3", "mpi4", "torchrun2"],
)
def test_same_hypernetwork_and_epsilon_on_every_world_size(run, tmp_path, reference_1proc, launcher, n):
    out = tmp_path / "run"
    cmd = train_cmd(out, *EQUALITY)
    r = run(mpi(n, cmd) if launcher == "mpiexec" else torchrun(n, cmd), timeout=180, name=launcher)
    assert r.returncode == 0, r.show()
    assert "Traceback" not in r.stderr, r.show()

    got, ref = results(out), results(reference_1proc)
    prov = got["provenance"]
    assert prov["world_size"] == n
    assert prov["backend"] == ("mpi" if launcher == "mpiexec" else "torch-gloo")
    assert prov["launcher"] == ("mpich" if launcher == "mpiexec" else "torchrun")
    assert got["privacy"]["epsilon_spent"] == ref["privacy"]["epsilon_spent"]
    assert got["privacy"]["steps"] == ref["privacy"]["steps"]
    assert got["data"]["declared_sizes"] == ref["data"]["declared_sizes"]
    # every rank wrote its own ledger file, and every client's history is in one of them
    assert len(list((out / "ledger").glob("rank_*.jsonl"))) == n
    from fedhypevae.privacy import PrivacyLedger

    led = PrivacyLedger(None, run_dir=out)
    assert led.ids.tolist() == list(range(7))
    assert led.epsilon(delta=got["privacy"]["delta"], accountant=got["privacy"]["accountant"]) == pytest.approx(
        got["privacy"]["epsilon_spent"], rel=1e-12
    )
    assert rel_diff(load_phi(reference_1proc), load_phi(out)) <= 1e-5


# ------------------------------------------------------------------------------- 2. too many ranks
@pytest.mark.mpi
@pytest.mark.timeout(90)
def test_more_ranks_than_clients_is_refused_with_one_line(run, tmp_path):
    rc, out, err, seconds = run(
        mpi(3, train_cmd(tmp_path / "run", "--set", "partition.clients=2")), timeout=FAIL_FAST_S
    )
    assert rc != 0
    assert seconds < FAIL_FAST_S
    assert "ranks" in err and "2 clients" in err, err
    assert "Traceback" not in err, err
    assert not (tmp_path / "run" / "results.json").exists()


# ------------------------------------------------------------------------------- 3. fail fast
@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_corrupt_shard_read_by_one_rank_ends_the_job(run, tmp_path):
    shards = tmp_path / "shards"
    r = run(
        [
            FEDHYPEVAE,
            "data",
            "partition",
            "digits",
            "--clients",
            "4",
            "--alpha",
            "0.5",
            "--min-client-size",
            "20",
            "--clients-per-file",
            "1",
            "--out",
            str(shards),
        ],
        timeout=60,
        name="partition",
    )
    assert r.returncode == 0, r.show()
    manifest = json.loads((shards / "manifest.json").read_text())
    placement = place_clients(manifest["declared_sizes"], 2)  # what every rank computes
    victim = placement[1][0]  # a client only rank 1 reads
    shard = shards / manifest["files"][victim]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])

    rc, out, err, seconds = run(
        mpi(2, train_cmd(tmp_path / "run", "--set", f"data.path={shards}")), timeout=FAIL_FAST_S, name="train"
    )
    assert rc != 0, err
    assert seconds < FAIL_FAST_S
    assert "rank 1/2" in err, err  # names the rank ...
    assert shard.name in err and ("truncated" in err or "corrupt" in err), err  # ... and the cause
    assert "rank 0/2" not in err, err  # rank 0 never read that shard
    assert "Traceback" not in err, err


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("launcher,victim", [("mpiexec", 1), ("torchrun", 0)], ids=["mpiexec-rank1", "torchrun-rank0"])
def test_sigkill_of_one_rank_ends_the_job(launch, tmp_path, launcher, victim):
    out = tmp_path / "run"
    # long enough to be still training when the rank is killed (the batched engine runs a tiny round in ~0.05 s)
    cmd = train_cmd(out, "--set", "train.rounds=2000")
    job = launch(mpi(2, cmd) if launcher == "mpiexec" else torchrun(2, cmd), name=launcher)
    # training is under way: round 2 logged (a round-1 checkpoint is pruned within two rounds: too short to poll for)
    wait_for(lambda: metric_rows(out) >= 2, 90, job, "round 2")
    ranks = rank_processes(job.pid, "PMI_RANK" if launcher == "mpiexec" else "RANK")
    assert sorted(ranks) == [0, 1], ranks
    t_kill = time.monotonic()
    os.kill(ranks[victim], signal.SIGKILL)
    r = job.wait(FAIL_FAST_S + 10)
    after = time.monotonic() - t_kill
    assert r.returncode != 0, r.show()
    assert after < FAIL_FAST_S, f"the job took {after:.1f} s to end after rank {victim} was killed"
    assert not (out / "results.json").exists()
    time.sleep(0.5)
    for rank, pid in ranks.items():  # no orphaned rank keeps running
        assert not process_running(pid), f"rank {rank} (pid {pid}) still alive after the job ended"


# ------------------------------------------------------------------------------- 4. signal + resume
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_checkpoints_collectively_and_resumes_on_one_process(launch, run, tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    job = launch(mpi(2, train_cmd(out, *RESUMABLE)), name="mpiexec")
    wait_for(lambda: metric_rows(out) >= 2, 90, job, "round 2")
    ranks = rank_processes(job.pid, "PMI_RANK")
    assert sorted(ranks) == [0, 1], ranks
    t_sig = time.monotonic()
    os.kill(job.pid, signal.SIGTERM)  # to mpiexec only: Hydra forwards it to every rank
    try:
        job.proc.wait(20)
    except subprocess.TimeoutExpired:  # an MPI that does not forward: signal the ranks as a scheduler would
        for pid in ranks.values():
            os.kill(pid, signal.SIGTERM)
    r = job.wait(FAIL_FAST_S)
    stop_s = time.monotonic() - t_sig
    assert r.returncode != 0, r.show()
    assert stop_s < FAIL_FAST_S
    assert "stopped by signal 15" in r.stderr and "--resume" in r.stderr, r.show()
    assert "Traceback" not in r.stderr, r.show()
    assert not (out / "results.json").exists()

    complete = sorted(p.parent for p in (out / "checkpoints").glob("round_*/COMPLETE"))
    rounds = [int(p.name.split("_")[1]) for p in complete]
    assert rounds[0] == 0 and len(rounds) == 2 and 2 <= rounds[1] < 40, rounds  # round 0 and the signal's
    last = complete[-1]
    # one shard per rank (its clients' stacked state), the shared state, the marker: no file per client
    assert sorted(p.name for p in last.iterdir()) == ["COMPLETE", "rank_00000.pt", "rank_00001.pt", "shared.pt"]
    held = sorted(
        i
        for r in range(2)
        for e in torch.load(last / f"rank_{r:05d}.pt", weights_only=True)["blocks"]
        for i in e["ids"].tolist()
    )
    assert held == list(range(4))

    # resume on ONE process (another world size), same overrides
    r = run(train_cmd(out, *RESUMABLE, "--resume"), timeout=120, name="resume")
    assert r.returncode == 0, r.show()
    # the same run, never interrupted
    r = run(train_cmd(ref, *RESUMABLE), timeout=120, name="reference")
    assert r.returncode == 0, r.show()

    got, want = results(out), results(ref)
    assert got["training"]["rounds"] == want["training"]["rounds"] == 40
    assert got["privacy"]["epsilon_spent"] == want["privacy"]["epsilon_spent"]
    assert got["privacy"]["steps"] == want["privacy"]["steps"]
    assert got["provenance"]["world_size"] == 1
    assert rel_diff(load_phi(ref), load_phi(out)) <= 1e-5
