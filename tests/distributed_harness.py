"""Run a function on N gloo processes inside plain pytest, with results, tracebacks and a timeout.

Usage in a test::

    from tests.distributed_harness import run_distributed

    def _worker(rank, world_size, arg):      # module-level, so it pickles (see mp_context)
        ...                                   # torch.distributed is initialised (gloo)
        return something_picklable            # e.g. tensors

    results = run_distributed(_worker, world_size=2, args=(arg,))   # list indexed by rank

A worker that raises makes ``run_distributed`` raise ``WorkerError`` with every failing
rank's traceback; a run that exceeds ``timeout`` (a hang) kills all processes and fails,
so a broken protocol shows up as a failed test, never as a stuck CI job.

Workers are forked from a fork server that imported torch, Megatron-Core and moba_cp once
(:mod:`tests.distributed_preload`), not spawned afresh: each spawned process spent ~9 s of CPU on
those imports. A worker still starts from a fresh interpreter's state (the server does nothing but
import), sees the caller's environment and working directory of the moment, and its output (fds 1
and 2) is replayed into the calling test's captured stderr when it ends.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing import forkserver


__all__ = ["run_distributed", "run_cli", "WorkerError", "mp_context"]

#: What the fork server imports before it forks the first worker.
PRELOAD = ["tests.distributed_preload"]


class WorkerError(RuntimeError):
    """One or more ranks raised; the message holds each rank's traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mp_context():
    """The multiprocessing context of every test worker: 'forkserver' with :data:`PRELOAD`.

    The server starts with the first worker, from a fresh interpreter (not a fork of the threaded
    pytest process), and lives until pytest exits. Targets must be module-level functions (they
    are pickled, as under 'spawn').
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs: the list never changes
    return ctx


def start_server() -> None:
    """Start the fork server now (its imports run in the background until the first worker)."""
    mp_context()
    forkserver.ensure_running()


def worker_setup(env: dict, log_path: str | None) -> None:
    """In a forked worker: the caller's environment of the moment (the server's is the one it
    started with), and fds 1 and 2 into ``log_path`` for :func:`replay_output` (the server's are
    the capture files of whichever test started it)."""
    os.environ.clear()
    os.environ.update(env)
    if log_path is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def log_file(tag: str) -> str:
    """A fresh, empty file for one worker's output."""
    fd, path = tempfile.mkstemp(prefix=f"moba_cp_{tag}_", suffix=".log")
    os.close(fd)
    return path


def replay_output(log_paths: list[str]) -> None:
    """Write the workers' output into this process's stderr (a test's capture), rank by rank."""
    for rank, path in enumerate(log_paths):
        try:
            with open(path, errors="replace") as f:
                text = f.read()
            os.unlink(path)
        except FileNotFoundError:
            continue
        if text:
            sys.stderr.write(f"--- rank {rank} output ---\n{text}")
            if not text.endswith("\n"):
                sys.stderr.write("\n")
    sys.stderr.flush()


def _entry(fn, rank, world_size, port, args, kwargs, out_q, env, log_path):
    import torch
    import torch.distributed as dist

    worker_setup(env, log_path)
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
        sys.stdout.flush()
        sys.stderr.flush()


def run_distributed(fn, world_size: int, args: tuple = (), kwargs: dict | None = None, timeout: float = 240.0):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo processes.

    Returns the list of per-rank return values. Raises ``WorkerError`` if any rank raised,
    ``TimeoutError`` if the processes did not all finish within ``timeout`` seconds.
    """
    ctx = mp_context()
    out_q = ctx.Queue()
    port = _free_port()
    env = dict(os.environ)
    logs = [log_file(f"rank{r}") for r in range(world_size)]
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, kwargs or {}, out_q, env, logs[r]),
                    daemon=False)
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
        replay_output(logs)
    errors = {r: payload for r, (status, payload) in results.items() if status == "error"}
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise WorkerError(f"{len(errors)} rank(s) failed:\n{msg}")
    return [pickle.loads(results[r][1]) for r in range(world_size)]


def _cli_entry(argv, env, cwd, out_path, err_path):
    """One process of ``python -m moba_cp.cli ARGV``: exits with main's code, as the interpreter would."""
    import torch

    from moba_cp.cli import main

    worker_setup(env, None)
    os.chdir(cwd)
    # what OMP_NUM_THREADS does to a fresh interpreter's torch (this one imported torch without it)
    if env.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    try:
        code = main(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):  # argparse, or an explicit exit code
            code = e.code
        else:  # a message: the interpreter prints it and exits 1
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback on stderr, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code or 0)


def run_cli(argv: list[str], *, nproc: int | None = None, env: dict | None = None, cwd: str | None = None,
            timeout: float = 400.0):
    """``moba-cp ARGV`` as ``python -m moba_cp.cli ARGV`` (``nproc=None``) or ``torchrun
    --nproc_per_node NPROC -m moba_cp.cli ARGV`` runs it, in workers forked from the preloaded
    server instead of fresh interpreters (~10 s of imports each); returns a
    ``subprocess.CompletedProcess``.

    Each process gets exactly ``env`` (default: this process's environment) and ``cwd``; under
    ``nproc`` also the variables torchrun gives its workers that moba_cp and ``init_process_group``
    read (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). stdout and
    stderr are the ranks' outputs one after another; the return code is the first failed rank's, and
    as under torchrun a failed rank ends the others (SIGTERM, then SIGKILL after 30 s). For the
    computation behind a command; tests of the launchers themselves start real processes.
    """
    ctx = mp_context()
    base = dict(os.environ if env is None else env)
    ranks = 1 if nproc is None else nproc
    port = _free_port()
    logs = [(log_file(f"cli{r}_out"), log_file(f"cli{r}_err")) for r in range(ranks)]
    procs = []
    for r in range(ranks):
        e = dict(base)
        if nproc is not None:
            e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(ctx.Process(target=_cli_entry, args=(list(argv), e, cwd or os.getcwd(), *logs[r]), daemon=False))
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    timed_out, code = False, 0
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            code = next((p.exitcode for p in procs if p.exitcode), 0)
            if code:  # a rank failed: its peers would wait on it
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                for p in procs:
                    p.join(timeout=30)
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        outs = []
        for paths in logs:
            texts = []
            for path in paths:
                with open(path, errors="replace") as f:
                    texts.append(f.read())
                os.unlink(path)
            outs.append(texts)
    stdout, stderr = "".join(o for o, _ in outs), "".join(e for _, e in outs)
    cmd = ["moba-cp", *argv] if nproc is None else ["torchrun", f"--nproc_per_node={nproc}", "-m", "moba_cp.cli", *argv]
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    code = code or next((p.exitcode for p in procs if p.exitcode), 0)
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def tmp_dir() -> str:
    """A fresh temporary directory (for workers that need a shared file)."""
    return tempfile.mkdtemp(prefix="moba_cp_dist_")
