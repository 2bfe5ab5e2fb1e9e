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

The plain optimizer's state is replicated, so such a run may resume with another data-parallel
size; the distributed optimizer's (sharded) state resumes with the dp it was saved with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moba_cp.megatron import compat_cpu

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "CheckpointError"]

_DIR_RE = re.compile(r"^iter_(\d{7})$")
# The distributed optimizer's state format. With torch's Adam (no apex/TE, our case everywhere),
# Megatron 0.16's reshardable formats break: "fully_reshardable" fails to load (KeyError 'step'),
# "fully_sharded_model_space" fails to save, and "dp_reshardable" loads under another dp size but
# resumes with different losses (measured). So the distributed optimizer resumes with the dp it
# was saved with (load_checkpoint checks); the plain optimizer (replicated state) resumes under any dp.
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
    private API; the loaded values replace the dummies.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        inner = getattr(opt, "optimizer", None)
        if init is not None and inner is not None and not inner.state:
            init()


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


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, scheduler, *,
                    consumed_samples: int, meta: dict, keep_last: int = 2) -> Path:
    """Save a complete checkpoint of ``step`` (collective: every rank must call it).

    Returns the final directory. Raises :class:`CheckpointError` on I/O failure (the previous
    checkpoint stays intact).
    """
    from megatron.core import dist_checkpointing

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
    dp_now = parallel_state.get_data_parallel_world_size()
    if meta.get("distributed_optimizer") and meta.get("dp") not in (None, dp_now):
        raise CheckpointError(
            f"{path} was saved with the distributed optimizer at dp={meta['dp']}; this run has dp={dp_now}. "
            f"Distributed-optimizer state resumes only with the dp it was saved with. Fix: launch "
            f"{meta['dp'] * parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_context_parallel_world_size()} "
            f"processes, or train with parallel.distributed_optimizer=false (its state resumes under any dp)."
        )
    # no_grad: Megatron copies loaded values into the (leaf, requires_grad) fp32 main params in place.
    with compat_cpu.cuda_to_cpu(), torch.no_grad():
        _ensure_optimizer_state(optimizer)
        state = dist_checkpointing.load(_sharded_state(model, optimizer, scheduler, is_loading=True), str(path))
        module = model.module if hasattr(model, "module") else model
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if meta.get("world_size") == dist.get_world_size() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
