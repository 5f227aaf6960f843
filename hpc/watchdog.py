"""A step watchdog: ends this rank when the job makes no progress for too long.

A peer killed outright is noticed at once when its launcher sees it die; a peer cut off from the network is
not: a node whose link went down keeps its processes alive and their sockets open, and the ranks waiting for
it sit in a collective for ever (MPI has no collective timeout; MPICH over TCP did not notice even a node that
died whole, tests/test_multinode.py, until SLURM declared it down). The trainer beats the watchdog at every step
boundary and around every collective; if no beat arrives for `timeout_s` while the watchdog is armed, a
daemon thread writes ONE line to stderr (what `describe(where, silent_s)` returns) and ends the process
with `os._exit(status)` (EXIT_STEP_TIMEOUT, 124): not MPI_Abort, which may itself hang over a partitioned
network. Under srun --kill-on-bad-exit=1, Hydra's mpiexec or torchrun one rank's non-zero exit ends the
whole job.

    dog = Watchdog(600.0, lambda where, silent: f"prog: error: {where} did not finish within 600 s")
    with dog:                         # armed (the thread starts at the first arm)
        for step in ...:
            dog.beat(f"step {step}")  # a time.monotonic() store (and the label, when given)
            ...
            with dog.paused():        # legitimate long work that is no step: not watched
                ...

mpi4py and torch.distributed release the GIL while they block in a collective, so the thread runs while the
main thread waits there (tests/test_watchdog.py checks both). A beat takes no lock: the thread only reads
two attributes the main thread replaces whole.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

EXIT_STEP_TIMEOUT = 124  # a rank's step watchdog fired (as coreutils' timeout): hpc/launch.py lists it with the others


class Watchdog:
    """Ends the process when armed and not beaten for `timeout_s` seconds (see the module docstring).

    timeout_s  seconds without a beat, while armed, after which the process ends
    describe   (where, silent_s) -> the one line written to stderr: `where` is the last label given to
               `beat` or `arm`, silent_s the seconds since the last beat
    status     the exit status (EXIT_STEP_TIMEOUT)
    poll_s     how often the thread looks: min(1 s, timeout_s / 10) unless given
    exit_grace_s  pause between the flushed line and the exit, so that a launcher forwarding the rank's
               output (Hydra's proxy) passes the line on before it acts on the exit
    """

    def __init__(
        self,
        timeout_s: float,
        describe: Callable[[str, float], str],
        *,
        status: int = EXIT_STEP_TIMEOUT,
        poll_s: float | None = None,
        exit_grace_s: float = 0.25,
        _exit: Callable[[int], None] = os._exit,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0; got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.describe, self.status, self.exit_grace_s = describe, status, exit_grace_s
        self.poll_s = float(poll_s) if poll_s is not None else min(1.0, self.timeout_s / 10)
        self._exit = _exit
        self._last = time.monotonic()
        self._where = ""
        self._armed = False
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def grace_s(self) -> float:
        """How late after `timeout_s` the watchdog may fire at the most (two polls and a second): a back-end's own
        collective timeout set to timeout_s + grace_s leaves the watchdog to report a stuck step."""
        return 2 * self.poll_s + 1.0

    @property
    def armed(self) -> bool:
        return self._armed

    # --------------------------------------------------------------------------- the main thread's side
    def beat(self, where: str | None = None) -> None:
        """Progress: the silence starts again now (`where`: what this rank is doing from now on, when it changes)."""
        self._last = time.monotonic()
        if where is not None:
            self._where = where

    def arm(self, where: str | None = None) -> None:
        """Watch from now on (a beat first); starts the thread the first time."""
        self.beat(where)
        self._armed = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        """Stop watching (the thread stays, idle) until the next `arm`."""
        self._armed = False

    @contextmanager
    def paused(self):
        """Not watched inside the block (legitimate long work that is no step); armed again after it if it was."""
        was = self._armed
        self.disarm()
        try:
            yield self
        finally:
            if was:
                self.arm()

    def close(self) -> None:
        """Disarm and end the thread."""
        self._armed = False
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.poll_s + 1.0)

    def __enter__(self) -> Watchdog:
        self.arm()
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # --------------------------------------------------------------------------------- the thread's side
    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            if not self._armed:
                continue
            silent = time.monotonic() - self._last
            if silent > self.timeout_s and self._armed:
                self._fire(self._where, silent)
                return

    def _fire(self, where: str, silent: float) -> None:
        try:
            line = self.describe(where, silent)
        except Exception as exc:  # noqa: BLE001 - the process must end whatever the message does
            line = f"error: no progress for {silent:.0f} s (timeout {self.timeout_s:g} s) in {where} ({exc!r})"
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or broken stream must not keep the process alive
                pass
        try:
            sys.stderr.write(line.rstrip("\n") + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            try:
                os.write(2, (line.rstrip("\n") + "\n").encode("utf-8", "replace"))
            except OSError:
                pass
        time.sleep(self.exit_grace_s)
        self._exit(self.status)
