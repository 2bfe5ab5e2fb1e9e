"""Plot bench_moba.py kernel tables: forward+backward time against sequence length, MoBA of each
table against SDPA cuDNN, one panel per setting (log-log), so the gap and its trend read at a glance.

    R=benchmarks/results
    python benchmarks/plot_kernels.py \
        --table $R/moba_h200_2026-12-04_session16.md:"session 16" \
        --table $R/moba_h200_2026-12-04_session16_b4096_512k.md:"session 16" \
        --table $R/moba_h200_2026-12-04_session17_final.md:"session 17" \
        --table $R/moba_h200_2026-12-04_session17_b128_gate.md:"session 17" \
        --out $R/moba_h200_2026-12-04_session17_fb.png

Each ``--table`` is a markdown file written by ``bench_moba.py --out`` (every table in the file is
read), optionally with ``:LABEL``; files given the same label are one series (a later file's point
replaces an earlier one's at the same setting and length). cuDNN is drawn from the last table that
has the point. Tables
measured on different devices are refused (their times do not compare); so is a file with no
bench_moba table, naming what is missing.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moba_cp.eval.plots import pyplot, save_figure  # noqa: E402

NEEDED = ("setting", "S", "MoBA fwd+bwd ms", "cuDNN f+b ms")  # header names the plot reads
_UNIT = {"K": 1 << 10, "M": 1 << 20}


def parse_tables(path: str) -> tuple[str, list[dict]]:
    """``(device, rows)`` of every bench_moba table in ``path``: each row a dict with ``setting``,
    ``seq`` (tokens), ``moba`` and ``cudnn`` (forward+backward ms; None where not measured).
    Raises ValueError naming the file and the missing column or device line."""
    text = Path(path).read_text()
    dev = re.search(r"^Device: ([^;]+);", text, re.M)
    if not dev:
        raise ValueError(f"{path}: no 'Device: ...;' line; this does not look like a bench_moba.py --out table")
    rows, cols = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            cols = None if not line.strip() else cols
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == "setting":
            missing = [c for c in NEEDED if c not in cells]
            if missing:
                raise ValueError(f"{path}: a table without the column(s) {missing}; bench_moba.py tables have {NEEDED}")
            cols = {name: i for i, name in enumerate(cells)}
            continue
        if cols is None or set(cells[0]) <= {"-"}:
            continue
        rows.append({"setting": cells[cols["setting"]], "seq": _tokens(cells[cols["S"]], path),
                     "moba": _ms(cells[cols["MoBA fwd+bwd ms"]]), "cudnn": _ms(cells[cols["cuDNN f+b ms"]])})
    if not rows:
        raise ValueError(f"{path}: no bench_moba.py table rows (a header starting '| setting |' and rows below it)")
    return dev.group(1).strip(), rows


def _tokens(cell: str, path: str) -> int:
    m = re.fullmatch(r"(\d+)([KM]?)", cell)
    if not m:
        raise ValueError(f"{path}: sequence length {cell!r} is not like 8K, 512K or 1M")
    return int(m.group(1)) * _UNIT.get(m.group(2), 1)


def _ms(cell: str) -> float | None:
    m = re.match(r"([\d.]+)", cell)
    return float(m.group(1)) if m else None


def plot(tables: list[tuple[str, str]], out: str) -> str:
    """``tables``: ``(path, label)`` in drawing order (one series per label). Returns the PNG path."""
    series: dict[str, tuple[set, dict]] = {}  # label -> (devices, {(setting, seq): row})
    for path, label in tables:
        dev, rows = parse_tables(path)
        devs, points = series.setdefault(label, (set(), {}))
        devs.add(dev)
        points.update({(r["setting"], r["seq"]): r for r in rows})
    parsed = [(label, devs, list(points.values())) for label, (devs, points) in series.items()]
    devices = sorted(set().union(*(devs for _, devs, _ in parsed)))
    if len(devices) > 1:
        raise ValueError(f"tables from different devices {devices} do not compare; plot each device's tables apart")
    settings = list(dict.fromkeys(r["setting"] for _, _, rows in parsed for r in rows))
    plt = pyplot()
    ncol = min(3, len(settings))
    nrow = -(-len(settings) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
    for ax, setting in zip(axes.flat, settings):
        cudnn = {}
        for i, (label, _, rows) in enumerate(parsed):
            pts = sorted((r["seq"], r["moba"]) for r in rows if r["setting"] == setting and r["moba"])
            cudnn.update({r["seq"]: r["cudnn"] for r in rows if r["setting"] == setting and r["cudnn"]})
            if pts:  # one colour per table in every panel
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"MoBA, {label}")
        if cudnn:
            ax.plot(*zip(*sorted(cudnn.items())), marker="s", color="black", linestyle="--", label="SDPA cuDNN (full)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(setting, fontsize=8)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("forward+backward ms")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(settings):]:
        ax.set_visible(False)
    fig.suptitle(f"MoBA kernels against full attention, {devices[0]}, bf16", fontsize=10)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="append", required=True, help="a bench_moba.py --out markdown file[:LABEL]")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    tables = []
    for spec in args.table:
        path, _, label = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        if not Path(path).exists():
            ap.error(f"--table {spec!r}: no file {path!r}")
        tables.append((path, label or Path(path).stem))
    try:
        out = plot(tables, args.out)
    except ValueError as e:
        ap.error(str(e))
    print(out)
    return out


if __name__ == "__main__":
    main()
