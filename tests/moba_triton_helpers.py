"""What the Triton MoBA backend's tests share: inputs, the oracle comparisons, and the kernel-path tables.

Tolerances are relative to the naive op's own error against its fp64 run:
``err(kernel) <= 2 * err(naive) + floor`` (:func:`_check`). Selections are compared by
:func:`_assert_same_selection`, which tolerates a disagreement only where the two choices score
the same within rounding. Imported by the ``tests/test_moba_triton*.py`` files (split by what
they test) and by ``tests/test_moba_gpu_training_shapes.py``.
"""

from __future__ import annotations

import pytest
import torch

from moba_cp.ops.moba import naive

pytest.importorskip("triton")
tb = pytest.importorskip("moba_cp.ops.moba.triton_backend")
from moba_cp.ops.moba.triton_config import BwdConfig, FwdConfig, KernelConfig  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(x)), "finite/-inf pattern differs"
    return ((x[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()


def _check(name, kern, nai, ref, floor):
    ek, en = _rel(kern, ref), _rel(nai, ref)
    assert ek <= 2 * en + floor, f"{name}: kernel error {ek:.3e} > 2 x naive error {en:.3e} + {floor:.0e}"


def _inputs(t, hq, hkv, d, dtype, seed, device=DEV):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda h: torch.randn(t, h, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def _cu(lengths, device=DEV):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _gate_scores(q, k, block_size, cu):
    """fp64 gate scores [T, Hq, NBmax] (document-local block ids), -inf where not a past block."""
    docs = [(0, q.shape[0])] if cu is None else list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    nbmax = max([-(-(e - s) // block_size) for s, e in docs] + [1])
    out = torch.full((q.shape[0], q.shape[1], nbmax), float("-inf"), dtype=torch.float64, device=q.device)
    for s, e in docs:
        if e == s:
            continue
        cent = naive.block_centroids(k[s:e].double(), block_size).repeat_interleave(q.shape[1] // k.shape[1], 1)
        sc = torch.einsum("thd,jhd->thj", q[s:e].double(), cent)
        own = torch.arange(e - s, device=q.device) // block_size
        past = torch.arange(cent.shape[0], device=q.device)[None, :] < own[:, None]
        out[s:e, :, : cent.shape[0]] = sc.masked_fill(~past[:, None, :], float("-inf"))
    return out


def _assert_same_selection(idx_t, idx_n, q, k, block_size, cu, rtol, max_frac):
    """Equal, except rows where both choices have the same total gate score within rtol."""
    assert idx_t.shape == idx_n.shape and idx_t.dtype == torch.int32
    bad = (idx_t != idx_n).any(-1)
    frac = bad.float().mean().item()
    assert frac <= max_frac, f"{frac:.2%} of (token, head) rows select differently"
    if not bad.any():
        return
    sc = _gate_scores(q, k, block_size, cu)
    own = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    docs = [(0, q.shape[0])] if cu is None else list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    for s, e in docs:
        own[s:e] = torch.arange(e - s, device=q.device) // block_size
    for t, h in bad.nonzero().tolist():
        tot = []
        for idx in (idx_t, idx_n):
            ids = [j for j in idx[t, h].tolist() if j >= 0]
            assert own[t].item() in ids and len(ids) == len(set(ids)), f"row {t},{h}: {ids}"
            tot.append(sum(sc[t, h, j].item() for j in ids if j != own[t].item()))
        scale = sc[t, h][torch.isfinite(sc[t, h])].abs().max().item()
        assert abs(tot[0] - tot[1]) <= rtol * scale * idx_t.shape[-1], f"row {t},{h}: {idx_t[t, h]} vs {idx_n[t, h]}"

def check_attn_fwd_bwd(case, config=None):
    """The Triton ``block_attn`` with tiling ``config`` on ``case = (T, Hq, Hkv, D, B, topk, doc
    lengths or None)`` in fp32, the gate's selection fed to both sides: o, lse, dq, dk and dv each
    within twice the naive op's error against its fp64 run (plus 2e-5)."""
    t, hq, hkv, d, b, topk, docs = case
    cu = None if docs is None else _cu(docs)
    q, k, v = _inputs(t, hq, hkv, d, torch.float32, seed=3 * t + hq)
    do = torch.randn(t, hq, d, generator=torch.Generator().manual_seed(7)).to(DEV)
    idx = naive.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    scale = d ** -0.5

    def run(fn, dtype, **kw):
        qq, kk, vv = (x.to(dtype).detach().requires_grad_() for x in (q, k, v))
        o, lse = fn(qq, kk, vv, idx, block_size=b, cu_seqlens=cu, softmax_scale=scale, **kw)
        (o.to(dtype) * do.to(dtype)).sum().backward()
        return o, lse, qq.grad, kk.grad, vv.grad

    ref = run(naive.block_attn, torch.float64)
    nai = run(naive.block_attn, torch.float32)
    ker = run(tb.block_attn, torch.float32, config=config)
    assert ker[0].dtype == torch.float32 and ker[1].dtype == torch.float32
    for name, a, n, r in zip(("o", "lse", "dq", "dk", "dv"), ker, nai, ref):
        _check(name, a, n, r, floor=2e-5)


# Every kernel path on small tiles: several key sub-tiles per block (online softmax across
# them; unmasked sub-tiles for past blocks, masked ones on the diagonal and at a short last
# block), several row tiles per program chunk, partials written per head chunk, the separate
# and the fused dQ, the dK/dV mask split on and off, rows read through the index or from their
# copy in bucket order (one KV head per chunk; plain loads or tensor descriptors), the dK/dV
# grid with a block's sub-tiles adjacent (sub_major), and the one-pass forward.
SMALL = dict(bm=16, bn=16, chunk=32, num_warps=4, num_stages=2)
PATH_CONFIGS = {
    "partials": KernelConfig(FwdConfig(method="partials", **SMALL),
                             BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16)),
    "partials-head-chunks-fused-dq": KernelConfig(FwdConfig(method="partials", partial_bytes=1, **SMALL),
                                                  BwdConfig(bnb=16, bm=16, fuse_dq=True)),
    # skip_unseen is on by default wherever split_mask runs; these two keep the form that walks
    # every row of the bucket (skip_unseen=False) against the oracle
    "two-pass-unfused-split-mask": KernelConfig(FwdConfig(method="two_pass", **SMALL),
                                                BwdConfig(bnb=16, bm=16, fuse_dq=False, split_mask=True, dq_bm=16,
                                                          dq_bn=16, skip_unseen=False)),
    "partials-fused-dq-split-mask": KernelConfig(FwdConfig(method="partials", **SMALL),
                                                 BwdConfig(bnb=16, bm=16, fuse_dq=True, split_mask=True)),
    "gathered-rows-split-kv-chunks": KernelConfig(FwdConfig(method="partials", **SMALL),
                                                  BwdConfig(bnb=16, bm=16, fuse_dq=False, split_mask=True,
                                                            gather_rows=True, dq_chunk_bytes=1, dq_bm=16, dq_bn=16)),
    "gathered-rows-fused-dq": KernelConfig(FwdConfig(method="two_pass", **SMALL),
                                           BwdConfig(bnb=16, bm=16, fuse_dq=True, gather_rows=True)),
    "gathered-rows-tma-split": KernelConfig(FwdConfig(method="partials", **SMALL),
                                            BwdConfig(bnb=16, bm=16, fuse_dq=False, split_mask=True, gather_rows=True,
                                                      tma=True, dq_chunk_bytes=1, dq_bm=16, dq_bn=16)),
    "gathered-rows-sub-major-fused-dq-split": KernelConfig(FwdConfig(method="partials", **SMALL),
                                                           BwdConfig(bnb=16, bm=16, fuse_dq=True, split_mask=True,
                                                                     gather_rows=True, sub_major=True,
                                                                     dq_chunk_bytes=1)),
    "sub-major-unfused": KernelConfig(FwdConfig(method="two_pass", **SMALL),
                                      BwdConfig(bnb=16, bm=16, fuse_dq=False, sub_major=True, dq_bm=16, dq_bn=16)),
    "dq-rows-split-kv-chunks": KernelConfig(FwdConfig(method="partials", **SMALL),
                                            BwdConfig(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True,
                                                      dq_chunk_bytes=1)),
    "dq-rows-sub-major-untransposed": KernelConfig(FwdConfig(method="two_pass", **SMALL),
                                                   BwdConfig(bnb=16, bm=16, trans=False, gather_rows=True,
                                                             dq_rows=True, sub_major=True)),
    "dq-rows-dq-trans-split": KernelConfig(FwdConfig(method="partials", **SMALL),
                                           BwdConfig(bnb=32, bm=16, split_mask=True, gather_rows=True, dq_rows=True,
                                                     dq_trans=True, skip_unseen=False)),
    # dQ into fp32 rows in bucket order while q and dO are read through the index (no row copy)
    "dq-rows-through-index-split-kv-chunks": KernelConfig(FwdConfig(method="partials", **SMALL),
                                                          BwdConfig(bnb=16, bm=16, split_mask=True, dq_rows=True,
                                                                    dq_chunk_bytes=1)),
    "fused-dq-trans": KernelConfig(FwdConfig(method="two_pass", **SMALL),
                                   BwdConfig(bnb=16, bm=16, fuse_dq=True, dq_trans=True)),
    "two-pass-untransposed": KernelConfig(FwdConfig(method="two_pass", **SMALL),
                                          BwdConfig(bnb=32, bm=16, fuse_dq=True, trans=False)),
    # the block (48 keys) fits one 64-key sub-tile: K/V loaded once per program, no running rescale
    "partials-whole-block": KernelConfig(FwdConfig(method="partials", bm=16, bn=64, chunk=32, num_warps=4,
                                                   num_stages=2),
                                         BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16)),
    # each block (48 keys) in one 64-key dK/dV program: its dQ stored per slot, then summed
    "dq-slots": KernelConfig(FwdConfig(method="partials", **SMALL), BwdConfig(bnb=64, bm=16, dq_slots=True)),
    "dq-slots-gathered-split": KernelConfig(FwdConfig(method="two_pass", **SMALL),
                                            BwdConfig(bnb=64, bm=16, dq_slots=True, gather_rows=True, split_mask=True,
                                                      dq_chunk_bytes=1)),
    # the unmasked K/V sub-tiles through tensor descriptors, the masked ones by masked loads
    "partials-tma-kv": KernelConfig(FwdConfig(method="partials", tma_kv=True, **SMALL),
                                    BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16)),
    "one-pass": KernelConfig(FwdConfig(method="one_pass", bm=16, bn=16, chunk=32, qchunk=32),
                             BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16)),
    # dV in a launch of its own (32-row steps there), then dK: with the dQ kernel; with the fused
    # dQ into the row copy, GQA groups split over launches (dK/dV summed in fp32) and blocks cut
    # at 16 rows (scratch sums); untransposed with fp32 atomics; dQ in per-block slots
    "split-dv": KernelConfig(FwdConfig(method="partials", **SMALL),
                             BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16, split_dv=True, dv_bm=32)),
    "split-dv-dq-rows-split-group-cut": KernelConfig(
        FwdConfig(method="partials", **SMALL),
        BwdConfig(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True, dq_chunk_bytes=1, split_group=True,
                  max_rows=16, split_dv=True)),
    # the later launches of a split group add their dK/dV by reductions (acc_red)
    "dq-rows-split-group-acc-red": KernelConfig(
        FwdConfig(method="partials", **SMALL),
        BwdConfig(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True, dq_chunk_bytes=1, split_group=True,
                  acc_red=True)),
    "split-dv-fused-dq-untransposed": KernelConfig(FwdConfig(method="two_pass", **SMALL),
                                                   BwdConfig(bnb=32, bm=16, fuse_dq=True, trans=False, split_dv=True,
                                                             dv_warps=2)),
    "split-dv-dq-slots": KernelConfig(FwdConfig(method="partials", **SMALL),
                                      BwdConfig(bnb=64, bm=16, dq_slots=True, split_dv=True, dv_bm=64)),
    # dense tiles of consecutive rows over their union of selected blocks (16-row tiles straddle
    # documents and blocks); the backward builds the gather index itself
    "query-major": KernelConfig(FwdConfig(method="query_major", bm=16, bn=16, chunk=32),
                                BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16)),
}


def _triton_grads(q, k, v, do, idx, b, cu, cfg):
    """dq, dk, dv of the Triton ``block_attn`` on documents ``cu`` with tiling ``cfg``."""
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o, _ = tb.block_attn(*xs, idx, block_size=b, cu_seqlens=cu, softmax_scale=q.shape[-1] ** -0.5, config=cfg)
    (o * do).sum().backward()
    return [x.grad for x in xs]


def _sink_into(idx, docs, b):
    """``idx [T, H, W]`` (the gate's selection on documents of lengths ``docs``, block ``b``),
    changed in place so that every row past its document's first block selects block 0 (an
    attention sink) in its first slot; a later slot that held 0 gets the row's own block, so the
    slots stay distinct."""
    pos = torch.cat([torch.arange(n, device=idx.device) for n in docs])
    later = pos >= b
    idx[later, :, 0] = 0
    own = (pos[later] // b)[:, None].expand(-1, idx.shape[1]).to(idx.dtype)
    for w in range(1, idx.shape[2]):
        idx[later, :, w] = torch.where(idx[later, :, w] == 0, own, idx[later, :, w])
    return idx


def _sink_selection(docs, b, hq, hkv, d, topk, seed):
    """fp32 inputs on documents ``docs`` whose top-``topk`` selection has an attention sink
    (:func:`_sink_into`), with ``do`` and ``cu_seqlens``."""
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=seed)
    cu = _cu(docs)
    idx = _sink_into(naive.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu).clone(), docs, b)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    return q, k, v, do, idx, cu


MAX_ROWS_PATHS = {
    # dQ in slots, later rows unmasked (the blocks-of-128 default's structure)
    "dq-slots-split": BwdConfig(bnb=16, bm=16, dq_slots=True, split_mask=True),
    # rows copied in bucket order, sub-tiles adjacent, dQ added into the copy (the block-1024 default's)
    "gathered-sub-major-dq-rows": BwdConfig(bnb=8, bm=16, split_mask=True, gather_rows=True, sub_major=True,
                                            dq_rows=True),
    # dQ by the separate kernel, two key sub-tiles per block on the grid's second axis
    "dq-kernel": BwdConfig(bnb=8, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16),
    # dQ by fp32 atomics from the dK/dV program
    "fused-atomics": BwdConfig(bnb=16, bm=16, fuse_dq=True, trans=False),
}


def gpu_sink_inputs(d: int, b: int, seed: int):
    """bf16 ``q [T, 8, d]``, ``k, v [T, 2, d]`` on the GPU for two documents (4000 and 2b + 100
    tokens), and a top-3 selection in which every row past its document's first block selects
    that block 0 (an attention sink) and its own block where block 0 displaced it; ``cu_seqlens``."""
    t_docs = [4000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 8, 2, d, torch.bfloat16, seed=seed, device="cuda")
    idx = _sink_into(naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu).clone(), t_docs, b)
    return q, k, v, idx, cu


def _poison_cuda_allocator(n_bytes: int = 1 << 30) -> None:
    """Fill ``n_bytes`` of the CUDA caching allocator's free memory with NaN, so that a kernel
    output or scratch row that no program writes reads NaN (and fails the finite-pattern check)
    instead of whatever an earlier test left there, which could pass by luck or fail only in a
    full run (session 25: a bf16 dv failed in the suite and passed alone)."""
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.full((n_bytes // 4,), float("nan"), dtype=torch.float32, device="cuda")  # freed at once: its block stays cached
    # allocations up to 1 MB come from the small pool's 2 MB segments: poison 128 MB of those too
    small = [torch.full((1 << 17,), float("nan"), dtype=torch.float32, device="cuda") for _ in range(256)]
    del small


def check_bf16_fwd_bwd(q, k, v, idx, *, block_size, cu_seqlens, softmax_scale, fn=None):
    """o, lse, dq, dk, dv of the Triton kernels (``fn``, default ``tb.block_attn``) at bf16 against
    the naive op on the same block indices, within twice the naive op's own bf16 error against its
    fp64 run (+ 2e-3)."""
    do = torch.randn_like(q)

    def run(fn, dtype):
        qq, kk, vv = (x.to(dtype).detach().requires_grad_() for x in (q, k, v))
        o, lse = fn(qq, kk, vv, idx, block_size=block_size, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale)
        (o * do.to(o.dtype)).sum().backward()
        return o, lse, qq.grad, kk.grad, vv.grad

    ref = run(naive.block_attn, torch.float64)
    nai = run(naive.block_attn, torch.bfloat16)
    _poison_cuda_allocator()
    ker = run(fn or tb.block_attn, torch.bfloat16)
    for name, a, n, r in zip(("o", "lse", "dq", "dk", "dv"), ker, nai, ref):
        _check(name, a, n, r, floor=2e-3)
