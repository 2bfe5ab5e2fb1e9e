"""Charts of finished sweeps in the style of the MoBA paper's figures (matplotlib, PNG)."""

from __future__ import annotations

from collections import defaultdict

from moba_cp.eval.plots import _plt, _save  # one headless-matplotlib setup for every chart
from moba_cp.experiments.fit import fit_power_law, pflops_days

__all__ = ["plot_scaling", "plot_granularity", "plot_hybrid", "plot_sweep"]

_YLABEL = {"loss": "LM loss (last steps)", "valid_loss": "validation LM loss", "trailing_loss": "trailing LM loss"}


def _method(row: dict) -> str:
    return row["labels"].get("method") or row["pattern"]


def plot_scaling(rows: list[dict], metric: str, out_path: str) -> tuple[str, dict]:
    """Loss against training compute (PFLOP/s-days), log-log, one fitted power law per method.

    Returns ``(path, {method: PowerLaw})``; the fitted formulas are in the legend.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            by[_method(r)].append((pflops_days(r["train_flops"]), r[metric]))
    fits = {}
    for i, (method, pts) in enumerate(sorted(by.items())):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        color = f"C{i}"
        ax.scatter(xs, ys, color=color, zorder=3)
        label = method
        if len(set(xs)) >= 2:
            fit = fit_power_law(xs, ys)
            fits[method] = fit
            grid = [xs[0] * (xs[-1] / xs[0]) ** (k / 50) for k in range(51)]
            ax.plot(grid, [fit(x) for x in grid], color=color, lw=1.5)
            label = f"{method}: {fit.formula()}"
        ax.plot([], [], color=color, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (PFLOP/s-days)")
    ax.set_ylabel(_YLABEL.get(metric, metric))
    ax.set_title("Scaling: MoBA vs full attention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path), fits


def plot_granularity(rows: list[dict], metric: str, out_path: str) -> str:
    """Loss against MoBA block granularity (top-k / #blocks at fixed sparsity), full attention as a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    moba = sorted((r for r in rows if r["pattern"] != "full" and r.get(metric) is not None), key=lambda r: r["n_blocks"])
    full = [r[metric] for r in rows if r["pattern"] == "full" and r.get(metric) is not None]
    labels = [f"{r['topk']}/{r['n_blocks']}" for r in moba]
    ax.plot(range(len(moba)), [r[metric] for r in moba], marker="o", label="MoBA")
    for x, r in enumerate(moba):
        ax.annotate(f"{r[metric]:.3f}", (x, r[metric]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if full:
        ax.axhline(sum(full) / len(full), color="k", ls="--", label=f"full attention ({sum(full) / len(full):.3f})")
    ax.set_xticks(range(len(moba)), labels)
    ax.set_xlabel("top-k / #blocks")
    ax.set_ylabel(_YLABEL.get(metric, metric))
    ax.set_title("Block granularity at fixed sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_hybrid(rows: list[dict], metric: str, out_path: str) -> str:
    """Trailing loss against the number of full-attention layers; MoBA and full as references."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    hyb = sorted((r for r in rows if r["pattern"] == "hybrid" and r.get(metric) is not None), key=lambda r: r["full_layers"])
    ax.plot([r["full_layers"] for r in hyb], [r[metric] for r in hyb], marker="o", label="layer-wise hybrid")
    for name, pattern, style in (("MoBA", "moba", ":"), ("full attention", "full", "--")):
        vals = [r[metric] for r in rows if r["pattern"] == pattern and r.get(metric) is not None]
        if vals:
            ax.axhline(sum(vals) / len(vals), color="k", ls=style, label=f"{name} ({sum(vals) / len(vals):.3f})")
    ax.set_xlabel("number of last layers with full attention")
    ax.set_ylabel(_YLABEL.get(metric, metric))
    ax.set_title("Layer-wise hybrid")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_sweep(kind: str, rows: list[dict], metric: str, out_path: str) -> str:
    """The chart for a sweep of ``kind`` (scaling / granularity / hybrid)."""
    if not rows:
        raise ValueError("no finished points to plot")
    if kind == "scaling":
        return plot_scaling(rows, metric, out_path)[0]
    if kind == "granularity":
        return plot_granularity(rows, metric, out_path)
    if kind == "hybrid":
        return plot_hybrid(rows, metric, out_path)
    raise ValueError(f"unknown sweep kind {kind!r}")
