"""The ``moba-cp`` command: parses the arguments and dispatches to the module of each subcommand.

    moba-cp --version
    moba-cp config RECIPE.yaml [--a.b=value ...]     print the resolved, validated recipe
    moba-cp selfcheck [--tokens N ...]               MoBA on random data vs the fp64 oracle
    moba-cp train RECIPE.yaml [--dry-run] [--a.b=value ...]
    moba-cp prepare-data INPUTS... --output PREFIX [--tokenizer byte|tokenizer.json]
    moba-cp plot RUN_DIR... [--out DIR]
    moba-cp sweep SWEEP.yaml... [--gpus 0,1,2,3] [--points-per-gpu N] [--deadline-min M] [--dry-run]; moba-cp plot --sweep SWEEP_OUT_DIR
    moba-cp eval loss CHECKPOINT --seq-len 32768 --last 2048
    moba-cp eval needle CHECKPOINT --lengths 4k,8k --depths 0,10,...,100
    moba-cp export hf RUN_DIR --out DIR              a transformers-loadable directory (moba_cp/hf/)
    moba-cp export needle-task EXPORT_DIR --out DIR  needle grid as an lm-evaluation-harness task
    moba-cp analyze selection RUN_DIR --seq-len 32768 [--cp 2,4,8,16] [--num-seqs N] [--out DIR]

Each subcommand lives with its part: ``train/train_command.py`` (train, config),
``eval/eval_command.py`` (eval), ``eval/plots.py`` (plot), ``experiments/sweep_command.py``
(sweep, plot --sweep), ``hf/export.py`` and ``hf/lm_eval_task.py`` (export), ``hf/needle_generate.py``
(eval needle --generate), ``analysis/selection.py``, ``data/prepare.py``, ``selfcheck.py``.
"""

from __future__ import annotations

import argparse
import sys

from moba_cp.import_notices import hide_megatron_import_notices

hide_megatron_import_notices()  # before the imports below reach Megatron-Core

# (the imports below follow that call: a warnings filter set after the import comes too late)
import moba_cp  # noqa: E402
from moba_cp import selfcheck  # noqa: E402
from moba_cp.analysis import selection  # noqa: E402
from moba_cp.config import RecipeError  # noqa: E402
from moba_cp.data import prepare  # noqa: E402
from moba_cp.eval import plots  # noqa: E402
from moba_cp.eval.eval_command import add_loss_arguments, add_needle_arguments, run_eval_command  # noqa: E402
from moba_cp.experiments.sweep_command import add_sweep_arguments, run_sweep_command, run_sweep_plots  # noqa: E402
from moba_cp.hf import export as hf_export  # noqa: E402
from moba_cp.hf import lm_eval_task as hf_lm_eval_task  # noqa: E402
from moba_cp.hf import needle_generate  # noqa: E402
from moba_cp.train.train_command import add_train_arguments, run_config_command, run_train_command  # noqa: E402

__all__ = ["build_parser", "main"]


def _no_extra(rest: list[str], cmd: str) -> None:
    if rest:
        raise SystemExit(f"moba-cp {cmd}: unexpected arguments {rest}")


def _cmd_eval_needle(args, overrides) -> int:
    """``eval needle``: teacher-forced scoring, or with ``--generate`` KV-cache decoding (hf/)."""
    if args.generate:
        return needle_generate.run(args, overrides)
    return run_eval_command(args, overrides)


def _cmd_analyze(args, overrides) -> int:
    args.overrides = overrides
    try:
        return selection.run(args)
    except (FileNotFoundError, RecipeError, ValueError) as e:
        print(f"moba-cp analyze selection: {e}", file=sys.stderr)
        return 2


def _cmd_prepare_data(args, rest) -> int:
    _no_extra(rest, "prepare-data")
    return prepare.run(args)


def _cmd_plot(args, rest) -> int:
    _no_extra(rest, "plot")
    if not args.sweep and (args.kind or args.metric):
        print("moba-cp plot: --kind and --metric choose a sweep chart; add --sweep.", file=sys.stderr)
        return 2
    return run_sweep_plots(args.run_dirs, args.out, args.kind, args.metric) if args.sweep else plots.run(args)


def _cmd_selfcheck(args, rest) -> int:
    _no_extra(rest, "selfcheck")
    return selfcheck.run(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``moba-cp`` parser; each subcommand's ``func(args, rest)`` runs it (``rest``: the
    arguments the parser did not know, i.e. recipe overrides ``--a.b=value``)."""
    parser = argparse.ArgumentParser(
        prog="moba-cp", description="Context-parallel MoBA training on Megatron-Core."
    )
    parser.add_argument("--version", action="version", version=f"moba-cp {moba_cp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("config", help="print the resolved, validated recipe",
                       description="Load RECIPE (YAML), apply --a.b=value overrides, validate, print.")
    p.add_argument("recipe", help="path to a YAML recipe (e.g. recipes/quickstart.yaml)")
    p.set_defaults(func=run_config_command)

    p = sub.add_parser("train", help="train a model from a recipe (run under torchrun for several processes)",
                       description="Train from RECIPE with --a.b=value overrides. Launch with torchrun for "
                                   "several processes; see launch/ and the README.")
    add_train_arguments(p)
    p.set_defaults(func=run_train_command)

    p = sub.add_parser("prepare-data", help="build a Megatron indexed dataset (.bin/.idx) from text files",
                       description="Tokenize text files into a Megatron indexed dataset, one document per file.")
    prepare.add_arguments(p)
    p.set_defaults(func=_cmd_prepare_data)

    p = sub.add_parser("plot", help="loss curves, position-wise/trailing loss and needle heatmaps of runs",
                       description="Draw comparison PNGs of one or more run directories.")
    plots.add_arguments(p)
    p.add_argument("--sweep", action="store_true",
                   help="the directories are sweep output folders: draw each sweep's chart (scaling fits, "
                        "granularity, hybrid) in the style of the MoBA paper")
    p.add_argument("--kind", default=None, help="with --sweep: draw this chart kind (scaling, granularity, hybrid, "
                                                "retrieval) instead of the sweep's own")
    p.add_argument("--metric", default=None, help="with --sweep: plot this metric instead of the sweep's own")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("sweep", help="run every point of experiment sweeps (skips finished points)",
                       description="Run the points of SWEEP.yaml files (each a moba-cp train under torchrun), "
                                   "one after another or, with --gpus, several at once on a machine's GPUs; "
                                   "skip finished ones; collect their metrics. Trailing --a.b=value overrides "
                                   "apply to every point.")
    add_sweep_arguments(p)
    p.set_defaults(func=run_sweep_command)

    p = sub.add_parser("eval", help="long-context evaluation of a checkpoint: trailing/position-wise loss, needles",
                       description="Evaluate a checkpoint (run dir, checkpoints dir or iter_* dir). Runs under "
                                   "torchrun with tp*cp processes for context-parallel evaluation; recipe "
                                   "overrides (--parallel.cp=N ...) may follow.")
    esub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    pl = esub.add_parser("loss", help="trailing loss (last N tokens) and position-wise loss")
    pl.add_argument("checkpoint")
    add_loss_arguments(pl)
    pn = esub.add_parser("needle", help="needle-in-a-haystack retrieval accuracy per (length, depth)")
    pn.add_argument("checkpoint")
    add_needle_arguments(pn)
    pn.add_argument("--generate", action="store_true",
                    help="decode the answers with the KV cache (exact match on the decoded string) instead of "
                         "teacher forcing; one process; CHECKPOINT may also be a `moba-cp export hf` directory")
    for q in (pl, pn):
        q.add_argument("--label", default=None, help="name in plots (default: the recipe name)")
        q.set_defaults(func=run_eval_command)
    pn.set_defaults(func=_cmd_eval_needle)

    p = sub.add_parser("export", help="export a trained checkpoint (e.g. to a transformers directory)")
    xsub = p.add_subparsers(dest="kind", metavar="FORMAT", required=True)
    px = xsub.add_parser("hf", help="a transformers-loadable directory (config, safetensors, tokenizer, modeling "
                                    "file); its logits are checked against moba_cp's forward",
                         description="Export RUN_DIR's latest checkpoint (any tp/cp) to a transformers directory.")
    hf_export.add_arguments(px)
    px.set_defaults(func=hf_export.run)
    px = xsub.add_parser("needle-task", help="the needle grid as an offline lm-evaluation-harness task (for the hf "
                                             "model type on an exported directory)")
    hf_lm_eval_task.add_arguments(px)
    px.set_defaults(func=hf_lm_eval_task.run)

    p = sub.add_parser("analyze", help="analyses of a checkpoint: what CP traffic its block selection implies",
                       description="Analyse a trained checkpoint (run dir, checkpoints dir or iter_* dir); runs "
                                   "under torchrun with tp processes like `eval`; recipe overrides may follow.")
    asub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    pa = asub.add_parser("selection", help="union of selected remote blocks per simulated CP rank, selection "
                                           "distances, bytes per comm type (JSON + plot)")
    pa.add_argument("checkpoint", help="run directory, checkpoints directory or one iter_* folder")
    pa.add_argument("--seq-len", type=int, required=True, help="held-out sequence length S (e.g. 32768)")
    pa.add_argument("--cp", default="2,4,8,16", help="simulated CP sizes, comma-separated (default 2,4,8,16)")
    pa.add_argument("--num-seqs", type=int, default=4, help="held-out sequences to analyse (default 4)")
    pa.add_argument("--tile-rows", default="64,128",
                    help="query-tile sizes whose per-head unions of selected past blocks are counted (what a "
                         "query-major kernel would walk); comma-separated powers of two, '' for none (default 64,128)")
    pa.add_argument("--out", default=None, help="output folder (default RUN_DIR/analysis)")
    pa.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("selfcheck", help="run MoBA on random data with each backend against the fp64 oracle")
    selfcheck.add_arguments(p)
    p.set_defaults(func=_cmd_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
