"""``bench_moba.py``'s "f+b rate / cuDNN's" column: MoBA's TFLOP/s on its required work over
cuDNN's on dense causal attention (the issue's block >= 512 target), checked on a row measured on
an H200 (session 22: d=128, block 4096, top-12, 128K, 32/8 heads: 782.3 ms against 922.5 ms)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_moba  # noqa: E402


def test_rate_vs_cudnn_on_a_measured_row():
    b, s, hq, d, block, topk = 1, 131072, 32, 128, 4096, 12
    gate, attn = bench_moba.moba_flops(b, s, hq, d, block, topk)
    causal = 4 * d * s * s / 2 * hq * b
    moba_tflops = (gate + 3.5 * attn) / 782.3 / 1e9
    cudnn_tflops = 3.5 * causal / 922.5 / 1e9
    assert moba_tflops == pytest.approx(371, abs=1)  # the table's 'TFLOP/s f+b' of that row
    assert cudnn_tflops == pytest.approx(534, abs=1)  # session 22's "cuDNN ... ~534 TFLOP/s"
    rate = bench_moba.rate_vs_cudnn(gate, attn, 782.3, causal, 922.5)
    assert rate == pytest.approx(100 * moba_tflops / cudnn_tflops) and rate == pytest.approx(69.5, abs=0.1)
    # twice as fast on the same work: twice the rate
    assert bench_moba.rate_vs_cudnn(gate, attn, 782.3 / 2, causal, 922.5) == pytest.approx(2 * rate)


def test_table_smoke_has_the_rate_column(tmp_path):
    """The table mode on CPU (Triton interpreter, tiny shape, no peers): header and row agree on
    their cells, and the rate column is there ('-' without cuDNN)."""
    import os
    import subprocess

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, "benchmarks/bench_moba.py", "--smoke", "--peers", "none", "--out", str(out)],
                          cwd=root, env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [x for x in out.read_text().splitlines() if x.startswith("| ")]
    header, row = rows[0], rows[1]
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    assert len(cells(header)) == len(cells(row))
    i = cells(header).index("f+b rate / cuDNN's")
    assert cells(row)[i] == "-"
