"""Registers, spills, shared memory and tensor-core instructions of every Triton kernel that one
MoBA forward+backward launches, compiled for a GPU architecture on any machine: no GPU needed,
nothing is launched (Triton's bundled ``ptxas`` and ``cuobjdump`` do the work).

Usage (CPU or GPU machine; ``TRITON_INTERPRET`` must be unset):
    python benchmarks/kernel_resources.py --at train-b1024:131072
    python benchmarks/kernel_resources.py --at flashmoba:32768 --kernel 'fwd.bn=64' --sass /tmp/sass
    python benchmarks/kernel_resources.py --at train-b1024:131072 --loops   # + per-loop pipe clocks

Per kernel (each distinct compiled variant once): registers per thread, stack bytes per thread
(spills land there), shared memory per program, warps, pipeline stages, the Hopper ``HGMMA`` and
older ``HMMA`` tensor-core instructions in its SASS, and how many programs fit one SM by registers,
by shared memory and in all (an H100/H200 SM: 64K registers, 228 KB of shared memory, 64 warps).
Session 20 found the forward's tile kernels and FlashMoBA's backward latency-bound at two 4-warp
(or one 8-warp) programs per SM: this shows such limits before any GPU time is spent.

The call runs on random CPU tensors at the suite's shape (``benchmarks/bench_moba.py``'s
``SUITES``; ``b x seq`` tokens) with the default tiling for that shape on a GPU with TMA (Hopper)
unless ``--no-tma``, plus ``--kernel`` overrides (as ``moba.kernel`` in a recipe). The kernels
never run, so their outputs are garbage: only the host code between launches runs, which asks
nothing of their values.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moba import SUITES  # noqa: E402
from sass_loops import format_rows, loop_report  # noqa: E402

import moba_cp.ops.moba.triton_attn_bwd as attn_bwd  # noqa: E402
import moba_cp.ops.moba.triton_attn_fwd as attn_fwd  # noqa: E402
from moba_cp.ops.moba import triton_backend  # noqa: E402
from moba_cp.ops.moba.triton_config import apply_overrides, choose_config  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SM_REGS, SM_SMEM, SM_WARPS, SMEM_RESERVED = 65536, 233472, 64, 1024  # Hopper: per SM; per program


class _NoLaunchDriver:
    """A driver that names a target and never reaches a GPU (compilation only)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _sass_facts(cubin: bytes, keep: str | None, name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    if keep:
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, f"{name}.sass"), "w") as out:
            out.write(sass)
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG/STACK line for {name}: {res.strip()[:200]}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
            "hmma": len(re.findall(r"\bHMMA\.", sass)), "sass": sass}


def programs_per_sm(regs: int, warps: int, shared: int) -> tuple[int, int, int]:
    """(by registers, by shared memory, in all) for one program of ``warps`` warps using ``regs``
    registers per thread and ``shared`` bytes: registers are allocated per warp in units of 256
    (8 per thread), and each program reserves 1 KB of shared memory beside its own."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM_REGS // (per_warp * warps)
    by_smem = SM_SMEM // (shared + SMEM_RESERVED)
    return by_regs, by_smem, min(by_regs, by_smem, SM_WARPS // warps)


@contextlib.contextmanager
def compile_only(arch: int, seen: dict, keep: str | None = None):
    """Inside: every Triton launch compiles for ``sm_<arch>`` and records its facts in ``seen``
    (keyed by kernel name and compiled hash) instead of running; restored on exit."""
    # the private slot, not .active: reading that creates the default driver, which needs a GPU
    old_driver, old_run = triton_driver._active, JITFunction.run
    old_check, old_cap = attn_bwd.descriptor_reductions_possible, attn_fwd.reg_cap

    def run(self, *args, grid, warmup, **kwargs):
        kernel = old_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.__name__, kernel.hash)
        if key not in seen:
            md = kernel.metadata
            seen[key] = {"name": self.__name__, "warps": md.num_warps, "stages": md.num_stages,
                         "shared": md.shared, **_sass_facts(kernel.asm["cubin"], keep, f"{self.__name__}_{kernel.hash[:8]}")}
        return kernel

    triton_driver.set_active(_NoLaunchDriver(arch))
    JITFunction.run = run
    attn_bwd.descriptor_reductions_possible = lambda device: True
    # the CPU tensors would drop a register cap (fwd.maxnreg); the target is a GPU, so keep it
    attn_fwd.reg_cap = lambda maxnreg, device: {"maxnreg": maxnreg} if maxnreg else {}
    try:
        yield seen
    finally:
        JITFunction.run = old_run
        triton_driver._active = old_driver
        attn_bwd.descriptor_reductions_possible = old_check
        attn_fwd.reg_cap = old_cap


def offline_call(tool: str, suite: str, seq: int, *, kernel: str = "", tma: bool = True, grad: bool = True):
    """The inputs of one MoBA call at ``suite``'s shape with ``seq`` tokens per sequence, for a tool
    that compiles its kernels without running them: ``(cfg, q, k, v, cu_seqlens, block, topk)``
    on random CPU tensors, with the shape's default tiling (for a GPU with TMA unless not ``tma``)
    plus ``kernel`` overrides. Refuses the interpreter and a Triton without the NVIDIA tools."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(f"{tool} compiles kernels, and TRITON_INTERPRET=1 makes every kernel an "
                           "interpreted function. Fix: run it with TRITON_INTERPRET unset")
    for name in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(TOOLS, name), os.X_OK):
            raise RuntimeError(f"{tool} needs Triton's bundled {name} in {TOOLS}, which is not there "
                               f"(a Triton build without the NVIDIA backend's tools)")
    if suite not in SUITES:
        raise ValueError(f"suite {suite!r} is not one of {', '.join(SUITES)}")
    b, hq, hkv, d, block, topk, _ = SUITES[suite]
    t = b * seq
    cfg = apply_overrides(choose_config(block, d, hq // hkv, t, tma), kernel)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(torch.bfloat16).requires_grad_(grad) for h in (hq, hkv, hkv))
    return cfg, q, k, v, torch.arange(b + 1, dtype=torch.int32) * seq, block, topk


def kernel_facts(suite: str, seq: int, *, kernel: str = "", tma: bool = True, arch: int = 90,
                 keep: str | None = None, backward: bool = True) -> tuple[object, list[dict]]:
    """Compile one forward(+backward) of MoBA at ``suite``'s shape with ``seq`` tokens per
    sequence; returns the tiling used and one dict per distinct compiled kernel."""
    cfg, q, k, v, cu, block, topk = offline_call("kernel_resources", suite, seq, kernel=kernel, tma=tma,
                                                 grad=backward)
    seen: dict = collections.OrderedDict()
    with compile_only(arch, seen, keep):
        o, _ = triton_backend.moba_attn(q, k, v, block_size=block, topk=topk, cu_seqlens=cu,
                                        softmax_scale=q.shape[-1] ** -0.5, config=cfg)
        if backward:
            o.backward(torch.ones_like(o))
    return cfg, list(seen.values())


def layer_op_facts(shape: str, arch: int = 90, keep: str | None = None) -> list[dict]:
    """Compile one forward+backward of each fused layer op (RoPE on q and on the strided k, SwiGLU,
    RMSNorm) at a training model's shape (``bench_layer_ops.SHAPES``, bf16); one dict per kernel."""
    from bench_layer_ops import SHAPES  # the same folder
    from moba_cp.model_sizes import default_ffn_hidden_size
    from moba_cp.ops.rms_norm import rms_norm
    from moba_cp.ops.rope import apply_rope, rope_tables
    from moba_cp.ops.swiglu import swiglu

    if shape not in SHAPES:
        raise ValueError(f"--layer-ops {shape!r}: choose one of {', '.join(SHAPES)}")
    s, b, hidden, hq, hkv, d, _, _ = SHAPES[shape]
    bf = torch.bfloat16
    mixed = torch.randn(s, b, hkv, (hq // hkv + 2) * d, dtype=bf)
    k = mixed[..., (hq // hkv) * d:(hq // hkv + 1) * d].detach().requires_grad_(True)
    q = torch.randn(s, b, hq, d, dtype=bf, requires_grad=True)
    freqs = torch.randn(s, 1, 1, d)
    x = torch.randn(s, b, 2 * default_ffn_hidden_size(hidden, True), dtype=bf, requires_grad=True)
    h = torch.randn(s, b, hidden, dtype=bf, requires_grad=True)
    w = torch.ones(hidden, dtype=bf, requires_grad=True)
    seen: dict = collections.OrderedDict()
    with compile_only(arch, seen, keep):
        for out in (apply_rope(q, *rope_tables(freqs)), apply_rope(k, *rope_tables(freqs)), swiglu(x),
                    rms_norm(h, w, 1e-5)):
            out.backward(torch.ones_like(out))
    return list(seen.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--at", default=None, help="suite:seq, e.g. train-b1024:131072 (suites of bench_moba.py)")
    ap.add_argument("--layer-ops", default=None,
                    help="instead of --at: the fused RoPE, SwiGLU and RMSNorm kernels at a training model's shape "
                         "(benchmarks/bench_layer_ops.py's SHAPES, e.g. 1gpu-32k)")
    ap.add_argument("--kernel", default="", help="tiling overrides, e.g. 'fwd.bn=64,gate.loop=keys'")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--no-tma", action="store_true", help="the tiling of a GPU without TMA")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--sass", default=None, help="also write each kernel's SASS into this folder")
    ap.add_argument("--loops", action="store_true",
                    help="also print, per loop of each kernel, one iteration's instructions, tensor FLOPs, "
                         "shared-memory bytes and the clocks each pipe needs (benchmarks/sass_loops.py)")
    args = ap.parse_args(argv)
    if (args.at is None) == (args.layer_ops is None):
        ap.error("give one of --at (a MoBA call) or --layer-ops (the fused layer ops)")
    if args.layer_ops:
        if os.environ.get("TRITON_INTERPRET") == "1":
            ap.error("--layer-ops compiles kernels; run it with TRITON_INTERPRET unset")
        facts = layer_op_facts(args.layer_ops, args.arch, args.sass)
        print(f"# fused layer ops at {args.layer_ops} (bench_layer_ops.py's shape, bf16) sm_{args.arch}")
    else:
        suite, seq = args.at.split(":")
        cfg, facts = kernel_facts(suite, int(seq), kernel=args.kernel, tma=not args.no_tma, arch=args.arch,
                                  keep=args.sass, backward=not args.forward_only)
        print(f"# {args.at} sm_{args.arch} ({'TMA' if not args.no_tma else 'no TMA'}) {cfg}")
    print(f"{'kernel':30s} {'regs':>4s} {'stack':>5s} {'smemKB':>6s} {'warps':>5s} {'st':>2s} {'HGMMA':>5s} "
          f"{'HMMA':>4s}  programs/SM (regs, smem -> all)")
    for f in facts:
        by_regs, by_smem, n = programs_per_sm(f["regs"], f["warps"], f["shared"])
        print(f"{f['name']:30s} {f['regs']:4d} {f['stack']:5d} {f['shared'] / 1024:6.1f} {f['warps']:5d} "
              f"{f['stages']:2d} {f['hgmma']:5d} {f['hmma']:4d}  {by_regs}, {by_smem} -> {n} "
              f"({n * f['warps']} warps)")
    if args.loops:
        print(f"\n# loops: one iteration of one program (nested loops in their own rows); clocks an SM needs "
              f"per pipe at Hopper's rates, the largest named (latency not modelled)")
        for f in facts:
            for row in format_rows(f["name"], loop_report(f["sass"], f["warps"])):
                print(row)


if __name__ == "__main__":
    main()
