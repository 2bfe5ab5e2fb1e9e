"""``moba-cp train RECIPE.yaml [--dry-run] [--a.b=value ...]``: its flags and what it runs.

The same arguments reach it three ways: ``moba-cp train`` (the top-level command), ``python -m
moba_cp.train`` (what torchrun launches; :func:`main`) and the torchrun wrapper
:mod:`moba_cp.train.launch`, which parses them with :func:`build_train_parser` to check a
recipe before it spawns any worker.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moba_cp.config import RecipeConfig, RecipeError, dump, load_recipe
from moba_cp.train.checkpoint import CheckpointError
from moba_cp.train.distributed import world_size_from_env
from moba_cp.train.dry_run import dry_run
from moba_cp.train.loop import TrainingError, train
from moba_cp.train.oom_hints import oom_message
from moba_cp.train.user_errors import report, user_errors

__all__ = ["add_train_arguments", "build_train_parser", "load_recipe_or_report", "run_train_command",
           "run_config_command", "main"]


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``moba-cp train`` (recipe overrides ``--a.b=value`` are the parser's unknown rest)."""
    parser.add_argument("recipe", help="path to a YAML recipe")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe without GPUs and print layout, memory, FLOPs and KV traffic")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: the world size to plan for (default tp*cp*dp, dp defaulting to 1)")
    parser.add_argument("--link-gbps", default=None, metavar="GBPS[,GBPS]",
                        help="with --dry-run: link speed per direction for the CP comm times, one number or "
                             "INTRA,INTER (NVLink, InfiniBand); default 3600,400")
    parser.add_argument("--selection", default=None, metavar="SELECTION.json",
                        help="with --dry-run: remote-block union measured by `moba-cp analyze selection` "
                             "(default 100%%)")
    return parser


def build_train_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m moba_cp.train`` (the same flags as ``moba-cp train``)."""
    return add_train_arguments(argparse.ArgumentParser(
        prog="moba-cp train", description="Train from RECIPE with --a.b=value overrides."))


def load_recipe_or_report(recipe: str, overrides: list[str], command: str) -> RecipeConfig | None:
    """The validated recipe, or None after printing the error (exit code 2 for the caller)."""
    try:
        return load_recipe(recipe, overrides)
    except RecipeError as e:
        report(command, e)
        return None


def run_train_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """``moba-cp train``: plan (``--dry-run``) or train; the exit code (2: bad input, 1: failed)."""
    cfg = load_recipe_or_report(args.recipe, overrides, "train")
    if cfg is None:
        return 2
    if args.dry_run:
        return dry_run(cfg, world_size=args.world_size, link_gbps=args.link_gbps, selection=args.selection)
    try:
        train(cfg)
    except user_errors() as e:  # raised before training starts
        report("train", e)
        return 2
    except (CheckpointError, TrainingError) as e:  # the same on every rank: said once
        report("train", e)
        return 1
    except torch.OutOfMemoryError:
        # The allocator's message names the allocation, not the setting that would make the run
        # fit: say which overrides would, from the rank that failed (it may be the only one),
        # then let the traceback through as for any crash.
        print(f"moba-cp train: {oom_message(cfg, args.recipe, world_size_from_env())}", file=sys.stderr, flush=True)
        raise
    return 0


def run_config_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """``moba-cp config RECIPE``: print the resolved, validated recipe."""
    cfg = load_recipe_or_report(args.recipe, overrides, "config")
    if cfg is None:
        return 2
    print(dump(cfg), end="")
    return 0


def main(argv: list[str]) -> int:
    """``python -m moba_cp.train ARGS``: ``moba-cp train ARGS``."""
    args, overrides = build_train_parser().parse_known_args(argv)
    return run_train_command(args, overrides)
