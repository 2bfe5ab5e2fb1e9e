"""The chart of a ``kind: retrieval`` sweep: needle accuracy per method and needle kind, mean +- std over seeds.

(The heatmaps per model, depth x length, come from ``moba-cp plot RUN_DIR...`` on the points' run
directories; this chart puts the methods side by side.)
"""

from __future__ import annotations

from collections import defaultdict

from moba_cp.eval.plots import pyplot, save_figure
from moba_cp.experiments.paired import mean_std, method_of

__all__ = ["plot_retrieval"]


def plot_retrieval(rows: list[dict], metric: str, out_path: str) -> str:
    """Grouped bars: for each method, the exact-match accuracy of every needle kind (``row["needle"]``)
    and the sweep's ``metric``, averaged over seeds with +-1 std error bars. Returns the path."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[method_of(r)].append(r)
    kinds = sorted({k for r in rows for k in (r.get("needle") or {})})
    series = [(k, lambda r, k=k: (r.get("needle") or {}).get(k)) for k in kinds]
    if metric not in ("needle_accuracy",) or not kinds:
        series.append((metric, lambda r: r.get(metric)))
    elif len(kinds) > 1:
        series.append(("mean", lambda r: r.get("needle_accuracy")))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods = sorted(by_method)
    width = 0.8 / max(len(series), 1)
    for j, (label, get) in enumerate(series):
        means, errs = [], []
        for m in methods:
            vals = [v for r in by_method[m] if (v := get(r)) is not None]
            mean, std = mean_std(vals) if vals else (0.0, 0.0)
            means.append(mean)
            errs.append(std)
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, means, width, yerr=errs if any(errs) else None, capsize=3, label=label, color=f"C{j}")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("exact-match accuracy" if metric == "needle_accuracy" else metric)
    ax.set_title("Retrieval: needle accuracy per method (mean +- std over seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_path)
