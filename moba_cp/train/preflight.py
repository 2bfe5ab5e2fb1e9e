"""The checks a training run makes before any process group exists (the workers, the torchrun
wrapper and ``--dry-run`` make the same ones), and the message for a run that is already done."""

from __future__ import annotations

from moba_cp.config import RecipeConfig, validate
from moba_cp.data.checks import validate_data_paths
from moba_cp.data.tokenizers import build_tokenizer
from moba_cp.train.run_dir import RunDirState, inspect_run_dir

__all__ = ["preflight", "complete_message"]


def preflight(cfg: RecipeConfig, world_size: int, device: str):
    """Every check that needs no process group, in the order a user should hear about them:
    the recipe (for ``world_size`` processes on ``device``), the run directory, data paths and
    tokenizer. Returns ``(tokenizer, RunDirState)``; raises the first error (RecipeError,
    RunDirError, DataConfigError, TokenizerError). Writes nothing but ``data.cache_dir``, and
    that only when the run may go ahead."""
    validate(cfg, world_size=world_size, device=device)
    state = inspect_run_dir(cfg)
    validate_data_paths(cfg.data)
    return build_tokenizer(cfg.data.tokenizer), state


def complete_message(cfg: RecipeConfig, state: RunDirState) -> str:
    """What a run whose directory already holds the finished run says (and then does nothing)."""
    return (f"moba-cp train: {cfg.logging.dir} is complete: {state.checkpoint} is at step {state.step} "
            f"(train.steps={cfg.train.steps}); nothing to do, nothing changed. To train longer, raise "
            f"--train.steps; to start over, use a new --logging.dir.")
