"""Argument sets and runners for ``moba-cp eval needle``, ``moba-cp eval loss`` and ``moba-cp plot``.

The model side (loading a checkpoint, building a possibly context-parallel forward) belongs to the
training code; these runners take it as a callable, parse the shared flags, run the evaluation,
and write the JSON result plus its figure into ``--out`` (which ``moba-cp plot`` then finds):

    parser = argparse.ArgumentParser(); add_needle_arguments(parser); args = parser.parse_args(argv)
    results = run_needle_eval(args, logits_fn, tokenizer)          # writes OUT/needle.json + .png
    results = run_loss_eval(args, loss_fn, sequences)              # writes OUT/eval_loss.json + .png

Only the main rank should write: pass ``write=False`` on the others (all ranks must still call
``logits_fn`` together when it is context-parallel).
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Iterable

from . import plots
from .lm_loss import trailing_and_positional_loss
from .needle import KINDS, parse_lengths, run_needle_grid, write_json

__all__ = ["add_needle_arguments", "run_needle_eval", "add_loss_arguments", "run_loss_eval",
           "NEEDLE_FILE", "LOSS_FILE", "parse_depths"]

NEEDLE_FILE = "needle.json"
LOSS_FILE = "eval_loss.json"


def parse_depths(spec: str) -> list[float]:
    """``"0,10,...,100"`` -> ``[0, 10, 20, ..., 100]``; ``"0,25,50"`` -> as listed; percent values."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if "..." in parts:
        i = parts.index("...")
        if i < 2 or i != len(parts) - 2:
            raise ValueError(f"depths {spec!r}: write 'a,b,...,z' (step b - a).")
        a, b, z = float(parts[0]), float(parts[1]), float(parts[-1])
        step, out, x = b - a, [], a
        if step <= 0:
            raise ValueError(f"depths {spec!r}: the step must be positive.")
        while x <= z + 1e-9:
            out.append(round(x, 6))
            x += step
        return out
    vals = [float(p) for p in parts]
    if not vals or any(not 0 <= v <= 100 for v in vals):
        raise ValueError(f"depths {spec!r}: expected percents in [0, 100].")
    return vals


def add_needle_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``moba-cp eval needle`` (the checkpoint argument is the caller's)."""
    parser.add_argument("--lengths", default="4k,8k", help="context lengths, e.g. 4k,8k,...: k=1024, m=1024^2")
    parser.add_argument("--depths", default="0,10,...,100", help="needle depths in percent, e.g. 0,10,...,100 or 0,50,100")
    parser.add_argument("--kinds", default="passkey,single,multikey,multivalue",
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--n-per-cell", type=int, default=4, help="samples per (length, depth) cell")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--out", default="eval", help="output folder (needle.json, needle_heatmap.png)")
    return parser


def run_needle_eval(args: argparse.Namespace, logits_fn: Callable, tokenizer, *, label: str = "model",
                    write: bool = True, progress: Callable[[str], None] | None = print) -> dict:
    """Run the needle grid described by ``args`` and write ``OUT/needle.json`` and ``OUT/needle_heatmap.png``.

    Args:
        logits_fn: ``tokens LongTensor[1, S] -> logits [1, S, V]`` (S = each length in ``--lengths``).
        tokenizer: the model's tokenizer.
        label: title of the heatmap.
    Returns:
        the result dict of :func:`moba_cp.eval.needle.run_needle_grid` (plus ``"label"``).
    """
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"--kinds: unknown {bad}; choose from {', '.join(KINDS)}.")
    res = run_needle_grid(logits_fn, tokenizer, parse_lengths(args.lengths), parse_depths(args.depths), kinds,
                          args.n_per_cell, args.seed, progress=progress if write else None)
    res["label"] = label
    if write:
        write_json(res, os.path.join(args.out, NEEDLE_FILE))
        plots.plot_needle_heatmaps({label: res}, os.path.join(args.out, "needle_heatmap.png"))
    return res


def add_loss_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``moba-cp eval loss``."""
    parser.add_argument("--seq-len", type=int, default=32768, help="sequence length (tokens)")
    parser.add_argument("--last", type=int, default=2048, help="trailing window: loss over the last N tokens")
    parser.add_argument("--num-seqs", type=int, default=8, help="held-out sequences to evaluate")
    parser.add_argument("--buckets", type=int, default=16, help="position buckets of the position-wise loss")
    parser.add_argument("--out", default="eval", help="output folder (eval_loss.json, positional_loss.png)")
    return parser


def run_loss_eval(args: argparse.Namespace, loss_fn: Callable, sequences: Iterable, *, label: str = "model",
                  write: bool = True) -> dict:
    """Trailing and position-wise loss over ``sequences``; writes ``OUT/eval_loss.json`` and a plot.

    Args:
        loss_fn: ``(tokens [S], labels [S]) -> per-token losses [S]`` (see :mod:`moba_cp.eval.lm_loss`).
        sequences: e.g. :func:`moba_cp.data.datasets.heldout_sequences` (``S + 1`` tokens each).
    """
    res = trailing_and_positional_loss(loss_fn, sequences, args.last, args.buckets, max_sequences=args.num_seqs)
    res["label"] = label
    if write:
        write_json(res, os.path.join(args.out, LOSS_FILE))
        plots.plot_positional_loss({label: res}, os.path.join(args.out, "positional_loss.png"))
        print(f"trailing loss (last {res['last_n']} of {res['seq_length']} tokens, {res['num_sequences']} "
              f"sequences): {res['trailing_loss']:.4f}")
    return res
