"""The one launch bootstrap of every entry point that runs as ranks (`fedhypevae train`, a sweep point's job).

    with Launch(backend="auto", device="auto", prog="fedhypevae", user_errors=(FedHypeVAEError,),
                setup_error=ConfigError, interrupt_message="...") as ranks:
        results = run_training(cfg, out, ranks.comm, launcher=ranks.info.launcher, device=str(ranks.device))
    if ranks.exit_status is not None:  # a second Ctrl-C on one process
        return ranks.exit_status

On entry, in this order: the launcher is read from the environment (or `info`, when the caller has
already read it), the device is chosen for the local rank (cuda:LOCAL_RANK where CUDA is present), the
communicator is built and checked against the world the launcher started (and against `ranks`, when
given), and an uncaught exception on any rank is made to end every rank (`install_failfast`). A failure
there is raised as `setup_error(message)`: one line that says what to change, no traceback.

On leaving the block:
  * normally: the communicator is closed (collective: every rank leaves normally; a caller that closed
    it already, e.g. before handing over to submitit, closes nothing twice) and sys.excepthook is restored;
  * a user error (an instance of `user_errors`, whose message says what to change): on a job of several
    ranks this rank writes `PROG: error: [rank R/N] MESSAGE` and aborts every rank with status 2, so
    that none is left waiting in a collective; on one process it propagates and the caller prints it;
  * KeyboardInterrupt, when `interrupt_message` is given (a second Ctrl-C: the first one already makes
    the run checkpoint and stop): rank 0 writes the message, a job of several ranks is aborted with 130,
    one process carries on with `exit_status` 130. Without a message it is an unexpected exception;
  * any other exception: on several ranks this rank writes its rank and the traceback and aborts every
    rank with status 1 (here, not only in sys.excepthook: submitit catches a job's exceptions before the
    hook could see them); on one process it propagates.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .backend import BackendError, install_failfast, make_communicator, report_fatal
from .comm import Communicator
from .device import choose_device
from .launcher import LaunchInfo, detect_launcher, srun_mpi_hint
from .watchdog import EXIT_STEP_TIMEOUT  # noqa: F401 (re-exported: one place lists every exit status)

EXIT_USER_ERROR = 2  # a rank's user error ends the job with this status (the CLI's status for a bad input)
EXIT_INTERRUPTED = 130  # a second Ctrl-C: 128 + SIGINT
EXIT_FATAL = 1  # an unexpected exception on one rank
# EXIT_STEP_TIMEOUT (124, defined in hpc/watchdog.py): a rank's step watchdog saw no progress for the step
# timeout (a peer unreachable or stuck) and ended that rank with os._exit, which ends the job


class Launch:
    """Context manager: detect the launcher, choose the device, build and check the communicator, fail
    fast, and on leaving close it or end every rank (see the module docstring).

    backend      "auto", "local", "mpi" or "torch" (`BACKENDS`)
    device       "auto", "cpu" or "cuda"
    timeout_s    collective timeout of the torch back-end (its rendezvous too); a run narrows it to its step
                 timeout while its step watchdog is armed (`Communicator.set_timeout`)
    prog         the prefix of the error line a rank writes before it aborts the job
    user_errors  exception types whose message is for the user (one line, status 2, no traceback)
    setup_error  makes the exception raised when the ranks cannot start (from a one-line message)
    ranks        the world size the job asked for, when it asked for one: another one is refused
    interrupt_message  written by rank 0 on a second Ctrl-C; None: KeyboardInterrupt is not handled apart
    info         the launcher, when the caller has read it already (detect_launcher() otherwise)
    """

    def __init__(
        self,
        *,
        backend: str = "auto",
        device: str = "auto",
        timeout_s: float = 600.0,
        prog: str,
        user_errors: tuple[type[BaseException], ...] = (),
        setup_error: Callable[[str], Exception] = BackendError,
        ranks: int | None = None,
        interrupt_message: str | None = None,
        info: LaunchInfo | None = None,
    ):
        self.backend, self.requested_device, self.timeout_s = backend, device, timeout_s
        self.prog, self.user_errors, self.setup_error = prog, tuple(user_errors), setup_error
        self.ranks, self.interrupt_message = ranks, interrupt_message
        self.info: LaunchInfo | None = info
        self.device = None
        self.comm: Communicator | None = None
        self.exit_status: int | None = None
        self._restore_excepthook: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------------------------------ entry
    def __enter__(self) -> Launch:
        self.info = self.info or detect_launcher()
        try:
            self.device = choose_device(self.info.local_rank, self.requested_device)  # cuda:LOCAL_RANK on GPUs
            self.comm = make_communicator(self.backend, self.info, device=self.device, timeout_s=self.timeout_s)
        except (BackendError, RuntimeError) as exc:
            raise self.setup_error(str(exc)) from None
        if self.ranks is not None and self.comm.world_size != self.ranks:
            # a launcher that gives every task a world of one must fail the job, not run it N times
            raise self.setup_error(
                f"asked for {self.ranks} ranks but this task sees a world of {self.comm.world_size} "
                f"(launcher {self.info.launcher}): {srun_mpi_hint()}"
            )
        self._restore_excepthook = install_failfast(self.comm)
        return self

    # ------------------------------------------------------------------------------------------- exit
    def __exit__(self, exc_type, exc, tb) -> bool:
        comm = self.comm
        if exc_type is None:
            comm.close()
            self._restore_excepthook()
            return False
        if isinstance(exc, KeyboardInterrupt) and self.interrupt_message is not None:
            if comm.is_root:
                print(f"{self.prog}: {self.interrupt_message}", file=sys.stderr, flush=True)
            if comm.world_size > 1:
                comm.abort(EXIT_INTERRUPTED)
            self.exit_status = EXIT_INTERRUPTED
            self._restore_excepthook()
            return True
        if comm.world_size == 1 or not isinstance(exc, Exception | KeyboardInterrupt):
            return False  # one process: the caller reports it; SystemExit and the like pass through
        if isinstance(exc, self.user_errors):
            print(f"{self.prog}: error: [rank {comm.rank}/{comm.world_size}] {exc}", file=sys.stderr, flush=True)
            comm.abort(EXIT_USER_ERROR)
        else:
            report_fatal(comm, exc_type, exc, tb)
            comm.abort(EXIT_FATAL)
        return False  # reached only where abort returns (a test double): the exception propagates
