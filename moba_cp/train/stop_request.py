"""How a training run is asked to stop: signals (preemption, Ctrl-C) and a dead launcher, turned
into one decision that every rank takes at the same step boundary."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

__all__ = ["StopRequest"]


class StopRequest:
    """SIGTERM / SIGUSR1 (preemption, SLURM's --signal) and a first SIGINT (Ctrl-C) -> finish the
    step, save, exit cleanly; a second SIGINT aborts at once, without saving.

    The handlers only record the signal; at each step boundary the ranks agree (one all-reduce
    of a flag per reason, :meth:`agreed`), so every rank saves the same step even when only some received
    the signal.

    Arrival times come from a thread reading the signal wakeup fd, not from the Python handler
    (which runs only when the main thread returns from a long C++ call). A SIGINT within
    ``SAME_INTERRUPT_S`` of the first counts as the same Ctrl-C: a launcher may deliver one
    key press twice (the terminal signals its process group, and the launcher forwards).

    A worker whose launcher died (torchrun killed with SIGKILL: its workers run in their own
    sessions and would train on, writing into the run directory a relaunch then uses) stops the
    same way: its parent process changed.

    Installing it replaces the handlers of :attr:`SIGNALS`; :meth:`restore` puts the previous
    ones back (call it in a ``finally``).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
    LAUNCHER_EXITED = "the launcher (parent process) exited"
    # The reasons the ranks agree on, one flag each, in the order a rank that saw none of them
    # names one (a dead launcher says most). Every rank sees a launcher's death or a job-wide
    # signal, but not always by the same step boundary.
    REASONS = (LAUNCHER_EXITED, *SIGNALS)
    SAME_INTERRUPT_S = 1.0

    def __init__(self, on_abort: str = ""):
        """``on_abort``: printed (rank 0) when a second Ctrl-C aborts, e.g. where the last
        checkpoint is."""
        self.received: str | None = None  # the first stop reason seen on this rank
        self.agreed_reasons: list[str] = []  # the reasons any rank had at the agreeing boundary
        self.device = torch.device("cpu")  # of the agreement all-reduce; set once the group exists
        self.on_abort = on_abort
        self._parent = os.getppid()
        self._first_interrupt: float | None = None
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="moba-cp-signals", daemon=True).start()

    def _handle(self, signum, frame):  # the watcher thread does the work
        pass

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._rfd, 64)
            except OSError:
                return
            if not data:  # restore() closed the write end
                os.close(self._rfd)
                return
            now = time.monotonic()
            for signum in data:
                try:
                    name = signal.Signals(signum).name
                except ValueError:
                    continue
                if name not in self.SIGNALS:
                    continue
                if name == "SIGINT":
                    if self._first_interrupt is None:
                        self._first_interrupt = now
                    elif now - self._first_interrupt > self.SAME_INTERRUPT_S:
                        self._abort()
                self.received = self.received or name

    def _abort(self) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(f"moba-cp train: second Ctrl-C: aborting now, without saving. {self.on_abort}",
                  file=sys.stderr, flush=True)
        os._exit(130)

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank calls it at the same step)."""
        if self.received is None and os.getppid() != self._parent:
            self.received = self.LAUNCHER_EXITED
        flags = torch.tensor([1.0 if r == self.received else 0.0 for r in self.REASONS], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.agreed_reasons = [r for r, f in zip(self.REASONS, flags.tolist()) if f > 0]
        return bool(self.agreed_reasons)

    def reason(self) -> str:
        """Why the run stops, as said in its last line: this rank's reason, else the one the ranks
        agreed on. A signal sent to the whole job reaches the ranks' watchers at slightly
        different times, and the parent of every rank dies at once, so at the agreeing boundary
        one rank may not have seen yet what another has: it is the same stop."""
        return self.received or next(iter(self.agreed_reasons), "no stop request")

    def restore(self) -> None:
        """Put the previous signal handlers and wakeup fd back; ends the watcher thread."""
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._wfd)  # the watcher's read returns empty and it ends
