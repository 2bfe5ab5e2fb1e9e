"""``moba-cp sweep SWEEP.yaml...`` and ``moba-cp plot --sweep SWEEP_OUT_DIR...``: their flags and
what they run (the sweeps themselves are :mod:`moba_cp.experiments.sweep` and, with ``--gpus``,
:mod:`moba_cp.experiments.scheduler`; the charts :mod:`moba_cp.experiments.sweep_plots`)."""

from __future__ import annotations

import argparse
import sys

from moba_cp.experiments.scheduler import parse_gpus, run_sweeps_parallel
from moba_cp.experiments.sweep import SweepError, load_sweep, run_sweep
from moba_cp.experiments.sweep_plots import plot_sweep_dir

__all__ = ["add_sweep_arguments", "run_sweep_command", "run_sweep_plots"]


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``moba-cp sweep`` (trailing ``--a.b=value`` recipe overrides are the caller's rest)."""
    parser.add_argument("sweep_files", nargs="+", metavar="SWEEP.yaml")
    parser.add_argument("--out-dir", default=None, help="override the sweep's out_dir (one sweep file only)")
    parser.add_argument("--gpus", default=None,
                        help="run points concurrently on these GPUs (0,1,2,3 or a count), largest first; each "
                             "point takes its sweep's nproc GPUs")
    parser.add_argument("--deadline-min", type=float, default=None,
                        help="with --gpus: start no point predicted to end after this many minutes, and stop "
                             "running points there (they save and resume on the next run)")
    parser.add_argument("--points-per-gpu", type=int, default=1,
                        help="with --gpus: run this many one-process points at once on each GPU (small models "
                             "leave a large GPU mostly idle)")
    parser.add_argument("--dry-run", action="store_true", help="validate every point and print the commands")
    return parser


def run_sweep_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """``moba-cp sweep``: run (or, with ``--dry-run``, plan) every unfinished point; exit code."""
    bad = [a for a in overrides if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])]
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
            if args.points_per_gpu != 1:
                raise SweepError("--points-per-gpu needs --gpus (the parallel scheduler).")
            results = {s.name: run_sweep(s, dry_run=args.dry_run, extra=overrides) for s in specs}
        else:
            results = run_sweeps_parallel(specs, parse_gpus(args.gpus), extra=overrides, dry_run=args.dry_run,
                                          deadline_s=args.deadline_min * 60 if args.deadline_min else None,
                                          points_per_gpu=args.points_per_gpu)
    except SweepError as e:
        print(f"moba-cp sweep: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        for spec in specs:
            rows = results.get(spec.name, [])
            print(f"sweep {spec.name!r}: {len(rows)}/{len(spec.points)} points finished; results in "
                  f"{spec.out_dir}/results.jsonl; chart: moba-cp plot --sweep {spec.out_dir}")
    return 0


def run_sweep_plots(sweep_dirs: list[str], out_dir: str, kind: str | None = None, metric: str | None = None) -> int:
    """``moba-cp plot --sweep [--kind K] [--metric M]``: each sweep folder's chart and table (printed); exit code."""
    for sweep_dir in sweep_dirs:
        try:
            png, table = plot_sweep_dir(sweep_dir, out_dir, kind, metric)
        except SweepError as e:
            print(f"moba-cp plot --sweep: {e}", file=sys.stderr)
            return 2
        print(png)
        print(table)
    return 0
