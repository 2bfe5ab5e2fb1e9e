"""`bench_layer_ops.py --smoke` on CPU (Triton interpreter, tiny shape): every op's row is produced
with both paths run and their results compared, and the table file carries its provenance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_bench_layer_ops_smoke(tmp_path):
    out = tmp_path / "table.md"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/bench_layer_ops.py", "--smoke", "--reps", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    text = out.read_text()
    assert "# command: python benchmarks/bench_layer_ops.py --smoke" in text and "commit" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    for op in ("RoPE q", "RoPE k (strided view)", "SwiGLU", "RMSNorm"):
        assert op in rows, op
        diff = float(rows[op].rstrip(" |").split("|")[-1])
        assert diff < 1e-4, (op, diff)  # fp32 on CPU: the two paths agree
    assert "per training step" in text
