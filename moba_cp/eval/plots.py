"""Comparison plots (matplotlib, Agg backend, PNG): loss curves, position-wise loss, trailing loss,
needle heatmaps. Every function takes data (or paths) and an output path and returns the path.

Run directories: ``metrics.jsonl`` (one JSON object per logged step: ``step``, ``loss``, ``tokens``,
optionally ``valid_loss``), and evaluation results as JSON anywhere in the run directory or its
``eval/`` folder: a loss result has ``trailing_loss`` and ``buckets`` (from
:func:`moba_cp.eval.lm_loss.trailing_and_positional_loss`), a needle result has ``kinds`` and
``lengths`` (from :func:`moba_cp.eval.needle.run_needle_grid`). The run's label is its folder name.

    moba-cp plot runs/moba runs/full runs/hybrid --out docs/results/figures
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Mapping, Sequence

__all__ = ["pyplot", "save_figure", "load_metrics", "find_eval_results", "plot_loss_curves", "plot_positional_loss",
           "plot_trailing_loss", "plot_needle_heatmaps", "plot_runs", "add_arguments", "run"]


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (every chart of moba_cp draws through it).

    Imported on first use, not at the top: matplotlib is only needed by the commands that draw,
    and a headless process must select Agg before pyplot is imported.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_path: str) -> str:
    """Lay out ``fig``, write it as a PNG to ``out_path`` (creating folders), close it; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    pyplot().close(fig)
    return out_path


def load_metrics(run_dir_or_file: str) -> list[dict]:
    """Records of ``metrics.jsonl`` (a run directory or the file itself); bad lines are skipped.

    When a run was resumed, later records of an already-logged step replace earlier ones, so the
    curve shows what the resumed run logged.
    """
    path = run_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file at {path!r}")
    by_key: dict = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a half-written last line after a crash
                continue
            if isinstance(rec, dict) and "step" in rec:
                by_key[(rec["step"], tuple(sorted(k for k in rec if k not in ("time",))))] = rec
    return sorted(by_key.values(), key=lambda r: r["step"])


def find_eval_results(run_dir: str) -> dict[str, list[dict]]:
    """``{"loss": [results...], "needle": [results...]}`` found as JSON in ``run_dir`` and ``run_dir/eval``."""
    out: dict[str, list] = {"loss": [], "needle": []}
    for p in sorted(glob.glob(os.path.join(run_dir, "*.json")) + glob.glob(os.path.join(run_dir, "eval", "*.json"))):
        try:
            with open(p) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(d, dict) and "trailing_loss" in d and "buckets" in d:
            out["loss"].append(d)
        elif isinstance(d, dict) and "kinds" in d and "lengths" in d and "depths" in d:
            out["needle"].append(d)
    return out


def _smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1:
        return ys
    out, acc, q = [], 0.0, []
    for y in ys:
        q.append(y)
        acc += y
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def plot_loss_curves(runs: Mapping[str, Sequence[dict]] | Sequence[str], out_path: str, *, x: str = "step",
                     smooth: int = 1, title: str = "Training loss") -> str:
    """Training (and validation, when logged) loss of several runs on one chart.

    Args:
        runs: ``{label: records}`` or a list of run directories (label = folder name).
        x: ``"step"`` or ``"tokens"`` (records without ``tokens`` fall back to step).
        smooth: moving-average window over logged points (1 = raw).
    """
    if not isinstance(runs, Mapping):
        runs = {os.path.basename(os.path.normpath(d)): load_metrics(d) for d in runs}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, recs) in enumerate(runs.items()):
        color = f"C{i}"
        tr = [r for r in recs if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        use_tokens = x == "tokens" and tr and all("tokens" in r for r in tr)
        xs = [r["tokens"] if use_tokens else r["step"] for r in tr]
        if xs:
            ax.plot(xs, _smooth([r["loss"] for r in tr], smooth), color=color, label=f"{label} (train)")
        va = [r for r in recs if isinstance(r.get("valid_loss"), (int, float))]
        if va:
            # validation records may lack "tokens": map their step through the training records
            tok_at = {r["step"]: r.get("tokens") for r in tr}
            vx = [(tok_at.get(r["step"]) or r["step"]) if use_tokens else r["step"] for r in va]
            ax.plot(vx, [r["valid_loss"] for r in va], "o--", color=color, ms=4, label=f"{label} (valid)")
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def plot_positional_loss(results: Mapping[str, dict], out_path: str, *, title: str = "Position-wise loss") -> str:
    """Mean loss per position bucket, one line per run (``results``: label -> loss result)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in results.items():
        b = r["buckets"]
        pts = [((s + e) / 2, l) for s, e, l in zip(b["start"], b["end"], b["loss"]) if l is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=label)
    ax.set_xlabel("position in sequence (tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if results:
        ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def plot_trailing_loss(results: Mapping[str, dict | float], out_path: str, *, title: str | None = None) -> str:
    """Bars of trailing loss per run (``results``: label -> loss result or a plain float)."""
    plt = pyplot()
    labels = list(results)
    vals = [float(v["trailing_loss"]) if isinstance(v, dict) else float(v) for v in results.values()]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(labels) + 2), 4.5))
    bars = ax.bar(range(len(labels)), vals, color=[f"C{i}" for i in range(len(labels))])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.4f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=15)
    ax.set_ylabel("trailing loss (nats/token)")
    if title is None:
        first = next((v for v in results.values() if isinstance(v, dict)), None)
        title = (f"Trailing loss: last {first['last_n']} of {first['seq_length']} tokens" if first
                 else "Trailing loss")
    ax.set_title(title)
    finite = [v for v in vals if math.isfinite(v)]
    if finite:  # zoom in: the differences of interest are small next to the absolute loss
        lo, hi = min(finite), max(finite)
        pad = max(0.05 * (hi - lo), 0.02 * hi, 1e-3)
        ax.set_ylim(max(0.0, lo - 4 * pad), hi + 2 * pad)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out_path)


def _fmt_len(n: int) -> str:
    return f"{n // 1024 ** 2}M" if n % 1024 ** 2 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plot_needle_heatmaps(results: Mapping[str, dict], out_path: str, *, kinds: Sequence[str] | None = None) -> str:
    """Needle accuracy heatmaps (depth x length), runs side by side, one row per kind.

    Args:
        results: label -> result of :func:`moba_cp.eval.needle.run_needle_grid`.
        kinds: which kinds (rows); default: every kind found in any result.
    """
    plt = pyplot()
    labels = list(results)
    if kinds is None:
        kinds = []
        for r in results.values():
            kinds += [k for k in r["kinds"] if k not in kinds]
    nr, nc = max(1, len(kinds)), max(1, len(labels))
    # constrained layout keeps each row's title clear of the x labels above it, and places the shared colorbar
    fig, axes = plt.subplots(nr, nc, figsize=(3.6 * nc + 1.2, 3.2 * nr + 0.6), squeeze=False, layout="constrained")
    im = None
    for ri, kind in enumerate(kinds):
        for ci, label in enumerate(labels):
            ax, r = axes[ri][ci], results[label]
            if kind not in r["kinds"]:
                ax.set_axis_off()
                ax.set_title(f"{label}: no {kind}", fontsize=9)
                continue
            acc = r["kinds"][kind]["accuracy"]  # [length][depth]
            mat = [[acc[li][di] for li in range(len(r["lengths"]))] for di in range(len(r["depths"]))]
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_xticks(range(len(r["lengths"])))
            ax.set_xticklabels([_fmt_len(n) for n in r["lengths"]], fontsize=7, rotation=45)
            ax.set_yticks(range(len(r["depths"])))
            ax.set_yticklabels([f"{d:g}%" for d in r["depths"]], fontsize=7)
            if len(r["lengths"]) * len(r["depths"]) <= 120:
                for di in range(len(r["depths"])):
                    for li in range(len(r["lengths"])):
                        ax.text(li, di, f"{mat[di][li]:.2f}", ha="center", va="center", fontsize=6)
            ax.set_title(f"{label}: {kind} (mean {r['kinds'][kind]['mean']:.2f})", fontsize=9)
            if ri == nr - 1:
                ax.set_xlabel("context length", fontsize=8)
            if ci == 0:
                ax.set_ylabel("needle depth", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_path


def plot_runs(run_dirs: Sequence[str], out_dir: str, *, x: str = "step") -> list[str]:
    """Draw every comparison the run directories support; returns the PNG paths written.

    Writes ``loss_curves.png`` (runs with ``metrics.jsonl``), ``positional_loss.png`` and
    ``trailing_loss.png`` (runs with a loss result), ``needle_heatmaps.png`` (runs with a needle
    result; the last found per run is used).

    Raises:
        FileNotFoundError: a run directory does not exist, or nothing plottable was found.
    """
    missing = [d for d in run_dirs if not os.path.isdir(d)]
    if missing:
        raise FileNotFoundError(f"run director{'ies' if len(missing) > 1 else 'y'} not found: {', '.join(missing)}")
    labels = {}
    for d in run_dirs:  # unique labels even when folder names repeat
        base = os.path.basename(os.path.normpath(d)) or d
        lab, k = base, 2
        while lab in labels.values():
            lab, k = f"{base}-{k}", k + 1
        labels[d] = lab
    written = []
    metrics = {labels[d]: load_metrics(d) for d in run_dirs if os.path.isfile(os.path.join(d, "metrics.jsonl"))}
    if metrics:
        written.append(plot_loss_curves(metrics, os.path.join(out_dir, "loss_curves.png"), x=x))
    found = {labels[d]: find_eval_results(d) for d in run_dirs}
    loss = {lab: f["loss"][-1] for lab, f in found.items() if f["loss"]}
    if loss:
        written.append(plot_positional_loss(loss, os.path.join(out_dir, "positional_loss.png")))
        written.append(plot_trailing_loss(loss, os.path.join(out_dir, "trailing_loss.png")))
    needle = {lab: f["needle"][-1] for lab, f in found.items() if f["needle"]}
    if needle:
        written.append(plot_needle_heatmaps(needle, os.path.join(out_dir, "needle_heatmaps.png")))
    if not written:
        raise FileNotFoundError(f"nothing to plot in {', '.join(run_dirs)}: no metrics.jsonl and no eval JSON results.")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``moba-cp plot``."""
    parser.add_argument("run_dirs", nargs="+", help="run directories (metrics.jsonl, eval JSON results)")
    parser.add_argument("--out", default="plots", help="output folder for the PNGs (default: ./plots)")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis of the loss curves")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``moba-cp plot``; prints the files written; returns an exit code."""
    try:
        paths = plot_runs(args.run_dirs, args.out, x=args.x)
    except FileNotFoundError as e:
        print(f"moba-cp plot: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
