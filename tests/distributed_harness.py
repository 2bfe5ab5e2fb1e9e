"""Run a function on N gloo processes inside plain pytest, with results, tracebacks and a timeout.

Usage in a test::

    from tests.distributed_harness import run_distributed

    def _worker(rank, world_size, arg):      # module-level, so it pickles under 'spawn'
        ...                                   # torch.distributed is initialised (gloo)
        return something_picklable            # e.g. tensors

    results = run_distributed(_worker, world_size=2, args=(arg,))   # list indexed by rank

A worker that raises makes ``run_distributed`` raise ``WorkerError`` with every failing
rank's traceback; a run that exceeds ``timeout`` (a hang) kills all processes and fails,
so a broken protocol shows up as a failed test, never as a stuck CI job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import tempfile
import time
import traceback


__all__ = ["run_distributed", "WorkerError"]


class WorkerError(RuntimeError):
    """One or more ranks raised; the message holds each rank's traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, kwargs, out_q):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # N processes share a small CPU; oversubscription only slows them
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        # Plain pickle bytes (tensors copied): torch's queue reducers share file descriptors
        # that die with this process before the parent can read them.
        out_q.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        out_q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn, world_size: int, args: tuple = (), kwargs: dict | None = None, timeout: float = 240.0):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo processes.

    Returns the list of per-rank return values. Raises ``WorkerError`` if any rank raised,
    ``TimeoutError`` if the processes did not all finish within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, kwargs or {}, out_q), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"distributed test: ranks {missing} did not finish within {timeout:.0f}s (a hang?); "
                    f"finished ranks: {sorted(results)}"
                )
            try:
                rank, status, payload = out_q.get(timeout=min(remaining, 1.0))
                results[rank] = (status, payload)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise WorkerError(f"ranks {dead} died without reporting (exit codes "
                                      f"{[procs[r].exitcode for r in dead]})")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: payload for r, (status, payload) in results.items() if status == "error"}
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise WorkerError(f"{len(errors)} rank(s) failed:\n{msg}")
    return [pickle.loads(results[r][1]) for r in range(world_size)]


def tmp_dir() -> str:
    """A fresh temporary directory (for workers that need a shared file)."""
    return tempfile.mkdtemp(prefix="moba_cp_dist_")
