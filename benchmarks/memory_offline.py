"""Host memory of one MoBA forward and backward at a benchmark shape, counted on any machine: no
GPU, nothing launched (the kernels compile for sm_90 and never run, as in ``kernel_resources.py``).

Usage (CPU or GPU machine; ``TRITON_INTERPRET`` must be unset):
    python benchmarks/memory_offline.py --at small-b512:8192
    python benchmarks/memory_offline.py --at train-b1024:131072 --kernel 'bwd.max_rows=0'

What it prints, per call (bytes the call allocates on top of its inputs, from the allocator's
events under ``torch.profiler``; CPU tensors stand in for the GPU's, same shapes and dtypes):
- ``peak``: the most the call holds at once: an eager call's transient on the GPU, and the size of
  the private memory pool a CUDA graph of that call keeps (``cuda_graphs``: the pool holds what the
  captured call allocated, freed or not).
- ``kept``: what it still holds when it returns (outputs and the state saved for the backward).
- the graphed call's static buffers (``cuda_graphs._Captured``): its contiguous input copies and its
  outputs stay allocated for as long as the graph lives, on top of the clones it hands out (also
  with ``MOBA_CP_CUDA_GRAPHS=shared``, where the backward's graph reads the forward graph's buffers).

The caching allocator's rounding and fragmentation on a GPU come on top; the figures are a floor.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_resources import compile_only, offline_call  # noqa: E402

from moba_cp.ops.moba import triton_backend  # noqa: E402
from moba_cp.ops.moba.cuda_graphs import GRAPH_MAX_TOKEN_HEADS  # noqa: E402

MIB = 2 ** 20


def allocated_during(*fns) -> list[tuple[int, int]]:
    """``(peak, kept)`` bytes each of ``fns`` (called in order, in one profiled region) allocated
    above what was live when it began. One region, so a later call's frees of what an earlier one
    allocated are seen (the CPU allocator reports the size of a freed block only when the block
    was allocated while memory was being profiled)."""
    names = [f"memory_offline_{i}" for i in range(len(fns))]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for name, fn in zip(names, fns):
            with record_function(name):
                fn()
    events = prof.profiler.kineto_results.events()
    spans = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in names}
    mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    out = []
    for name in names:
        lo, hi = spans[name]
        live = peak = 0
        for e in mem:
            if lo <= e.start_ns() <= hi:
                live += e.nbytes()
                peak = max(peak, live)
        out.append((peak, live))
    return out


def call_memory(suite: str, seq: int, *, kernel: str = "", tma: bool = True) -> dict:
    """Forward and backward memory of MoBA at ``suite``'s shape with ``seq`` tokens per sequence."""
    cfg, q, k, v, cu, block, topk = offline_call("memory_offline", suite, seq, kernel=kernel, tma=tma)
    t, hq, d = q.shape
    hkv = k.shape[1]
    res: dict = {}

    def forward():
        res["o"], res["lse"] = triton_backend.moba_attn(q, k, v, block_size=block, topk=topk, cu_seqlens=cu,
                                                        softmax_scale=d ** -0.5, config=cfg)

    with compile_only(90, collections.OrderedDict()):
        forward()  # compiles every kernel first: the measured calls allocate as a warm call does
        res["o"].backward(torch.ones_like(res["o"]))
        for x in (q, k, v):
            x.grad = None
        do = torch.ones_like(q)
        fwd, bwd = allocated_during(forward, lambda: res["o"].backward(do))
    nbytes = lambda *xs: sum(x.numel() * x.element_size() for x in xs)  # noqa: E731
    return {"shape": f"{suite}:{seq}", "tokens": t, "heads": (hq, hkv), "d": d, "block": block, "topk": topk,
            "fwd_peak": fwd[0], "fwd_kept": fwd[1], "bwd_peak": bwd[0], "bwd_kept": bwd[1],
            "qkv": nbytes(q, k, v), "o": nbytes(res["o"]),
            # whole-call graphs: the forward copies q, k, v in and keeps o and the saved state (what
            # the eager forward kept); the backward copies do, q, k, v, o and that state in and
            # keeps dq, dk, dv
            "graph_static": 3 * nbytes(q, k, v) + nbytes(res["o"]) + 2 * fwd[1],
            # MOBA_CP_CUDA_GRAPHS=shared: the backward reads the forward graph's buffers, copies do alone
            "graph_static_shared": 2 * nbytes(q, k, v) + nbytes(res["o"]) + fwd[1],
            # and one pool for both graphs: the backward's capture beside the forward's live outputs
            "graph_pools_shared": max(fwd[0], fwd[1] + bwd[0])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--at", required=True, help="SUITE:SEQ, e.g. small-b512:8192 (bench_moba.py's suites)")
    ap.add_argument("--kernel", default="", help="tiling overrides, as moba.kernel in a recipe")
    ap.add_argument("--no-tma", action="store_true", help="the tiling of a GPU without TMA (before Hopper)")
    args = ap.parse_args(argv)
    suite, _, seq = args.at.partition(":")
    if not seq.isdigit():
        ap.error(f"--at {args.at!r}: give SUITE:SEQ, e.g. small-b512:8192")
    m = call_memory(suite, int(seq), kernel=args.kernel, tma=not args.no_tma)
    print(f"# {m['shape']}: {m['tokens']} tokens, heads {m['heads'][0]}/{m['heads'][1]}, d={m['d']}, "
          f"block {m['block']}, top-k {m['topk']}; q+k+v {m['qkv'] / MIB:.1f} MiB, o {m['o'] / MIB:.1f} MiB")
    print(f"forward:  peak {m['fwd_peak'] / MIB:8.1f} MiB above its inputs, kept {m['fwd_kept'] / MIB:8.1f} MiB")
    print(f"backward: peak {m['bwd_peak'] / MIB:8.1f} MiB above its inputs, kept {m['bwd_kept'] / MIB:8.1f} MiB")
    if m["tokens"] * m["heads"][0] > GRAPH_MAX_TOKEN_HEADS:
        print(f"not graphed: {m['tokens']} tokens x {m['heads'][0]} heads > GRAPH_MAX_TOKEN_HEADS "
              f"({GRAPH_MAX_TOKEN_HEADS}); the backward's peak is a transient")
    else:
        print(f"whole-call CUDA graphs: static buffers {m['graph_static'] / MIB:.1f} MiB allocated while they live, "
              f"pools {(m['fwd_peak'] + m['bwd_peak']) / MIB:.1f} MiB reserved; "
              f"MOBA_CP_CUDA_GRAPHS=shared: static buffers {m['graph_static_shared'] / MIB:.1f} MiB, "
              f"one pool {m['graph_pools_shared'] / MIB:.1f} MiB (shared is the default; the first figures "
              f"are MOBA_CP_CUDA_GRAPHS=1's)")


if __name__ == "__main__":
    main()
