"""Charts of finished sweeps in the style of the MoBA paper's figures (matplotlib, PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import yaml
from matplotlib import ticker

from moba_cp.eval.plots import pyplot, save_figure  # one headless-matplotlib setup for every chart
from moba_cp.experiments.fit import fit_power_law, pflops_days
from moba_cp.experiments.retrieval_chart import plot_retrieval
from moba_cp.experiments.sweep import KINDS, METRICS, SweepError, collect_results

__all__ = ["plot_scaling", "plot_granularity", "plot_hybrid", "plot_sweep", "aggregate_seeds", "sweep_table",
           "plot_sweep_dir"]

_YLABEL = {"loss": "LM loss (last steps)", "valid_loss": "validation LM loss", "trailing_loss": "trailing LM loss"}


def _method(row: dict) -> str:
    return row["labels"].get("method") or row["pattern"]


def aggregate_seeds(rows: list[dict], metric: str) -> list[dict]:
    """One row per point group (seed replicates of one configuration) with the metric's mean.

    Each returned row is the group's first row with ``metric`` = mean over the replicates that
    have it, ``metric + "_std"`` = their sample standard deviation (0 for one replicate), ``n`` =
    their count, and ``name`` = the group. Rows of sweeps without seeds are their own group.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r.get("group") or r["name"]].append(r)
    out = []
    for g, rs in groups.items():
        vals = [r[metric] for r in rs if r.get(metric) is not None]
        row = dict(rs[0], name=g, n=len(vals), labels={k: v for k, v in rs[0]["labels"].items() if k != "seed"})
        if vals:
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            row[metric], row[metric + "_std"] = mean, var ** 0.5
        else:
            row[metric], row[metric + "_std"] = None, None
        out.append(row)
    return out


def sweep_table(rows: list[dict], metric: str) -> str:
    """Markdown table of a sweep's points: compute, the metric (mean +- std over seeds) and n."""
    lines = [f"| point | compute (PFLOP) | {metric} | seeds |", "|---|---|---|---|"]
    for r in sorted(aggregate_seeds(rows, metric), key=lambda r: r["name"]):
        v, sd = r.get(metric), r.get(metric + "_std")
        cell = "-" if v is None else (f"{v:.4f} +- {sd:.4f}" if r["n"] > 1 else f"{v:.4f}")
        lines.append(f"| {r['name']} | {r['train_flops'] / 1e15:.2f} | {cell} | {r['n']} |")
    return "\n".join(lines)


def _reference(ax, rows, metric, name, style):
    """A horizontal reference line at the rows' mean, shaded +-1 std when seeds give one."""
    if not rows:
        return
    mean = sum(r[metric] for r in rows) / len(rows)
    sd = max((r.get(metric + "_std") or 0.0) for r in rows)
    ax.axhline(mean, color="k", ls=style, label=f"{name} ({mean:.3f}" + (f" +- {sd:.3f})" if sd else ")"))
    if sd:
        ax.axhspan(mean - sd, mean + sd, color="k", alpha=0.08)


def _errorbar(ax, xs, rows, metric, **kw):
    """Points with +-1 std error bars where a point has several seeds."""
    err = [r.get(metric + "_std") or 0.0 for r in rows]
    ax.errorbar(xs, [r[metric] for r in rows], yerr=err if any(err) else None, capsize=3, **kw)


def _finish(fig, ax, metric: str, title: str, out_path: str, which: str = "major") -> str:
    """The axis dressing every sweep chart shares, then save."""
    ax.set_ylabel(_YLABEL.get(metric, metric))
    ax.set_title(title)
    ax.grid(True, which=which, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_path)


def plot_scaling(rows: list[dict], metric: str, out_path: str) -> tuple[str, dict]:
    """Loss against training compute (PFLOP/s-days), log-log, one fitted power law per method.

    Returns ``(path, {method: PowerLaw})``; the fitted formulas are in the legend.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by = defaultdict(list)
    for r in aggregate_seeds(rows, metric):
        if r.get(metric) is not None:
            by[_method(r)].append((pflops_days(r["train_flops"]), r[metric], r))
    fits = {}
    for i, (method, pts) in enumerate(sorted(by.items())):
        pts.sort(key=lambda p: p[0])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        color = f"C{i}"
        _errorbar(ax, xs, [p[2] for p in pts], metric, color=color, ls="none", marker="o", zorder=3)
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
    # a loss axis spans less than a decade: plain numbers, and no labels on the compute axis's minor
    # ticks (they overlapped the major ones)
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2f"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("training compute C (PFLOP/s-days)")
    return _finish(fig, ax, metric, "Scaling: MoBA vs full attention", out_path, which="both"), fits


def plot_granularity(rows: list[dict], metric: str, out_path: str) -> str:
    """Loss against MoBA block granularity (top-k / #blocks at fixed sparsity), full attention as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = aggregate_seeds(rows, metric)
    moba = sorted((r for r in rows if r["pattern"] != "full" and r.get(metric) is not None), key=lambda r: r["n_blocks"])
    full = [r for r in rows if r["pattern"] == "full" and r.get(metric) is not None]
    labels = [f"{r['topk']}/{r['n_blocks']}" for r in moba]
    _errorbar(ax, list(range(len(moba))), moba, metric, marker="o", label="MoBA")
    for x, r in enumerate(moba):
        ax.annotate(f"{r[metric]:.3f}", (x, r[metric]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    _reference(ax, full, metric, "full attention", "--")
    ax.set_xticks(range(len(moba)), labels)
    ax.set_xlabel("top-k / #blocks")
    return _finish(fig, ax, metric, "Block granularity at fixed sparsity", out_path)


def plot_hybrid(rows: list[dict], metric: str, out_path: str) -> str:
    """Trailing loss against the number of full-attention layers; MoBA and full as references.

    Only plain MoBA layers count here: points with a key convolution (``key_conv`` > 0, e.g. a retrieval
    sweep's variant) are left out of the chart (their numbers stay in the sweep's tables)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = [r for r in aggregate_seeds(rows, metric) if not r.get("key_conv")]
    hyb = sorted((r for r in rows if r["pattern"] == "hybrid" and r.get(metric) is not None), key=lambda r: r["full_layers"])
    _errorbar(ax, [r["full_layers"] for r in hyb], hyb, metric, marker="o", label="layer-wise hybrid")
    for name, pattern, style in (("MoBA", "moba", ":"), ("full attention", "full", "--")):
        _reference(ax, [r for r in rows if r["pattern"] == pattern and r.get(metric) is not None], metric, name, style)
    ax.xaxis.get_major_locator().set_params(integer=True)  # layer counts
    ax.set_xlabel("number of last layers with full attention")
    return _finish(fig, ax, metric, "Layer-wise hybrid", out_path)


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
    if kind == "retrieval":
        return plot_retrieval(rows, metric, out_path)
    raise ValueError(f"unknown sweep kind {kind!r}")


def plot_sweep_dir(sweep_dir: str | Path, out_dir: str | Path, kind: str | None = None,
                   metric: str | None = None) -> tuple[str, str]:
    """The chart of a sweep's output folder (``moba-cp plot --sweep``) and the table behind it.

    Reads ``SWEEP_DIR/sweep.yaml`` (written by ``moba-cp sweep``) and the finished points; writes
    ``OUT_DIR/NAME_KIND.png`` and ``OUT_DIR/NAME_KIND.md`` (the numbers, mean +- std over seeds).
    ``kind`` and ``metric`` draw another chart of the same points than the sweep's own (e.g. the
    hybrid chart of a retrieval sweep that also trained hybrids). Returns ``(png path, table)``;
    raises :class:`SweepError` when the folder holds no sweep or no finished point.
    """
    spec_file = Path(sweep_dir) / "sweep.yaml"
    if not spec_file.is_file():
        raise SweepError(f"{spec_file} not found (run `moba-cp sweep` first)")
    spec = yaml.safe_load(spec_file.read_text())
    rows = collect_results(sweep_dir)
    if not rows:
        raise SweepError(f"no finished points in {sweep_dir}")
    kind, metric = kind or spec["kind"], metric or spec.get("metric", "loss")
    if kind not in KINDS or metric not in METRICS:
        raise SweepError(f"--kind {kind} / --metric {metric}: the kind must be one of {', '.join(KINDS)} and the "
                         f"metric one of {', '.join(METRICS)}.")
    if not any(r.get(metric) is not None for r in rows):
        raise SweepError(f"no finished point in {sweep_dir} has {metric!r} (was it evaluated?)")
    out = Path(out_dir) / f"{spec['name']}_{kind}.png"
    png = plot_sweep(kind, rows, metric, str(out))
    table = sweep_table(rows, metric)
    out.with_suffix(".md").write_text(f"# {spec['name']} ({kind}), {metric}\n\n{table}\n")
    return png, table
