"""`bench_moba.py --tune` on CPU (Triton interpreter, tiny shape): every sweep line is produced
and no variant fails, so the GPU sweep that picks `choose_config`'s rows runs as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~45 s in the Triton interpreter (5 min before the smoke shape had 4 heads): run with -m slow
def test_tune_smoke_every_variant_runs():
    fwd = [{}, {"method": "partials", "bm": 16, "bn": 16, "chunk": 32}, {"method": "one_pass", "bm": 16, "bn": 16},
           {"method": "query_major", "bm": 16, "bn": 16, "chunk": 32}]
    bwd = [{}, {"bnb": 16, "bm": 16, "fuse_dq": False, "dq_bm": 16, "dq_bn": 16}]
    gate = [{}, {"bm": 16, "bn": 16}]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_moba.py", "--smoke", "--tune", "smoke:72", "--tune-parts", "gate,fwd,bwd",
         "--tune-fwd", json.dumps(fwd), "--tune-bwd", json.dumps(bwd), "--tune-gate", json.dumps(gate)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("tune ")]
    assert not [x for x in lines if "failed" in x], out[-3000:]
    assert any("default config: KernelConfig(" in x for x in lines)
    for piece in ("select (centroids+gate)", "gather index", "chunk index", "gate pieces: centroids",
                  "gate pieces: gate kernel:", "gate pieces: gate kernel, scores only (diag)",
                  # the default (block 16: whole-block partials, dQ fused by atomics) timed in pieces
                  "fwd partials diagnostic {'diag_pass': 1}", "bwd diagnostic: fused dQ stored, not added",
                  "bwd diagnostic: fused dQ left out"):
        assert any(piece in x for x in lines), piece
    assert sum(" gate {" in x for x in lines) == len(gate)
    assert sum(" fwd {" in x for x in lines) == len(fwd)
    assert sum(" bwd {" in x for x in lines) == len(bwd)
    assert all(float(x.rsplit(": ", 1)[1].split()[0]) > 0 for x in lines if x.endswith(" ms"))
