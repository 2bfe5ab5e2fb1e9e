"""Where a MoBA call's time goes: per-kernel CUDA times, host enqueue time, syncs, GPU idle.

Usage (GPU):
    PYTHONPATH=$PWD python benchmarks/profile_moba.py --at flashmoba:8192,paper-b512:8192

Per setting: median fwd and fwd+bwd time (CUDA events, like ``bench_moba.py``), the host time
to *enqueue* one call (no sync; when it is close to the event time the call is host-bound),
then ``torch.profiler`` over a few fwd+bwd calls: the kernels by total CUDA time, the sum of
kernel time per call against the call's wall time (the difference is GPU idle: launch gaps
and host syncs), and the count of sync-like runtime calls per call.
``--host`` adds a cProfile of the host side (which Python functions the enqueue time is spent in).
``--sync-check`` lists every host synchronization of one warm fwd+bwd with the stack that made it
(``torch.cuda.set_sync_debug_mode``).
``--ncu`` runs, after the warm-up, exactly one fwd+bwd between ``cudaProfilerStart`` and
``cudaProfilerStop`` and nothing else: the range that ``scripts/gpu/ncu_kernels.sh`` profiles with
Nsight Compute (``--profile-from-start off``) for hardware counters per kernel.
``--layer`` times instead the call one training layer makes, MoBA against SDPA on the same
tensors: q, k, v as the slices of one fused QKV projection output ``[s, b, Hkv, (G + 2) D]``,
MoBA through ``api.moba_attn`` with the batch rows folded into heads as ``MoBACoreAttention`` does
(so short calls replay CUDA graphs, as in training), SDPA (cuDNN) as the full-attention layer
calls it. Per attention: back-to-back fwd+bwd calls (ms per call; no sync between calls, so the
larger of host and device time), the host time to enqueue one forward and one backward, and the
device time of the kernels (profiler); ``--host`` adds a cProfile of the enqueue. Where the
back-to-back time is the host time, the host decides the step (8K training: a small model's step
leaves the GPU idle between kernels).
Tile configurations are swept by ``bench_moba.py --tune``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_moba import SUITES, make_inputs, timed  # noqa: E402
from kernel_time import SYNC_WARNING, device_self_us, is_sync_warning, kernel_ms  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync", "cudaEventSynchronize")


def make(name, s, kernel=""):
    """Inputs of suite ``name`` at ``s`` tokens a sequence, and its tiling: the shape's default with
    ``kernel`` overrides (``moba.kernel`` syntax, e.g. ``bwd.dq_chunk_bytes=268435456``; "" = default)."""
    from moba_cp.ops.moba.triton_config import tiling_for

    b, hq, hkv, d, block, topk, _ = SUITES[name]
    cu, q, k, v, do = make_inputs(b, s, hq, hkv, d, "cuda", torch.bfloat16)
    config = tiling_for(block, d, hq // hkv, b * s, q.device, kernel) if kernel else None
    return dict(q=q, k=k, v=v, do=do, cu=cu, block=block, topk=topk, scale=d ** -0.5, hkv=hkv, config=config)


def calls(x):
    from moba_cp.ops.moba import triton_backend as tb

    kw = dict(block_size=x["block"], cu_seqlens=x["cu"], softmax_scale=x["scale"], config=x["config"])
    qg, kg, vg = (x[n].detach().requires_grad_() for n in ("q", "k", "v"))

    def fwd():
        with torch.no_grad():
            return tb.moba_attn(x["q"], x["k"], x["v"], topk=x["topk"], **kw)

    def fwd_bwd():
        o, _ = tb.moba_attn(qg, kg, vg, topk=x["topk"], **kw)
        return torch.autograd.grad(o, (qg, kg, vg), x["do"])

    return fwd, fwd_bwd


def layer_calls(name, s):
    """``(moba_fwd, moba_bwd, sdpa_fwd, sdpa_bwd)`` closures of one training layer's attention call
    at suite ``name``'s shape (see ``--layer``); each ``*_bwd`` runs a fresh forward's backward."""
    import torch.nn.functional as F

    from moba_cp.ops.moba.api import moba_attn

    b, hq, hkv, d, block, topk, _ = SUITES[name]
    g = hq // hkv
    fused = torch.randn(s, b, hkv, (g + 2) * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(s, b, hq * d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5

    def qkv():
        q = fused[..., : g * d].reshape(s, b, hq, d)
        return q, fused[..., g * d:(g + 1) * d], fused[..., (g + 1) * d:]

    def moba_fwd():
        q, k, v = qkv()
        fold = lambda t: t.reshape(s, b * t.shape[2], d)  # noqa: E731  (MoBACoreAttention's view)
        return moba_attn(fold(q), fold(k), fold(v), block_size=block, topk=topk, softmax_scale=scale).reshape(s, b, -1)

    def sdpa_fwd():
        q, k, v = qkv()
        o = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                           is_causal=True, scale=scale, enable_gqa=g > 1)
        return o.permute(2, 0, 1, 3).reshape(s, b, -1)

    def bwd_of(fwd):
        def run():
            fused.grad = None
            fwd().backward(do)
        return run

    return moba_fwd, bwd_of(moba_fwd), sdpa_fwd, bwd_of(sdpa_fwd)


def back_to_back_ms(fn, n=40):
    """ms per call of ``n`` calls enqueued back to back (one sync at the end)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n


def layer_report(name, s, host):
    moba_fwd, moba_fb, sdpa_fwd, sdpa_fb = layer_calls(name, s)
    for label, fwd, fb in (("moba", moba_fwd, moba_fb), ("sdpa", sdpa_fwd, sdpa_fb)):
        fwd_ng = lambda: fwd().detach()  # noqa: E731  (a forward whose graph is dropped at once)
        print(f"layer {name} S={s} {label}: back-to-back fwd+bwd {back_to_back_ms(fb):.3f} ms/call, "
              f"fwd {back_to_back_ms(fwd_ng):.3f} ms/call; enqueue fwd+bwd {enqueue_ms(fb):.3f} ms, "
              f"fwd {enqueue_ms(fwd_ng):.3f} ms; kernels fwd+bwd {kernel_ms(fb):.3f} ms, fwd {kernel_ms(fwd_ng):.3f} ms",
              flush=True)
        if host:
            host_profile(f"layer {name} S={s} {label} fwd+bwd", fb, rows=25)


def enqueue_ms(fn, n=10):
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(out)


def sync_report(label, fn):
    """Every host synchronization one warm ``fn()`` makes (``torch.cuda.set_sync_debug_mode``:
    ``.item()``, copies to the host, ``nonzero`` ...), each with the stack that made it. A sync
    in a call makes the GPU drain and then wait while the host enqueues what follows. A known
    sync (``.item()``) is checked first, so a torch whose warning reads differently fails loudly
    instead of reporting none."""
    fn()
    torch.cuda.synchronize()
    stacks, others = [], []

    def record(message, category, filename, lineno, file=None, line=None):
        if is_sync_warning(message):  # not the mode's own "prototype feature" notice
            stacks.append(f"{message}\n" + "".join(traceback.format_stack(limit=14)[:-2]))
        else:
            others.append(str(message))

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            torch.ones((), device="cuda").item()
            if len(stacks) != 1:
                raise RuntimeError(f"sync_report: a known sync (.item()) gave {len(stacks)} sync warnings and "
                                   f"these others: {others}; this torch's sync debug mode reads differently "
                                   f"from kernel_time.SYNC_WARNING={SYNC_WARNING!r}")
            stacks.clear()
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    print(f"[{label}] host synchronizations in one call: {len(stacks)}", flush=True)
    for where in dict.fromkeys(stacks):
        print(where, flush=True)


def profile(label, fn, iters=5, rows=22):
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    fn()
    torch.cuda.synchronize()
    with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
            torch.cuda.synchronize()
    ev = prof.key_averages()
    kern, syncs, launches = device_self_us(ev), {}, 0
    for e in ev:
        if e.key in SYNC_CALLS:
            syncs[e.key] = e.count / iters
        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"):
            launches += e.count / iters
    print(f"[{label}] kernels {kern / iters / 1e3:.3f} ms per call; launches/call {launches:.0f}; "
          f"sync-like calls/call {syncs}", flush=True)
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(ev.table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)
            break
        except Exception:  # older/newer key names
            continue


def host_profile(label, fn, iters=50, rows=30):
    """cProfile of the host side of ``iters`` calls (no sync inside): where the enqueue time goes
    when a call is host-bound (Python wrappers, custom-op dispatch, Triton's launcher)."""
    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(iters):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf).sort_stats("tottime")
    st.print_stats(rows)
    print(f"[{label}] host profile, {iters} calls (times are totals over the calls)", flush=True)
    print(buf.getvalue(), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--at", default="flashmoba:8192,paper-b512:8192", help="suite:seq list")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--label", default="")
    ap.add_argument("--host", action="store_true", help="also cProfile the host side of fwd+bwd")
    ap.add_argument("--layer", action="store_true",
                    help="time one training layer's attention call, MoBA against SDPA (see the docstring)")
    ap.add_argument("--ncu", action="store_true",
                    help="warm up, then one fwd+bwd inside cudaProfilerStart/Stop (for ncu --profile-from-start off)")
    ap.add_argument("--sync-check", action="store_true",
                    help="also list every host synchronization of one warm fwd+bwd, with its stack")
    ap.add_argument("--kernel", default="",
                    help="tiling overrides on each shape's default (moba.kernel syntax, e.g. "
                         "'bwd.dq_chunk_bytes=268435456'); not with --layer")
    args = ap.parse_args()
    if args.kernel and args.layer:
        ap.error("--kernel applies to the op calls; --layer times the default tiling a training layer gets")
    for item in args.at.split(","):
        name, s = item.split(":")
        if args.layer:
            layer_report(name, int(s), args.host)
            torch.cuda.empty_cache()
            continue
        x = make(name, int(s), args.kernel)
        fwd, fwd_bwd = calls(x)
        if args.ncu:
            fwd_bwd()  # compiles every kernel outside the profiled range
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            fwd_bwd()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"{args.label} {name} S={s}: one fwd+bwd profiled", flush=True)
            del x
            torch.cuda.empty_cache()
            continue
        f = timed(fwd, 3, 30)[0]
        fb = timed(fwd_bwd, 3, 30)[0]
        print(f"{args.label} {name} S={s}: fwd {f:.3f} ms (enqueue {enqueue_ms(fwd):.3f} ms), "
              f"fwd+bwd {fb:.3f} ms (enqueue {enqueue_ms(fwd_bwd):.3f} ms)", flush=True)
        if not args.no_profile:
            profile(f"{args.label} {name} S={s} fwd+bwd", fwd_bwd)
        if args.host:
            host_profile(f"{args.label} {name} S={s} fwd+bwd", fwd_bwd)
        if args.sync_check:
            sync_report(f"{args.label} {name} S={s} fwd+bwd", fwd_bwd)
        del x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
