"""benchmarks/memory_offline.py: a MoBA call's allocations counted on this CPU machine."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_offline  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def test_allocated_during_counts_each_calls_peak_and_what_stays():
    """Per call: the most it held above what was live when it began, and what it left; the second
    call's free of the first call's tensor counts against the second."""
    keep = []

    def first():
        big = torch.empty(4 << 20, dtype=torch.uint8)
        keep.append(torch.empty(1 << 20, dtype=torch.uint8))
        del big  # freed inside: in the peak, not in what stays
        keep.append(torch.empty(2 << 20, dtype=torch.uint8))

    def second():
        keep.pop(0)  # the first call's 1 MiB
        keep.append(torch.empty(512 << 10, dtype=torch.uint8))

    (p1, k1), (p2, k2) = memory_offline.allocated_during(first, second)
    assert (p1, k1) == (5 << 20, 3 << 20)
    assert (p2, k2) == (0, -(512 << 10))


def test_the_interpreter_is_refused_with_the_fix():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this process does not run the interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 .* Fix: run it with TRITON_INTERPRET unset"):
        memory_offline.call_memory("small-b512", 1024)


@pytest.mark.skipif(not all(os.access(TOOLS / t, os.X_OK) for t in ("ptxas", "cuobjdump")),
                    reason="Triton's bundled ptxas and cuobjdump are not installed")
def test_a_call_is_counted_without_a_gpu():
    """4 x 1K tokens, 6 heads, d=64: the forward keeps at least o (3 MiB bf16), the backward's
    transient holds at least dq, dk, dv (9 MiB), and the graphs' static buffers are the formula's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory_offline.py"), "--at", "small-b512:1024"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "q+k+v 9.0 MiB, o 3.0 MiB" in text, text
    fwd_peak, fwd_kept = map(float, re.search(r"forward: +peak +([\d.]+) MiB above its inputs, kept +([\d.]+)", text).groups())
    bwd_peak, _ = map(float, re.search(r"backward: +peak +([\d.]+) MiB above its inputs, kept +(-?[\d.]+)", text).groups())
    static = float(re.search(r"whole-call CUDA graphs: static buffers ([\d.]+) MiB", text).group(1))
    assert 3.0 < fwd_kept <= fwd_peak and bwd_peak >= 9.0
    assert static == pytest.approx(3 * 9.0 + 3.0 + 2 * fwd_kept, abs=0.15)
    shared, pool = map(float, re.search(r"MOBA_CP_CUDA_GRAPHS=shared: static buffers ([\d.]+) MiB, one pool ([\d.]+)",
                                        text).groups())
    assert shared == pytest.approx(2 * 9.0 + 3.0 + fwd_kept, abs=0.15)
    assert pool == pytest.approx(max(fwd_peak, fwd_kept + bwd_peak), abs=0.15)
