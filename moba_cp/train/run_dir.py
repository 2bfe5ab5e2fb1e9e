"""A run directory belongs to one model: the check made before a run writes anything.

A checkpoint is only meaningful together with the recipe that trained it. Before a training run
touches its run directory, :func:`inspect_run_dir` compares the new resolved recipe with the one
saved beside the newest complete checkpoint (``meta.json``'s ``config``; ``recipe.yaml`` of the
run directory for checkpoints written before that existed):

- a key that changes what the checkpoint means (model shape, attention pattern, MoBA block size
  and top-k, tokenizer and data, seed, batch size, optimizer and its hyper-parameters, ...)
  differs -> :class:`RunDirError` naming each key with both values and the fix;
- only keys that may change on resume differ (:data:`MAY_CHANGE`: steps, intervals, logging,
  dp/cp, kernel backends, ...) -> the run resumes and the differences are listed;
- the checkpoint is at or past ``train.steps`` -> the run is complete: nothing to do.

Plain files only (no torch, no process group), so the launcher can run it before spawning
workers and every worker before ``init_process_group``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moba_cp.config import RecipeConfig, to_dict
from moba_cp.train.checkpoint_dirs import checkpoint_step, latest_checkpoint

__all__ = ["RunDirError", "RunDirState", "inspect_run_dir", "checkpoint_dir_of", "describe", "MAY_CHANGE", "flatten"]

# Keys (or "section." prefixes) that may differ between a checkpoint's recipe and the run that
# resumes it: they change how the run is executed or logged, not what the weights mean.
MAY_CHANGE = (
    "name", "model.fused_ops", "model.fused_norm", "moba.backend", "moba.kernel", "attention.full_backend",
    "parallel.", "train.steps", "train.micro_batch_size",
    "train.recompute", "train.prefetch", "data.cache_dir", "eval.", "logging.", "checkpoint.",
)
# Exceptions inside those prefixes, with the reason printed when they differ.
NOT_ON_RESUME = {
    "parallel.tp": "resuming under another tensor-parallel size is not supported",
    "parallel.distributed_optimizer": "the optimizer state is saved in another layout",
}


class RunDirError(RuntimeError):
    """The run directory cannot be used for this recipe; the message names each reason and the fix."""


@dataclass
class RunDirState:
    """What a run directory holds for the recipe about to run."""

    checkpoint: Path | None = None  # newest complete checkpoint, if any
    step: int = 0  # its step (0 = a new run)
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)  # allowed (key, saved, new)
    complete: bool = False  # the checkpoint is at or past train.steps: nothing to train

    def describe_changes(self) -> str:
        return "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in self.changes)


def checkpoint_dir_of(cfg: RecipeConfig) -> Path:
    """``checkpoint.dir``, or ``<logging.dir>/checkpoints``."""
    return Path(cfg.checkpoint.dir or Path(cfg.logging.dir) / "checkpoints")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"hidden_size": 64}}`` -> ``{"model.hidden_size": 64}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _show(v) -> str:
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v).replace("'", "")


def _as_override(v) -> str:
    """A value as it is written after ``--key=`` on a command line."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(_as_override(x) for x in v) + "]"
    return str(v)


def _may_change(key: str) -> bool:
    if key in NOT_ON_RESUME:
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in MAY_CHANGE)


def _saved_recipe(ckpt: Path, run_dir: Path) -> dict | None:
    """The recipe a checkpoint was trained with: its meta.json ``config``, else the run's recipe.yaml."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{ckpt}/meta.json cannot be read ({e}); the checkpoint is damaged. Fix: move it "
                          f"away to resume from the one before, or train into a new --logging.dir.") from None
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    for candidate in (run_dir / "recipe.yaml", ckpt.parent.parent / "recipe.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text())
    return None


def _latest(ckpt_dir: Path) -> tuple[Path | None, int]:
    latest = latest_checkpoint(ckpt_dir)
    return latest, (checkpoint_step(latest) if latest is not None else 0)


def inspect_run_dir(cfg: RecipeConfig) -> RunDirState:
    """Check that ``cfg`` may run in its run directory; raise :class:`RunDirError` if not.

    Reads only; writes nothing. See the module docstring for the rules.
    """
    run_dir = Path(cfg.logging.dir)
    ckpt_dir = checkpoint_dir_of(cfg)
    latest, step = _latest(ckpt_dir)
    if latest is None:
        return RunDirState()
    where = "--logging.dir" if cfg.checkpoint.dir is None else "--checkpoint.dir"
    if not cfg.checkpoint.resume:
        raise RunDirError(
            f"checkpoint.resume=false starts a new run, but {ckpt_dir} holds checkpoints of an earlier run "
            f"(latest: {latest.name}); a new run there would mix its checkpoints with them. Nothing was "
            f"written. Fix: start the new run in an empty directory ({where}=NEW_DIR), or drop "
            f"--checkpoint.resume=false to resume the earlier run.")
    saved = _saved_recipe(latest, run_dir)
    state = RunDirState(checkpoint=latest, step=step)
    if saved is None:
        print(f"moba-cp train: warning: {latest} has no saved recipe (meta.json config or recipe.yaml); "
              f"cannot check that it belongs to this model.", flush=True)
    else:
        new = flatten(to_dict(cfg))
        defaults = flatten(to_dict(RecipeConfig()))
        old = flatten(saved)
        refused = []
        for key in sorted(new):
            before = old.get(key, defaults.get(key))  # a key added since the save had its default
            if before == new[key]:
                continue
            if _may_change(key):
                state.changes.append((key, before, new[key]))
            else:
                refused.append((key, before, new[key]))
        if refused:
            lines = "\n".join(f"  {k}: checkpoint {_show(a)}, now {_show(b)}"
                              + (f" ({NOT_ON_RESUME[k]})" if k in NOT_ON_RESUME else "") for k, a, b in refused)
            keep = " ".join(f"--{k}={_as_override(a)}" for k, a, _ in refused)
            raise RunDirError(
                f"{ckpt_dir} holds a checkpoint ({latest.name}, step {step}) of a different run; these "
                f"settings differ from the ones it was trained with:\n{lines}\n"
                f"Resuming would mix them, so nothing was written. Fix: train into a new directory "
                f"({where}=NEW_DIR), or resume with the saved values ({keep}).")
    state.complete = step >= cfg.train.steps
    return state


def describe(state: RunDirState, cfg: RecipeConfig) -> str:
    """One line for the log about what the run will do with its directory."""
    if state.checkpoint is None:
        return f"new run in {cfg.logging.dir}"
    text = f"resuming from {state.checkpoint} (step {state.step})"
    if state.changes:
        text += f" with changed settings: {state.describe_changes()}"
    return text

