"""benchmarks/kernel_resources.py: MoBA's Triton kernels compiled for sm_90 on this CPU machine."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_resources  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _run_tool(*args):
    """``kernel_resources.py`` with ``args`` in a process without the interpreter; must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/kernel_resources.py"), *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_programs_per_sm_takes_the_tightest_of_registers_shared_memory_and_warps():
    # 255 registers round to 256 a thread, 8192 a warp: two 4-warp programs; 64 KB + 1 KB reserved: three
    assert kernel_resources.programs_per_sm(255, 4, 65536) == (2, 3, 2)
    assert kernel_resources.programs_per_sm(168, 4, 57344) == (3, 4, 3)
    assert kernel_resources.programs_per_sm(24, 2, 0) == (42, 228, 32)  # 64 warps an SM at most
    assert kernel_resources.programs_per_sm(128, 8, 148736) == (2, 1, 1)


def test_the_interpreter_is_refused_with_the_fix():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this process does not run the interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 .* Fix: run it with TRITON_INTERPRET unset"):
        kernel_resources.kernel_facts("small-b512", 1024)


@pytest.mark.skipif(not all(os.access(TOOLS / t, os.X_OK) for t in ("ptxas", "cuobjdump")),
                    reason="Triton's bundled ptxas and cuobjdump are not installed")
def test_a_call_compiles_for_sm90_without_a_gpu_and_reports_each_kernel(tmp_path):
    """One fwd+bwd at a small shape, in a process without the interpreter: the gate, the forward's
    tile kernel and the dK/dV kernel appear, with registers, Hopper tensor-core instructions (HGMMA,
    not the older HMMA) and a programs-per-SM bound; --sass writes their SASS; --loops adds one
    row per loop, and the loops of those three kernels do tensor-core work."""
    out = _run_tool("--at", "train-b128:2048", "--sass", str(tmp_path), "--loops")
    lines, _, loop_lines = out.stdout.partition("\n# loops")
    lines = lines.rstrip("\n").splitlines()
    assert lines[0].startswith("# train-b128:2048 sm_90 (TMA)")
    rows = {}
    for line in lines[2:]:
        m = re.match(r"(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+), (\d+) -> (\d+)", line)
        assert m, line
        rows.setdefault(m.group(1), []).append([int(m.group(i)) for i in (2, 3, 5, 7, 8, 11)])
    for name in ("_gate_topk_kernel", "_fwd_partial_kernel", "_dkdv_kernel"):
        assert name in rows, (name, list(rows))
        for regs, _stack, warps, hgmma, hmma, per_sm in rows[name]:
            assert 0 < regs <= 255 and warps in (4, 8) and hgmma > 0 and hmma == 0 and per_sm >= 1
    assert rows["_merge_kernel"][0][3] == 0  # no products in the merge
    assert any(p.name.startswith("_dkdv_kernel_") and "HGMMA" in p.read_text() for p in tmp_path.glob("*.sass"))
    loops = {}
    for line in loop_lines.splitlines()[1:]:
        if line.lstrip().startswith("branch "):  # an iteration that takes a forward branch
            assert re.search(r"branch 0x[0-9a-f]+ -> 0x[0-9a-f]+ taken: +\d+ ins \| clk: .* -> \w+$", line), line
            continue
        m = re.match(r"(\w+)\s+0x[0-9a-f]+-0x[0-9a-f]+ d\d+\s+\d+ ins\s+\d+ mma\s+([\d.]+) MFLOP .* -> (\w+)$", line)
        assert m, line
        loops.setdefault(m.group(1), []).append((float(m.group(2)), m.group(3)))
    for name in ("_gate_topk_kernel", "_fwd_partial_kernel", "_dkdv_kernel"):
        assert any(mflop > 0 for mflop, _ in loops[name]), (name, loops.get(name))
    assert {b for rows in loops.values() for _, b in rows} <= {"tensor", "smem", "alu", "fma", "xu", "issue"}


@pytest.mark.skipif(not all(os.access(TOOLS / t, os.X_OK) for t in ("ptxas", "cuobjdump")),
                    reason="Triton's bundled ptxas and cuobjdump are not installed")
def test_a_register_cap_reaches_the_offline_compile():
    """``fwd.maxnreg`` caps the forward tile kernel on a GPU; the offline compile targets one, so
    the cap must reach it although the tensors are on the CPU (the launcher drops it there)."""
    regs = {}
    for kernel in ("", "fwd.maxnreg=128"):
        out = _run_tool("--at", "small-b512:1024", "--forward-only", "--kernel", kernel)
        regs[kernel] = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("_fwd_partial_kernel")]
    assert regs[""] and max(regs[""]) > 128  # uncapped, the tile kernel takes more
    assert regs["fwd.maxnreg=128"] and max(regs["fwd.maxnreg=128"]) <= 128


@pytest.mark.skipif(not (TOOLS / "ptxas").exists(), reason="Triton without the NVIDIA backend's ptxas")
def test_layer_ops_compile_for_sm90_without_spills():
    out = _run_tool("--layer-ops", "small-8k").stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("_")]
    names = {r[0] for r in rows}
    assert names == {"_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_rms_norm_fwd_kernel",
                     "_rms_norm_bwd_kernel"}, out
    assert all(int(r[2]) == 0 for r in rows), out  # stack bytes: nothing spills at the training shapes
    assert len([r for r in rows if r[0] == "_rope_kernel"]) == 2  # forward and backward variants


def test_layer_ops_and_at_are_exclusive():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/kernel_resources.py"), "--at", "small-b512:8192",
                          "--layer-ops", "small-8k"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "one of --at" in out.stderr
