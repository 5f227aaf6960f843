"""The Communicator collectives beyond the training all-reduce: allreduce_int64 (wraps modulo 2**64),
reduce / gather to a root, allgather, broadcast of float64 and int64.

(a) LocalCommunicator in process; (b) the MPI back-end under real `mpiexec -n 2` and `-n 3`;
(c) torch.distributed (gloo) under real `torchrun --nproc_per_node 2`. The multi-process tests run
tests/collectives_worker.py, which checks exact values on every rank (including int64 sums that
wrap: (2**63-1) + 5 == -(2**63) + 4) and exits non-zero on every rank if any check failed.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import free_port, launcher_free_env
from collectives_worker import I64_MAX, I64_MIN, int64_values, run_checks, wrap64
from hpc.comm import Communicator, LocalCommunicator

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "collectives_worker.py"
BIN = Path(sys.executable).parent
MPIEXEC, TORCHRUN = BIN / "mpiexec", BIN / "torchrun"

def clean_env(**extra: str) -> dict:
    return launcher_free_env(BIN, **extra)


def launch(cmd: list, timeout: float, **env: str) -> tuple[int, str, str]:
    """Run a launcher in its own session; on timeout kill the whole job and fail with its output."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=clean_env(**env), cwd=REPO, start_new_session=True)
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} did not exit within {timeout} s\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"{cmd[0]} took {time.monotonic() - t0:.1f} s")
    return proc.returncode, out, err


def ok_lines(out: str, n: int, backend: str) -> list[str]:
    """The worker's success lines: one per rank, every rank with the same (non-zero) number of checks."""
    # ranks share the launcher's stdout: lines may interleave, so match anywhere rather than per line
    found = sorted(re.findall(r"collectives ok rank (\d+)/(\d+) backend (\S+?) checks (\d+)", out))
    assert [(int(r), int(w)) for r, w, _, _ in found] == [(r, n) for r in range(n)], out
    assert {b for _, _, b, _ in found} == {backend}, out
    counts = {int(c) for _, _, _, c in found}
    assert len(counts) == 1 and counts.pop() >= 30, out
    return found


# ----------------------------------------------------------------------------- (a) in process
def test_int64_wrap_helper_is_twos_complement():
    assert wrap64(I64_MAX + 5) == I64_MIN + 4 == -(2**63) + 4
    assert wrap64(2 * I64_MIN) == 0
    assert wrap64(-7 + 3 * 10**18) == 3 * 10**18 - 7
    # what torch itself does with int64 addition (the semantics the back-ends must reproduce)
    assert int(torch.tensor(I64_MAX) + torch.tensor(5)) == wrap64(I64_MAX + 5)


def test_local_communicator_passes_every_worker_check():
    failures, count = run_checks(LocalCommunicator())
    assert failures == [] and count >= 25


def test_local_collectives_are_exact_identities():
    comm = LocalCommunicator()
    buf = torch.tensor(int64_values(0), dtype=torch.int64)
    want = buf.clone()
    assert comm.allreduce_int64(buf) is buf and torch.equal(buf, want)
    assert comm.reduce(buf, root=0, op="max") is buf and torch.equal(buf, want)

    g = comm.allgather(buf)
    assert g.shape == (1, 6) and g.dtype == torch.int64 and torch.equal(g[0], want)
    g[0, 0] = 1  # a new tensor, not a view of buf
    assert buf[0] == I64_MAX

    f = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    got = comm.gather(f, root=0)
    assert got.shape == (1, 1, 2) and got.dtype == torch.float64 and torch.equal(got[0], f)
    assert got.data_ptr() != f.data_ptr()


@pytest.mark.parametrize("call,needles", [
    (lambda c: c.allreduce_int64(torch.ones(2, dtype=torch.float64)), ["allreduce_int64", "buf", "torch.float64"]),
    (lambda c: c.allreduce_int64(torch.ones(2, dtype=torch.uint8)), ["buf", "torch.uint8"]),
    (lambda c: c.reduce(torch.ones(2, dtype=torch.float64), op="prod"), ["reduce", "op", "'prod'", "sum, max"]),
    (lambda c: c.reduce(torch.ones(2, dtype=torch.float16)), ["reduce", "buf", "torch.float16"]),
    (lambda c: c.reduce(torch.ones(2, dtype=torch.float64), root=1), ["reduce", "root", "[0, 1)", "1"]),
    (lambda c: c.allgather(torch.ones(2, dtype=torch.bool)), ["allgather", "buf", "torch.bool"]),
    (lambda c: c.gather(torch.ones(2, dtype=torch.int64), root=3), ["gather", "root", "3"]),
    (lambda c: c.gather(torch.ones(2, dtype=torch.int64), root=True), ["gather", "root", "True"]),
    (lambda c: c.allgather([1, 2]), ["allgather", "buf", "list"]),
], ids=["i64-float", "i64-uint8", "reduce-op", "reduce-dtype", "reduce-root", "allgather-dtype", "gather-root",
        "gather-root-bool", "allgather-list"])
def test_wrong_arguments_raise_value_error_naming_them(call, needles):
    with pytest.raises(ValueError) as exc:
        call(LocalCommunicator())
    for n in needles:
        assert n in str(exc.value), (n, str(exc.value))


def test_existing_allreduce_unchanged_on_local():
    comm = LocalCommunicator()
    buf = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert comm.allreduce(buf, op="sum") is buf and comm.allreduce(buf, op="max") is buf
    with pytest.raises(ValueError, match="unknown reduction 'min'"):
        comm.allreduce(buf, op="min")


class _Broken(LocalCommunicator):
    """Wrong results of the kinds a buggy back-end would give: the worker's checks must see them."""

    def allgather(self, buf):
        return torch.zeros((1, *buf.shape), dtype=buf.dtype)

    def reduce(self, buf, root=0, op="sum"):
        return buf.add_(1)

    def gather(self, buf, root=0):
        return None


def test_worker_checks_detect_wrong_results():
    failures, _ = run_checks(_Broken())
    text = "\n".join(failures)
    for what in ("allgather float64", "allgather int64", "reduce float64 sum root 0", "reduce int64 max root 0",
                 "gather float64 root 0", "gather int64 2-D root 0"):
        assert what + ":" in text, (what, text)
    assert not any(f.startswith(("allreduce_int64", "broadcast")) for f in failures), text


def test_interface_requires_the_new_collectives():
    class Partial(Communicator):  # only the pre-existing methods
        def allreduce(self, buf, op="sum"):
            return buf

        def broadcast(self, buf, root=0):
            return buf

        def barrier(self):
            return None

    with pytest.raises(TypeError, match="allgather"):
        Partial()


# ----------------------------------------------------------------------------- (b) mpiexec
needs_mpiexec = pytest.mark.skipif(not MPIEXEC.is_file(), reason=f"needs mpiexec in {BIN} (pip install mpich)")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"needs torchrun in {BIN}")


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_collectives_exact_including_int64_wraparound(n):
    rc, out, err = launch([MPIEXEC, "-n", n, sys.executable, WORKER], timeout=45)
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    assert "FAIL" not in out and "Traceback" not in err, f"{out}\n{err}"
    ok_lines(out, n, "mpi")


@pytest.mark.mpi
@needs_mpiexec
@pytest.mark.timeout(60)
def test_mpi_worker_fails_on_a_lossy_int64_sum():
    """The same job with allreduce_int64 replaced by a float64 detour must fail, on every rank, quickly."""
    rc, out, err = launch([MPIEXEC, "-n", 2, sys.executable, WORKER], timeout=45, COLLECTIVES_WORKER_SABOTAGE="1")
    assert rc != 0, out
    for r in (0, 1):
        assert f"FAIL rank {r}: allreduce_int64 (2**63-1)+5: got -9223372036854775808, want -9223372036854775804" in out, out
    assert "collectives ok" not in out, out
    assert "FAIL rank 0: allgather" not in out and "FAIL rank 0: reduce" not in out, out  # only what was broken


# ----------------------------------------------------------------------------- (c) torchrun, gloo
@pytest.mark.mpi
@needs_torchrun
@pytest.mark.timeout(90)
def test_torch_gloo_collectives_exact_including_int64_wraparound():
    cmd = [TORCHRUN, "--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", free_port(), WORKER]
    rc, out, err = launch(cmd, timeout=75)
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    assert "FAIL" not in out and "Traceback" not in err, f"{out}\n{err}"
    ok_lines(out, 2, "torch-gloo")
