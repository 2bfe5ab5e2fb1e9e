"""``moba-cp eval loss|needle CHECKPOINT ...``: the flags, the checks made before a model loads,
and the resumable runners that write each result and its figure into ``--out`` (where
``moba-cp plot`` finds them).

The model side (loading a checkpoint, building a possibly context-parallel forward) is
:mod:`moba_cp.eval.model_runner`; the runners take it as a callable:

    parser = argparse.ArgumentParser(); add_needle_arguments(parser); args = parser.parse_args(argv)
    results = run_needle_eval(args, logits_fn, tokenizer)          # writes OUT/needle.json + .png
    results = run_loss_eval(args, loss_fn, sequences)              # writes OUT/eval_loss.json + .png

Only the main rank should write: pass ``write=False`` on the others (all ranks must still call
``logits_fn`` together when it is context-parallel). :func:`run_eval_command` is the whole
command (checks, model, run, clean-up), as ``moba-cp eval`` dispatches it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from moba_cp.data.datasets import heldout_sequences
from moba_cp.data.retrieval_docs import haystack_tokens
from moba_cp.data.tokenizers import build_tokenizer
from moba_cp.eval import plots
from moba_cp.eval.lm_loss import trailing_and_positional_loss
from moba_cp.eval.model_runner import load_eval_model, read_trained_recipe
from moba_cp.eval.needle import (HAYSTACKS, KINDS, cell_key, check_needle_grid, parse_depths, parse_kinds, parse_lengths,
                                 run_needle_grid, write_json)
from moba_cp.train.distributed import shutdown_distributed
from moba_cp.train.user_errors import is_main_process, report, user_errors

__all__ = ["add_needle_arguments", "run_needle_eval", "heldout_haystacks", "HAYSTACKS", "add_loss_arguments", "run_loss_eval",
           "NEEDLE_FILE", "LOSS_FILE", "needle_grid_of", "check_loss_arguments",
           "check_eval_inputs", "run_eval_command"]

NEEDLE_FILE = "needle.json"
NEEDLE_PARTIAL_FILE = "needle.partial.json"  # finished cells of a run in progress (or interrupted)
LOSS_FILE = "eval_loss.json"
LOSS_PARTIAL_FILE = "eval_loss.partial.jsonl"  # per-sequence losses of a run in progress


def add_needle_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``moba-cp eval needle`` (the checkpoint argument is the caller's)."""
    parser.add_argument("--lengths", default="4k,8k", help="context lengths, e.g. 4k,8k,...: k=1024, m=1024^2")
    parser.add_argument("--depths", default="0,10,...,100", help="needle depths in percent, e.g. 0,10,...,100 or 0,50,100")
    parser.add_argument("--kinds", default="passkey,single,multikey,multivalue",
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--n-per-cell", type=int, default=4, help="samples per (length, depth) cell")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--haystack", choices=HAYSTACKS, default="passkey",
                        help="haystack text: 'passkey' = the passkey paper's repeated sentences (default); 'heldout' = "
                             "held-out text of the run's training corpus, --n-per-cell sequences, sample j of every cell in "
                             "sequence j (the text a model trained with data.retrieval_fraction saw around its needles)")
    parser.add_argument("--out", default="eval", help="output folder (needle.json, needle_heatmap.png)")
    return parser


def heldout_haystacks(data_cfg, tokenizer, length: int, num: int) -> list[list[int]]:
    """``num`` held-out documents of the run's corpus as haystack token lists (EOD and padding dropped).

    Args:
        data_cfg: the trained recipe's ``DataConfig``.
        length: the longest needle length; each haystack has ``length + 1`` tokens before dropping.
    Raises:
        DataConfigError: no held-out document is that long (the message gives the longest).
    """
    seqs = heldout_sequences(data_cfg, seq_length=length, num_sequences=num, tokenizer=tokenizer,
                             builtin_budget_bytes=data_cfg.builtin_budget_bytes)
    return [haystack_tokens(tokenizer, x.tolist()) for x in seqs]


def _identity(args_settings: dict, source: dict | None) -> dict:
    return {"settings": args_settings, "source": source or {}}


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def needle_grid_of(args: argparse.Namespace) -> tuple[list[int], list[float], list[str]]:
    """``(lengths, depths, kinds)`` of the needle flags (``ValueError`` naming a bad flag)."""
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as e:
        raise ValueError(f"--kinds: {e}") from None
    try:
        lengths = parse_lengths(args.lengths)
    except ValueError as e:
        raise ValueError(f"--lengths: {e}") from None
    return lengths, parse_depths(args.depths), kinds


def run_needle_eval(args: argparse.Namespace, logits_fn: Callable, tokenizer, *, label: str = "model",
                    write: bool = True, progress: Callable[[str], None] | None = print,
                    source: dict | None = None, share: Callable | None = None,
                    scorer: Callable | None = None, fillers: list[list[int]] | None = None) -> dict:
    """Run the needle grid described by ``args`` and write ``OUT/needle.json`` and ``OUT/needle_heatmap.png``.

    Every (kind, length) is checked before the first sample. Each finished cell is saved at once
    to ``OUT/needle.partial.json``; a rerun with the same grid settings and ``source`` (the
    checkpoint) takes the saved cells and runs only the rest, so an interrupted evaluation loses
    at most the cell in progress.

    Args:
        logits_fn: ``tokens LongTensor[1, S] -> logits [1, S, V]`` (S = each length in ``--lengths``).
        tokenizer: the model's tokenizer.
        label: title of the heatmap.
        source: what is evaluated (e.g. checkpoint path and step); saved cells of another source
            are not reused.
        share: ``obj -> obj`` of the writing rank on every rank (all ranks must skip the same
            cells); None in a single process.
        scorer: per-sample scoring instead of teacher forcing (see :func:`run_needle_grid`).
        fillers: the per-sample haystacks that ``--haystack heldout`` asks for (:func:`heldout_haystacks`);
            must be None for ``--haystack passkey``.
    Returns:
        the result dict of :func:`moba_cp.eval.needle.run_needle_grid` (plus ``"label"``, ``"haystack"``).
    """
    haystack = getattr(args, "haystack", "passkey")
    if (haystack == "heldout") != (fillers is not None):
        raise ValueError(f"--haystack {haystack} needs {'held-out haystacks' if fillers is None else 'no fillers'}: "
                         f"pass fillers=heldout_haystacks(...) exactly when --haystack heldout.")
    lengths, depths, kinds = needle_grid_of(args)
    check_needle_grid(tokenizer, lengths, depths, kinds, args.n_per_cell, args.seed)
    final_path = os.path.join(args.out, NEEDLE_FILE)
    partial_path = os.path.join(args.out, NEEDLE_PARTIAL_FILE)
    # The haystack is part of what is measured: cells of another haystack are never reused.
    ident = _identity({"n_per_cell": args.n_per_cell, "seed": args.seed, "haystack": haystack}, source)
    done: dict = {}
    if write:
        for path in (partial_path, final_path):
            saved = _read_json(path)
            if saved and saved.get("identity") == ident:
                done = {cell_key(c["kind"], c["length"], c["depth"]): c for c in saved.get("cells", [])}
                break
        wanted = {cell_key(k, L, d) for k in kinds for L in lengths for d in depths}
        done = {k: c for k, c in done.items() if k in wanted}
        if done and progress:
            progress(f"needle: resuming: {len(done)} of {len(wanted)} cells already done in {args.out}")
    if share is not None:
        done = share(done)
    finished = dict(done)

    def save_cell(cell):
        finished[cell_key(cell["kind"], cell["length"], cell["depth"])] = cell
        if write:
            write_json({"identity": ident, "cells": list(finished.values())}, partial_path)

    res = run_needle_grid(logits_fn, tokenizer, lengths, depths, kinds, args.n_per_cell, args.seed,
                          progress=progress if write else None, done=done, on_cell=save_cell, scorer=scorer,
                          fillers=fillers)
    res["label"] = label
    res["haystack"] = haystack
    res["identity"] = ident
    if write:
        write_json(res, final_path)
        if os.path.exists(partial_path):
            os.remove(partial_path)
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


def check_loss_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` naming a bad ``eval loss`` flag (checked before the model loads)."""
    if args.seq_len < 2:
        raise ValueError(f"--seq-len={args.seq_len} must be >= 2.")
    if not 1 <= args.last <= args.seq_len:
        raise ValueError(f"--last={args.last} must be within [1, --seq-len={args.seq_len}].")
    if args.num_seqs < 1:
        raise ValueError(f"--num-seqs={args.num_seqs} must be >= 1.")
    if args.buckets < 1:
        raise ValueError(f"--buckets={args.buckets} must be >= 1.")


def _sequence_key(tokens: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha1(tokens.cpu().long().numpy().tobytes())
    h.update(labels.cpu().long().numpy().tobytes())
    return h.hexdigest()


def run_loss_eval(args: argparse.Namespace, loss_fn: Callable, sequences: Iterable, *, label: str = "model",
                  write: bool = True, source: dict | None = None, share: Callable | None = None) -> dict:
    """Trailing and position-wise loss over ``sequences``; writes ``OUT/eval_loss.json`` and a plot.

    Each sequence's per-token losses are saved as they finish (``OUT/eval_loss.partial.jsonl``);
    a rerun with the same ``--seq-len`` and ``source`` reuses them and evaluates only the rest
    (the result is the same as an uninterrupted run's).

    Args:
        loss_fn: ``(tokens [S], labels [S]) -> per-token losses [S]`` (see :mod:`moba_cp.eval.lm_loss`).
        sequences: e.g. :func:`moba_cp.data.datasets.heldout_sequences` (``S + 1`` tokens each).
        source, share: as for :func:`run_needle_eval`.
    """
    check_loss_arguments(args)
    partial_path = os.path.join(args.out, LOSS_PARTIAL_FILE)
    ident = _identity({"seq_len": args.seq_len}, source)
    cache: dict[str, list[float]] = {}
    if write and os.path.exists(partial_path):
        with open(partial_path) as f:
            lines = f.read().splitlines()
        try:
            if lines and json.loads(lines[0]) == {"identity": ident}:
                for line in lines[1:]:
                    row = json.loads(line)
                    cache[row["key"]] = row["losses"]
        except ValueError:  # a line cut short by a kill: keep what parsed
            pass
        if cache:
            print(f"eval loss: resuming: {len(cache)} sequence(s) already done in {args.out}")
    if share is not None:
        cache = share(cache)
    if write:
        os.makedirs(args.out, exist_ok=True)
        with open(partial_path, "w") as f:  # rewritten whole: drops a torn last line
            f.write(json.dumps({"identity": ident}) + "\n")
            f.writelines(json.dumps({"key": k, "losses": v}) + "\n" for k, v in cache.items())

    def cached_loss_fn(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        key = _sequence_key(tokens, labels)
        if key in cache:
            return torch.tensor(cache[key], dtype=torch.float64)
        losses = loss_fn(tokens, labels).detach().double().cpu().reshape(-1)
        if write:
            with open(partial_path, "a") as f:
                f.write(json.dumps({"key": key, "losses": losses.tolist()}) + "\n")
        return losses

    res = trailing_and_positional_loss(cached_loss_fn, sequences, args.last, args.buckets, max_sequences=args.num_seqs)
    res["label"] = label
    if write:
        write_json(res, os.path.join(args.out, LOSS_FILE))
        os.remove(partial_path)
        plots.plot_positional_loss({label: res}, os.path.join(args.out, "positional_loss.png"))
        print(f"trailing loss (last {res['last_n']} of {res['seq_length']} tokens, {res['num_sequences']} "
              f"sequences): {res['trailing_loss']:.4f}")
    return res


def check_eval_inputs(args: argparse.Namespace, overrides: list[str]):
    """Everything ``moba-cp eval`` can check before a process group or model exists.

    Returns ``(checkpoint, trained recipe, meta, longest length)``; prints (rank 0) a notice for
    each length beyond the trained ``model.seq_length``. Raises ValueError / FileNotFoundError /
    a user error with the fix.
    """
    ckpt, trained, meta = read_trained_recipe(args.checkpoint, overrides)
    if args.kind == "loss":
        check_loss_arguments(args)
        lengths = [args.seq_len]
    else:
        lengths, depths, kinds = needle_grid_of(args)
        check_needle_grid(build_tokenizer(trained.data.tokenizer), lengths, depths, kinds, args.n_per_cell, args.seed)
    longer = [n for n in lengths if n > trained.model.seq_length]
    if longer and is_main_process():
        print(f"moba-cp eval: notice: length(s) {', '.join(map(str, longer))} exceed the trained "
              f"model.seq_length={trained.model.seq_length} of {ckpt}: results there measure length "
              f"extrapolation (RoPE base {trained.model.rotary_base}).", file=sys.stderr, flush=True)
    return ckpt, trained, meta, max(lengths)


def run_eval_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """``moba-cp eval loss|needle``: check, load the model (joining the process group), run, and
    always leave the process group; the exit code (2: bad input, 130: interrupted, work kept)."""
    try:
        ckpt, trained, meta, max_len = check_eval_inputs(args, overrides)
        seqs = fillers = None
        if args.kind == "loss":
            seqs = heldout_sequences(trained.data, seq_length=args.seq_len, num_sequences=args.num_seqs,
                                     builtin_budget_bytes=trained.data.builtin_budget_bytes)
        elif args.haystack == "heldout":
            fillers = heldout_haystacks(trained.data, build_tokenizer(trained.data.tokenizer), max_len, args.n_per_cell)
        em = load_eval_model(args.checkpoint, max_len, overrides)
    except (FileNotFoundError, ValueError, *user_errors()) as e:
        report("eval", e)
        shutdown_distributed()
        return 2
    source = {"checkpoint": str(Path(ckpt).resolve()), "step": meta.get("step")}
    kept = os.path.join(args.out, LOSS_PARTIAL_FILE if args.kind == "loss" else NEEDLE_PARTIAL_FILE)
    try:
        label = args.label or em.cfg.name
        if args.kind == "loss":
            run_loss_eval(args, em.loss_fn, seqs, label=label, write=em.env.is_main, source=source, share=em.share)
        else:
            run_needle_eval(args, em.logits_fn, em.tokenizer, label=label, write=em.env.is_main,
                            source=source, share=em.share, fillers=fillers)
    except KeyboardInterrupt:
        report("eval", f"interrupted; finished work is kept in {kept}: rerun the same command to resume.")
        return 130
    finally:
        shutdown_distributed()
    return 0
