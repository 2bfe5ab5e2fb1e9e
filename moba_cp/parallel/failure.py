"""A failing CP rank never hangs the others: bounded waits and one shared failure message.

Every exchange of ``moba_cp.parallel`` (collectives and P2P of the CP ops) runs inside
:func:`report_failure` and waits through :func:`wait_all`:

- **the failing rank** (any exception inside the op: an OOM in a ring step, a bad kernel call)
  writes ``"CP rank r (global rank g) failed in <op>: <Type>: <message>"`` under a key of the
  CP group in the job's c10d store, then re-raises;
- **its peers**, waiting on a message that will never come, see the transfer fail as soon as the
  failing process exits (gloo: "connection closed"), or their wait time out at the bound when it
  does not exit; then they read that key and raise :class:`CPGroupFailure` with the failing
  rank's own message (or, when none was published, naming the rank they waited for and the
  bound). Either way every process exits non-zero within the bound.

On CUDA the host does not block on NCCL transfers (the compute stream waits), so a host-side
poll cannot see a stuck transfer; there :class:`_Watchdog` (a daemon thread) watches the pending
work and the failure key, logs the one message and ends the process (``os._exit(1)``) when a
peer failed or a transfer missed the bound; NCCL cannot be unblocked from the host otherwise.

The bound: ``MOBA_CP_EXCHANGE_TIMEOUT_S`` (seconds, default 60; the launchers set it) or
:func:`set_exchange_timeout`. It bounds one wait, i.e. the slowest peer's compute between two
exchanges plus the transfer, so keep it well above a layer's attention time.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = [
    "CPGroupFailure",
    "exchange_timeout",
    "set_exchange_timeout",
    "report_failure",
    "wait_all",
    "failure_message",
    "watch_stream",
]

ENV_TIMEOUT = "MOBA_CP_EXCHANGE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
STORE_POLL_S = 0.2  # how often a waiting rank looks for a peer's failure message
_timeout_override: float | None = None


class CPGroupFailure(RuntimeError):
    """Another rank of the CP group failed (its message is included), or did not answer in time."""


def exchange_timeout() -> float:
    """Seconds one wait may take before the CP group is declared failed."""
    if _timeout_override is not None:
        return _timeout_override
    text = os.environ.get(ENV_TIMEOUT)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}={text!r} is not a number of seconds (e.g. 60)") from None
    if value <= 0:
        raise ValueError(f"{ENV_TIMEOUT}={text!r} must be > 0 seconds")
    return value


def set_exchange_timeout(seconds: float | None) -> None:
    """Override the bound for this process (None: back to the environment / default)."""
    global _timeout_override
    if seconds is not None and not seconds > 0:
        raise ValueError(f"set_exchange_timeout({seconds!r}): the bound must be > 0 seconds")
    _timeout_override = None if seconds is None else float(seconds)


# ------------------------------------------------------------------------------ the shared message
def _store():
    try:  # the default group's store (TCPStore under torchrun and in the tests)
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (e.g. a custom init): waits stay bounded anyway
        return None


def _key(group) -> str:
    name = getattr(group, "group_name", None) or str(id(group))
    return f"moba_cp/cp_failure/{name}"


def failure_message(group) -> str | None:
    """The failure message a rank of ``group`` published, or None."""
    store = _store()
    if store is None:
        return None
    try:
        if store.check([_key(group)]):
            return store.get(_key(group)).decode(errors="replace")
    except Exception:  # noqa: BLE001 - the store itself went away (rank 0 died): nothing to read
        return None
    return None


def _publish(group, message: str) -> None:
    store = _store()
    if store is None:
        return
    try:
        # compare_set: the first failure wins, a peer's later CPGroupFailure does not overwrite it
        store.compare_set(_key(group), "", message)
    except Exception:  # noqa: BLE001 - best effort: the peers' waits are bounded without it
        pass


@contextlib.contextmanager
def report_failure(op: str, group):
    """Run an exchange; on an exception publish who failed and why, then re-raise it."""
    try:
        yield
    except CPGroupFailure:
        raise  # a peer's failure, already published by the peer
    except BaseException as e:
        # A transport error after a peer failed and published why is the consequence, not a cause:
        # gloo raises a plain RuntimeError ("connection closed") when a transfer to a process that
        # has exited is *started*, outside any wait_all. Name the peer's failure then. This rank's
        # own errors (a ValueError every rank raises on the same bad input, an out-of-memory: a
        # RuntimeError subclass) stay what they are.
        transport = type(e) is RuntimeError or isinstance(e, dist.DistError)
        peer = failure_message(group) if transport and _key(group) not in _own_failures else None
        if peer is not None:
            raise CPGroupFailure(f"{op}: stopping because {peer}") from e
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        message = (f"CP rank {rank} (global rank {dist.get_rank() if dist.is_initialized() else 0}) failed "
                   f"in {op}: {type(e).__name__}: {str(e)[:500]}")
        _publish(group, message)
        _own_failures[_key(group)] = time.monotonic()
        log.error("%s", message)
        raise


# ------------------------------------------------------------------------------ bounded waits
def wait_all(works, *, group, what: str, peers=()) -> None:
    """Wait for ``works`` (``dist.Work`` objects) on the host, at most :func:`exchange_timeout`.

    A work that errors (gloo: the peer's process died, which it does right after its failure)
    or that misses the bound raises :class:`CPGroupFailure` carrying the failing rank's published
    message, or naming ``peers`` (the group ranks waited for) when none was published.
    """
    bound = exchange_timeout()
    for w in works:
        if w is None:
            continue
        try:
            # gloo: a timed-out wait leaves the transfer unusable, so one wait with the whole bound
            if w.wait(timeout=datetime.timedelta(seconds=bound)) is False:
                raise TimeoutError(f"no answer within {bound:g} s ({ENV_TIMEOUT})")
        except Exception as e:  # noqa: BLE001 - the transport failed or timed out: say which rank caused it
            _raise_peer_failure(group, what, peers, f"{type(e).__name__}: {str(e)[:300]}")


def _raise_peer_failure(group, what, peers, reason, wait_s: float = 2.0):
    deadline = time.monotonic() + wait_s
    msg = failure_message(group)
    while msg is None and time.monotonic() < deadline:  # the failing rank may still be publishing
        time.sleep(0.05)
        msg = failure_message(group)
    if msg is not None:
        raise CPGroupFailure(f"{what}: stopping because {msg}")
    who = f"CP rank(s) {sorted(set(peers))}" if peers else "a peer"
    message = (f"CP rank {dist.get_rank(group)} (global rank {dist.get_rank()}) failed in {what}: waiting for "
               f"{who}: {reason}")
    _publish(group, message)
    raise CPGroupFailure(message)


# ------------------------------------------------------------------------------ CUDA: watchdog
class _Watchdog(threading.Thread):
    """Ends this process when a CP peer failed or a CUDA stream stays stuck on a transfer.

    NCCL transfers are waited on by the compute stream, not the host, so a transfer whose peer
    died blocks the GPU forever while the host runs ahead; only a separate thread can notice.
    Each stream wait is marked by a CUDA event (no tensor is held); an event that has not
    completed within the bound, or a failure message of a peer, ends the process with that
    message. After this rank's own failure it waits one bound for the normal exit first.
    """

    _instance: "_Watchdog | None" = None
    _lock = threading.Lock()

    def __init__(self):
        super().__init__(name="moba_cp-cp-watchdog", daemon=True)
        self.pending: list[tuple[float, object, object, str]] = []
        self.groups: dict[str, object] = {}
        self.mutex = threading.Lock()

    @classmethod
    def get(cls) -> "_Watchdog":
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Watchdog()
                cls._instance.start()
            return cls._instance

    def add(self, event, group, what: str) -> None:
        with self.mutex:
            self.pending.append((time.monotonic(), event, group, what))
            self.groups[_key(group)] = group

    def run(self):
        while True:
            time.sleep(STORE_POLL_S)
            now, bound = time.monotonic(), exchange_timeout()
            with self.mutex:
                self.pending = [p for p in self.pending if not p[1].query()]
                stuck = [p for p in self.pending if now - p[0] > bound]
                groups = list(self.groups.items())
            for t0, _, group, what in stuck[:1]:
                msg = failure_message(group) or (
                    f"CP rank {dist.get_rank(group)} (global rank {dist.get_rank()}): {what} did not complete "
                    f"within {bound:g} s ({ENV_TIMEOUT})")
                _publish(group, msg)
                _die(msg)
            for key, group in groups:
                msg = failure_message(group)
                own = _own_failures.get(key)
                if msg is not None and (own is None or now - own > bound):
                    _die(msg)


_own_failures: dict[str, float] = {}  # group key -> when this rank published its failure


def _die(msg):
    log.critical("moba_cp: ending this process: %s", msg)
    print(f"moba_cp: ending this process: {msg}", flush=True)
    os._exit(1)


def watch_stream(group, what: str) -> None:
    """Mark that the current CUDA stream now waits for a transfer of ``group``; the watchdog
    ends the process if the stream has not passed this point within the bound."""
    event = torch.cuda.Event()
    event.record()
    _Watchdog.get().add(event, group, what)
