"""mpi4py back-end: buffer collectives (Allreduce, Reduce, Allgather, Gather, Bcast) on flat host arrays.

mpi4py is imported only here (and only when this back-end is chosen), so single-process runs
never initialize MPI. GPU tensors are copied to the host (PyPI MPI builds are not CUDA-aware) and
results copied back to the tensor's device.

int64 sums (allreduce_int64, reduce with op "sum") are reduced as MPI_UINT64_T on a uint64 view of
the same bytes: unsigned overflow is defined modulo 2**64, and two's-complement addition is the same
bit operation, so the wrap-around is exact by the standard (MPI_INT64_T overflow is undefined).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from .comm import Communicator


def _host(buf: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with buf's values: buf itself when it already is one."""
    host = buf if buf.device.type == "cpu" else buf.cpu()
    return host.contiguous()


class MPICommunicator(Communicator):
    backend = "mpi"

    def __init__(self, local_rank: int = 0):
        from mpi4py import MPI  # noqa: PLC0415 - deliberate lazy import

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.local_rank = local_rank
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX}
        self._types = {torch.float64: MPI.DOUBLE, torch.int64: MPI.INT64_T}

    def _spec(self, host: torch.Tensor, op: str | None = None) -> list:
        """[flat numpy view, MPI datatype] of a contiguous host tensor; an int64 sum goes as uint64."""
        flat = host.numpy().reshape(-1)
        if host.dtype == torch.int64 and op == "sum":
            return [flat.view(np.uint64), self.MPI.UINT64_T]
        return [flat, self._types[host.dtype]]

    # hooks of Communicator's collectives: world_size > 1, arguments already checked
    def _allreduce(self, buf: torch.Tensor, op: str) -> torch.Tensor:
        host = buf if buf.device.type == "cpu" else buf.cpu()  # host copy: PyPI MPI is not CUDA-aware
        host = host.contiguous()
        self.comm.Allreduce(self.MPI.IN_PLACE, host.numpy(), op=self._ops[op])
        if host is not buf:
            buf.copy_(host)
        return buf

    def _allreduce_int64(self, buf: torch.Tensor) -> torch.Tensor:
        host = _host(buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, self._spec(host, "sum"), op=self.MPI.SUM)
        if host is not buf:
            buf.copy_(host)
        return buf

    def _reduce(self, buf: torch.Tensor, root: int, op: str) -> torch.Tensor:
        host = _host(buf)
        if self.rank == root:
            self.comm.Reduce(self.MPI.IN_PLACE, self._spec(host, op), op=self._ops[op], root=root)
            if host is not buf:
                buf.copy_(host)
        else:  # MPI only reads a non-root send buffer: buf stays as it was
            self.comm.Reduce(self._spec(host, op), None, op=self._ops[op], root=root)
        return buf

    def _allgather(self, buf: torch.Tensor) -> torch.Tensor:
        host = _host(buf)
        out = torch.empty((self.world_size, *buf.shape), dtype=buf.dtype)
        self.comm.Allgather(self._spec(host), self._spec(out))
        return out.to(buf.device)

    def _gather(self, buf: torch.Tensor, root: int) -> torch.Tensor | None:
        host = _host(buf)
        if self.rank != root:
            self.comm.Gather(self._spec(host), None, root=root)
            return None
        out = torch.empty((self.world_size, *buf.shape), dtype=buf.dtype)
        self.comm.Gather(self._spec(host), self._spec(out), root=root)
        return out.to(buf.device)

    def _broadcast(self, buf: torch.Tensor, root: int) -> torch.Tensor:
        host = buf.cpu().contiguous()
        self.comm.Bcast(host.numpy(), root=root)
        if host.data_ptr() != buf.data_ptr():
            buf.copy_(host)
        return buf

    def barrier(self) -> None:
        self.comm.Barrier()

    # MPI_Abort races the launcher's output forwarding: Hydra's proxy may act on the abort before it
    # has passed on what this rank just wrote to stderr, and the job then ends with its message lost
    # (seen once in CI). A short pause after the flush lets the proxy forward it first.
    ABORT_GRACE_S = 1.0

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(self.ABORT_GRACE_S)
        self.comm.Abort(code)

    def close(self) -> None:
        """Finalize MPI (collective: every rank calls it). Ending MPI before a job step is torn down
        matters under SLURM: a step killed while MPI is up leaves MPICH's shared-memory segment behind,
        and a requeued job (same job and step id) then fails in MPI_Init."""
        if not self.MPI.Is_finalized():
            self.MPI.Finalize()
