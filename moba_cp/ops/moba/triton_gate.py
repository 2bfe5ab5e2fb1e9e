"""Triton kernel: fused MoBA gate and running top-k (the score matrix never exists whole).

One program owns ``BM`` query tokens of one query head. It walks the candidate blocks in
tiles of ``BN`` centroids, computes the ``[BM, BN]`` scores with one matrix product, masks
everything that is not a *complete past block of the row's own document*, and folds the tile
into a per-row running top-``K`` (``K = topk - 1``) held in registers. Only the final
``[BM, W]`` block ids are written: memory traffic is ``T*Hq*W`` ints plus centroid reads,
never ``T x n_blocks``.

Running top-k: a tile rarely changes a row's top-k once a few tiles are seen (for random
scores a block enters the top-k with probability ``~K / n``), so rather than sorting every
tile we insert candidates one at a time, and only those above the row's current k-th best
value: each loop step moves every row's best remaining candidate into the slot holding its
row minimum. The loop runs as many steps as the busiest row of the tile needs (``K`` steps on
the first tile, usually 0-3 later). At FlashMoBA 512K the products and masks alone take ~37 of
the first loop's ~115 ms (measured with ``diag="scores"``), so ``GateConfig.loop`` offers cheaper
steps: ``keys`` packs each score's order bits and its column into one int32, so a step is one
plain max and one compare-select over the tile, and the tile's step count is fixed once instead
of asked with a block-wide reduction every step (80 ms on 8 warps); ``below`` (the default) takes
the same keys in the same order with one subtraction and one unsigned min per key (70 ms).

Precision: the contract computes scores in fp32. For half inputs the fp32 centroid is split
into ``hi + lo`` half-precision parts and scored with two tensor-core products (q is exact in
its own dtype), which reproduces fp32 scores to ~2^-17 relative; fp32 inputs use IEEE fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_cp.ops.launch_math import cdiv, next_power_of_2
from moba_cp.ops.moba.kernel_limits import TRITON
from moba_cp.ops.moba.triton_config import GATE_LOOPS, GateConfig

__all__ = ["gate_topk", "MAX_GATE_WIDTH"]

#: The ``keys`` loop's empty slot and masked score: below every key of a real score (even -inf's).
_KEY_EMPTY = tl.constexpr(-(2**31))

#: Largest ``min(topk, blocks per document)`` the register-resident top-k supports.
MAX_GATE_WIDTH = TRITON.max_gate_width



@triton.jit
def _take_key(kmax, take, topv, topi, pmin, kcol, g0, BN: tl.constexpr):
    """One step of the key loops: where ``take``, row ``kmax`` (an int32 key: score order bits,
    low bits ``BN - 1 - column``) replaces the row's smallest kept key (slot ``pmin``); returns the
    running top-k (keys, block ids) and its new minimum and slot."""
    hit = (kcol[None, :] == pmin[:, None]) & take[:, None]
    topv = tl.where(hit, kmax[:, None], topv)
    topi = tl.where(hit, (g0 + BN - 1 - (kmax & (BN - 1)))[:, None], topi)
    thr, pmin = tl.min(topv, axis=1, return_indices=True)
    return topv, topi, thr, pmin


@triton.jit
def _gate_tile(q, CENT, CENT_LO, g0, g_hi, hk, stride_cg, stride_ch, base, g_end_row, rmask, topv, topi, thr, pmin,
               kcol, ncol, K: tl.constexpr, BN: tl.constexpr, Q_DTYPE: tl.constexpr, D: tl.constexpr,
               SPLIT: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr, PREFILTER: tl.constexpr,
               PRESPLIT: tl.constexpr, FOLD: tl.constexpr, LOOP: tl.constexpr):
    """Scores of centroids ``[g0, g0 + BN)`` folded into the running top-k ``(topv, topi)``.
    Without ``MASK`` the caller guarantees every row of the tile may pick every column (its rows
    past ``T`` score 0 and are never stored). ``PREFILTER``: candidates not above the row's k-th
    best are set to -inf first; without it the insertion loop tests each row's best remaining
    score against its k-th best instead (a row whose best is not above it takes nothing, now or
    later, since its k-th best only grows): the same result with one fewer pass over the tile.
    ``PRESPLIT`` (with ``SPLIT``): ``CENT``/``CENT_LO`` hold the centroids' hi and lo parts, split
    once per call, instead of every program splitting every fp32 tile it reads. Without ``FOLD``
    (a timing diagnostic) the tile only raises every slot to the row's tile maximum: the products
    and the mask run, the running top-k does not, and the result is not a selection.

    ``LOOP`` (``GateConfig.loop``): 0 ``while``, each step tests whether any row still has a
    candidate (a block-wide reduction per step). 1 ``counted``: the tile's step count is fixed
    first, the most any row can take (``min(#scores above its k-th best, K)``, one block-wide
    reduction per tile), and each step finds a row's best with its column in one reduction and
    the slot to replace with the new k-th best in another. 2 ``keys``: as ``counted`` on int32
    keys, the score's order-preserving bits with the low ``log2(BN)`` bits replaced by the
    column, so a step is one plain max and one compare-select over the tile (``topv`` holds keys,
    ``INT_MIN`` = empty). 3 ``below``: the same keys taken in the same order, each step's as the
    largest key below the last one taken (one subtraction and one unsigned min per element; the
    tile is never rewritten). Nsight Compute showed the ``keys`` gate ALU-bound (ALU pipe 71% at
    FlashMoBA 32K, 88% at 128K block 1024); in its SASS a step was ~148 instructions per thread
    for 32 keys (a compare and a select per key), ``below``'s ~121 with the subtractions as IMADs
    on the FMA pipe (``results/ncu_h200_2026-12-04_session20*``)."""
    d = tl.arange(0, D)
    gg = g0 + ncol
    c_ptr = gg.to(tl.int64)[:, None] * stride_cg + hk * stride_ch + d[None, :]
    if PRESPLIT:
        c_hi = tl.load(CENT + c_ptr, mask=(gg < g_hi)[:, None], other=0.0)
        c_lo = tl.load(CENT_LO + c_ptr, mask=(gg < g_hi)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(c_hi)) + tl.dot(q, tl.trans(c_lo))
    elif SPLIT:
        c = tl.load(CENT + c_ptr, mask=(gg < g_hi)[:, None], other=0.0)
        c_hi = c.to(Q_DTYPE)
        c_lo = (c - c_hi.to(tl.float32)).to(Q_DTYPE)
        s = tl.dot(q, tl.trans(c_hi)) + tl.dot(q, tl.trans(c_lo))
    else:
        c = tl.load(CENT + c_ptr, mask=(gg < g_hi)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(c), input_precision=PREC)
    if MASK:
        ok = (gg[None, :] >= base[:, None]) & (gg[None, :] < g_end_row[:, None]) & rmask[:, None]
    if LOOP >= 2 and FOLD:
        # Order-preserving int32 of the fp32 score (negative floats: flip the magnitude bits),
        # its low bits replaced by (BN - 1 - column): one max finds a row's best and its column,
        # the lowest column on a tie. Scores closer than 2^-(23 - log2 BN) relative may order
        # either way (the half-input gate's scores are ~2^-17-grade to begin with).
        b = s.to(tl.int32, bitcast=True)
        key = b ^ ((b >> 31) & 0x7FFFFFFF)  # the flip by the sign's shift: no compare, no select
        key = (key & (-BN)) | (BN - 1 - ncol)[None, :]
        if MASK:
            key = tl.where(ok, key, _KEY_EMPTY)
        cnt = tl.sum((key > thr[:, None]).to(tl.int32), axis=1)
        if LOOP == 3:
            # ``below``: step j takes each row's largest key below step j-1's (keys are unique
            # in a row), found as prev - 1 - min(prev - 1 - key) in uint32: for key < prev the
            # difference is exact, for key >= prev it wraps above every exact one (keys span
            # less than 2^32 - 2). One subtraction and one unsigned min per element, and the
            # tile's keys are never rewritten. A row's sequence ends at _KEY_EMPTY; a step after
            # that wraps to a key >= prev, which `below` rejects. The start, INT_MAX, is above
            # every key but a NaN score's.
            ku = key.to(tl.uint32, bitcast=True)
            prev = thr * 0 + 2147483647
            for _ in range(tl.max(tl.minimum(cnt, K), axis=0)):
                mu = (prev - 1).to(tl.uint32, bitcast=True)
                kmax = (mu - tl.min(mu[:, None] - ku, axis=1)).to(tl.int32, bitcast=True)
                below = kmax < prev
                prev = tl.where(below, kmax, prev)
                topv, topi, thr, pmin = _take_key(kmax, below & (kmax > thr), topv, topi, pmin, kcol, g0, BN)
        else:
            for _ in range(tl.max(tl.minimum(cnt, K), axis=0)):
                kmax = tl.max(key, axis=1)
                topv, topi, thr, pmin = _take_key(kmax, kmax > thr, topv, topi, pmin, kcol, g0, BN)
                key = tl.where(key == kmax[:, None], _KEY_EMPTY, key)
    else:
        if MASK:
            s = tl.where(ok, s, float("-inf"))
        if not FOLD:
            topv = tl.maximum(topv, tl.max(s, axis=1)[:, None])
        elif LOOP == 1:
            cand = s
            cnt = tl.sum((cand > thr[:, None]).to(tl.int32), axis=1)
            for _ in range(tl.max(tl.minimum(cnt, K), axis=0)):
                cmax, am = tl.max(cand, axis=1, return_indices=True)
                hit = (kcol[None, :] == pmin[:, None]) & (cmax > thr)[:, None]
                topv = tl.where(hit, cmax[:, None], topv)
                topi = tl.where(hit, (g0 + am)[:, None], topi)
                thr, pmin = tl.min(topv, axis=1, return_indices=True)
                cand = tl.where(ncol[None, :] == am[:, None], float("-inf"), cand)
        elif PREFILTER:
            cand = tl.where(s > thr[:, None], s, float("-inf"))
            cmax = tl.max(cand, axis=1)
            while tl.max(cmax, axis=0) > float("-inf"):
                am = tl.argmax(cand, axis=1)
                pmin = tl.argmin(topv, axis=1)
                hit = (kcol[None, :] == pmin[:, None]) & (cmax > float("-inf"))[:, None]
                topv = tl.where(hit, cmax[:, None], topv)
                topi = tl.where(hit, (g0 + am)[:, None], topi)
                thr = tl.min(topv, axis=1)
                cand = tl.where(ncol[None, :] == am[:, None], float("-inf"), cand)
                cand = tl.where(cand > thr[:, None], cand, float("-inf"))
                cmax = tl.max(cand, axis=1)
        else:
            cand = s
            cmax = tl.max(cand, axis=1)
            take = cmax > thr
            while tl.max(take.to(tl.int32), axis=0) > 0:
                am = tl.argmax(cand, axis=1)
                pmin = tl.argmin(topv, axis=1)
                hit = (kcol[None, :] == pmin[:, None]) & take[:, None]
                topv = tl.where(hit, cmax[:, None], topv)
                topi = tl.where(hit, (g0 + am)[:, None], topi)
                thr = tl.min(topv, axis=1)
                cand = tl.where(ncol[None, :] == am[:, None], float("-inf"), cand)
                cmax = tl.max(cand, axis=1)
                take = cmax > thr
    return topv, topi, thr, pmin


@triton.jit
def _gate_topk_kernel(
    Q, CENT, CENT_LO, QPOS, BASE, OUT,
    T, G, block_size, W,
    stride_qt, stride_qh, stride_cg, stride_ch, stride_ot, stride_oh,
    K: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
    SPLIT: tl.constexpr, PREC: tl.constexpr, SPLIT_EDGES: tl.constexpr, PREFILTER: tl.constexpr,
    PRESPLIT: tl.constexpr, FOLD: tl.constexpr, LOOP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    qpos = tl.load(QPOS + rows, mask=rmask, other=0)
    base = tl.load(BASE + rows, mask=rmask, other=0)
    own = qpos // block_size
    # Row t's candidates are the complete past blocks of its document: global ids [base, base + own).
    g_end_row = base + own
    g_lo = tl.min(tl.where(rmask, base, 2147483647), axis=0)
    g_hi = tl.max(tl.where(rmask, g_end_row, 0), axis=0)

    d = tl.arange(0, D)
    q = tl.load(Q + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0)

    kcol = tl.arange(0, KP)
    ncol = tl.arange(0, BN)
    # Slots [0, K) hold the running top-k (-inf = empty); slots >= K are +inf so the
    # "replace the row minimum" step never picks them.
    if LOOP >= 2 and FOLD:
        topv = tl.where(kcol[None, :] < K, _KEY_EMPTY, 2147483647) + tl.zeros([BM, KP], dtype=tl.int32)
    else:
        topv = tl.where(kcol[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BM, KP], dtype=tl.float32)
    topi = tl.zeros([BM, KP], dtype=tl.int32)
    thr, pmin = tl.min(topv, axis=1, return_indices=True)

    # SPLIT_EDGES: the tiles inside [max base, min row end) of the live rows are candidates of
    # every live row and run without the mask, in their own loop (a branch per tile inside one
    # loop would stop its pipelining); the masked tiles before and after them keep the mask.
    g_mid_lo = g_lo
    g_mid_hi = g_lo
    if SPLIT_EDGES:
        in_lo = tl.max(tl.where(rmask, base, 0), axis=0)
        in_hi = tl.min(tl.where(rmask, g_end_row, 2147483647), axis=0)
        g_mid_lo = g_lo + tl.cdiv(in_lo - g_lo, BN) * BN
        g_mid_hi = g_mid_lo + tl.maximum(in_hi - g_mid_lo, 0) // BN * BN
    for g0 in range(g_lo, g_mid_lo, BN):
        topv, topi, thr, pmin = _gate_tile(q, CENT, CENT_LO, g0, g_hi, hk, stride_cg, stride_ch, base, g_end_row, rmask,
                                           topv, topi, thr, pmin, kcol, ncol, K, BN, Q.dtype.element_ty, D, SPLIT, PREC,
                                           True, PREFILTER, PRESPLIT, FOLD, LOOP)
    for g0 in range(g_mid_lo, g_mid_hi, BN):
        topv, topi, thr, pmin = _gate_tile(q, CENT, CENT_LO, g0, g_hi, hk, stride_cg, stride_ch, base, g_end_row, rmask,
                                           topv, topi, thr, pmin, kcol, ncol, K, BN, Q.dtype.element_ty, D, SPLIT, PREC,
                                           False, PREFILTER, PRESPLIT, FOLD, LOOP)
    for g0 in range(g_mid_hi, g_hi, BN):
        topv, topi, thr, pmin = _gate_tile(q, CENT, CENT_LO, g0, g_hi, hk, stride_cg, stride_ch, base, g_end_row, rmask,
                                           topv, topi, thr, pmin, kcol, ncol, K, BN, Q.dtype.element_ty, D, SPLIT, PREC,
                                           True, PREFILTER, PRESPLIT, FOLD, LOOP)

    # Assemble: past blocks as document-local ids, the own block in slot K, the rest "big";
    # an ascending sort then gives the contract's order with padding last.
    BIG: tl.constexpr = 1073741824
    if LOOP >= 2 and FOLD:
        filled = topv > _KEY_EMPTY
    else:
        filled = topv > float("-inf")
    vals = tl.where((kcol[None, :] < K) & filled, topi - base[:, None], BIG)
    vals = tl.where(kcol[None, :] == K, own[:, None] + tl.zeros([BM, KP], dtype=tl.int32), vals)
    vals = tl.sort(vals, dim=1)
    vals = tl.where(vals == BIG, -1, vals)
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_ot + h * stride_oh + kcol[None, :], vals,
             mask=rmask[:, None] & (kcol[None, :] < W))


def gate_topk(
    q: torch.Tensor,
    cent: torch.Tensor,
    qpos: torch.Tensor,
    base: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    width: int,
    cfg: GateConfig = GateConfig(),
    diag: str | None = None,
) -> torch.Tensor:
    """MoBA selection from centroids, fused gate + running top-k.

    Args:
        q: ``[T, Hq, D]`` queries (fp16/bf16/fp32).
        cent: ``[NBK, Hkv, D]`` fp32 centroids of the global key-block table.
        qpos: int32 ``[T]`` document-local position of each query.
        base: int32 ``[T]`` global id of block 0 of each query's document.
        block_size: ``B``; topk: blocks per query incl. the own block.
        width: ``W`` columns of the result (``min(topk, max blocks of any document)``).
        cfg: tiling (``bm`` 0: by head dim and top-k).
        diag: ``"scores"`` is a timing diagnostic (benchmarks only: the result is not a
            selection): the same programs, products and masks without the running top-k, so
            the full call minus this one is the insertion loop's time.
    Returns:
        ``[T, Hq, W]`` int32 document-local block ids, ascending, ``-1`` padded at the end.
    """
    if diag not in (None, "scores"):
        raise ValueError(f"gate_topk: diag={diag!r} is not one of None, 'scores'")
    t, hq, d = q.shape
    hkv = cent.shape[1]
    k_past = max(0, min(topk, width) - 1)  # a row never has more than width-1 past blocks
    kp = max(cfg.slots, next_power_of_2(k_past + 1))
    out = torch.empty(t, hq, width, dtype=torch.int32, device=q.device)
    if t == 0:
        return out
    split = q.dtype in (torch.float16, torch.bfloat16)
    # 128 rows at d=128 with a small top-k: FlashMoBA 512K gate 159 -> 141 ms on H100 (session 3,
    # benchmarks/results/moba_tune_gate_2026-11-22.log; 8 warps or 32 rows were slower).
    bm = cfg.bm or (64 if d <= 64 else 32 if kp > 64 else 128 if kp <= 16 else 64)
    bn = cfg.bn
    grid = (cdiv(t, bm), hq)
    presplit = split and cfg.presplit
    # Keys order scores to ~2^-17 relative, the grade of the half-input gate's hi + lo scores;
    # fp32 inputs are scored in IEEE fp32, so they keep the exact counted loop.
    loop = "counted" if cfg.loop in ("keys", "below") and not split else cfg.loop
    c_hi = c_lo = cent
    if presplit:
        # The same hi + lo parts the kernel would make (round to nearest even both ways), once.
        c_hi = cent.to(q.dtype).contiguous()
        c_lo = (cent - c_hi.float()).to(q.dtype).contiguous()
    _gate_topk_kernel[grid](
        q, c_hi, c_lo, qpos, base, out,
        t, hq // hkv, block_size, width,
        q.stride(0), q.stride(1), c_hi.stride(0), c_hi.stride(1), out.stride(0), out.stride(1),
        K=k_past, KP=kp, BM=bm, BN=bn, D=d, SPLIT=split, PREC="ieee", SPLIT_EDGES=cfg.split_edges,
        PREFILTER=cfg.prefilter, PRESPLIT=presplit, FOLD=diag is None, LOOP=GATE_LOOPS.index(loop),
        num_warps=cfg.num_warps,
    )
    return out
