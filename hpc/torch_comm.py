"""torch.distributed back-end: gloo on CPU, NCCL on GPU.

RANK / WORLD_SIZE come from the launcher (torchrun sets them; under mpiexec or srun they are
derived from the MPI/SLURM variables). MASTER_ADDR defaults to 127.0.0.1, or the first host of
SLURM_JOB_NODELIST; MASTER_PORT is derived from the SLURM job id so that array tasks sharing a
node do not collide.
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
    job = os.environ.get("SLURM_ARRAY_JOB_ID", "") + "_" + os.environ.get("SLURM_ARRAY_TASK_ID", "") + os.environ.get("SLURM_JOB_ID", "")
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
        if not dist.is_initialized():
            # a finite collective timeout: a dead peer ends the job instead of hanging it for 30 min
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = info.local_rank
        self.backend = "torch-" + self.backend

    def allreduce(self, buf: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in _OPS:
            raise ValueError(f"unknown reduction {op!r}; valid: {', '.join(_OPS)}")
        if self.world_size == 1:
            return buf
        t = buf if buf.device == self.device else buf.to(self.device)
        dist.all_reduce(t, op=_OPS[op])
        if t is not buf:
            buf.copy_(t)
        return buf

    def broadcast(self, buf: torch.Tensor, root: int = 0) -> torch.Tensor:
        t = buf if buf.device == self.device else buf.to(self.device)
        dist.broadcast(t, src=root)
        if t is not buf:
            buf.copy_(t)
        return buf

    def barrier(self) -> None:
        dist.barrier()

    def abort(self, code: int = 1) -> None:
        # no collective abort in gloo: exiting non-zero makes torchrun's agent stop the other workers,
        # and peers blocked in a collective fail at the timeout set above
        os._exit(code)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
