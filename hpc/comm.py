"""The Communicator interface every back-end implements, and the single-process one.

Training talks only to this interface, so MPI and torch.distributed back-ends are drop-ins.
Collectives take one flat float64 buffer (noisy gradients, weights and metric sums together):
one all-reduce per step, and fp64 sums keep results nearly independent of the world size.
"""
from __future__ import annotations

import abc

import torch


class Communicator(abc.ABC):
    """rank/world_size plus the few collectives training needs."""

    backend: str = "abstract"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def allreduce(self, buf: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `buf` in place across ranks (op: sum or max) and return it."""

    @abc.abstractmethod
    def broadcast(self, buf: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite `buf` on every rank with root's copy."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (a failing rank must not leave the others hanging)."""
        raise SystemExit(code)

    def close(self) -> None:
        """Release the back-end's resources."""

    def describe(self) -> dict:
        return {"backend": self.backend, "rank": self.rank, "world_size": self.world_size}


class LocalCommunicator(Communicator):
    """One process hosting every client: collectives are identities."""

    backend = "local"

    def allreduce(self, buf: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in ("sum", "max"):
            raise ValueError(f"unknown reduction {op!r}; valid: sum, max")
        return buf

    def broadcast(self, buf: torch.Tensor, root: int = 0) -> torch.Tensor:
        return buf

    def barrier(self) -> None:
        return None
