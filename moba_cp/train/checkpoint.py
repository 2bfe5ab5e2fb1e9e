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

Both optimizers resume under another data-parallel size: the plain optimizer's state is
replicated, the distributed optimizer's is saved in Megatron's "dp_reshardable" format (tested:
dp=2 -> dp=1 gives the uninterrupted run's losses).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from moba_cp.megatron import compat_cpu

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "CheckpointError"]

_DIR_RE = re.compile(r"^iter_(\d{7})$")
# The distributed optimizer's state format. With torch's Adam (no apex/TE, our case everywhere),
# Megatron 0.16's other formats break: "fully_reshardable" fails to load (KeyError 'step') and
# "fully_sharded_model_space" fails to save. "dp_reshardable" loads under the same or another dp
# size; its wrong Adam step count after a load is repaired by _restore_adam_steps (it was what
# made resumed losses differ, with the same dp as with another).
_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message names the path and the cause."""


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint directory (one with meta.json), or None."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    best = None
    for p in root.iterdir():
        m = _DIR_RE.match(p.name)
        if m and (p / "meta.json").is_file():
            if best is None or int(m.group(1)) > int(_DIR_RE.match(best.name).group(1)):
                best = p
    return best


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
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _start_writer_service_immune_to_stop_signals() -> None:
    """Start Megatron's checkpoint-writer results service with SIGTERM/SIGINT ignored.

    Megatron's writer collects results through a ``multiprocessing`` Manager, a separate process
    started at the first save. Preemption (SLURM, a ``kill`` of the process group) signals every
    process, and a dead Manager makes the very save meant to preserve the run fail. Ignored
    signals stay ignored across the Manager's spawn, so it survives; the trainer itself handles
    SIGTERM by saving (see ``moba_cp.train.loop``).
    """
    import signal

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # pragma: no cover - layout of another megatron-core version
        return
    start = getattr(filesystem_async, "_get_write_results_queue", None)
    if start is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, scheduler, *,
                    consumed_samples: int, meta: dict, keep_last: int = 2) -> Path:
    """Save a complete checkpoint of ``step`` (collective: every rank must call it).

    Returns the final directory. Raises :class:`CheckpointError` on I/O failure (the previous
    checkpoint stays intact).
    """
    from megatron.core import dist_checkpointing

    _start_writer_service_immune_to_stop_signals()
    root = Path(ckpt_dir)
    final = root / f"iter_{step:07d}"
    tmp = root / f"iter_{step:07d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    try:
        with compat_cpu.cuda_to_cpu():  # the reshardable optimizer state gathers on 'cuda' (no-op on GPUs)
            dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, is_loading=False), str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)  # after the Megatron save, which wants an empty directory
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    except Exception as e:  # noqa: BLE001 - wrap with the path, keep the cause
        raise CheckpointError(f"saving checkpoint step {step} to {tmp} failed: {e}") from e
    dist.barrier()
    if rank == 0:
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
        complete = sorted(p for p in root.iterdir() if _DIR_RE.match(p.name) and (p / "meta.json").is_file())
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Load a complete checkpoint into model/optimizer/scheduler (collective). Returns meta.json."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a complete moba_cp checkpoint (no meta.json).")
    meta = json.loads(meta_file.read_text())
    # no_grad: Megatron copies loaded values into the (leaf, requires_grad) fp32 main params in place.
    with compat_cpu.cuda_to_cpu(), torch.no_grad():
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
