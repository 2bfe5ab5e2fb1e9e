"""The ``moba-cp`` command: one entry point, subcommands in their own modules.

    moba-cp --version
    moba-cp config RECIPE.yaml [--a.b=value ...]     print the resolved, validated recipe
    moba-cp selfcheck [--tokens N ...]               MoBA on random data vs the fp64 oracle
    moba-cp train RECIPE.yaml [--dry-run] [--a.b=value ...]
    moba-cp prepare-data INPUTS... --output PREFIX [--tokenizer byte|tokenizer.json]
    moba-cp plot RUN_DIR... [--out DIR]
    moba-cp sweep SWEEP.yaml... [--gpus 0,1,2,3] [--deadline-min M] [--dry-run]; moba-cp plot --sweep SWEEP_OUT_DIR
    moba-cp eval loss CHECKPOINT --seq-len 32768 --last 2048
    moba-cp eval needle CHECKPOINT --lengths 4k,8k --depths 0,10,...,100
    moba-cp export hf RUN_DIR --out DIR              a transformers-loadable directory (moba_cp/hf/)
    moba-cp export needle-task EXPORT_DIR --out DIR  needle grid as an lm-evaluation-harness task
    moba-cp analyze selection RUN_DIR --seq-len 32768 [--cp 2,4,8,16] [--num-seqs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import moba_cp
from moba_cp.train.user_errors import user_errors


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job (or a plain process): the one that prints user errors."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _report(cmd: str, error: BaseException) -> None:
    """One readable message on stderr from rank 0; the other ranks stay silent (same error)."""
    if _is_main_process():
        print(f"moba-cp {cmd}: {error}", file=sys.stderr, flush=True)


def _load_or_report(args, overrides, cmd: str):
    """The validated recipe, or None after printing the error (exit code 2 for the caller)."""
    from moba_cp.config import RecipeError, load_recipe

    try:
        return load_recipe(args.recipe, overrides)
    except RecipeError as e:
        _report(cmd, e)
        return None


def _cmd_config(args, overrides) -> int:
    from moba_cp.config import dump

    cfg = _load_or_report(args, overrides, "config")
    if cfg is None:
        return 2
    print(dump(cfg), end="")
    return 0


def _cmd_train(args, overrides) -> int:
    cfg = _load_or_report(args, overrides, "train")
    if cfg is None:
        return 2
    if args.dry_run:
        from moba_cp.train.dry_run import dry_run

        return dry_run(cfg, world_size=args.world_size, link_gbps=args.link_gbps, selection=args.selection)
    from moba_cp.train.checkpoint import CheckpointError
    from moba_cp.train.loop import TrainingError, train

    try:
        train(cfg)
    except user_errors() as e:  # raised before training starts
        _report("train", e)
        return 2
    except (CheckpointError, TrainingError) as e:  # the same on every rank: said once
        _report("train", e)
        return 1
    return 0


def _eval_checks(args, overrides):
    """Everything ``moba-cp eval`` can check before a process group or model exists.

    Returns ``(checkpoint, trained recipe, meta, longest length)``; prints (rank 0) a notice for
    each length beyond the trained ``model.seq_length``. Raises ValueError / FileNotFoundError /
    a user error with the fix.
    """
    from moba_cp.data.tokenizers import build_tokenizer
    from moba_cp.eval import cli as eval_cli
    from moba_cp.eval.model_runner import read_trained_recipe
    from moba_cp.eval.needle import check_needle_grid

    ckpt, trained, meta = read_trained_recipe(args.checkpoint, overrides)
    if args.kind == "loss":
        eval_cli.check_loss_arguments(args)
        lengths = [args.seq_len]
    else:
        lengths, depths, kinds = eval_cli.needle_grid_of(args)
        check_needle_grid(build_tokenizer(trained.data.tokenizer), lengths, depths, kinds, args.n_per_cell, args.seed)
    longer = [n for n in lengths if n > trained.model.seq_length]
    if longer and _is_main_process():
        print(f"moba-cp eval: notice: length(s) {', '.join(map(str, longer))} exceed the trained "
              f"model.seq_length={trained.model.seq_length} of {ckpt}: results there measure length "
              f"extrapolation (RoPE base {trained.model.rotary_base}).", file=sys.stderr, flush=True)
    return ckpt, trained, meta, max(lengths)


def _cmd_eval(args, overrides) -> int:
    if args.kind == "needle" and args.generate:  # (issue 19)
        from moba_cp.hf import needle_generate

        return needle_generate.run(args, overrides)
    from moba_cp.eval import cli as eval_cli
    from moba_cp.eval.model_runner import load_eval_model
    from moba_cp.train.distributed import shutdown_distributed

    try:
        ckpt, trained, meta, max_len = _eval_checks(args, overrides)
        seqs = None
        if args.kind == "loss":
            from moba_cp.data.datasets import heldout_sequences

            seqs = heldout_sequences(trained.data, seq_length=args.seq_len, num_sequences=args.num_seqs,
                                     builtin_budget_bytes=trained.data.builtin_budget_bytes)
        em = load_eval_model(args.checkpoint, max_len, overrides)
    except (FileNotFoundError, ValueError, *user_errors()) as e:
        _report("eval", e)
        shutdown_distributed()
        return 2
    source = {"checkpoint": str(ckpt.resolve()), "step": meta.get("step")}
    kept = os.path.join(args.out, eval_cli.LOSS_PARTIAL_FILE if args.kind == "loss" else eval_cli.NEEDLE_PARTIAL_FILE)
    try:
        label = args.label or em.cfg.name
        if args.kind == "loss":
            eval_cli.run_loss_eval(args, em.loss_fn, seqs, label=label, write=em.env.is_main, source=source,
                                   share=em.share)
        else:
            eval_cli.run_needle_eval(args, em.logits_fn, em.tokenizer, label=label, write=em.env.is_main,
                                     source=source, share=em.share)
    except KeyboardInterrupt:
        _report("eval", f"interrupted; finished work is kept in {kept}: rerun the same command to resume.")
        return 130
    finally:
        shutdown_distributed()
    return 0


def _cmd_analyze(args, overrides) -> int:
    from moba_cp.analysis import selection
    from moba_cp.config import RecipeError

    args.overrides = overrides
    try:
        return selection.run(args)
    except (FileNotFoundError, RecipeError, ValueError) as e:
        print(f"moba-cp analyze selection: {e}", file=sys.stderr)
        return 2


def _cmd_prepare_data(args, rest) -> int:
    from moba_cp.data import prepare

    _no_extra(rest, "prepare-data")
    return prepare.run(args)


def _cmd_plot(args, rest) -> int:
    from moba_cp.eval import plots

    _no_extra(rest, "plot")
    if args.sweep:
        import yaml

        from moba_cp.experiments.sweep_plots import plot_sweep, sweep_table
        from moba_cp.experiments.sweep import collect_results

        for sweep_dir in args.run_dirs:
            spec_file = Path(sweep_dir) / "sweep.yaml"
            if not spec_file.is_file():
                print(f"moba-cp plot --sweep: {spec_file} not found (run `moba-cp sweep` first)", file=sys.stderr)
                return 2
            spec = yaml.safe_load(spec_file.read_text())
            rows = collect_results(sweep_dir)
            if not rows:
                print(f"moba-cp plot --sweep: no finished points in {sweep_dir}", file=sys.stderr)
                return 2
            out = Path(args.out) / f"{spec['name']}_{spec['kind']}.png"
            metric = spec.get("metric", "loss")
            print(plot_sweep(spec["kind"], rows, metric, str(out)))
            table = sweep_table(rows, metric)  # the numbers behind the chart, mean +- std over seeds
            out.with_suffix(".md").write_text(f"# {spec['name']} ({spec['kind']}), {metric}\n\n{table}\n")
            print(table)
        return 0
    return plots.run(args)


def _cmd_sweep(args, rest) -> int:
    from moba_cp.experiments.sweep import SweepError, load_sweep, run_sweep

    bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])]
    if bad:
        raise SystemExit(f"moba-cp sweep: unexpected arguments {bad}; recipe overrides for every point look "
                         f"like --train.steps=100")
    try:
        specs = [load_sweep(f, out_dir=args.out_dir) for f in args.sweep_files]
        if args.out_dir and len(specs) > 1:
            raise SweepError("--out-dir works with one sweep file only (each sweep needs its own folder).")
        if args.gpus is None:
            if args.deadline_min is not None:
                raise SweepError("--deadline-min needs --gpus (the parallel scheduler).")
            results = {s.name: run_sweep(s, dry_run=args.dry_run, extra=rest) for s in specs}
        else:
            from moba_cp.experiments.scheduler import parse_gpus, run_sweeps_parallel

            results = run_sweeps_parallel(specs, parse_gpus(args.gpus), extra=rest, dry_run=args.dry_run,
                                          deadline_s=args.deadline_min * 60 if args.deadline_min else None)
    except SweepError as e:
        print(f"moba-cp sweep: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        for spec in specs:
            rows = results.get(spec.name, [])
            print(f"sweep {spec.name!r}: {len(rows)}/{len(spec.points)} points finished; results in "
                  f"{spec.out_dir}/results.jsonl; chart: moba-cp plot --sweep {spec.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moba-cp", description="Context-parallel MoBA training on Megatron-Core."
    )
    parser.add_argument("--version", action="version", version=f"moba-cp {moba_cp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("config", help="print the resolved, validated recipe",
                       description="Load RECIPE (YAML), apply --a.b=value overrides, validate, print.")
    p.add_argument("recipe", help="path to a YAML recipe (e.g. recipes/quickstart.yaml)")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("train", help="train a model from a recipe (run under torchrun for several processes)",
                       description="Train from RECIPE with --a.b=value overrides. Launch with torchrun for "
                                   "several processes; see launch/ and the README.")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe without GPUs and print layout, memory, FLOPs and KV traffic")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the world size to plan for (default tp*cp*dp, dp defaulting to 1)")
    p.add_argument("--link-gbps", default=None, metavar="GBPS[,GBPS]",
                   help="with --dry-run: link speed per direction for the CP comm times, one number or "
                        "INTRA,INTER (NVLink, InfiniBand); default 3600,400")
    p.add_argument("--selection", default=None, metavar="SELECTION.json",
                   help="with --dry-run: remote-block union measured by `moba-cp analyze selection` (default 100%%)")
    p.set_defaults(func=_cmd_train)

    from moba_cp.data import prepare
    from moba_cp.eval import plots

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
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("sweep", help="run every point of experiment sweeps (skips finished points)",
                       description="Run the points of SWEEP.yaml files (each a moba-cp train under torchrun), "
                                   "one after another or, with --gpus, several at once on a machine's GPUs; "
                                   "skip finished ones; collect their metrics. Trailing --a.b=value overrides "
                                   "apply to every point.")
    p.add_argument("sweep_files", nargs="+", metavar="SWEEP.yaml")
    p.add_argument("--out-dir", default=None, help="override the sweep's out_dir (one sweep file only)")
    p.add_argument("--gpus", default=None,
                   help="run points concurrently on these GPUs (0,1,2,3 or a count), largest first; each point "
                        "takes its sweep's nproc GPUs")
    p.add_argument("--deadline-min", type=float, default=None,
                   help="with --gpus: start no point predicted to end after this many minutes, and stop running "
                        "points there (they save and resume on the next run)")
    p.add_argument("--dry-run", action="store_true", help="validate every point and print the commands")
    p.set_defaults(func=_cmd_sweep)

    from moba_cp.eval import cli as eval_cli

    p = sub.add_parser("eval", help="long-context evaluation of a checkpoint: trailing/position-wise loss, needles",
                       description="Evaluate a checkpoint (run dir, checkpoints dir or iter_* dir). Runs under "
                                   "torchrun with tp*cp processes for context-parallel evaluation; recipe "
                                   "overrides (--parallel.cp=N ...) may follow.")
    esub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    pl = esub.add_parser("loss", help="trailing loss (last N tokens) and position-wise loss")
    pl.add_argument("checkpoint")
    eval_cli.add_loss_arguments(pl)
    pn = esub.add_parser("needle", help="needle-in-a-haystack retrieval accuracy per (length, depth)")
    pn.add_argument("checkpoint")
    eval_cli.add_needle_arguments(pn)
    pn.add_argument("--generate", action="store_true",  # (issue 19) logic in moba_cp/hf/needle_generate.py
                    help="decode the answers with the KV cache (exact match on the decoded string) instead of "
                         "teacher forcing; one process; CHECKPOINT may also be a `moba-cp export hf` directory")
    for q in (pl, pn):
        q.add_argument("--label", default=None, help="name in plots (default: the recipe name)")
        q.set_defaults(func=_cmd_eval)

    from moba_cp.hf import export as hf_export  # (issue 19) moba-cp export hf: logic in moba_cp/hf/export.py
    from moba_cp.hf import lm_eval_task as hf_lm_eval_task  # (issue 19) moba-cp export needle-task

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
    pa.add_argument("--out", default=None, help="output folder (default RUN_DIR/analysis)")
    pa.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("selfcheck", help="run MoBA on random data with each backend against the fp64 oracle")
    from moba_cp import selfcheck

    selfcheck.add_arguments(p)
    p.set_defaults(func=lambda a, rest: _no_extra(rest, "selfcheck") or selfcheck.run(a))
    return parser


def _no_extra(rest, cmd):
    if rest:
        raise SystemExit(f"moba-cp {cmd}: unexpected arguments {rest}")


def main(argv: list[str] | None = None) -> int:
    # Megatron-Core warns at import that TE/apex are absent; moba_cp does not need them.
    for msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=msg)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
