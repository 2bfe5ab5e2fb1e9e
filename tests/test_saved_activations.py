"""`benchmarks/saved_activations.py` on CPU: what one layer of the 1gpu-32k model keeps for its
backward, fused against unfused layer ops, counted by storage and charged to the right submodule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _rows(text: str) -> dict[str, list[str]]:
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]]
            for cells in (line.split("|") for line in text.splitlines() if line.startswith("| ")) if "---" not in cells[1]}


def test_saved_activations_counts_the_fused_layer():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), MASTER_PORT="29547")
    proc = subprocess.run([sys.executable, "benchmarks/saved_activations.py", "--seq", "32"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = _rows(proc.stdout)
    per_token = {k: float(rows[k][0].replace(",", "")) for k in ("torch", "triton")}
    assert 0 < per_token["triton"] < per_token["torch"]
    # the fused SwiGLU keeps fc1's output alone: 2 x FFN (2752) bf16 values a token, nothing else
    assert rows["mlp.activation_func"] == ["0", "11,008"]
    assert rows["mlp"][1] == "0" and float(rows["mlp"][0].replace(",", "")) > 11008  # unfused: more than that
    # everything the layer saves is charged to one of its submodules: the rows add up to the total
    for col, key in ((0, "torch"), (1, "triton")):
        parts = sum(float(v[col].replace(",", "")) for k, v in rows.items() if k not in ("torch", "triton", "layer ops", "submodule of the layer"))
        assert parts == pytest.approx(per_token[key], abs=2), key
