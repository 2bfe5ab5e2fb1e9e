"""Host cost of enqueueing one small kernel, by the way it is launched: torch's own op, a Triton
kernel through its JIT dispatch (``kernel[grid](...)``), through the compiled kernel's runner
(``compiled[grid](...)``), and through the compiled kernel's C launcher with everything but the
arguments prepared once; then moba_cp's fused ops as the model calls them (forward under autograd).

Why: 8K training is host-bound (the GPU idles between kernels for both attentions), and the
layer ops' Triton calls measured ~0.14 ms of host time each on an H100 host against ~0.01 ms of
kernel (``results/layer_ops_h100_2026-12-05_session30.md``). This says which part of that is
Triton's dispatch and which is ours (autograd, allocation, checks) before anything is changed.

Usage (GPU only; no output on CPU):
    python benchmarks/bench_launch.py --out benchmarks/results/launch_<gpu>_<date>.md

Each line: the median over ``--rounds`` rounds of the mean host time per call of ``--calls``
back-to-back enqueues (``time.perf_counter`` around the loop, a synchronize before each round
and none inside it; each kernel is a few microseconds of GPU time, so the queue never fills and
the loop measures the host). A cProfile of the JIT dispatch follows the table.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import os
import pstats
import statistics
import subprocess
import sys
import time

import torch


def host_us(fn, calls: int, rounds: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_launch.py times GPU launches; no GPU here")
        return
    import triton
    from triton import knobs

    from moba_cp.ops.fast_launch import FastKernel, reset_fast_launch
    from moba_cp.ops.rms_norm.triton_rms_norm import rms_norm
    from moba_cp.ops.rope.triton_rope import _rope_kernel, apply_rope, rope_tables
    from moba_cp.ops.swiglu.triton_swiglu import swiglu

    dev = torch.device("cuda")
    s, b, h, d = 64, 1, 6, 64  # tiny: the kernel is a few microseconds, the host decides
    x = torch.randn(s, b, h, d, device=dev, dtype=torch.bfloat16)
    freqs = torch.randn(s, 1, 1, d, device=dev)
    cos, sin = rope_tables(freqs)
    y = torch.empty_like(x)
    n_rows = s * b * h
    br = 32
    grid = (triton.cdiv(n_rows, br),)
    kw = dict(HALF=d // 2, HP=d // 2, REST=0, RP=1, D=d, BR=br, BACKWARD=False)
    jit_args = (x, cos, sin, y, n_rows, b, h, x.stride(0), x.stride(1), x.stride(2), cos.stride(0))

    def jit():
        _rope_kernel[grid](*jit_args, **kw, num_warps=4)

    fast_rope = FastKernel(_rope_kernel)

    def fast():
        fast_rope[grid](*jit_args, **kw, num_warps=4)

    compiled = _rope_kernel[grid](*jit_args, **kw, num_warps=4)
    names = _rope_kernel.arg_names
    all_args = tuple(list(jit_args) + [kw[n] for n in names[len(jit_args):]])
    runner = compiled[(grid[0], 1, 1)]  # the runner indexes all three grid dims

    def via_runner():
        runner(*all_args)

    stream = torch.cuda.current_stream().cuda_stream
    fn_handle, packed = compiled.function, compiled.packed_metadata
    g0 = grid[0]

    def direct():
        compiled.run(g0, 1, 1, stream, fn_handle, packed, None, None, None, *all_args)

    def direct_stream_lookup():
        compiled.run(g0, 1, 1, torch.cuda.current_stream().cuda_stream, fn_handle, packed, None,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *all_args)

    a = torch.randn(1024, device=dev)
    xg = x.clone().requires_grad_(True)
    w = torch.ones(d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    xn = torch.randn(s * 4, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    xs = torch.randn(s * 4, 2 * d, device=dev, dtype=torch.bfloat16, requires_grad=True)

    rows = [
        ("torch.add (one torch op)", lambda: torch.add(a, a)),
        ("torch.empty_like", lambda: torch.empty_like(x)),
        ("Triton JIT dispatch: kernel[grid](...)", jit),
        ("moba_cp FastKernel: fast[grid](...) (key, then the C launcher)", fast),
        ("compiled[grid](*args) (CompiledKernel runner)", via_runner),
        ("compiled.run(...) with the stream looked up", direct_stream_lookup),
        ("compiled.run(...) with everything prepared", direct),
        ("apply_rope, no grad", lambda: apply_rope(x, cos, sin)),
        ("apply_rope, no grad, MOBA_CP_FAST_LAUNCH=0", lambda: apply_rope(x, cos, sin), "0"),
        ("apply_rope, input requires grad (autograd node)", lambda: apply_rope(xg, cos, sin)),
        ("apply_rope, input requires grad, MOBA_CP_FAST_LAUNCH=0", lambda: apply_rope(xg, cos, sin), "0"),
        ("rms_norm, input requires grad", lambda: rms_norm(xn, w, 1e-5)),
        ("swiglu, input requires grad", lambda: swiglu(xs)),
    ]
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    lines = [
        "# Host cost of one small kernel launch, by launch path",
        f"# command: python benchmarks/bench_launch.py {' '.join(sys.argv[1:])}",
        f"# device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; triton {triton.__version__}; "
        f"date {datetime.date.today()}; commit {commit}; median of {args.rounds} rounds of {args.calls} calls",
        "",
        "| launch path | host us per call |",
        "|---|---|",
    ]
    for name, fn, *env in rows:
        if env:
            os.environ["MOBA_CP_FAST_LAUNCH"] = env[0]
        reset_fast_launch()
        us = host_us(fn, args.calls, args.rounds)
        os.environ.pop("MOBA_CP_FAST_LAUNCH", None)
        reset_fast_launch()
        lines.append(f"| {name} | {us:.1f} |")
        print(lines[-1], flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        jit()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    lines += ["", "cProfile of 2000 JIT dispatches (tottime order):", "```", buf.getvalue().strip(), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
