"""Crash-safe checkpoints with Megatron-Core distributed checkpointing.

Layout under the checkpoint directory::

    iter_0000100/            a complete checkpoint (has meta.json, written last)
        meta.json            step, consumed samples, layout, resolved recipe
        rng/rank_00003.pt    per-rank RNG states (restored when the world size matches)
        ...                  Megatron dist-checkpoint files (model, optimizer, scheduler)
    iter_0000200.tmp/        a save in progress (or killed mid-way): never read, removed later
    latest                   informational: the step of the newest complete checkpoint

Why this is safe: every save goes to a fresh ``.tmp`` directory; only after all ranks finished
writing does rank 0 write ``meta.json`` and atomically rename the directory. A crash at any
point leaves the previous complete checkpoint untouched, and resume only ever reads directories
that hold ``meta.json``. Old checkpoints are deleted only after a newer one is complete.
``meta.json`` also holds the resolved recipe (``config``): what the run-directory check
(``moba_cp.train.run_dir``) and ``moba-cp eval`` read.

Why a failed save never hangs: this rank's shards are written in this process (Megatron's
forked/threaded writer waited forever for a worker that died early, e.g. without psutil, which
the writes here do not need), and
after each local step that may fail (directory set-up, shard writes, publishing) the ranks agree
on the outcome, so a failure on any rank raises the same :class:`CheckpointError` on all of them
within seconds, with the cause and the last good checkpoint, and the partial save is removed.

Both optimizers resume under another data-parallel size: the plain optimizer's state is
replicated, the distributed optimizer's is saved in Megatron's "dp_reshardable" format (tested:
dp=2 -> dp=1 gives the uninterrupted run's losses).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import signal
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from moba_cp.megatron import compat_cpu
from moba_cp.train.checkpoint_dirs import CheckpointError, checkpoint_step, complete_checkpoints, latest_checkpoint

try:  # Megatron's async checkpoint writer; its module layout is not a public API across versions
    from megatron.core.dist_checkpointing.strategies import filesystem_async
except ImportError:  # pragma: no cover - another megatron-core layout: its own writer is used
    filesystem_async = None

__all__ = ["latest_checkpoint", "checkpoint_step", "save_checkpoint", "load_checkpoint", "CheckpointError",
           "quiet_known_load_warnings"]

# The distributed optimizer's state format. With torch's Adam (no apex/TE, our case everywhere),
# Megatron 0.16's other formats break: "fully_reshardable" fails to load (KeyError 'step') and
# "fully_sharded_model_space" fails to save. "dp_reshardable" loads under the same or another dp
# size; its wrong Adam step count after a load is repaired by _restore_adam_steps (it was what
# made resumed losses differ, with the same dp as with another).
_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state(model, optimizer, scheduler, is_loading: bool):
    module = model.module if hasattr(model, "module") else model
    model_sd = module.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_META),
        "scheduler": scheduler.state_dict(),
    }


def _ensure_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer state tensors to load into.

    Megatron's DistributedOptimizer builds its sharded state dict from ``state_dict()``, which
    (with torch's Adam, no apex/TE) asserts one Adam step count and fails while the state is still
    empty, i.e. on every resume. Megatron's own remedy, a dummy step with zero gradients, is
    private API; the loaded values replace the dummies, except the Adam step count, which
    Megatron overwrites with the dummy's (see :func:`_restore_adam_steps`).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        inner = getattr(opt, "optimizer", None)
        if init is not None and inner is not None and not inner.state:
            init()


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own, correct Adam step count after a distributed-optimizer load.

    With torch's Adam (no apex/TE) Megatron 0.16's ``DistributedOptimizer`` keeps the step in the
    checkpoint's param groups only. On load it (1) puts *one* shared step tensor into every
    parameter's state (``load_state_dict``), and then (2) ``load_parameter_state_from_dp_reshardable``
    copies the *local* step tensors captured before the load (the dummy step's value, 1) into it
    as if they were checkpoint data. The first step after a resume then ran with step 1 instead
    of the saved one, and the shared tensor was incremented once per parameter (each parameter
    saw a different bias correction; measured: 14 parameters at dp=1, steps 2..15 instead of 4).
    The saved step survives in the inner param groups (torch's ``load_state_dict`` keeps the
    checkpoint's group keys): restore it into a fresh tensor per parameter, and drop the group
    key, which an uninterrupted run does not have. Optimizers whose state has no per-parameter
    ``step`` (apex/TE FusedAdam keeps it in the group) are left alone.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            states = [inner.state[p] for p in group["params"] if p in inner.state]
            if "step" not in group or not any(torch.is_tensor(st.get("step")) for st in states):
                continue
            step = float(group.pop("step"))
            for st in states:
                old = st.get("step")
                if torch.is_tensor(old):
                    st["step"] = torch.tensor(step, dtype=old.dtype, device=old.device)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _start_writer_service_immune_to_stop_signals() -> None:
    """Start Megatron's checkpoint-writer results service with SIGTERM/SIGINT ignored.

    Megatron's writer collects results through a ``multiprocessing`` Manager, a separate process
    started at the first save. Preemption (SLURM, a ``kill`` of the process group) and Ctrl-C
    signal every process, and a dead Manager makes the very save meant to preserve the run fail.
    Ignored signals stay ignored across the Manager's spawn, so it survives; the trainer itself
    handles SIGTERM and SIGINT by saving (see ``moba_cp.train.stop_request``).
    """
    if filesystem_async is None:
        return
    # megatron-core 0.16 names it _get_write_results_queue, 0.19 get_write_results_queue.
    start = getattr(filesystem_async, "_get_write_results_queue", None) or getattr(
        filesystem_async, "get_write_results_queue", None)
    if start is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _mcore_writer_kwargs() -> dict:
    """megatron-core 0.19 picks nvidia-resiliency-ext's writer when installed; ask for its own,
    whose bucket writer :func:`_write_shards` calls (0.16 has only its own: no argument)."""
    return {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {}


class _Inbox(list):
    """Stands in for the writer's result queue when a bucket is written in this process."""

    put = list.append


class _NoCount:
    """Stands in for the writer's completion-count queue (nothing to count in one process)."""

    def get(self):
        return None

    def task_done(self):
        return None


def _write_shards(request) -> None:
    """Write this rank's shards of a Megatron save request in this process; raise on any failure.

    Megatron's own writer forks worker processes (0.16) or threads (0.19) and then waits on a
    completion queue that a worker only signals when it gets past its first line: a worker that
    dies there (0.16 without psutil: ``RuntimeError: psutil is not installed``, or a worker
    killed by the OOM killer) left the trainer waiting forever. Writing the buckets here, one
    after another, turns every such failure into an exception of this call.
    """
    fn = request.async_fn
    if fn is None:  # nothing to write on this rank
        return
    args = list(request.async_fn_args)
    if request.preload_fn is not None:
        args[1] = request.preload_fn()  # device -> host copies of the tensors to write
    name = getattr(getattr(fn, "func", None), "__name__", "")
    if not (isinstance(fn, partial) and name in ("write_preloaded_data_multiproc", "write_preloaded_data_multithread")):
        fn(*args, **request.async_fn_kwargs)  # another writer layout: its errors still raise here
        return
    transform_list, use_msc = fn.args[:2]
    _, buckets, results_queue = args
    results = {}
    with _memory_probe_without_psutil():
        for i, bucket in enumerate(buckets):
            inbox = _Inbox()
            filesystem_async.FileSystemWriterAsync.write_preloaded_data(
                transform_list, i, bucket, inbox, _NoCount(), True, **({"use_msc": use_msc} if use_msc else {}))
            (idx, written), = inbox
            if isinstance(written, BaseException):
                raise written
            results[idx] = written
    results_queue.put(results)  # what Megatron's finalize step reads back


@contextlib.contextmanager
def _memory_probe_without_psutil():
    """Megatron's bucket writer measures its memory with psutil for a debug log line only, and
    raises before writing anything when psutil is missing. Without psutil, report 0 bytes for
    the duration of our writes, so saving does not depend on a logging aid."""
    if getattr(filesystem_async, "HAVE_PSUTIL", True) or not hasattr(filesystem_async, "_process_memory"):
        yield
        return
    probe = filesystem_async._process_memory
    filesystem_async._process_memory = lambda: 0
    try:
        yield
    finally:
        filesystem_async._process_memory = probe


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(error: BaseException | None, what: str, last_good: Path | None, cleanup: Path | None = None) -> None:
    """Every rank learns whether any rank failed ``what``; if one did, all raise the same error.

    Called by every rank at the same point, after a local step that may fail (so no rank is
    inside another collective). The error names each failing rank's cause and the last good
    checkpoint; rank 0 removes the half-written ``cleanup`` directory.
    """
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return
    causes: list = [None] * dist.get_world_size()
    dist.all_gather_object(causes, None if error is None else f"{type(error).__name__}: {error}")
    by_cause: dict[str, list[int]] = {}
    for r, c in enumerate(causes):
        if c is not None:
            by_cause.setdefault(c.strip().splitlines()[0] if c.strip() else c, []).append(r)
    detail = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))}: {c}" for c, rs in by_cause.items())
    if dist.get_rank() == 0 and cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    raise CheckpointError(f"{what} failed ({detail}). {_last_good_text(last_good)}")


def _last_good_text(last_good: Path | None) -> str:
    if last_good is None:
        return "No earlier checkpoint exists; nothing was resumable before this save either."
    return f"The last good checkpoint, {last_good}, is intact: fix the cause and rerun the same command to resume from it."


def _abort(error: BaseException, what: str, last_good: Path | None) -> None:
    """A rank failed inside Megatron's collective save: the others may be waiting for it in a
    collective it will never join, so this process exits now; its peers' collectives then fail
    (gloo: at once; NCCL: torchrun stops the job when this worker exits)."""
    print(f"moba-cp train: rank {dist.get_rank()}: {what} failed ({type(error).__name__}: {error}). "
          f"{_last_good_text(last_good)}", file=sys.stderr, flush=True)
    os._exit(1)


def _run_local(fn) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank by _agree
        return e
    return None


def _prepare_tmp(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def _probe_writable(tmp: Path, rank: int) -> None:
    probe = tmp / f".probe_rank_{rank:05d}"
    probe.write_bytes(b"moba_cp")
    probe.unlink()


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, scheduler, *,
                    consumed_samples: int, meta: dict, keep_last: int = 2) -> Path:
    """Save a complete checkpoint of ``step`` (collective: every rank must call it).

    Returns the final directory. Any failure (an unwritable or full disk, a writer error) raises
    the same :class:`CheckpointError` on every rank within seconds, naming the failing ranks'
    causes and the last good checkpoint, which stays intact; the partial save is removed.
    The local steps that can fail are each followed by an agreement among the ranks, so no rank
    is left waiting in a collective; a failure inside Megatron's collective planning ends the
    failing process instead (see :func:`_abort`).
    """
    root = Path(ckpt_dir)
    final = root / f"iter_{step:07d}"
    tmp = root / f"iter_{step:07d}.tmp"
    rank = dist.get_rank()
    last_good = latest_checkpoint(root)
    what = f"saving checkpoint step {step} to {tmp}"
    _agree(_run_local(lambda: _prepare_tmp(root, tmp)) if rank == 0 else None, what, last_good)
    _agree(_run_local(lambda: _probe_writable(tmp, rank)), what, last_good, cleanup=tmp)
    _start_writer_service_immune_to_stop_signals()
    writer = _mcore_writer_kwargs()
    try:
        with compat_cpu.cuda_to_cpu():  # the reshardable optimizer state gathers on 'cuda' (no-op on GPUs)
            request = dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, is_loading=False),
                                              str(tmp), async_sharded_save=True, **writer)
    except Exception as e:  # noqa: BLE001
        _abort(e, what, last_good)

    def write_local():
        with compat_cpu.cuda_to_cpu():
            _write_shards(request)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")

    _agree(_run_local(write_local), what, last_good, cleanup=tmp)
    try:
        with compat_cpu.cuda_to_cpu():
            for finalize in request.finalize_fns:  # gathers the write results; rank 0 writes .metadata
                finalize()
    except Exception as e:  # noqa: BLE001
        _abort(e, what, last_good)

    def publish():
        info = dict(meta, step=step, consumed_samples=consumed_samples, world_size=dist.get_world_size())
        with open(tmp / "meta.json", "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a complete checkpoint of the same step (re-run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(f"{step}\n")
        os.replace(latest_tmp, root / "latest")
        complete = complete_checkpoints(root)
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    _agree(_run_local(publish) if rank == 0 else None, what, last_good, cleanup=tmp)
    return final


# Deprecation notices torch/Megatron print on every dist-checkpoint load; harmless for us (the
# APIs are Megatron's to migrate). Silenced only around our loads, by message and category.
_KNOWN_LOAD_WARNINGS = (
    r"`load_state_dict` is deprecated and will be removed in future versions",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
)


@contextlib.contextmanager
def quiet_known_load_warnings():
    """Hide the known-harmless FutureWarnings of a Megatron dist-checkpoint load (nothing else)."""
    with warnings.catch_warnings():
        for message in _KNOWN_LOAD_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Load a complete checkpoint into model/optimizer/scheduler (collective). Returns meta.json."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a complete moba_cp checkpoint (no meta.json).")
    meta = json.loads(meta_file.read_text())
    # no_grad: Megatron copies loaded values into the (leaf, requires_grad) fp32 main params in place.
    with compat_cpu.cuda_to_cpu(), torch.no_grad(), quiet_known_load_warnings():
        _ensure_optimizer_state(optimizer)
        state = dist_checkpointing.load(_sharded_state(model, optimizer, scheduler, is_loading=True), str(path))
        module = model.module if hasattr(model, "module") else model
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if meta.get("world_size") == dist.get_world_size() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
