"""MoBA Triton kernels vs its peers in the same run: PyTorch SDPA full causal attention (cuDNN,
flash), FlexAttention MoBA and FLA's NSA selected attention (``benchmarks/peers.py``), one table.

Usage (GPU):
    PYTHONPATH=$PWD python benchmarks/bench_moba.py --suite all --out benchmarks/results/moba_h100.md
    # FLA peer: carry .whl/fla_core-0.6.0-py3-none-any.whl (einops is on the GPU image) and
    # install it, e.g. pip install --no-deps --target /tmp/site .whl/*.whl (.gpucmd.sh does).
    # Fetch the wheel once (pure Python):
    #   python3 -m pip download --no-deps --only-binary=:all: -d .whl fla-core==0.6.0
CPU smoke (tiny shape; Triton interpreter; every column's code path, timings meaningless):
    PYTHONPATH=$PWD python benchmarks/bench_moba.py --smoke

Peers (``--peers``, default all available):
- ``sdpa``: full causal attention (backends from ``--sdpa``).
- ``flex``: FlexAttention (``torch.compile``d) with a MoBA ``mask_mod`` on our selection and a
  BlockMask of per-query-tile KV-tile unions. Its times *include our gate* (Triton
  ``select_blocks``) and the BlockMask build, so they compare with the MoBA fwd / fwd+bwd
  columns; the build alone is the "flex mask ms" column. Skipped above ``--flex-max-seq``.
- ``fla``: FLA's NSA selected attention (fla-core 0.6.0), attention only on given indices (no
  gate), at ``Hkv = Hq / 16`` (its kernel needs a GQA group that is a power of 2 >= 16) with
  indices shared per group (the first query head's selection); beside it our ``block_attn`` on
  the same inputs and indices ("ours same-idx"), so that pair compares like with like.

Per setting it prints forward and forward+backward time (CUDA events around each call,
after warm-up, median), the achieved TFLOP/s on the work MoBA must do, peak memory, and the
SDPA times measured in the same run. Inputs are bf16 random normal.

Work counted (per query token and head, head dim d): gate ``2 d * (#complete past blocks)``;
attention forward ``4 d * (#keys attended)`` with ``#keys = min(topk-1, own block) * B +
(pos % B) + 1``; backward = 2.5 x the attention forward (5 products vs 2). SDPA TFLOP/s
count the causal half: ``4 d S^2 / 2`` forward, 3.5 x that for forward+backward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DT = torch.bfloat16 if CUDA else torch.float32  # CPU smoke: fp32 (interpreter, flex on CPU)

SUITES = {
    # name: (batch, Hq, Hkv, d, block, topk, [seq lens])
    "flashmoba": (2, 16, 16, 128, 128, 8, [8192, 32768, 131072, 524288]),
    "paper-b512": (1, 32, 8, 128, 512, 3, [8192, 32768]),
    "paper-b4096": (1, 32, 8, 128, 4096, 12, [131072, 524288, 1048576]),
    # one CP=2 rank's gate at 1M tokens and block 128 (not in the default table; --tune cp-b128:524288)
    "cp-b128": (1, 32, 8, 128, 128, 8, [524288]),
    # The recipes' head dim 64: the 0.27B model (16/4 heads) at its two training settings, and
    # the small scaling-experiment model (6/6 heads, micro-batch 4 x 8K).
    "train-b1024": (1, 16, 4, 64, 1024, 12, [131072]),
    "train-b512": (1, 16, 4, 64, 512, 3, [32768]),
    "small-b512": (4, 6, 6, 64, 512, 3, [8192]),
    # the 0.27B model with FlashMoBA's block and top-k (not in the default table; --suite train-b128)
    "train-b128": (1, 16, 4, 64, 128, 8, [8192, 32768, 131072]),
}
SMOKE = {"smoke": (1, 4, 1, 16, 16, 3, [72])}  # CPU smoke: T not a multiple of the block, a GQA group of 4


def _sync():
    if CUDA:
        torch.cuda.synchronize()


class _Timer:
    """CUDA events on a GPU, perf_counter on CPU (smoke only)."""

    def __init__(self):
        if CUDA:
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        if CUDA:
            self.s.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if CUDA:
            self.e.record()
            torch.cuda.synchronize()
            return self.s.elapsed_time(self.e)
        return (time.perf_counter() - self.t0) * 1e3


def rate_vs_cudnn(gate_flop: float, attn_flop: float, moba_fwdbwd_ms: float, causal_flop: float,
                  cudnn_fwdbwd_ms: float) -> float:
    """MoBA's forward+backward TFLOP/s on its required work (gate + 3.5 x selected attention)
    over cuDNN's on dense causal attention at the same shape (3.5 x ``causal_flop``), in percent:
    the issue's "block >= 512 at 70% of cuDNN's rate" figure."""
    return (gate_flop + 3.5 * attn_flop) / moba_fwdbwd_ms / (3.5 * causal_flop / cudnn_fwdbwd_ms) * 100


def moba_flops(b, s, hq, d, block, topk):
    pos = torch.arange(s, dtype=torch.float64)
    own = torch.div(pos, block, rounding_mode="floor")
    keys = torch.clamp(own, max=topk - 1) * block + (pos % block) + 1
    gate = 2 * d * own.sum().item() * hq * b
    attn = 4 * d * keys.sum().item() * hq * b
    return gate, attn


def timed(fn, warmup, reps, budget_ms=None):
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    n = reps
    i = 0
    while i < n:
        tm = _Timer()
        tm.start()
        fn()
        times.append(tm.stop())
        if i == 0 and budget_ms is not None:  # adapt the repeat count to the call's length
            n = max(1, min(reps, int(budget_ms / max(times[0], 1e-3))))
        i += 1
    return statistics.median(times), len(times)


def peak_of(fn):
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def timed_peak(fn):
    """One call: CUDA-event time and peak memory of that same call (for rows of seconds)."""
    if not CUDA:
        tm = _Timer()
        tm.start()
        fn()
        return tm.stop(), None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e), torch.cuda.max_memory_allocated() / 2**30


def _empty_cache():
    if CUDA:
        torch.cuda.empty_cache()


#: ``--sink A``: every query and the keys of each document's first block get ``A`` times one
#: shared unit vector, so every query's gate picks that block, as an attention sink of a trained
#: model would (not measured on trained MoBA models here). Random inputs spread the selection over
#: the blocks; a sink puts every row of a document into block 0's bucket, which the backward cuts
#: into programs of at most ``bwd.max_rows`` rows.
SINK = 0.0


def inputs_note() -> str:
    """The table footer's sentence on what the inputs were, so a table run with ``--sink`` says so."""
    if not SINK:
        return "Inputs: random (the selection spread over the blocks)."
    return (f"Inputs: random plus an attention sink ({SINK:g} x a shared unit vector on every query and on "
            f"each document's first block of keys: every query selects its block 0).")


def make_inputs(b, s, hq, hkv, d, device=DEV, dtype=DT, block=0):
    """``b`` packed documents of ``s`` tokens: ``cu [b+1]`` int32 and random ``q, do [b*s, hq, d]``,
    ``k, v [b*s, hkv, d]`` (drawn in that order: q, k, v, do). ``cu`` is the lasting offsets
    tensor the Megatron path passes for a batch (``batch_cu_seqlens``), so short calls take the
    CUDA-graph path as they do in training. With :data:`SINK` and ``block``, the sink above."""
    from moba_cp.ops.moba.api import batch_cu_seqlens

    t = b * s
    cu = batch_cu_seqlens(b, s, torch.device(device))
    q, k, v, do = (torch.randn(t, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv, hq))
    if SINK and block:
        u = torch.randn(d, generator=torch.Generator().manual_seed(7))
        u = (SINK * u / u.norm()).to(device=device, dtype=dtype)
        q += u
        for i in range(b):
            k[i * s:i * s + min(block, s)] += u
    return cu, q, k, v, do


def bench_moba(b, s, hq, hkv, d, block, topk, budget_ms, big=False):
    from moba_cp.ops.moba import triton_backend as tb

    if big:  # compile every kernel on a small input first, so the single timed calls hold none
        bench_moba(b, min(s, max(16 * block, 8192)), hq, hkv, d, block, topk, 1.0)
    cu, q, k, v, do = make_inputs(b, s, hq, hkv, d, block=block)
    scale = d ** -0.5
    kw = dict(block_size=block, cu_seqlens=cu, softmax_scale=scale)

    def fwd():
        with torch.no_grad():
            return tb.moba_attn(q, k, v, topk=topk, **kw)

    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd_bwd():
        o, _ = tb.moba_attn(qg, kg, vg, topk=topk, **kw)
        return torch.autograd.grad(o, (qg, kg, vg), do)

    with torch.no_grad():
        idx = tb.select_blocks(q, k, block_size=block, topk=topk, cu_seqlens=cu)

    def sel():
        with torch.no_grad():
            return tb.select_blocks(q, k, block_size=block, topk=topk, cu_seqlens=cu)

    def attn_only():
        with torch.no_grad():
            return tb.block_attn(q, k, v, idx, **kw)

    r = {}
    r["fwd"], r["n_fwd"] = timed(fwd, 1, 30, budget_ms)
    if big:  # one warm-up fwd+bwd at this size, then one timed call whose peak is the row's peak
        fwd_bwd()
        (r["fwdbwd"], r["peak"]), r["n_fwdbwd"] = timed_peak(fwd_bwd), 1
    else:
        r["fwdbwd"], r["n_fwdbwd"] = timed(fwd_bwd, 1, 20, budget_ms)
    r["gate"], _ = timed(sel, 0, 10, budget_ms / 3)
    r["attn_fwd"], _ = timed(attn_only, 0, 10, budget_ms / 3)
    if not big:
        r["peak"] = peak_of(fwd_bwd)
    del q, k, v, do, qg, kg, vg, idx
    _empty_cache()
    return r


def bench_flex(b, s, hq, hkv, d, block, topk, budget_ms, big=False):
    """FlexAttention MoBA: our gate + BlockMask build + compiled flex_attention (fwd, fwd+bwd)."""
    from moba_cp.ops.moba import triton_backend as tb

    cu, q, k, v, do = make_inputs(b, s, hq, hkv, d, block=block)
    do4 = peers.to_bhsd(do)
    q4, k4, v4 = (peers.to_bhsd(x) for x in (q, k, v))
    scale = d ** -0.5

    def build():
        with torch.no_grad():
            idx = tb.select_blocks(q, k, block_size=block, topk=topk, cu_seqlens=cu)
            return peers.flex_moba_block_mask(idx, cu, block)

    def fwd():
        with torch.no_grad():
            return peers.flex_moba_attn(q4, k4, v4, build(), softmax_scale=scale)

    qg, kg, vg = (x.detach().requires_grad_() for x in (q4, k4, v4))

    def fwd_bwd():
        o = peers.flex_moba_attn(qg, kg, vg, build(), softmax_scale=scale)
        return torch.autograd.grad(o, (qg, kg, vg), do4)

    warm, reps = (1, 1) if big else (1, 20)
    r = {}
    r["mask"], _ = timed(build, 1, 5, budget_ms / 3)
    r["fwd"], r["n_fwd"] = timed(fwd, warm, reps, budget_ms)
    if CUDA:  # flex has no backward on CPU
        r["fwdbwd"], r["n_fwdbwd"] = timed(fwd_bwd, warm, reps, budget_ms)
        r["peak"] = peak_of(fwd_bwd)
    del q, k, v, q4, k4, v4, qg, kg, vg, do4
    _empty_cache()
    return r


def bench_fla(b, s, hq, d, block, topk, budget_ms, big=False):
    """FLA NSA selected attention vs our block_attn, same inputs and group-shared indices.

    Shape: ``Hkv = Hq / 16`` (FLA's minimum group); q ``[b, s, Hq, d]``, k/v ``[b, s, Hkv, d]``
    (our kernels see the same memory as packed ``[b*s, H, d]`` with one document per row).
    """
    from moba_cp.ops.moba import triton_backend as tb

    hkv = max(1, hq // peers.FLA_MIN_GROUP)
    why = peers.fla_shape_reason(hq, hkv, d, block)
    if why is not None:
        return {"skip": f"n/a: {why}"}
    t = b * s
    cu = torch.arange(0, t + 1, s, dtype=torch.int32, device=DEV)
    q = torch.randn(b, s, hq, d, device=DEV, dtype=DT)
    k = torch.randn(b, s, hkv, d, device=DEV, dtype=DT)
    v = torch.randn(b, s, hkv, d, device=DEV, dtype=DT)
    do = torch.randn(b, s, hq, d, device=DEV, dtype=DT)
    qt, kt, vt, dot = (x.view(t, x.shape[2], d) for x in (q, k, v, do))
    scale = d ** -0.5
    with torch.no_grad():
        idx = tb.select_blocks(qt, kt, block_size=block, topk=topk, cu_seqlens=cu)
    bi = peers.fla_group_indices(idx, hkv, b)
    shared = idx[:, :: hq // hkv].repeat_interleave(hq // hkv, dim=1).contiguous()  # same blocks, unpadded
    del idx
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fla_fwd():
        with torch.no_grad():
            return peers.fla_nsa_attn(q, k, v, bi, block_size=block, softmax_scale=scale)

    def fla_fwd_bwd():
        o = peers.fla_nsa_attn(*leaves, bi, block_size=block, softmax_scale=scale)
        return torch.autograd.grad(o, leaves, do)

    tleaves = [x.view(t, x.shape[2], d) for x in leaves]

    def ours_fwd():
        with torch.no_grad():
            return tb.block_attn(qt, kt, vt, shared, block_size=block, cu_seqlens=cu, softmax_scale=scale)

    def ours_fwd_bwd():
        o, _ = tb.block_attn(*tleaves, shared, block_size=block, cu_seqlens=cu, softmax_scale=scale)
        return torch.autograd.grad(o, leaves, dot)

    warm, reps = (1, 1) if big else (1, 20)
    r = {"hkv": hkv, "slots": bi.shape[-1]}
    for key, fn in (("fwd", fla_fwd), ("fwdbwd", fla_fwd_bwd), ("ours_fwd", ours_fwd), ("ours_fwdbwd", ours_fwd_bwd)):
        try:
            r[key], _ = timed(fn, warm, reps, budget_ms)
        except torch.OutOfMemoryError:
            r[key] = "OOM"
            _empty_cache()
        except Exception as e:  # e.g. a block too large for FLA's [G, BS] tile
            r[key] = f"failed: {type(e).__name__}"
            print(f"FLA peer S={s} {key}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    del q, k, v, do, qt, kt, vt, dot, leaves, tleaves, bi, shared
    _empty_cache()
    return r


def bench_sdpa(b, s, hq, hkv, d, backend, big, budget_ms):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    q = torch.randn(b, hq, s, d, device=DEV, dtype=DT, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device=DEV, dtype=DT, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=DEV, dtype=DT, requires_grad=True)
    do = torch.randn(b, hq, s, d, device=DEV, dtype=DT)
    gqa = hq != hkv
    note = ""
    kk, vv = k, v

    def call(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    try:
        with torch.no_grad():
            call(q, k, v)
    except RuntimeError:
        # This backend has no GQA path here: repeat K/V (what a user of it would do).
        kk = k.detach().repeat_interleave(hq // hkv, 1).requires_grad_()
        vv = v.detach().repeat_interleave(hq // hkv, 1).requires_grad_()
        gqa = False
        note = "KV repeated"

    def fwd():
        with torch.no_grad():
            return call(q, kk, vv)

    def fwd_bwd():
        o = call(q, kk, vv)
        return torch.autograd.grad(o, (q, kk, vv), do)

    warm = 0 if big else 1
    reps = 1 if big else 20
    r = {"note": note}
    r["fwd"], r["n_fwd"] = timed(fwd, warm, reps, budget_ms)
    if big:  # one call of tens of seconds: its peak is the row's peak (no second call)
        (r["fwdbwd"], r["peak"]), r["n_fwdbwd"] = timed_peak(fwd_bwd), 1
    else:
        r["fwdbwd"], r["n_fwdbwd"] = timed(fwd_bwd, warm, reps, budget_ms)
        r["peak"] = peak_of(fwd_bwd)
    del q, k, v, kk, vv, do
    _empty_cache()
    return r


#: Forward and backward tilings tried by ``--tune`` (overrides of the shape's default config;
#: each line names what it changes). ``fwd:`` variants time the forward alone (index build
#: included, as a call pays it); ``bwd:`` variants time the backward on the default's index.
TUNE_FWD = [
    {},
    {"method": "two_pass", "bm": 64, "bn": 64, "chunk": 256, "num_warps": 4, "num_stages": 2},
    {"method": "partials", "bm": 128, "bn": 64, "chunk": 128, "num_warps": 8, "num_stages": 3},
    {"method": "partials", "bm": 128, "bn": 128, "chunk": 128, "num_warps": 8, "num_stages": 3},
    {"method": "partials", "bm": 64, "bn": 64, "chunk": 128, "num_warps": 4, "num_stages": 3},
    {"method": "partials", "bm": 128, "bn": 64, "chunk": 128, "num_warps": 4, "num_stages": 3},
    {"method": "partials", "bm": 128, "bn": 64, "chunk": 128, "num_warps": 4, "num_stages": 4},
    {"method": "partials", "bm": 128, "bn": 32, "chunk": 128, "num_warps": 4, "num_stages": 3},
    {"method": "one_pass", "bm": 128, "bn": 64, "chunk": 256, "num_warps": 8, "num_stages": 4},
]
TUNE_BWD = [
    {},
    {"bnb": 128, "bm": 64, "num_warps": 8, "num_stages": 3},
    {"bnb": 128, "bm": 32, "num_warps": 4, "num_stages": 3},
    {"bnb": 128, "bm": 64, "num_warps": 4, "num_stages": 2},
    {"bnb": 64, "bm": 32, "num_warps": 4, "num_stages": 3},
    {"fuse_dq": True},
    {"fuse_dq": True, "bnb": 128, "bm": 64, "num_warps": 8},
    {"dq_bm": 128, "dq_bn": 64, "dq_warps": 8, "dq_stages": 3},
    {"dq_bm": 64, "dq_bn": 64, "dq_warps": 4, "dq_stages": 3},
    {"split_mask": True},
    {"split_mask": True, "gather_rows": True},
    {"split_mask": True, "gather_rows": True, "bm": 64, "num_warps": 8},
    {"split_mask": True, "gather_rows": True, "num_stages": 4},
]
TUNE_GATE = [{}, {"num_warps": 8}, {"bm": 128, "num_warps": 8}, {"bm": 128, "num_warps": 4}, {"bm": 64, "bn": 128},
             {"bm": 32, "num_warps": 4}, {"bn": 32, "num_warps": 4}]


def tune(b, s, hq, hkv, d, block, topk, budget_ms=2500.0, parts=("fwd", "bwd"), fwd_variants=None, bwd_variants=None,
         gate_variants=None):
    """Time the pieces and tile configurations at one shape (one line each). Every variant is a
    :class:`KernelConfig` passed to the kernels; nothing global is changed."""
    from moba_cp.ops.moba import triton_backend as tb
    from moba_cp.ops.moba.triton_attn_bwd import sparse_attn_bwd
    from moba_cp.ops.moba.triton_attn_fwd import build_chunk_index, onepass_qchunk, sparse_attn_fwd, sparse_attn_fwd_onepass
    from moba_cp.ops.moba.triton_attn_fwd_qmajor import sparse_attn_fwd_query_major
    from moba_cp.ops.moba.triton_centroids import block_centroids
    from moba_cp.ops.moba.triton_common import build_gather_index, doc_tables
    from moba_cp.ops.moba.triton_config import choose_config, device_has_tma
    from moba_cp.ops.moba.triton_gate import gate_topk

    t = b * s
    cu, q, k, v, do = make_inputs(b, s, hq, hkv, d, DEV, DT, block=block)
    scale = d ** -0.5
    base_cfg = choose_config(block, d, hq // hkv, t, device_has_tma(q.device))
    print(f"tune S={s} B={block} default config: {base_cfg}", flush=True)
    blocks, qpos, base, _ = doc_tables(t, cu, block, DEV)
    idx = tb.select_blocks(q, k, block_size=block, topk=topk, cu_seqlens=cu)
    w = idx.shape[-1]
    tm = lambda fn: timed(fn, 1, 10 if CUDA else 1, budget_ms)[0]  # noqa: E731
    pr = lambda name, ms: print(f"tune S={s} B={block} {name}: {ms:.3f} ms", flush=True)  # noqa: E731
    # how the selection spreads over the (query head, block) buckets: the backward's dK/dV program
    # of a block walks all of its bucket's rows, so the largest bucket is its longest program
    cnt = build_gather_index(idx, base, blocks.n, hkv, base_cfg.fwd.chunk).offs.diff().float()
    used = cnt[cnt > 0]
    print(f"tune S={s} B={block} selection (sink {SINK:g}): largest bucket {int(cnt.max())} rows, mean "
          f"{used.mean().item():.0f} over {used.numel()} non-empty (query head, block) buckets", flush=True)
    pr("select (centroids+gate)", tm(lambda: tb.select_blocks(q, k, block_size=block, topk=topk, cu_seqlens=cu)))
    pr("gather index", tm(lambda: build_gather_index(idx, base, blocks.n, hkv, base_cfg.fwd.chunk)))
    pr("gather index, int32 keys (before session 27)",
       tm(lambda: build_gather_index(idx, base, blocks.n, hkv, base_cfg.fwd.chunk, narrow_keys=False)))
    pr("gather index, again", tm(lambda: build_gather_index(idx, base, blocks.n, hkv, base_cfg.fwd.chunk)))
    pr("chunk index", tm(lambda: build_chunk_index(idx, base, blocks.n, onepass_qchunk(t, hq, DEV, base_cfg.fwd))))

    def attempt(label, fn):
        try:
            if not CUDA:
                pr(label, tm(fn))
                return
            # on the GPU also the call's transient peak: the most allocated above what was held before it
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = tm(fn)
            peak = (torch.cuda.max_memory_allocated() - held) / 2 ** 30
            print(f"tune S={s} B={block} {label}: {ms:.3f} ms (transient peak {peak:.2f} GiB)", flush=True)
        except Exception as e:  # a config that does not compile (shared memory) is reported
            print(f"tune S={s} B={block} {label}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)

    def fwd_call(fc):
        if fc.method == "one_pass":
            return sparse_attn_fwd_onepass(q, k, v, qpos, blocks, idx, base, scale, fc)
        if fc.method == "query_major":  # reads the selection: no index to build
            return sparse_attn_fwd_query_major(q, k, v, qpos, blocks, idx, base, scale, fc)
        gi = build_gather_index(idx, base, blocks.n, hkv, fc.chunk)
        return sparse_attn_fwd(q, k, v, qpos, blocks, gi, w, scale, block, fc)

    if "gate" in parts:
        # The selection's pieces at the default tiling: centroids, the gate kernel, and the same
        # kernel without its running top-k (products and masks only), so the loop's share is the
        # difference of the last two (a diagnostic: that call's output is not a selection).
        cent = block_centroids(k, blocks.kstart, blocks.klen, block)
        gate_args = dict(block_size=block, topk=topk, width=w, cfg=base_cfg.gate)
        attempt("gate pieces: centroids", lambda: block_centroids(k, blocks.kstart, blocks.klen, block))
        attempt("gate pieces: gate kernel", lambda: gate_topk(q, cent, qpos, base, **gate_args))
        attempt("gate pieces: gate kernel, scores only (diag)", lambda: gate_topk(q, cent, qpos, base, diag="scores",
                                                                                  **gate_args))
        for change in gate_variants or TUNE_GATE:
            cfg = base_cfg.replace(gate=change)
            attempt(f"gate {change}", lambda: tb.select_blocks(q, k, block_size=block, topk=topk, cu_seqlens=cu, config=cfg))
    if "fwd" in parts:
        for change in fwd_variants or TUNE_FWD:
            fc = base_cfg.replace(fwd=change).fwd
            attempt(f"fwd {change}", lambda: fwd_call(fc))
        if base_cfg.fwd.method in ("two_pass", "partials"):
            # the default's pieces: two passes (each; the second storing instead of adding), or the
            # partials' tile kernel alone (with the fill of the partial LSEs; the merge is the rest: alone
            # it would read unwritten partials)
            gi = build_gather_index(idx, base, blocks.n, hkv, base_cfg.fwd.chunk)
            diags = ({"diag_pass": 1}, {"diag_pass": 2}, {"diag_pass": 2, "diag_no_atomic": True})
            for diag in diags if base_cfg.fwd.method == "two_pass" else diags[:1]:
                attempt(f"fwd {base_cfg.fwd.method} diagnostic {diag}",
                        lambda: sparse_attn_fwd(q, k, v, qpos, blocks, gi, w, scale, block, base_cfg.fwd, **diag))
    if "bwd" in parts:
        # the backward reads a gather index: the one-pass and query-major forwards have none, so
        # take their two-pass twin
        fc = base_cfg.fwd if base_cfg.fwd.method in ("two_pass", "partials") \
            else base_cfg.replace(fwd={"method": "two_pass"}).fwd
        gi = build_gather_index(idx, base, blocks.n, hkv, fc.chunk)
        o, lse = sparse_attn_fwd(q, k, v, qpos, blocks, gi, w, scale, block, fc)
        for change in bwd_variants or TUNE_BWD:
            bc = base_cfg.replace(bwd=change).bwd
            attempt(f"bwd {change}", lambda: sparse_attn_bwd(do, q, k, v, o, lse, qpos, blocks, gi, w, scale, block, bc,
                                                             kv_grad_dtype=k.dtype, dq_dtype=q.dtype,
                                                             sorted_positions=True, blocks_nonempty=True))
        bc = base_cfg.bwd
        if bc.dq_slots:
            # the default's slot buffer zero-filled (as the CP slot form does) instead of left
            # unfilled but for the unselected slots: what skipping the fill saves
            attempt("bwd diagnostic: dq slot buffer zero-filled",
                    lambda: sparse_attn_bwd(do, q, k, v, o, lse, qpos, blocks, gi, w, scale, block, bc,
                                            kv_grad_dtype=k.dtype, dq_dtype=q.dtype, sorted_positions=True))
        if not bc.dq_rows and not bc.dq_slots and bc.fuses_dq(block, d):
            # the default's fused dQ by fp32 atomics: its cost, as the time without it (wrong dq)
            for diag, what in ((1, "stored, not added"), (2, "left out")):
                attempt(f"bwd diagnostic: fused dQ {what} (wrong dq)",
                        lambda: sparse_attn_bwd(do, q, k, v, o, lse, qpos, blocks, gi, w, scale, block, bc,
                                                kv_grad_dtype=k.dtype, dq_dtype=q.dtype, sorted_positions=True,
                                                blocks_nonempty=True, diag_dq=diag))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="all", help="all, or a comma list of " + ", ".join(SUITES))
    ap.add_argument("--max-seq", type=int, default=1 << 21, help="skip longer sequences")
    ap.add_argument("--min-seq", type=int, default=0, help="skip shorter sequences")
    ap.add_argument("--skip-seq", default="", help="comma list of sequence lengths to skip")
    ap.add_argument("--sdpa", default="cudnn,flash", help="SDPA backends to time (comma list, or 'none')")
    ap.add_argument("--sdpa-big", default="cudnn", help="SDPA backends to time at S >= 512K (one untimed-warm-up-free call each)")
    ap.add_argument("--budget-ms", type=float, default=1500.0, help="time per measured point (sets the repeats)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write raw numbers here")
    ap.add_argument("--commit", default="", help="the commit measured (default: git rev-parse; a copied tree's .git may be stale)")
    ap.add_argument("--tune", default=None, help="suite:seq, e.g. flashmoba:32768: time pieces and tile configs, then exit")
    ap.add_argument("--tune-parts", default="fwd,bwd", help="with --tune: which sweeps (gate, fwd, bwd)")
    ap.add_argument("--tune-fwd", default=None, help="with --tune: JSON list of FwdConfig overrides (else TUNE_FWD)")
    ap.add_argument("--tune-bwd", default=None, help="with --tune: JSON list of BwdConfig overrides (else TUNE_BWD)")
    ap.add_argument("--tune-gate", default=None, help="with --tune: JSON list of GateConfig overrides (else TUNE_GATE)")
    ap.add_argument("--peers", default="all",
                    help="comma list of sdpa, flex, fla (or 'all': every one available, or 'none')")
    ap.add_argument("--flex-max-seq", type=int, default=131072, help="no FlexAttention peer above this S")
    ap.add_argument("--fla-max-seq", type=int, default=1 << 21, help="no FLA peer above this S")
    ap.add_argument("--sink", type=float, default=0.0,
                    help="give every query and each document's first block of keys this multiple of one shared "
                         "unit vector, so every query selects block 0 (an attention sink, as trained models may have; 8 makes "
                         "it certain at d=64-128)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke: tiny shape, Triton interpreter, every column's code path (times meaningless)")
    args = ap.parse_args()
    global SINK
    SINK = args.sink
    known = ("sdpa", "flex", "fla")
    want = list(known) if args.peers == "all" else ([] if args.peers == "none" else args.peers.split(","))
    bad = [x for x in want if x not in known]
    if bad:
        ap.error(f"--peers: unknown {bad}; choose from {', '.join(known)}, 'all' or 'none'")
    fla_why = peers.fla_unavailable_reason() if "fla" in want else None
    if fla_why is None and "fla" in want and not CUDA:
        peers.fla_interpreter_shims()  # CPU smoke: FLA under the Triton interpreter
    suite_table = SUITES
    if args.smoke:
        if CUDA:
            ap.error("--smoke is the CPU smoke mode; on a GPU run a real suite with --max-seq")
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--smoke needs TRITON_INTERPRET=1 in the environment (Triton on CPU)")
        suite_table, args.suite, args.budget_ms = SMOKE, "smoke", 1.0
        want = [x for x in want if x != "sdpa"]  # cuDNN / flash SDPA do not run on CPU
    if args.tune:
        for at in args.tune.split(","):
            name, seq = at.split(":")
            b, hq, hkv, d, block, topk, _ = suite_table[name]
            tune(b, int(seq), hq, hkv, d, block, topk, parts=args.tune_parts.split(","),
                 fwd_variants=args.tune_fwd and json.loads(args.tune_fwd),
                 bwd_variants=args.tune_bwd and json.loads(args.tune_bwd),
                 gate_variants=args.tune_gate and json.loads(args.tune_gate))
            _empty_cache()
        return

    suites = [x for x in suite_table if x not in ("cp-b128", "train-b128")] if args.suite == "all" else args.suite.split(",")
    dev = torch.cuda.get_device_name() if CUDA else "CPU (smoke: Triton interpreter)"
    hdr = (
        "| setting | S | MoBA fwd ms | MoBA fwd+bwd ms | gate ms | attn fwd ms | TFLOP/s fwd | TFLOP/s f+b "
        "| peak GiB | cuDNN fwd ms | cuDNN f+b ms | flash fwd ms | flash f+b ms | SDPA peak GiB "
        "| x cuDNN fwd | x cuDNN f+b | x flash fwd | x flash f+b | f+b rate / cuDNN's "
        "| flex fwd ms (incl. our gate + mask) | flex f+b ms (incl. our gate + mask) | flex mask ms | flex peak GiB "
        "| x flex fwd | x flex f+b "
        "| FLA NSA fwd ms (Hkv=Hq/16, no gate) | FLA NSA f+b ms | ours same-idx fwd ms | ours same-idx f+b ms "
        "| x FLA fwd | x FLA f+b |"
    )
    lines = [hdr, "|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|"]
    print(hdr, flush=True)
    print(lines[1], flush=True)
    raw = []
    for name in suites:
        b, hq, hkv, d, block, topk, seqs = suite_table[name]
        for s in seqs:
            if s > args.max_seq or s < args.min_seq or str(s) in args.skip_seq.split(","):
                continue
            big = s >= 524288
            gate_f, attn_f = moba_flops(b, s, hq, d, block, topk)
            t0 = time.time()
            try:
                m = bench_moba(b, s, hq, hkv, d, block, topk, args.budget_ms, big=big)
            except torch.OutOfMemoryError as e:  # noqa: F841
                m = None
                _empty_cache()
            sd = {}
            backends = [] if (args.sdpa == "none" or "sdpa" not in want) else args.sdpa.split(",")
            if big:
                backends = [x for x in backends if x in args.sdpa_big.split(",")]
            for be in backends:
                try:
                    sd[be] = bench_sdpa(b, s, hq, hkv, d, be, big, args.budget_ms)
                except torch.OutOfMemoryError:
                    sd[be] = {"oom": True}
                    _empty_cache()
            causal = 4 * d * s * s / 2 * hq * b
            f = lambda x, spec=".1f": ("-" if x is None else format(x, spec))  # noqa: E731
            g = lambda be, key: sd.get(be, {}).get(key)  # noqa: E731
            sdpa_peak = max([x.get("peak", 0) for x in sd.values()] + [0]) or None
            row = [
                f"{name} (B={b}, H={hq}/{hkv}, d={d}, block {block}, top-k {topk})", f"{s // 1024}K" if s >= 1024 else str(s),
                f(m and m["fwd"], ".2f"), f(m and m["fwdbwd"], ".2f"), f(m and m["gate"], ".2f"), f(m and m["attn_fwd"], ".2f"),
                f(m and (gate_f + attn_f) / m["fwd"] / 1e9, ".0f"),
                f(m and (gate_f + 3.5 * attn_f) / m["fwdbwd"] / 1e9, ".0f"),
                f(m and m["peak"], ".1f"),
            ]
            for be in ("cudnn", "flash"):
                for key in ("fwd", "fwdbwd"):
                    x = g(be, key)
                    cell = "OOM" if sd.get(be, {}).get("oom") else f(x, ".1f")
                    if x is not None and big:
                        cell += " (1 run)"
                    if x is not None and sd[be].get("note"):
                        cell += f" ({sd[be]['note']})"
                    row.append(cell)
            row.append(f(sdpa_peak, ".1f"))
            for be in ("cudnn", "flash"):
                for key in ("fwd", "fwdbwd"):
                    x = g(be, key)
                    row.append(f(m and x and x / m[key], ".1f"))
            x = g("cudnn", "fwdbwd")
            row.append(f"{rate_vs_cudnn(gate_f, attn_f, m['fwdbwd'], causal, x):.0f}%" if m and x else "-")
            fx = None
            if "flex" not in want:
                row += ["-"] * 6
            elif s > args.flex_max_seq:
                row += [f"skipped: S > {args.flex_max_seq}"] + ["-"] * 5
            else:
                try:
                    fx = bench_flex(b, s, hq, hkv, d, block, topk, args.budget_ms, big=big)
                except torch.OutOfMemoryError:
                    fx = {"oom": True}
                    _empty_cache()
                except Exception as e:  # a compile failure is reported in the table, the run goes on
                    fx = {"err": f"failed: {type(e).__name__}"}
                    print(f"flex peer S={s}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                if fx.get("oom") or fx.get("err"):
                    row += [fx.get("err", "OOM")] + ["-"] * 5
                else:
                    row += [f(fx["fwd"], ".2f"), f(fx.get("fwdbwd"), ".2f") if CUDA else "n/a (no flex bwd on CPU)",
                            f(fx["mask"], ".2f"), f(fx.get("peak"), ".1f")]
                    row += [f(m and fx.get(key) and fx[key] / m[key], ".1f") for key in ("fwd", "fwdbwd")]
            fl = None
            if "fla" not in want:
                row += ["-"] * 6
            elif fla_why is not None:
                row += [f"skipped: {fla_why}"] + ["-"] * 5
            elif s > args.fla_max_seq:
                row += [f"skipped: S > {args.fla_max_seq}"] + ["-"] * 5
            else:
                fl = bench_fla(b, s, hq, d, block, topk, args.budget_ms, big=big)
                if "skip" in fl:
                    row += [fl["skip"]] + ["-"] * 5
                else:
                    cell = lambda x: x if isinstance(x, str) else f(x, ".2f")  # noqa: E731
                    row += [cell(fl[key]) for key in ("fwd", "fwdbwd", "ours_fwd", "ours_fwdbwd")]
                    for key in ("fwd", "fwdbwd"):
                        a, o = fl[key], fl["ours_" + key]
                        row.append(f(a / o, ".1f") if isinstance(a, float) and isinstance(o, float) else "-")
            line = "| " + " | ".join(row) + " |"
            lines.append(line)
            print(line, flush=True)
            if args.out:  # rows so far, so a run cut off by a time limit keeps what it measured
                with open(args.out, "w") as fh:
                    fh.write("\n".join(lines) + "\n\n(incomplete: the run has not finished)\n")
            raw.append({"suite": name, "S": s, "sink": SINK, "moba": m, "sdpa": sd, "flex": fx, "fla": fl,
                        "gate_flop": gate_f, "attn_flop": attn_f,
                        "causal_flop": causal, "wall_s": time.time() - t0})
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    foot = (
        f"\nDevice: {dev}; torch {torch.__version__}; date {datetime.date.today()}; commit {commit}; "
        f"{str(DT).split('.')[-1]}; "
        f"command: `{' '.join(sys.argv)}`. {inputs_note()} TFLOP/s count MoBA's required work (gate + selected "
        f"keys, backward = 2.5 x attention forward); 'f+b rate / cuDNN's' = that rate over cuDNN's f+b "
        f"TFLOP/s on dense causal attention (3.5 x 2 S^2 H D B). At S >= 512K: SDPA one call each, no warm-up; "
        f"MoBA fwd+bwd one call after one warm-up call at the same size, and peak memory is that call's. "
        f"Peers: {','.join(want) or 'none'}. flex = torch.compile(flex_attention) with a MoBA mask_mod on "
        f"our selection and a BlockMask of per-query-tile KV-tile unions (tile {peers.TILE}); its fwd and "
        f"f+b times include our Triton gate (select_blocks) and the BlockMask build ('flex mask ms' = "
        f"gate + build); 'x flex' = flex time / MoBA time. FLA = fla-core NSA parallel_nsa selected "
        f"attention only (indices given, no gate), run at Hkv = Hq/16 (its kernel needs a GQA group that "
        f"is a power of 2 >= 16) with each group sharing its first query head's selection, slots padded "
        f"to a power of 2 with -1; 'ours same-idx' = our block_attn on the same inputs and blocks; "
        f"'x FLA' = FLA time / ours same-idx."
    )
    print(foot)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n" + foot + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)


if __name__ == "__main__":
    main()
