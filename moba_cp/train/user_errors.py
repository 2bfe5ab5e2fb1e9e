"""The exceptions that mean bad input (recipe, data, tokenizer, run directory), and how a command
reports an error: the CLI, the launcher and ``--dry-run`` print them in one line with exit code
2, never with a traceback, from rank 0 only (every rank raises the same error)."""

from __future__ import annotations

import os
import sys

from moba_cp.config import RecipeError
from moba_cp.data.checks import DataConfigError
from moba_cp.data.tokenizers import TokenizerError
from moba_cp.train.run_dir import RunDirError

__all__ = ["user_errors", "is_main_process", "report"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (recipe, data, run directory): exit 2, no traceback."""
    return RecipeError, DataConfigError, TokenizerError, RunDirError


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (or a plain process): the one that prints user errors."""
    return int(os.environ.get("RANK", "0")) == 0


def report(command: str, error: BaseException | str) -> None:
    """One readable line on stderr, ``moba-cp COMMAND: ERROR``, from rank 0; the other ranks
    stay silent (they hit the same error)."""
    if is_main_process():
        print(f"moba-cp {command}: {error}", file=sys.stderr, flush=True)
