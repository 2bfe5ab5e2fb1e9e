"""The layer's operations outside attention: moba_cp's fused Triton RoPE, SwiGLU and RMSNorm
against what the model ran before them (Megatron-Core's unfused RoPE and SwiGLU, ``torch.nn.RMSNorm``),
forward and forward+backward, at the recipes' shapes, in the same process on the same GPU.

Usage (GPU; the CPU run is a smoke test of the script under the Triton interpreter):
    python benchmarks/bench_layer_ops.py --out benchmarks/results/layer_ops_<gpu>_<date>.md
    python benchmarks/bench_layer_ops.py --shapes small-8k --reps 20

Timing, two ways. Wall: CUDA events around each call after warm-up, the median of ``--reps``
calls; this includes the host's launch cost when an op's kernels are shorter than their launches
(every op here at 8K, and the Triton ops' backward at 32K). GPU: the kernels' own time under
``torch.profiler`` (the sum of every kernel's duration over ``--reps`` calls, divided by
``--reps``), which is what an op costs a step whose GPU is busy (32K and 128K training). The inputs
are Megatron's layouts (q and k as views of the fused QKV projection's output, ``[s, b, ...]``)
in bf16 with bf16 norm weights, as after ``model.bfloat16()``. Each row also gives the largest
difference between the two results (the fused kernels round once, the unfused path after each
operation), and a last line per shape adds the rows up per training step of the recipe's model
(2 RMSNorms, q and k RoPE and one SwiGLU a layer).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    # before Triton is first imported (Megatron imports it): the smoke run on CPU interprets every
    # kernel (not when imported: kernel_resources.py reads SHAPES and compiles the kernels for a GPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_time import kernel_ms  # noqa: E402  (the same folder)
from moba_cp.model_sizes import default_ffn_hidden_size  # noqa: E402
from moba_cp.ops.rms_norm import rms_norm  # noqa: E402
from moba_cp.ops.rope import apply_rope, rope_tables  # noqa: E402
from moba_cp.ops.swiglu import swiglu  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

#: name: (tokens per sequence, sequences, hidden, query heads, KV heads, head dim, layers,
#: micro-batches per step) of the models that ``benchmarks/bench_train.py`` trains.
SHAPES = {
    "1gpu-32k": (32768, 1, 1024, 16, 4, 64, 24, 2),
    "1gpu-32k@128K": (131072, 1, 1024, 16, 4, 64, 24, 1),
    "small-8k": (8192, 4, 384, 6, 6, 64, 6, 2),
}
SMOKE = {"smoke": (64, 2, 48, 3, 1, 16, 2, 1)}


def unfused_swiglu(x: torch.Tensor) -> torch.Tensor:
    """Megatron-Core's MLP activation without fusion (``MLP.forward``'s ``glu``)."""
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * b


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if CUDA:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_ms(fn, reps: int, warmup: int = 3) -> float | None:
    """Kernel time of one ``fn()`` call (:func:`kernel_time.kernel_ms` over ``reps`` calls); None
    without a GPU."""
    return kernel_ms(fn, reps, warmup) if CUDA else None


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def fwd_bwd(op, inputs, grad_out, params=()):
    """``op(*inputs)`` then its backward with ``grad_out`` (inputs that need grad get one)."""
    def run():
        for x in (*inputs, *params):
            x.grad = None
        op(*inputs).backward(grad_out)
    return run


def compare(name: str, fused, unfused, inputs, reps: int, params=()) -> tuple[str, tuple, tuple]:
    """One table row: both ops forward and forward+backward, wall and GPU time; returns (row,
    (fused f+b wall, GPU), (unfused f+b wall, GPU)). ``params``: parameters whose gradients the
    backward makes (reset each call, like the inputs')."""
    with torch.no_grad():
        y_f, y_u = fused(*inputs), unfused(*inputs)
        err = float((y_f.float() - y_u.float()).abs().max())
    g = torch.randn_like(y_f)
    with torch.no_grad():
        f_ms, u_ms = median_ms(lambda: fused(*inputs), reps), median_ms(lambda: unfused(*inputs), reps)
    run_f, run_u = fwd_bwd(fused, inputs, g, params), fwd_bwd(unfused, inputs, g, params)
    fb_f, fb_u = median_ms(run_f, reps), median_ms(run_u, reps)
    gpu_f, gpu_u = gpu_ms(run_f, reps), gpu_ms(run_u, reps)
    shape = "x".join(str(n) for n in inputs[0].shape)
    row = (f"| {name} | {shape} | {f_ms:.3f} | {u_ms:.3f} | {u_ms / f_ms:.2f} | {fb_f:.3f} | {fb_u:.3f} "
           f"| {fb_u / fb_f:.2f} | {_fmt(gpu_f)} | {_fmt(gpu_u)} | {_ratio(gpu_u, gpu_f)} | {err:.2e} |")
    return row, (fb_f, gpu_f), (fb_u, gpu_u)


def bench_shape(name: str, shape, reps: int, emit) -> None:
    s, b, hidden, hq, hkv, d, layers, micro = shape
    dt = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator(device=DEV).manual_seed(0)
    g = hq // hkv
    # Megatron's QKV layout: [s, b, hkv, (g + 2) * d]; q and k are views into it
    mixed = torch.randn(s, b, hkv, (g + 2) * d, device=DEV, dtype=dt, generator=gen)
    q = mixed[..., : g * d].reshape(s, b, hq, d).detach().requires_grad_(True)
    k = mixed[..., g * d:(g + 1) * d].detach().requires_grad_(True)
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(s, device=DEV, dtype=torch.float32), inv)
    freqs = torch.cat((f, f), dim=-1)[:, None, None, :]
    ffn = default_ffn_hidden_size(hidden, True)
    x_mlp = torch.randn(s, b, 2 * ffn, device=DEV, dtype=dt, generator=gen).requires_grad_(True)
    x_norm = torch.randn(s, b, hidden, device=DEV, dtype=dt, generator=gen).requires_grad_(True)
    norm = torch.nn.RMSNorm(hidden, eps=1e-5, device=DEV, dtype=dt)
    w = norm.weight

    rows = [
        ("RoPE q", lambda t: apply_rope(t, *rope_tables(freqs)), lambda t: _apply_rotary_pos_emb_bshd(t, freqs), [q], 1, ()),
        ("RoPE k (strided view)", lambda t: apply_rope(t, *rope_tables(freqs)),
         lambda t: _apply_rotary_pos_emb_bshd(t, freqs), [k], 1, ()),
        ("SwiGLU", swiglu, unfused_swiglu, [x_mlp], 1, ()),
        ("RMSNorm", lambda x: rms_norm(x, w, 1e-5), norm, [x_norm], 2, (w,)),
    ]
    emit(f"\n### {name}: {b} x {s} tokens, hidden {hidden}, {hq}/{hkv} heads of {d}, FFN {ffn}, {dt}\n")
    emit("| op | input | fused fwd ms | unfused fwd ms | x | fused f+b ms | unfused f+b ms | x "
         "| fused f+b GPU ms | unfused f+b GPU ms | x (GPU) | max abs diff |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|")
    step = layers * micro
    totals = {}  # (op kind, fused?) -> [wall, GPU] per step
    for label, fused, unfused, inputs, per_layer, params in rows:
        row, f, u = compare(label, fused, unfused, inputs, reps, params)
        emit(row)
        kind = "RMSNorm" if label == "RMSNorm" else "RoPE, SwiGLU"
        for is_fused, (wall, gpu) in ((True, f), (False, u)):
            acc = totals.setdefault((kind, is_fused), [0.0, 0.0])
            acc[0] += per_layer * step * wall
            acc[1] = None if gpu is None or acc[1] is None else acc[1] + per_layer * step * gpu
    emit(f"\nper training step ({layers} layers x {micro} micro-batches; forward+backward, no recomputation of "
         f"these ops), wall / GPU ms:")
    for kind in ("RoPE, SwiGLU", "RMSNorm"):
        (fw, fg), (uw, ug) = totals[(kind, True)], totals[(kind, False)]
        saved_gpu = "-" if fg is None or ug is None else f"{ug - fg:.1f}"
        emit(f"- {kind}: fused {fw:.1f} / {_fmt(fg)}, unfused {uw:.1f} / {_fmt(ug)}, saved {uw - fw:.1f} / {saved_gpu}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape (CPU: the Triton interpreter)")
    ap.add_argument("--commit", default="", help="the commit measured (default: git rev-parse; a copied tree's .git may be stale)")
    args = ap.parse_args(argv)
    if not CUDA and not args.smoke:
        raise SystemExit("bench_layer_ops.py: no CUDA GPU here, and the recipes' shapes would take hours in the "
                         "Triton interpreter. Fix: run it on a GPU, or pass --smoke for the CPU smoke run.")
    table = SMOKE if args.smoke else SHAPES
    names = list(table) if args.smoke else args.shapes.split(",")
    for n in names:
        if n not in table:
            raise SystemExit(f"--shapes: {n!r} is not one of {', '.join(table)}")
    lines = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write("\n".join(lines) + "\n")

    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    dev = torch.cuda.get_device_name() if CUDA else "CPU (smoke: Triton interpreter, fp32)"
    emit(f"# Layer operations outside attention: fused (moba_cp Triton) against unfused (Megatron / torch)")
    emit(f"# command: python benchmarks/bench_layer_ops.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    emit(f"# device: {dev}; torch {torch.__version__}; date {datetime.date.today()}; commit {commit}; "
         f"median of {args.reps} after warm-up")
    env = {k: os.environ[k] for k in ("MOBA_CP_FAST_LAUNCH",) if k in os.environ}
    if env:
        emit("# environment: " + " ".join(f"{k}={v}" for k, v in env.items()))
    for n in names:
        bench_shape(n, table[n], args.reps, emit)
        if CUDA:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
