"""``benchmarks/plot_kernels.py``: bench_moba tables read back into points and drawn; tables of
different devices, files without a bench_moba table and missing files are refused by name."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import plot_kernels  # noqa: E402

HEADER = ("| setting | S | MoBA fwd ms | MoBA fwd+bwd ms | gate ms | cuDNN fwd ms | cuDNN f+b ms |\n"
          "|---|---|---|---|---|---|---|\n")


def _table(path, device, rows):
    body = "".join(f"| {s} | {n} | 1.0 | {m} | 0.1 | 1.0 | {c} |\n" for s, n, m, c in rows)
    path.write_text(f"# command: python benchmarks/bench_moba.py ...\n\n{HEADER}{body}\nDevice: {device}; torch x; bf16\n")
    return str(path)


def test_tables_are_read_into_points_and_drawn(tmp_path, monkeypatch):
    a = _table(tmp_path / "a.md", "NVIDIA H200", [("flash (B=2)", "8K", "4.92", "3.7"),
                                                    ("flash (B=2)", "512K", "383.70", "15034.3 (1 run)")])
    b = _table(tmp_path / "b.md", "NVIDIA H200", [("flash (B=2)", "8K", "3.70", "3.6"), ("small", "1M", "9.0", "-")])
    dev, rows = plot_kernels.parse_tables(a)
    assert dev == "NVIDIA H200"
    assert rows[1] == {"setting": "flash (B=2)", "seq": 512 * 1024, "moba": 383.7, "cudnn": 15034.3}
    assert plot_kernels.parse_tables(b)[1][1] == {"setting": "small", "seq": 1 << 20, "moba": 9.0, "cudnn": None}
    out = plot_kernels.main(["--table", f"{a}:before", "--table", b, "--out", str(tmp_path / "fig" / "k.png")])
    assert os.path.getsize(out) > 10_000
    # files under one label are one series: the later file's point replaces the earlier one's
    c = _table(tmp_path / "c.md", "NVIDIA H200", [("flash (B=2)", "512K", "283.2", "15181.5")])
    seen = {}
    real_save = plot_kernels.save_figure

    def spy(fig, path):
        seen["lines"] = {ln.get_label(): list(ln.get_ydata()) for ax in fig.axes for ln in ax.get_lines()}
        return real_save(fig, path)

    monkeypatch.setattr(plot_kernels, "save_figure", spy)
    plot_kernels.plot([(a, "s16"), (c, "s16"), (b, "s17")], str(tmp_path / "m.png"))
    assert seen["lines"]["MoBA, s16"] == [4.92, 283.2]


def test_mixed_devices_and_non_tables_are_refused(tmp_path):
    a = _table(tmp_path / "a.md", "NVIDIA H200", [("flash", "8K", "4.9", "3.7")])
    b = _table(tmp_path / "b.md", "NVIDIA H100 80GB HBM3", [("flash", "8K", "6.0", "3.9")])
    with pytest.raises(ValueError, match=r"different devices \['NVIDIA H100 80GB HBM3', 'NVIDIA H200'\]"):
        plot_kernels.plot([(a, "a"), (b, "b")], str(tmp_path / "x.png"))
    (tmp_path / "c.md").write_text("| setting | S | MoBA fwd ms |\n|---|---|---|\n| x | 8K | 1 |\nDevice: H200; x\n")
    with pytest.raises(ValueError, match=r"c.md: a table without the column\(s\) \['MoBA fwd\+bwd ms', 'cuDNN f\+b ms'\]"):
        plot_kernels.parse_tables(str(tmp_path / "c.md"))
    (tmp_path / "d.md").write_text("notes only\n")
    with pytest.raises(ValueError, match="d.md: no 'Device: ...;' line"):
        plot_kernels.parse_tables(str(tmp_path / "d.md"))
    with pytest.raises(SystemExit):
        plot_kernels.main(["--table", str(tmp_path / "missing.md"), "--out", str(tmp_path / "y.png")])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
