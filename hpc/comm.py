"""The Communicator interface every back-end implements, and the single-process one.

Training talks only to this interface, so MPI and torch.distributed back-ends are drop-ins.
Collectives take one flat float64 buffer (noisy gradients, weights and metric sums together):
one all-reduce per step, and fp64 sums keep results nearly independent of the world size.

Collectives (every rank must call each one, in the same order, with the same shape and dtype;
a shape mismatch between ranks is not detected and its outcome is back-end defined):

  allreduce(buf, op)        in place, every rank gets the result; op "sum" | "max" (the trainer's
                            float64 step buffer; dtype not checked, behaviour as before)
  allreduce_int64(buf)      in place, int64 only: sum that wraps around modulo 2**64 (two's
                            complement), exact by design on every back-end -- what masked secure
                            aggregation needs (masks cancel modulo 2**64)
  reduce(buf, root, op)     in place on root; other ranks' `buf` is left unchanged
  allgather(buf)            new tensor (world_size, *buf.shape), row r = rank r's buf, on every rank
  gather(buf, root)         the same tensor on root, None on every other rank
  broadcast(buf, root)      in place: every rank gets root's copy (any dtype)

The new collectives (allreduce_int64, reduce, allgather, gather) accept float64 and int64
tensors (`COLLECTIVE_DTYPES`); in reduce, an int64 "sum" wraps modulo 2**64 like allreduce_int64.
A wrong dtype, op or root raises ValueError naming the argument, before any communication, so a
mistake made on every rank fails on every rank instead of hanging the job (broadcast checks its
root the same way). Results keep the input's dtype and device.

`Communicator` holds these checks and the one-rank answers once, for every back-end: its public
collectives validate, answer world_size == 1 themselves, and otherwise call the back-end's hook
(`_allreduce`, `_allreduce_int64`, `_reduce`, `_allgather`, `_gather`, `_broadcast`).
"""

from __future__ import annotations

import abc

import torch

OPS = ("sum", "max")
COLLECTIVE_DTYPES = (torch.float64, torch.int64)


def check_op(method: str, op: str) -> None:
    if op not in OPS:
        raise ValueError(f"{method}: op must be one of {', '.join(OPS)}; got {op!r}")


def check_dtype(method: str, buf: torch.Tensor, allowed=COLLECTIVE_DTYPES) -> None:
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"{method}: buf must be a torch.Tensor; got {type(buf).__name__}")
    if buf.dtype not in allowed:
        raise ValueError(f"{method}: buf must have dtype {' or '.join(str(d) for d in allowed)}; got {buf.dtype}")


def check_root(method: str, root: int, world_size: int) -> None:
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < world_size:
        raise ValueError(f"{method}: root must be a rank in [0, {world_size}); got {root!r}")


NAME_BYTES = 64


def encode_name(name: str) -> torch.Tensor:
    """A short public string (a host name) as a fixed-width int64 tensor, for `allgather`: UTF-8 bytes, zero-padded,
    cut at NAME_BYTES."""
    raw = name.encode()[:NAME_BYTES]
    return torch.tensor(list(raw) + [0] * (NAME_BYTES - len(raw)), dtype=torch.int64)


def decode_name(row: torch.Tensor) -> str:
    """The string `encode_name` wrote into `row`."""
    return bytes(int(b) for b in row.tolist() if b).decode(errors="replace")


def one_rank_stack(buf: torch.Tensor) -> torch.Tensor:
    """What allgather (and gather, on root) return on one rank: a new (1, *buf.shape) tensor."""
    return buf.unsqueeze(0).clone(memory_format=torch.contiguous_format)


class Communicator(abc.ABC):
    """rank/world_size plus the few collectives training (and secure aggregation) needs.

    See the module docstring for the semantics every back-end provides. The public collectives are
    template methods: they check their arguments (ValueError before any communication, so on every
    rank alike), answer a one-rank world themselves, and only then call the back-end's hook
    (`_allreduce`, `_allreduce_int64`, `_reduce`, `_allgather`, `_gather`, `_broadcast`). A back-end
    implements the hooks (plus `barrier`) for world_size > 1, with arguments already checked."""

    backend: str = "abstract"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- collectives (template methods)
    def allreduce(self, buf: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `buf` in place across ranks (op: sum or max) and return it. For an int64 sum
        that must wrap around modulo 2**64 by design, use `allreduce_int64`."""
        if op not in OPS:  # the historical message; the dtype is not checked here
            raise ValueError(f"unknown reduction {op!r}; valid: {', '.join(OPS)}")
        if self.world_size == 1:
            return buf
        return self._allreduce(buf, op)

    def allreduce_int64(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum the int64 tensor `buf` in place across ranks, modulo 2**64 (two's complement
        wrap-around: (2**63-1) + 5 == -2**63 + 4), and return it. ValueError unless int64."""
        check_dtype("allreduce_int64", buf, (torch.int64,))
        if self.world_size == 1:
            return buf
        return self._allreduce_int64(buf)

    def reduce(self, buf: torch.Tensor, root: int = 0, op: str = "sum") -> torch.Tensor:
        """Reduce `buf` (float64 or int64; op sum or max) onto `root`, in place there, and return it.
        Only root's result is the reduction; on every other rank `buf` is returned unchanged.
        An int64 sum wraps modulo 2**64."""
        check_op("reduce", op)
        check_dtype("reduce", buf)
        check_root("reduce", root, self.world_size)
        if self.world_size == 1:
            return buf
        return self._reduce(buf, root, op)

    def allgather(self, buf: torch.Tensor) -> torch.Tensor:
        """Every rank's same-shape `buf` (float64 or int64), stacked in rank order: a new tensor of
        shape (world_size, *buf.shape) on every rank. `buf` itself is not modified."""
        check_dtype("allgather", buf)
        if self.world_size == 1:
            return one_rank_stack(buf)
        return self._allgather(buf)

    def gather(self, buf: torch.Tensor, root: int = 0) -> torch.Tensor | None:
        """Like `allgather`, but the (world_size, *buf.shape) tensor is returned on `root` only;
        every other rank gets None."""
        check_dtype("gather", buf)
        check_root("gather", root, self.world_size)
        if self.world_size == 1:  # the one rank is root
            return one_rank_stack(buf)
        return self._gather(buf, root)

    def broadcast(self, buf: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite `buf` on every rank with root's copy (any dtype numpy/torch can send; float64
        and int64 are tested) and return it."""
        check_root("broadcast", root, self.world_size)
        if self.world_size == 1:
            return buf
        return self._broadcast(buf, root)

    # ---------------------------------------------------------------- hooks: world_size > 1, checked arguments
    @abc.abstractmethod
    def _allreduce(self, buf: torch.Tensor, op: str) -> torch.Tensor:
        """allreduce across ranks: `buf` in place, returned."""

    @abc.abstractmethod
    def _allreduce_int64(self, buf: torch.Tensor) -> torch.Tensor:
        """allreduce_int64 across ranks (int64, sum modulo 2**64): `buf` in place, returned."""

    @abc.abstractmethod
    def _reduce(self, buf: torch.Tensor, root: int, op: str) -> torch.Tensor:
        """reduce onto `root`: `buf` in place there, unchanged elsewhere; returned on every rank."""

    @abc.abstractmethod
    def _allgather(self, buf: torch.Tensor) -> torch.Tensor:
        """allgather: a new (world_size, *buf.shape) tensor on buf's device."""

    @abc.abstractmethod
    def _gather(self, buf: torch.Tensor, root: int) -> torch.Tensor | None:
        """gather: the allgather tensor on `root`, None on every other rank."""

    @abc.abstractmethod
    def _broadcast(self, buf: torch.Tensor, root: int) -> torch.Tensor:
        """broadcast: root's copy into `buf` on every rank, returned."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (a failing rank must not leave the others hanging)."""
        raise SystemExit(code)

    def set_timeout(self, seconds: float | None) -> None:  # noqa: B027 (optional hook: only torch has a timeout)
        """From now on a collective that waits longer than `seconds` fails (None: the timeout the communicator was
        built with). Only the torch back-end has such a timeout; MPI's collectives wait for ever (a run's step
        watchdog, hpc/watchdog.py, bounds them) and a one-rank world never waits."""

    def close(self) -> None:  # noqa: B027 (optional hook: most back-ends hold nothing to release)
        """Release the back-end's resources."""

    def describe(self) -> dict:
        return {"backend": self.backend, "rank": self.rank, "world_size": self.world_size}


class LocalCommunicator(Communicator):
    """One process hosting every client: collectives are identities (a one-rank sum adds nothing,
    so there is nothing to wrap).

    With world_size 1 the base class answers every collective before a hook is reached. The hooks
    keep the identities for a test double that sets world_size > 1 to play one rank of a larger
    job whose other ranks contribute nothing (tests/test_payloads.py does)."""

    backend = "local"

    def _unchanged(self, buf: torch.Tensor, *_args) -> torch.Tensor:
        return buf

    def _own_row(self, buf: torch.Tensor, *_args) -> torch.Tensor:
        return one_rank_stack(buf)

    _allreduce = _allreduce_int64 = _reduce = _broadcast = _unchanged
    _allgather = _gather = _own_row

    def barrier(self) -> None:
        return None
