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
import torch
from helpers import launcher_free_env, load_phi, rel_diff

from fedhypevae.privacy.ledger import read_client_releases
from fedhypevae.slurm.sbatch import render

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
TINY = ["--config", "tiny", "--no-progress", "--set", "partition.clients=7"]


def sh(cmd, env, timeout=120, check=True):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def wait_for(pred, timeout, what, on_fail=lambda: ""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return time.time() - t0
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_fail()}")


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
    took = time.time() - t0
    moved = {n: b - before[n] for n, b in link_bytes().items()}
    ranks = placement(out)
    print(f"{backend}: 6 ranks on 3 nodes in {took:.1f} s; bytes through each node's link {moved}")
    print("placement:", [(r["rank"], r["host"], r["local_rank"]) for r in ranks])
    assert [(r["host"], r["local_rank"]) for r in ranks] == [(n, i) for n in NODES for i in (0, 1)]
    res = json.loads((out / "results.json").read_text())
    assert res["provenance"]["world_size"] == 6
    assert res["provenance"]["backend"] == ("mpi" if backend == "mpi" else "torch-gloo")
    # every step's all-reduce carries Phi (float64): each node must send or receive at least about Phi per step
    steps = res["privacy"]["steps"]
    assert all(b >= steps * phi_bytes(out) / 2 for b in moved.values()), (moved, steps, phi_bytes(out))
    diff = rel_diff(load_phi(ref), load_phi(out))
    print(f"max relative difference to the one-process hypernetwork: {diff:.2e}")
    assert diff < 1e-5
