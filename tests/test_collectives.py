"""The Communicator collectives beyond the training all-reduce: allreduce_int64 (wraps modulo 2**64),
reduce / gather to a root, allgather, broadcast of float64 and int64.

(a) LocalCommunicator in process; (b) the MPI back-end under real `mpiexec -n 2` and `-n 3`;
(c) torch.distributed (gloo) under real `torchrun --nproc_per_node 2`. The multi-process tests run
tests/collectives_worker.py, which checks exact values on every rank (including int64 sums that
wrap: (2**63-1) + 5 == -(2**63) + 4) and exits non-zero on every rank if any check failed.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch
from collectives_worker import I64_MAX, I64_MIN, int64_values, run_checks, wrap64
from fedhypevae.hpc.comm import Communicator, LocalCommunicator
from helpers import free_port, launcher_free_env, run_job

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "collectives_worker.py"
BIN = Path(sys.executable).parent
MPIEXEC, TORCHRUN = BIN / "mpiexec", BIN / "torchrun"


def clean_env(**extra: str) -> dict:
    return launcher_free_env(BIN, **extra)


def launch(cmd: list, timeout: float, **env: str) -> tuple[int, str, str]:
    """Run a launcher in its own session; on timeout kill the whole job and fail with its output."""
    t0 = time.monotonic()
    rc, out, err = run_job(cmd, timeout, clean_env(**env))
    print(f"{cmd[0]} took {time.monotonic() - t0:.1f} s")
    return rc, out, err


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


@pytest.mark.parametrize(
    "call,needles",
    [
        (lambda c: c.allreduce_int64(torch.ones(2, dtype=torch.float64)), ["allreduce_int64", "buf", "torch.float64"]),
        (lambda c: c.allreduce_int64(torch.ones(2, dtype=torch.uint8)), ["buf", "torch.uint8"]),
        (lambda c: c.reduce(torch.ones(2, dtype=torch.float64), op="prod"), ["reduce", "op", "'prod'", "sum, max"]),
        (lambda c: c.reduce(torch.ones(2, dtype=torch.float16)), ["reduce", "buf", "torch.float16"]),
        (lambda c: c.reduce(torch.ones(2, dtype=torch.float64), root=1), ["reduce", "root", "[0, 1)", "1"]),
        (lambda c: c.allgather(torch.ones(2, dtype=torch.bool)), ["allgather", "buf", "torch.bool"]),
        (lambda c: c.gather(torch.ones(2, dtype=torch.int64), root=3), ["gather", "root", "3"]),
        (lambda c: c.gather(torch.ones(2, dtype=torch.int64), root=True), ["gather", "root", "True"]),
        (lambda c: c.allgather([1, 2]), ["allgather", "buf", "list"]),
    ],
    ids=[
        "i64-float",
        "i64-uint8",
        "reduce-op",
        "reduce-dtype",
        "reduce-root",
        "allgather-dtype",
        "gather-root",
        "gather-root-bool",
        "allgather-list",
    ],
)
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
    for what in (
        "allgather float64",
        "allgather int64",
        "reduce float64 sum root 0",
        "reduce int64 max root 0",
        "gather float64 root 0",
        "gather int64 2-D root 0",
    ):
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


class _Hooked(Communicator):
    """A new back-end written against the hooks only: each hook records its call and communicates nothing."""

    backend = "hooked"

    def __init__(self, world_size: int, rank: int = 0):
        self.world_size, self.rank = world_size, rank
        self.calls = []

    def _allreduce(self, buf, op):
        self.calls.append(("allreduce", op))
        return buf

    def _allreduce_int64(self, buf):
        self.calls.append(("allreduce_int64",))
        return buf

    def _reduce(self, buf, root, op):
        self.calls.append(("reduce", root, op))
        return buf

    def _allgather(self, buf):
        self.calls.append(("allgather",))
        return torch.stack([buf] * self.world_size)

    def _gather(self, buf, root):
        self.calls.append(("gather", root))
        return torch.stack([buf] * self.world_size) if self.rank == root else None

    def _broadcast(self, buf, root):
        self.calls.append(("broadcast", root))
        return buf

    def barrier(self):
        self.calls.append(("barrier",))


@pytest.mark.parametrize(
    "call,needles",
    [
        (lambda c: c.allreduce(torch.ones(2, dtype=torch.float64), op="min"), ["unknown reduction 'min'", "sum, max"]),
        (lambda c: c.allreduce_int64(torch.ones(2, dtype=torch.float64)), ["allreduce_int64", "buf", "torch.float64"]),
        (lambda c: c.allreduce_int64([1, 2]), ["allreduce_int64", "buf", "list"]),
        (lambda c: c.reduce(torch.ones(2, dtype=torch.float64), op="prod"), ["reduce", "op", "'prod'"]),
        (lambda c: c.reduce(torch.ones(2, dtype=torch.float32)), ["reduce", "buf", "torch.float32"]),
        (lambda c: c.reduce(torch.ones(2, dtype=torch.int64), root=3), ["reduce", "root", "[0, 3)", "3"]),
        (lambda c: c.allgather(torch.ones(2, dtype=torch.bool)), ["allgather", "buf", "torch.bool"]),
        (lambda c: c.gather(torch.ones(2, dtype=torch.float16)), ["gather", "buf", "torch.float16"]),
        (lambda c: c.gather(torch.ones(2, dtype=torch.int64), root=-1), ["gather", "root", "-1"]),
        (lambda c: c.gather(torch.ones(2, dtype=torch.int64), root=True), ["gather", "root", "True"]),
        (lambda c: c.broadcast(torch.ones(2, dtype=torch.float64), root=3), ["broadcast", "root", "[0, 3)", "3"]),
    ],
    ids=[
        "allreduce-op",
        "i64-float",
        "i64-list",
        "reduce-op",
        "reduce-dtype",
        "reduce-root",
        "allgather-dtype",
        "gather-dtype",
        "gather-root",
        "gather-root-bool",
        "broadcast-root",
    ],
)
@pytest.mark.parametrize("world_size", [1, 3])
def test_a_new_backend_gets_the_argument_checks_before_any_hook(call, needles, world_size):
    comm = _Hooked(world_size)
    if world_size == 1 and "[0, 3)" in needles:
        needles = [n.replace("3)", "1)") for n in needles]
    with pytest.raises(ValueError) as exc:
        call(comm)
    for n in needles:
        assert n in str(exc.value), (n, str(exc.value))
    assert comm.calls == []


def test_a_new_backend_gets_the_one_rank_answers_without_a_hook():
    comm = _Hooked(world_size=1)
    f = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    i = torch.tensor([I64_MAX, I64_MIN], dtype=torch.int64)
    assert comm.allreduce(f, op="max") is f and comm.allreduce(f) is f
    assert comm.allreduce(torch.ones(2, dtype=torch.float32)).dtype == torch.float32  # dtype not checked
    assert comm.allreduce_int64(i) is i and comm.reduce(i, root=0, op="sum") is i and comm.broadcast(f) is f
    for got, buf in ((comm.allgather(i), i), (comm.gather(f, root=0), f), (comm.allgather(f[:, 1]), f[:, 1])):
        assert got.shape == (1, *buf.shape) and got.dtype == buf.dtype and torch.equal(got[0], buf)
        assert got.is_contiguous() and got.data_ptr() != buf.data_ptr()
    assert torch.equal(i, torch.tensor([I64_MAX, I64_MIN]))  # the inputs are left alone
    assert torch.equal(f, torch.tensor([[1.5, -2.0]], dtype=torch.float64))
    assert comm.calls == []


def test_a_new_backend_hooks_get_every_multi_rank_call_with_its_arguments():
    f, i = torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.int64)
    comm = _Hooked(world_size=2, rank=1)
    assert comm.allreduce(f) is f and comm.allreduce(f, op="max") is f
    comm.allreduce(torch.ones(2, dtype=torch.float32))  # allreduce: dtype not checked, as before
    assert comm.allreduce_int64(i) is i
    assert comm.reduce(i) is i and comm.reduce(f, root=1, op="max") is f
    assert comm.allgather(f).shape == (2, 2)
    assert comm.gather(i) is None and comm.gather(i, root=1).shape == (2, 2)
    assert comm.broadcast(f) is f and comm.broadcast(i, root=1) is i
    assert comm.calls == [
        ("allreduce", "sum"),
        ("allreduce", "max"),
        ("allreduce", "sum"),
        ("allreduce_int64",),
        ("reduce", 0, "sum"),
        ("reduce", 1, "max"),
        ("allgather",),
        ("gather", 0),
        ("gather", 1),
        ("broadcast", 0),
        ("broadcast", 1),
    ]


def test_backends_implement_only_the_hooks():
    """The checks and one-rank answers live in Communicator alone: no back-end overrides a collective."""
    from fedhypevae.hpc.mpi_comm import MPICommunicator  # mpi4py is imported only when one is constructed
    from fedhypevae.hpc.torch_comm import TorchCommunicator

    for cls in (LocalCommunicator, MPICommunicator, TorchCommunicator):
        for name in ("allreduce", "allreduce_int64", "reduce", "allgather", "gather", "broadcast"):
            assert getattr(cls, name) is getattr(Communicator, name), (cls.__name__, name)
            assert "_" + name in vars(cls), (cls.__name__, name)


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
        assert (
            f"FAIL rank {r}: allreduce_int64 (2**63-1)+5: got -9223372036854775808, want -9223372036854775804" in out
        ), out
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
