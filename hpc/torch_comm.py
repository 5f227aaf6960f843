"""torch.distributed back-end: gloo on CPU, NCCL on GPU.

RANK / WORLD_SIZE come from the launcher (torchrun sets them; under mpiexec or srun they are
derived from the MPI/SLURM variables). MASTER_ADDR defaults to 127.0.0.1, or the first host of
SLURM_JOB_NODELIST; MASTER_PORT is derived from the SLURM job id so that array tasks sharing a
node do not collide.

Tensors are moved to the communicator's device (CPU for gloo, the rank's GPU for NCCL) and results
returned on the input's device. int64 sums use torch's int64 SUM, which both gloo and NCCL compute
with C integer addition: it wraps modulo 2**64 in practice (tested on gloo with values near 2**63;
the NCCL paths are written for NCCL -- device tensors, all_gather instead of gather -- but have not
been run on a GPU here).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import zlib

import torch
import torch.distributed as dist

from .comm import Communicator
from .launcher import LaunchInfo

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def _first_slurm_host() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        hosts = out.stdout.split()
        return hosts[0] if hosts else None
    except (OSError, subprocess.SubprocessError):
        return None


def default_port() -> int:
    job = (
        os.environ.get("SLURM_ARRAY_JOB_ID", "")
        + "_"
        + os.environ.get("SLURM_ARRAY_TASK_ID", "")
        + os.environ.get("SLURM_JOB_ID", "")
    )
    if job.strip("_"):
        return 20000 + zlib.crc32(job.encode()) % 20000
    return 29500


class TorchCommunicator(Communicator):
    def __init__(self, info: LaunchInfo, *, device: torch.device, timeout_s: float = 600.0):
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host() or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(default_port()))
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.timeout_s = float(timeout_s)  # the rendezvous's and, outside a run's steps, every collective's
        if not dist.is_initialized():
            # a finite collective timeout: a dead peer ends the job instead of hanging it for 30 min
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = info.local_rank
        self.backend = "torch-" + self.backend

    def _on_device(self, buf: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor on the communicator's device with buf's values: buf itself if it is one."""
        t = buf if buf.device == self.device else buf.to(self.device)
        return t.contiguous()

    # hooks of Communicator's collectives: world_size > 1, arguments already checked
    def _allreduce(self, buf: torch.Tensor, op: str) -> torch.Tensor:
        t = buf if buf.device == self.device else buf.to(self.device)
        dist.all_reduce(t, op=_OPS[op])
        if t is not buf:
            buf.copy_(t)
        return buf

    def _allreduce_int64(self, buf: torch.Tensor) -> torch.Tensor:
        t = self._on_device(buf)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if t is not buf:
            buf.copy_(t)
        return buf

    def _reduce(self, buf: torch.Tensor, root: int, op: str) -> torch.Tensor:
        t = self._on_device(buf)
        if self.rank != root and t is buf:
            t = buf.clone()  # gloo and NCCL may use a non-root input as scratch: keep buf unchanged
        dist.reduce(t, dst=root, op=_OPS[op])
        if self.rank == root and t is not buf:
            buf.copy_(t)
        return buf

    def _allgather(self, buf: torch.Tensor) -> torch.Tensor:
        t = self._on_device(buf)
        out = torch.empty((self.world_size, *buf.shape), dtype=buf.dtype, device=self.device)
        # all_gather into the rows of one tensor (views): works on gloo and on every NCCL version
        dist.all_gather(list(out.unbind(0)), t)
        return out.to(buf.device)

    def _gather(self, buf: torch.Tensor, root: int) -> torch.Tensor | None:
        # dist.gather on NCCL too (point-to-point underneath): an all_gather would hand every rank every
        # buffer, against "root only" (secure aggregation's peers must not see each other's vectors).
        # Untested on NCCL: the development machine has no GPU.
        t = self._on_device(buf)
        if self.rank != root:
            dist.gather(t, None, dst=root)
            return None
        out = torch.empty((self.world_size, *buf.shape), dtype=buf.dtype, device=self.device)
        dist.gather(t, list(out.unbind(0)), dst=root)
        return out.to(buf.device)

    def _broadcast(self, buf: torch.Tensor, root: int) -> torch.Tensor:
        t = buf if buf.device == self.device else buf.to(self.device)
        dist.broadcast(t, src=root)
        if t is not buf:
            buf.copy_(t)
        return buf

    def barrier(self) -> None:
        dist.barrier()

    def set_timeout(self, seconds: float | None) -> None:
        """The default group's collective timeout from now on (None: the one it was built with). A run sets its
        step timeout while its steps run and puts the long one back around set-up and rank 0's own work (the
        other ranks wait for it in a barrier). gloo applies it to every later collective, barriers included."""
        if not dist.is_initialized():
            return
        t = datetime.timedelta(seconds=self.timeout_s if seconds is None else float(seconds))
        # torch.distributed.set_timeout where torch has it (newer releases; it supersedes the private _set_pg_timeout,
        # used with torch 2.13); neither: the group keeps the timeout it was built with, and the step watchdog
        # alone bounds a stuck step
        setter = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if setter is not None:
            setter(t)

    def abort(self, code: int = 1) -> None:
        # no collective abort in gloo: exiting non-zero makes torchrun's agent stop the other workers,
        # and peers blocked in a collective fail at the timeout set above
        os._exit(code)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
