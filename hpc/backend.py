"""Back-end registry and start-up checks: `make_communicator("auto" | "local" | "mpi" | "torch")`.

Importing this module does not import torch (the command line's --help reads `BACKENDS`); the
communicators are imported when one is made."""

from __future__ import annotations

import sys
import traceback
from typing import TYPE_CHECKING

from .launcher import LaunchInfo, detect_launcher, expected_world_size, srun_mpi_hint

if TYPE_CHECKING:
    from .comm import Communicator

BACKENDS = ("auto", "local", "mpi", "torch")  # the one list: `fedhypevae train --backend` offers these


class BackendError(RuntimeError):
    """The requested back-end cannot run here; the message says what to change."""


def _auto(info: LaunchInfo) -> str:
    if info.launcher == "none":
        return "local"
    if info.launcher == "torchrun":
        return "torch"
    return "mpi"  # mpiexec and srun: MPI when mpi4py is present


def make_communicator(
    name: str = "auto", info: LaunchInfo | None = None, *, device=None, timeout_s: float = 600.0
) -> Communicator:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    info = info or detect_launcher()
    chosen = _auto(info) if name == "auto" else name
    if chosen == "local":
        if info.distributed:
            raise BackendError(
                f"--backend local under {info.launcher} with {info.world_size} ranks would run every "
                "client on every rank; use --backend auto, mpi or torch"
            )
        from .comm import LocalCommunicator

        return LocalCommunicator()
    if chosen == "mpi":
        try:
            from .mpi_comm import MPICommunicator

            comm = MPICommunicator(local_rank=info.local_rank)
        except ImportError as exc:
            raise BackendError(
                f"--backend mpi needs mpi4py and an MPI library ({exc}); "
                "`pip install mpi4py mpich`, or use --backend torch"
            ) from None
    else:
        import torch

        from .torch_comm import TorchCommunicator

        comm = TorchCommunicator(info, device=device or torch.device("cpu"), timeout_s=timeout_s)
    check_world(comm, info)
    return comm


def check_world(comm: Communicator, info: LaunchInfo) -> None:
    """A launcher that starts N processes while the MPI library gives each a world of one (Open MPI
    under srun without PMIx) would run N independent copies of the job: refuse it."""
    expected = expected_world_size()
    want = max(info.world_size, expected or 1)
    if comm.world_size != want:
        raise BackendError(
            f"the launcher ({info.launcher}) started {want} ranks but the {comm.backend} back-end sees a world of "
            f"{comm.world_size}: every rank would run alone; {srun_mpi_hint()}"
        )


def report_fatal(comm: Communicator, exc_type, exc, tb) -> None:
    """What a rank writes before it aborts the job for an unexpected exception: its rank, then the traceback."""
    sys.stderr.write(f"[rank {comm.rank}/{comm.world_size}] fatal {exc_type.__name__}: {exc}; aborting all ranks\n")
    traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
    sys.stderr.flush()


def install_failfast(comm: Communicator):
    """An uncaught exception on any rank ends every rank (instead of leaving them in a collective).

    Returns a function that puts the previous `sys.excepthook` back (for when `comm` is closed)."""
    previous = sys.excepthook
    if comm.world_size == 1:
        return lambda: None

    def hook(exc_type, exc, tb):
        report_fatal(comm, exc_type, exc, tb)
        try:
            comm.abort(1)
        finally:
            previous(exc_type, exc, tb)

    def restore() -> None:
        if sys.excepthook is hook:
            sys.excepthook = previous

    sys.excepthook = hook
    return restore
