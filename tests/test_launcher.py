"""Launcher detection, the world-of-one guard, and client placement.

`detect_launcher` is fed each launcher's real variables (as documented by Open MPI, MPICH's
Hydra, torchrun and SLURM); the world-of-one guard runs in a real subprocess with the
variables srun sets when the MPI library cannot talk to it (no PMI).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedhypevae.hpc.launcher import LaunchInfo, detect_launcher, expected_world_size
from fedhypevae.hpc.placement import PlacementError, place_clients
from helpers import launcher_free_env

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict:
    return launcher_free_env(**extra)


# ------------------------------------------------------------------------------- detect_launcher
SBATCH_SCRIPT = {
    "SLURM_JOB_ID": "77",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_NODELIST": "node01",
}  # a batch script's own environment
SRUN_STEP = {
    **SBATCH_SCRIPT,
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
}

CASES = {
    "nothing": ({}, LaunchInfo("none", 0, 1, 0)),
    "openmpi": (
        {
            "OMPI_COMM_WORLD_RANK": "3",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "PMIX_RANK": "3",
        },
        LaunchInfo("openmpi", 3, 4, 1),
    ),
    "mpich-hydra": (
        {
            "PMI_RANK": "2",
            "PMI_SIZE": "3",
            "MPI_LOCALRANKID": "2",
            "MPI_LOCALNRANKS": "3",
            "PMI_FD": "5",
            "PMI_PORT": "vm:4000",
        },
        LaunchInfo("mpich", 2, 3, 2),
    ),
    "torchrun": (
        {
            "TORCHELASTIC_RUN_ID": "none",
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
        },
        LaunchInfo("torchrun", 1, 2, 1),
    ),
    "srun-no-pmi": (SRUN_STEP, LaunchInfo("srun", 1, 2, 1)),  # step size wins over the job's SLURM_NTASKS
    "srun-pmi2": ({**SRUN_STEP, "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "7"}, LaunchInfo("srun", 1, 2, 1)),
    "srun-pmix": ({**SRUN_STEP, "PMIX_RANK": "1"}, LaunchInfo("srun", 1, 2, 1)),
    # mpiexec (Hydra) in an sbatch script starts its proxies with srun: one proxy step per node
    "mpiexec-inside-sbatch": (
        {
            **SRUN_STEP,
            "SLURM_STEP_NUM_TASKS": "1",
            "SLURM_PROCID": "0",
            "PMI_RANK": "3",
            "PMI_SIZE": "4",
            "PMI_FD": "7",
            "MPI_LOCALRANKID": "3",
        },
        LaunchInfo("mpich", 3, 4, 3),
    ),
    "sbatch-without-srun": (SBATCH_SCRIPT, LaunchInfo("none", 0, 1, 0)),
    "torchrun-inside-srun": (
        {
            **SRUN_STEP,
            "SLURM_STEP_NUM_TASKS": "1",
            "SLURM_PROCID": "0",
            "TORCHELASTIC_RUN_ID": "j",
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "3",
        },
        LaunchInfo("torchrun", 3, 4, 3),
    ),
    "openmpi-inside-sbatch": (
        {**SBATCH_SCRIPT, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
        LaunchInfo("openmpi", 1, 2, 1),
    ),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", list(CASES))
def test_detect_launcher(name):
    env, want = CASES[name]
    got = detect_launcher(env)
    assert got == want
    assert got.distributed == (want.world_size > 1)


@pytest.mark.timeout(10)
def test_detect_launcher_reads_os_environ_by_default(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    assert detect_launcher() == LaunchInfo("mpich", 1, 2, 0)


@pytest.mark.timeout(10)
def test_expected_world_size_only_inside_a_slurm_step():
    assert expected_world_size(SRUN_STEP) == 2
    assert expected_world_size(SBATCH_SCRIPT) is None  # a batch script is not a step of N tasks
    assert expected_world_size({"PMI_RANK": "0", "PMI_SIZE": "4"}) is None
    assert expected_world_size({}) is None


# ------------------------------------------------------------------------------- world of one
SRUN_WITHOUT_PMI = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.mpi
@pytest.mark.timeout(90)
def test_world_of_one_under_srun_is_refused_by_make_communicator():
    """srun started 2 tasks but MPI (no PMI variables) sees a world of 1: refuse, don't run 2 copies."""
    r = subprocess.run(
        [sys.executable, "-c", "from fedhypevae.hpc.backend import make_communicator; make_communicator('mpi')"],
        env=clean_env(**SRUN_WITHOUT_PMI),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0, r.stdout + r.stderr
    assert "BackendError" in r.stderr
    assert "world of 1" in r.stderr and "--mpi=pmix" in r.stderr, r.stderr


@pytest.mark.mpi
@pytest.mark.timeout(90)
def test_world_of_one_under_srun_is_a_one_line_cli_error(tmp_path):
    exe = Path(sys.executable).parent / "fedhypevae"
    if not exe.is_file():
        pytest.skip(f"no console script at {exe}")
    r = subprocess.run(
        [str(exe), "train", "--config", "tiny", "--no-progress", "--quiet", "--out", str(tmp_path / "run")],
        env=clean_env(**SRUN_WITHOUT_PMI),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "world of 1" in r.stderr and "--mpi=pmix" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


# ------------------------------------------------------------------------------- placement
def _check_placement(sizes: list[int], world: int, placement: list[list[int]]) -> None:
    assert len(placement) == world
    flat = sorted(itertools.chain.from_iterable(placement))
    assert flat == list(range(len(sizes))), "every client placed exactly once"
    assert all(placement), "every rank hosts at least one client"
    loads = [sum(sizes[c] for c in p) for p in placement]
    assert max(loads) - min(loads) <= max(sizes), (loads, sizes)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(6))
def test_place_clients_balances_and_places_every_client_once(seed):
    rng = np.random.default_rng(seed)
    for world in (1, 2, 3, 4, 7, 16):
        for m in (world, world + 1, 3 * world + 2, 50):
            if m < world:
                continue
            sizes = [int(s) for s in rng.integers(10, 2000, size=m)]
            if seed % 2:  # heavy-tailed (Dirichlet-like) sizes
                sizes = [int(s) for s in (rng.pareto(1.2, size=m) * 100 + 10)]
            p = place_clients(sizes, world)
            _check_placement(sizes, world, p)
            assert place_clients(list(sizes), world) == p, "deterministic: every rank computes the same map"


@pytest.mark.timeout(10)
def test_place_clients_examples():
    assert place_clients([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]  # ties broken by client id, then rank
    assert place_clients([100, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert place_clients([3, 2, 1], 1) == [[0, 1, 2]]
    assert place_clients([1, 1, 1], 3) == [[0], [1], [2]]


@pytest.mark.timeout(10)
def test_fewer_clients_than_ranks_raises():
    with pytest.raises(PlacementError, match="ranks"):
        place_clients([10, 20], 3)
    with pytest.raises(PlacementError):
        place_clients([10, 20], 0)
    assert issubclass(PlacementError, ValueError)
