"""benchmarks/bench_cp.py runs end to end on CPU (gloo, naive kernels, tiny shapes), with the
options the GPU runs use: default K/V mode only, random inputs only, and the profile section.
Its numbers mean nothing on CPU; the test checks that every section is produced and filled."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cp_smoke_prints_every_section(tmp_path):
    out = tmp_path / "cp.md"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "benchmarks/bench_cp.py", "--smoke", "--no-keep", "--no-structured", "--profile", "512:16:3",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    # 1. equality: CP against one process, errors at fp32 rounding
    errs = [float(x) for x in re.findall(r"\| moba_attn_cp CP=2 \(naive, comm=ring\) \| [^|]+ \| ([0-9.e+-]+) \|", text)]
    assert len(errs) == 2 and max(errs) < 1e-5
    # profile: one table per call
    assert text.count("### moba_attn_cp CP=2, S=512") == 1 and text.count("### moba_attn one GPU, S/2=256") == 1
    # 2. scaling: re-fetch time measured, keep column empty (--no-keep), random inputs only
    rows = re.findall(r"^\| (256|512) \| (\d+) / (\d+) \| (\w+) \| (\S+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|",
                      text, flags=re.M)
    assert len(rows) == 4 and {r[3] for r in rows} == {"random"}
    assert all(r[4] == "-" and float(r[5]) > 0 and float(r[7]) > 0 for r in rows)
    # 3. ring table compares against the re-fetch time
    assert "K/V re-fetched (ms)" in text
    assert len(re.findall(r"^\| (256|512) \| (math|flash) \| [0-9.]+ \|", text, flags=re.M)) == 4


def test_bench_cp_equality_section_with_the_all_to_all(tmp_path):
    out = tmp_path / "cp_a2a.md"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "benchmarks/bench_cp.py", "--smoke", "--eq-only", "--comm", "a2a", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    errs = [float(x) for x in re.findall(r"\| moba_attn_cp CP=2 \(naive, comm=a2a\) \| [^|]+ \| ([0-9.e+-]+) \|", text)]
    assert len(errs) == 2 and max(errs) < 1e-5
    assert "ring_attn_cp CP=2 (math, comm=a2a)" in text or "ring_attn_cp CP=2 (flash, comm=a2a)" in text
