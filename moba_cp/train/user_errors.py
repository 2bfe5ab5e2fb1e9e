"""The exceptions that mean bad input (recipe, data, tokenizer, run directory): the CLI, the
launcher and ``--dry-run`` report them in one line with exit code 2, never with a traceback."""

from __future__ import annotations

from moba_cp.config import RecipeError
from moba_cp.data.datasets import DataConfigError
from moba_cp.data.tokenizers import TokenizerError
from moba_cp.train.run_dir import RunDirError

__all__ = ["user_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (recipe, data, run directory): exit 2, no traceback."""
    return RecipeError, DataConfigError, TokenizerError, RunDirError
