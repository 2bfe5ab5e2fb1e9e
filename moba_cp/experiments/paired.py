"""Paired-seed statistics of a sweep: every point against a named reference method, seed by seed.

Two runs with the same seed share their initialisation and their data order; only the attention
differs. Their difference is far less noisy than either loss (measured on one H200: full
attention 1.756 vs 1.878 across two seeds, while MoBA minus full stayed within 0.034-0.077), so a
finding is judged on the per-seed differences ``d_s = metric(point, seed s) - metric(reference, seed s)``:

- ``mean`` and ``std`` (sample, ddof 1) of the ``d_s``, ``se = std / sqrt(n)``, ``t = mean / se``;
- ``agree``: how many seeds have the sign of the mean (``n`` of ``n`` = the sign never flips);
- ``eval_se``: the held-out evaluation's own sampling noise on the difference, when the metric
  comes from ``eval_loss`` (per-sequence losses on the same held-out sequences for both runs):
  the standard error of the per-sequence differences, averaged over the seeds.

Pairing (:func:`paired_differences`): a row's *method* is its ``method`` label, else its point
group name (sweeps given as a ``points`` list); its *context* is its other labels but ``seed``
(e.g. ``size``). A point is paired with the reference method's row of the same context and seed,
or, when the reference has no row of that context, of the empty context.

``collect_results`` of :mod:`moba_cp.experiments.sweep` writes ``paired.md`` / ``paired.json``
beside ``results.jsonl`` when the sweep names a ``reference``;
``python -m moba_cp.experiments.paired SWEEP_DIR`` prints the table again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import yaml

__all__ = ["paired_differences", "paired_table", "method_of", "mean_std", "write_paired_report", "main"]


def method_of(row: dict) -> str:
    """The row's method: its ``method`` label, else its point group (a ``points``-list sweep)."""
    return row.get("labels", {}).get("method") or row.get("group") or row["name"]


def _context(row: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in row.get("labels", {}).items() if k not in ("method", "seed")))


def _seed(row: dict) -> str:
    return str(row.get("labels", {}).get("seed", ""))


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _eval_se(a: list | None, b: list | None) -> float | None:
    """Standard error of the mean per-sequence difference (same held-out sequences, in order)."""
    if not a or not b or len(a) != len(b) or len(a) < 2 or any(x is None for x in a + b):
        return None
    return mean_std([x - y for x, y in zip(a, b)])[1] / math.sqrt(len(a))


def paired_differences(rows: list[dict], metric: str, reference: str) -> list[dict]:
    """Per point group, its per-seed differences to the reference method and their statistics.

    Args:
        rows: finished points' summaries (``sweep_point.json``; ``name``, ``group``, ``labels``, the metric,
            and ``<metric>_per_seq`` for per-sequence evaluation values when present).
        metric: e.g. ``valid_loss`` or ``trailing_loss``.
        reference: the reference method (a ``method`` label value or a point group name).
    Returns:
        one dict per non-reference group with a pair: ``group``, ``method``, ``context``,
        ``reference`` (the reference group), ``seeds``, ``diffs`` (per seed), ``n``, ``mean``, ``std``,
        ``se``, ``t``, ``agree``, ``point_mean``/``point_std``, ``ref_mean``/``ref_std`` (over the paired
        seeds) and ``eval_se`` (None without per-sequence values). Sorted by group name.
    """
    ref_rows = {(_context(r), _seed(r)): r for r in rows if method_of(r) == reference and r.get(metric) is not None}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if method_of(r) != reference and r.get(metric) is not None:
            groups[r.get("group") or r["name"]].append(r)
    out = []
    for g in sorted(groups):
        pairs = []
        for r in sorted(groups[g], key=lambda r: _seed(r)):
            ref = ref_rows.get((_context(r), _seed(r))) or ref_rows.get(((), _seed(r)))
            if ref is not None:
                pairs.append((r, ref))
        if not pairs:
            continue
        diffs = [r[metric] - ref[metric] for r, ref in pairs]
        mean, std = mean_std(diffs)
        se = std / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        sign = (mean > 0) - (mean < 0)
        eval_ses = [s for r, ref in pairs
                    if (s := _eval_se(r.get(f"{metric}_per_seq"), ref.get(f"{metric}_per_seq"))) is not None]
        pm, ps = mean_std([r[metric] for r, _ in pairs])
        rm, rs = mean_std([ref[metric] for _, ref in pairs])
        out.append({
            "group": g, "method": method_of(pairs[0][0]), "context": dict(_context(pairs[0][0])),
            "reference": pairs[0][1].get("group") or pairs[0][1]["name"], "seeds": [_seed(r) for r, _ in pairs],
            "diffs": diffs, "n": len(diffs), "mean": mean, "std": std, "se": se,
            "t": (mean / se) if se else None, "agree": sum(1 for d in diffs if ((d > 0) - (d < 0)) == sign and sign),
            "point_mean": pm, "point_std": ps, "ref_mean": rm, "ref_std": rs,
            "eval_se": (sum(eval_ses) / len(eval_ses)) if eval_ses else None,
        })
    return out


def _or_dash(x, fmt="{:+.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def paired_table(stats: list[dict], metric: str, reference: str) -> str:
    """Markdown table of :func:`paired_differences` (one row per point group)."""
    lines = [f"Paired differences of `{metric}` against `{reference}` (same seed = same init and data order; "
             f"diff = point - reference; std over seeds; SE = std/sqrt(n); eval SE = the held-out set's own noise "
             f"on the difference).", "",
             f"| point | vs | seeds | point | {reference} | diff mean +- std | SE | t | sign agrees | eval SE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in stats:
        below = "below" if s["mean"] < 0 else "above" if s["mean"] > 0 else "equal"
        lines.append(
            f"| {s['group']} | {s['reference']} | {s['n']} | {s['point_mean']:.4f} +- {s['point_std']:.4f} | "
            f"{s['ref_mean']:.4f} +- {s['ref_std']:.4f} | {s['mean']:+.4f} +- {s['std']:.4f} | "
            f"{_or_dash(s['se'], '{:.4f}')} | "
            f"{_or_dash(s['t'], '{:+.1f}')} | {s['agree']}/{s['n']} {below} | {_or_dash(s['eval_se'], '{:.4f}')} |")
    if not stats:
        lines.append(f"| (no point has a `{reference}` run of the same seed yet) | | | | | | | | | |")
    return "\n".join(lines)


def write_paired_report(out_dir: str | Path, rows: list[dict], metric: str, reference: str,
                        also: tuple[str, ...] = ()) -> list[dict]:
    """Write ``paired.md`` and ``paired.json`` into ``out_dir``; returns the statistics of ``metric``.

    ``also``: further metrics to pair when the rows have them (e.g. the needle accuracy of a sweep
    whose metric is a loss); each gets its own table after the main one, and ``paired.json`` holds
    them under ``by_metric``.
    """
    out = Path(out_dir)
    stats = paired_differences(rows, metric, reference)
    by_metric = {metric: stats}
    for m in also:
        if m != metric and any(r.get(m) is not None for r in rows):
            by_metric[m] = paired_differences(rows, m, reference)
    text = "\n\n".join(paired_table(st, m, reference) for m, st in by_metric.items())
    (out / "paired.md").write_text(text + "\n")
    (out / "paired.json").write_text(json.dumps({"metric": metric, "reference": reference, "points": stats,
                                                 "by_metric": by_metric}, indent=1))
    return stats


def main(argv: list[str] | None = None) -> int:
    """``python -m moba_cp.experiments.paired SWEEP_DIR [--metric M] [--reference R]``: print the table."""
    p = argparse.ArgumentParser(prog="python -m moba_cp.experiments.paired",
                                description="Paired-seed differences of a finished sweep against its reference method.")
    p.add_argument("sweep_dir")
    p.add_argument("--metric", default=None, help="default: the sweep's metric")
    p.add_argument("--reference", default=None, help="default: the sweep's reference")
    args = p.parse_args(argv)
    spec_file = Path(args.sweep_dir) / "sweep.yaml"
    spec = yaml.safe_load(spec_file.read_text()) if spec_file.is_file() else {}
    metric, reference = args.metric or spec.get("metric", "loss"), args.reference or spec.get("reference")
    if not reference:
        print(f"{args.sweep_dir}: the sweep names no reference; pass --reference METHOD (e.g. full).", file=sys.stderr)
        return 2
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.sweep_dir).glob("*/sweep_point.json"))]
    print(paired_table(write_paired_report(args.sweep_dir, rows, metric, reference), metric, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
