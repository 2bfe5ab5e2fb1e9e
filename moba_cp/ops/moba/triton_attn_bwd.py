"""Triton kernels: block-sparse MoBA attention backward (dq, dk, dv) from outside o/lse.

Given ``o`` and ``lse`` from outside (possibly LSE-merged over several partials, as context
parallelism does), ``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - delta)`` with
``delta = rowsum(dO * o)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``.

Kernels, both over the same gather index as the forward:

* ``_dkdv_kernel``: one program per (KV head, key block, key sub-tile of ``BNB`` keys); it
  loops over the gathered entries of every query head of the GQA group that selected the
  block, so dK/dV of a sub-tile live in registers and are stored once, without atomics and
  without repeating K/V per query head. Programs are ordered by decreasing entry count
  (longest first); with ``SUB_MAJOR`` a block's sub-tiles are adjacent in a 1-D grid, so
  they run together and share its rows in L2. With ``FUSE_DQ`` (by default where the block
  fits in a few sub-tiles) the same program also adds ``dS K`` into an fp32 dQ buffer with
  atomics. ``SPLIT``: the rows that see the whole
  sub-tile (found by a binary search on sorted positions) run in a second loop without the
  causal mask. ``GATHERED``: the rows are read from a copy in bucket order
  (``_gather_rows_kernel``, one chunk of KV heads at a time) instead of through the index.
  With ``max_rows`` (``_BlockCuts``) a block with more rows than that over its KV head's query
  heads (an attention sink's block 0 holds every row of its document) is cut into programs of
  ``max_rows`` rows, each storing its partial dK/dV into an fp32 scratch slot of its own (no
  atomics), which ``_dkdv_split_sum_kernel`` adds in tile order and stores; the plan is built on
  the device (``_kv_tiles_count_kernel``).
* ``_dq_kernel`` (large blocks): one program per forward tile (``BM`` entries of one bucket),
  looping over the block's key sub-tiles and adding one dQ row per entry atomically, so a
  4096-key block costs one atomic row per entry instead of 4096/BNB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from moba_cp.ops.launch_math import cdiv, next_power_of_2
from moba_cp.ops.moba.triton_common import (GatherIndex, KeyBlocks, _head_chunk_pid, _key_span, _ld, _load_kv,
                                            _tile_rows, _tiles_kernel)
from moba_cp.ops.moba.triton_config import BwdConfig

__all__ = ["sparse_attn_bwd"]

LOG2E = 1.4426950408889634

#: Elements of each fp32 sum (dK, dV) one ``_dkdv_split_sum_kernel`` program moves: ``[4096 / D, D]``.
SPLIT_SUM_ELEMS = 4096

#: Programs of ``_zero_free_slots_kernel`` at most (they stride over the index's tail of empty
#: slots, whose start only the device knows): ~8 an SM on an H100/H200, so a tail of one tile a
#: program is written in one wave, and a larger one (many short documents) in a few strides.
ZERO_SLOT_PROGRAMS = 1024

@triton.jit
def _delta_kernel(DO, O, DELTA, n_rows, stride_dot, stride_doh, stride_ot, stride_oh, H,
                  BR: tl.constexpr, D: tl.constexpr):
    # delta[t, h] = sum_d do * o in fp32, without fp32 copies of do and o in memory.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    m = r < n_rows
    t = (r // H).to(tl.int64)
    h = r % H
    d = tl.arange(0, D)
    a = tl.load(DO + (t * stride_dot + h * stride_doh)[:, None] + d[None, :], mask=m[:, None], other=0.0)
    b = tl.load(O + (t * stride_ot + h * stride_oh)[:, None] + d[None, :], mask=m[:, None], other=0.0)
    tl.store(DELTA + r, tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1), mask=m)


@triton.jit
def _gather_rows_kernel(Q, DO, LSE, DELTA, QPOS, ENT, OFFS, QG, DOG, LSE2G, DLG, QPG, INV,
                        stride_qt, stride_qh, stride_dot, stride_doh, H, W, B0, B1, NR, H0, HC,
                        BR: tl.constexpr, D: tl.constexpr, PAD: tl.constexpr, WRITE_INV: tl.constexpr,
                        COPY: tl.constexpr = True):
    # The rows of buckets [B0, B1) (one chunk of KV heads) in bucket order, so the dK/dV loop
    # reads contiguous tiles: q and do rows, lse * log2(e) (-inf -> 0), delta and the position.
    # PAD rows after the last (up to NR, the buffers' length) get zero q and do: a tile read
    # through a tensor descriptor has no row mask and may run past the last bucket, into
    # memory that was never written. WRITE_INV: INV[(t, h - H0, w)] = the entry's row in the copy
    # (slots nobody selected keep the caller's -1), for the pass that sums dQ rows per token.
    # COPY off: INV alone (dq_rows without gather_rows: only the fp32 dQ rows are in bucket order).
    e0 = _ld(OFFS + B0)
    e1 = _ld(OFFS + B1)
    if e0 + tl.program_id(0) * BR >= e1 + PAD:
        return
    i = tl.program_id(0) * BR + tl.arange(0, BR)
    r = e0 + i
    m = r < e1
    mz = m | ((r < e1 + PAD) & (i < NR))
    ent = tl.load(ENT + r, mask=m, other=0)
    t64 = (ent // (H * W)).to(tl.int64)
    h = (ent // W) % H
    if COPY:
        d = tl.arange(0, D)
        q = tl.load(Q + t64[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :], mask=m[:, None], other=0.0)
        do = tl.load(DO + t64[:, None] * stride_dot + h[:, None] * stride_doh + d[None, :], mask=m[:, None],
                     other=0.0)
        lse2 = tl.load(LSE + t64 * H + h, mask=m, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
        i64 = i.to(tl.int64)
        tl.store(QG + i64[:, None] * D + d[None, :], q, mask=mz[:, None])
        tl.store(DOG + i64[:, None] * D + d[None, :], do, mask=mz[:, None])
        tl.store(LSE2G + i64, lse2, mask=m)
        tl.store(DLG + i64, tl.load(DELTA + t64 * H + h, mask=m, other=0.0), mask=m)
        tl.store(QPG + i64, tl.load(QPOS + t64, mask=m, other=0), mask=m)
    if WRITE_INV:
        tl.store(INV + (t64 * HC + (h - H0)) * W + ent % W, i, mask=m)


@triton.jit
def _dkdv_step(k, v, q, do, lse2, dl, qp, rmask, kk, kmask, kp0, dk, dv, scale_log2,
               MASK: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr, PART: tl.constexpr = 0):
    """dK/dV of one key sub-tile from one gathered row tile; returns dS for a fused dQ.
    Without ``MASK`` every row sees every key (rows past the bucket were loaded as zeros
    with lse = delta = 0, so they add exactly nothing). ``PART`` (``BwdConfig.split_dv``): 0 both,
    1 dV alone (two products; dk and the returned dS are left as they came / zero), 2 dK and dS
    alone (four with a fused dQ)."""
    if TRANS:
        # Keys as the M dimension of every product (M = BNB, e.g. 128), which suits
        # Hopper's warpgroup MMA better than M = BM gathered rows.
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2
        if MASK:
            okt = kmask[:, None] & rmask[None, :] & ((kp0 + kk)[:, None] <= qp[None, :])
            pt = tl.where(okt, tl.exp2(st - lse2[None, :]), 0.0)
        else:
            pt = tl.exp2(st - lse2[None, :])
        if PART != 2:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        if PART != 1:
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = (pt * (dpt - dl[None, :])).to(q.dtype)
            dk += tl.dot(dst, q, input_precision=PREC)
        else:
            dst = tl.zeros_like(pt).to(q.dtype)
        ds = tl.trans(dst)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        if MASK:
            ok = rmask[:, None] & kmask[None, :] & ((kp0 + kk)[None, :] <= qp[:, None])
            p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        else:
            p = tl.exp2(s - lse2[:, None])
        if PART != 2:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        if PART != 1:
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = (p * (dp - dl[:, None])).to(q.dtype)
            dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
        else:
            ds = tl.zeros_like(p).to(q.dtype)
    return dk, dv, ds


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, QPOS, ENT, rr, rmask, h, H, W, stride_qt, stride_qh, stride_dot, stride_doh,
               D: tl.constexpr):
    """Gathered rows ``rr`` of query head ``h`` through the index: ``(t, q, do, lse * log2 e
    (-inf -> 0), delta, position)``; masked rows read zeros (position: int32 max)."""
    d = tl.arange(0, D)
    t64 = (tl.load(ENT + rr, mask=rmask, other=0) // (H * W)).to(tl.int64)
    q = tl.load(Q + t64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO + t64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=rmask[:, None], other=0.0)
    lse2 = tl.load(LSE + t64 * H + h, mask=rmask, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    dl = tl.load(DELTA + t64 * H + h, mask=rmask, other=0.0)
    qp = tl.load(QPOS + t64, mask=rmask, other=2147483647)
    return t64, q, do, lse2, dl, qp


@triton.jit
def _pos_at(ENT, QPOS, QPG, e0, r, ok, HW, GATHERED: tl.constexpr):
    """The query position of bucket row ``r`` (0 where ``ok`` is false)."""
    if GATHERED:
        return tl.load(QPG + (r - e0), mask=ok, other=0)
    return tl.load(QPOS + tl.load(ENT + r, mask=ok, other=0) // HW, mask=ok, other=0)


@triton.jit
def _first_row_at(ENT, QPOS, QPG, e0, r_lo, r_hi, thr, guess, HW, GATHERED: tl.constexpr, TRY: tl.constexpr):
    """First index in ``[r_lo, r_hi]`` whose entry's query position is ``>= thr`` (``r_hi`` if
    none; the rows' positions are nondecreasing). ``guess`` is tried first with two independent
    loads (it is the answer when the row before it is below ``thr`` and it is not), else a binary
    search of up to ~16 dependent loads. A bucket starts with its block's own rows, one per
    position from the block's first, so ``r_lo + thr - kp0`` is the answer there. ``TRY`` off:
    the binary search alone (``guess`` unused). ``GATHERED``: positions read from ``QPG[r - e0]``."""
    lo = r_lo
    hi = r_hi
    if TRY:
        inr = (guess >= lo) & (guess <= hi)
        before = _pos_at(ENT, QPOS, QPG, e0, guess - 1, inr & (guess > lo), HW, GATHERED)
        at = _pos_at(ENT, QPOS, QPG, e0, guess, inr & (guess < hi), HW, GATHERED)
        if inr & ((guess == lo) | (before < thr)) & ((guess == hi) | (at >= thr)):
            lo = guess
            hi = guess
    while lo < hi:
        mid = (lo + hi) // 2
        p = _pos_at(ENT, QPOS, QPG, e0, mid, True, HW, GATHERED)
        if p >= thr:
            hi = mid
        else:
            lo = mid + 1
    return lo


@triton.jit
def _dkdv_tile(Q, DO, LSE, DELTA, QPOS, ENT, DQ, QG, DOG, QGD, DOGD, LSE2G, DLG, QPG, DQG, DQGD, e0, r0, r_hi, h, H,
               W, H0, HC, k, v, kk, kmask, kp0, dk, dv, stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, scale,
               scale_log2, BM: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr, FUSE_DQ: tl.constexpr,
               PREC: tl.constexpr, TRANS: tl.constexpr, GATHERED: tl.constexpr, TMA: tl.constexpr,
               DQ_ROWS: tl.constexpr, TMA_DQ: tl.constexpr, DQ_TRANS: tl.constexpr, DQ_SLOTS: tl.constexpr,
               DQ_DIAG: tl.constexpr, PART: tl.constexpr = 0):
    """Loads gathered rows ``[r0, r0 + BM)`` of one bucket and adds their dK/dV (and, with
    ``FUSE_DQ``, their dQ by fp32 atomics into the launch's head chunk starting at ``H0``).
    ``GATHERED``: the rows were copied in bucket order (``_gather_rows_kernel``; row ``r`` at
    ``r - e0``), so the loads are contiguous tiles with no index lookup in the loop. ``TMA``:
    q and dO tiles through the descriptors ``QGD``/``DOGD``, unmasked: rows past the bucket
    hold the next bucket's rows (or the zeroed pad) and get lse = +inf, so P = 0 there and
    they add exactly nothing. ``DQ_ROWS``: the fused dQ goes to ``DQG``, fp32 rows in the same
    bucket order (contiguous tiles, no index lookup; with or without ``GATHERED``); ``TMA_DQ``: as one
    asynchronous bulk reduction per tile through the descriptor ``DQGD`` (unmasked: the rows
    past the bucket have dS = 0, so they add zeros, and rows past the buffer are clipped).
    ``DQ_SLOTS``: the block is one key sub-tile, so this tile's dQ is each row's whole dQ from
    this block: stored (in ``DQ``'s dtype) into the row's slot ``(t * HC + h - H0) * W + w`` of
    ``DQ``, the slot buffer (its unselected slots zeroed by the caller), instead of added. ``DQ_DIAG`` (benchmarks only, wrong dq): 1
    stores the fused dQ instead of adding it, 2 leaves it out."""
    d = tl.arange(0, D)
    rr = r0 + tl.arange(0, BM)
    rmask = rr < r_hi
    lr = (rr - e0).to(tl.int64)  # the rows' place in bucket order: their row of the copies and of DQG
    if GATHERED:
        if TMA:
            q = QGD.load([(r0 - e0).to(tl.int32), 0])
            do = DOGD.load([(r0 - e0).to(tl.int32), 0])
            lse2 = tl.load(LSE2G + lr, mask=rmask, other=float("inf"))
        else:
            q = tl.load(QG + lr[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
            do = tl.load(DOG + lr[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
            lse2 = tl.load(LSE2G + lr, mask=rmask, other=0.0)
        dl = tl.load(DLG + lr, mask=rmask, other=0.0)
        qp = tl.load(QPG + lr, mask=rmask, other=2147483647)
    else:
        t64, q, do, lse2, dl, qp = _load_rows(Q, DO, LSE, DELTA, QPOS, ENT, rr, rmask, h, H, W, stride_qt, stride_qh,
                                              stride_dot, stride_doh, D)
    dk, dv, ds = _dkdv_step(k, v, q, do, lse2, dl, qp, rmask, kk, kmask, kp0, dk, dv, scale_log2, MASK, PREC, TRANS,
                            PART)
    if FUSE_DQ:
        if DQ_TRANS:
            # dQ^T = K^T dS^T: the product's M is the head dim (a whole Hopper warpgroup MMA)
            # instead of the BM gathered rows (32 at d=64, below the warpgroup's 64).
            dq = tl.trans(tl.dot(tl.trans(k), tl.trans(ds), input_precision=PREC)) * scale
        else:
            dq = tl.dot(ds, k, input_precision=PREC) * scale
        if DQ_ROWS:
            if TMA_DQ:
                DQGD.atomic_add([(r0 - e0).to(tl.int32), 0], dq)
            else:
                tl.atomic_add(DQG + lr[:, None] * D + d[None, :], dq, mask=rmask[:, None], sem="relaxed")
        elif DQ_SLOTS:
            ent = tl.load(ENT + rr, mask=rmask, other=0)
            slot = ((ent // (H * W)).to(tl.int64) * HC + (h - H0)) * W + ent % W
            tl.store(DQ + slot[:, None] * D + d[None, :], dq.to(DQ.dtype.element_ty), mask=rmask[:, None])
        elif DQ_DIAG == 0:
            if GATHERED:
                t64 = (tl.load(ENT + rr, mask=rmask, other=0) // (H * W)).to(tl.int64)
            # DQ holds the launch's query heads only (fp32 scratch per head chunk).
            tl.atomic_add(DQ + t64[:, None] * stride_dqt + (h - H0) * D + d[None, :], dq, mask=rmask[:, None],
                          sem="relaxed")
        elif DQ_DIAG == 1:
            if GATHERED:
                t64 = (tl.load(ENT + rr, mask=rmask, other=0) // (H * W)).to(tl.int64)
            tl.store(DQ + t64[:, None] * stride_dqt + (h - H0) * D + d[None, :], dq, mask=rmask[:, None])
    return dk, dv


# Head-chunk offsets and counts are not specialized: Triton would otherwise compile a variant
# per chunk pattern (e.g. HK0 = 4 is not a multiple of 16, HKVC = 1 is specialized), and a
# large call's first backward paid those compiles (run 5: FlashMoBA 512K's single timed
# fwd+bwd, compiled only on a small input, took 3.4 s against 0.45 s warm; compiles are the
# likely cause, not verified on the GPU).
@triton.jit(do_not_specialize=["HK0", "HKVC", "NSUB", "QH0", "QHC"])
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QPOS, ENT, OFFS, ORDER, KSTART, KPOS, KLEN, DQ, DK, DV, QG, DOG, QGD, DOGD, LSE2G, DLG,
    QPG, DQG, DQGD, TILE_PJ, TILE_C0, TEND, SLOT0, SCR_DK, SCR_DV, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
    stride_vh, stride_dot, stride_doh, stride_dqt, H, W, NBK, G, HK0, HKVC, NSUB, QH0, QHC, MAX_ROWS, scale,
    scale_log2,
    BM: tl.constexpr, BNB: tl.constexpr, D: tl.constexpr, FUSE_DQ: tl.constexpr, PREC: tl.constexpr,
    TRANS: tl.constexpr, SPLIT: tl.constexpr, GATHERED: tl.constexpr, TMA: tl.constexpr,
    SUB_MAJOR: tl.constexpr, DQ_ROWS: tl.constexpr, TMA_DQ: tl.constexpr, DQ_TRANS: tl.constexpr,
    ACC_KV: tl.constexpr, DQ_SLOTS: tl.constexpr = False, DQ_DIAG: tl.constexpr = 0, TILED: tl.constexpr = False,
    PART: tl.constexpr = 0, SKIP: tl.constexpr = False, KV_ONE: tl.constexpr = False, ACC_RED: tl.constexpr = False,
    ZNEXT=None, ZN=0, ZERO_NEXT: tl.constexpr = False, ZB: tl.constexpr = 4096,
):
    # KV heads [HK0, HK0 + HKVC) of this launch, and of their query heads those in
    # [QH0, QH0 + QHC) (all of them unless the launch splits a GQA group: split_group); the j-th
    # longest blocks of all the KV heads run side by side (decreasing-work order, heads
    # interleaved). ACC_KV: dK/dV are added to what an earlier launch of the same KV head stored
    # (fp32; each key row still has one program per launch, so plain loads and stores suffice).
    # TILED (max_rows): grid entry -> (pj, first row c0 of the (KV head, block)'s rows, counted
    # over its query heads in order); the program walks rows [c0, c0 + MAX_ROWS) of them. Tile r
    # of a pj cut into several (TEND: inclusive tile counts) stores its partial dK/dV into fp32
    # scratch slot SLOT0[pj] + r; _dkdv_split_sum_kernel adds a pj's slots in order and stores the
    # sums. Plain stores, no atomics: the cut backward is deterministic (session 25 saw the earlier
    # atomic sums give a wrong dv now and then on an H200, cause not found).
    # PART (BwdConfig.split_dv): 0 dK and dV; 1 dV alone, 2 dK (and the fused dQ) alone: two
    # launches over the same programs, each with half the accumulators.
    # SKIP (BwdConfig.skip_unseen, with SPLIT): the sub-tile's program does not walk the rows that
    # precede its first key, and the searches try the row the block's own rows predict first
    # (off: the binary search alone). Never with dq_slots, whose programs must store every selected slot.
    # KV_ONE: DK/DV hold this launch's one KV head alone ([Tk, 1, D] fp32 sums of a split GQA
    # group, cast into the caller's dk/dv once the group's last launch is done).
    # ZERO_NEXT (BwdConfig.zero_ahead): every program first zeroes its share of ZNEXT, the next
    # launch's fp32 dQ row copy (ZN elements), before any early return, so the whole grid zeroes it
    # whatever the programs go on to do.
    if ZERO_NEXT:
        _zero_share(ZNEXT, ZN, ZB)
    if SUB_MAJOR:
        # One 1-D grid with the key sub-tiles of a block adjacent: the NSUB programs that read
        # the same gathered rows (and, with FUSE_DQ, add into the same dQ rows) run at the same
        # time, so those rows are shared in L2 instead of fetched NSUB times from memory.
        pj = tl.program_id(0) // NSUB
        sub = tl.program_id(0) % NSUB
    else:
        pj = tl.program_id(0)
        sub = tl.program_id(1)
    c0 = 0
    t_before = pj
    n_t = 1
    tix = pj
    if TILED:
        pj = tl.load(TILE_PJ + tix)
        if pj < 0:
            return
        c0 = tl.load(TILE_C0 + tix)
        t_before = tl.load(TEND + pj - 1, mask=pj > 0, other=0)
        n_t = tl.load(TEND + pj) - t_before
        # a block's only program walks all its rows (also one the scratch had no slots left for)
        c1 = tl.where(n_t > 1, c0 + MAX_ROWS, 2147483647)
    j = pj // HKVC
    hk = HK0 + pj % HKVC
    g = tl.load(ORDER + hk * NBK + j)
    n0 = sub * BNB
    kl = _ld(KLEN + g)
    if n0 >= kl:
        return
    ks = tl.load(KSTART + g).to(tl.int64)
    kp0 = tl.load(KPOS + g)
    d = tl.arange(0, D)
    kk = n0 + tl.arange(0, BNB)
    kmask = kk < kl
    k = tl.load(K + (ks + kk)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(V + (ks + kk)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BNB, D], dtype=tl.float32)
    dv = tl.zeros([BNB, D], dtype=tl.float32)
    e0 = _ld(OFFS + QH0 * NBK)  # first row of this launch's buckets (row 0 of the gathered copy)
    # A row at position >= thr sees every key of this sub-tile (keys past the block end are
    # loaded as zeros and their dK/dV rows are never stored, so they need no mask either).
    thr = kp0 + n0 + BNB - 1
    cum = 0  # rows of the earlier query heads' buckets (TILED)
    for i in range(tl.maximum(QH0 - hk * G, 0), tl.minimum(QH0 + QHC - hk * G, G)):
        h = hk * G + i
        b = h * NBK + g
        r_lo = _ld(OFFS + b)
        r_hi = _ld(OFFS + b + 1)
        if TILED:
            # this tile's share of the bucket: rows [c0, c0 + MAX_ROWS) of the concatenation
            n = r_hi - r_lo
            r_hi = r_lo + tl.minimum(tl.maximum(c1 - cum, 0), n)
            r_lo = r_lo + tl.minimum(tl.maximum(c0 - cum, 0), n)
            cum += n
        r_mid = r_lo
        r_start = r_lo
        if SPLIT:
            # A bucket's rows are in token order, so by position where the caller says
            # positions are sorted (sorted_positions: documents): the rows that need the
            # causal mask come first. Two loops, each pipelined on its own; a branch
            # per tile inside one loop measured 2x slower (it breaks the pipelining).
            hi_s = r_hi
            if TILED:
                # a tile that starts inside a bucket mostly starts at rows that see the whole
                # sub-tile: then no search (up to 14 dependent loads per bucket)
                has = r_lo < r_hi
                if GATHERED:
                    p0 = tl.load(QPG + (r_lo - e0), mask=has, other=-1)
                else:
                    p0 = tl.load(QPOS + tl.load(ENT + r_lo, mask=has, other=0) // (H * W), mask=has, other=-1)
                hi_s = tl.where(p0 >= thr, r_lo, r_hi)
            r_see = _first_row_at(ENT, QPOS, QPG, e0, r_lo, hi_s, thr, r_lo + thr - kp0, H * W, GATHERED, SKIP)
            r_mid = r_lo + tl.cdiv(r_see - r_lo, BM) * BM
            if SKIP:
                if n0 > 0:
                    # The rows before the sub-tile's first key (the block's own rows that precede
                    # it: n0 of them in a block's bucket) see none of its keys, so P = 0 there and
                    # they add exactly nothing: the masked loop starts at the first row that sees
                    # one, moved back to a whole number of steps before r_mid (so no row is walked
                    # by both loops; the rows it moves back over are unseen ones too).
                    r_first = _first_row_at(ENT, QPOS, QPG, e0, r_lo, r_see, kp0 + n0, r_lo + n0, H * W, GATHERED,
                                             True)
                    r_start = r_mid - tl.cdiv(r_mid - r_first, BM) * BM
        r_mask_end = r_mid if SPLIT else r_hi
        for r0 in range(r_start, r_mask_end, BM):
            dk, dv = _dkdv_tile(Q, DO, LSE, DELTA, QPOS, ENT, DQ, QG, DOG, QGD, DOGD, LSE2G, DLG, QPG, DQG, DQGD, e0,
                                r0, r_hi, h, H, W, QH0, QHC, k, v, kk, kmask, kp0, dk, dv, stride_qt, stride_qh,
                                stride_dot, stride_doh, stride_dqt, scale, scale_log2, BM, D, True, FUSE_DQ, PREC,
                                TRANS, GATHERED, TMA, DQ_ROWS, TMA_DQ, DQ_TRANS, DQ_SLOTS, DQ_DIAG, PART)
        if SPLIT:
            for r0 in range(r_mid, r_hi, BM):
                dk, dv = _dkdv_tile(Q, DO, LSE, DELTA, QPOS, ENT, DQ, QG, DOG, QGD, DOGD, LSE2G, DLG, QPG, DQG, DQGD,
                                    e0, r0, r_hi, h, H, W, QH0, QHC, k, v, kk, kmask, kp0, dk, dv, stride_qt, stride_qh,
                                    stride_dot, stride_doh, stride_dqt, scale, scale_log2, BM, D, False, FUSE_DQ, PREC,
                                    TRANS, GATHERED, TMA, DQ_ROWS, TMA_DQ, DQ_TRANS, DQ_SLOTS, DQ_DIAG, PART)
    dk = dk * scale
    if n_t > 1:
        # tile (tix - t_before) of several of this block: its partial in a slot of its own, added
        # up in tile order by the sum kernel
        slot = tl.load(SLOT0 + pj) + (tix - t_before)
        sp = (slot.to(tl.int64) * (NSUB * BNB) + kk)[:, None] * D + d[None, :]
        if PART != 2:
            tl.store(SCR_DV + sp, dv, mask=kmask[:, None])
        if PART != 1:
            tl.store(SCR_DK + sp, dk, mask=kmask[:, None])
    else:
        _store_dkdv(DK, DV, dk, dv, ks + kk, kmask, hk, H // G, D, ACC_KV, PART, ACC_RED, KV_ONE)


@triton.jit
def _zero_share(Z, n, ZB: tl.constexpr):
    """This program's share of zeroing ``Z[:n]`` (fp32): the grid's programs, in row-major
    order over its axes, take consecutive runs of whole ``ZB``-element pieces (the last clipped).
    Plain stores, fire and forget: a kernel bound by shared memory leaves DRAM room for them."""
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    pieces = tl.cdiv(tl.cdiv(n, ZB), n_prog)
    offs = tl.arange(0, ZB)
    for i in range(pieces):
        z = (pid.to(tl.int64) * pieces + i) * ZB + offs
        tl.store(Z + z, tl.zeros([ZB], dtype=tl.float32), mask=z < n)


@triton.jit
def _store_dkdv(DK, DV, dk, dv, key_rows, kmask, hk, HKV, D: tl.constexpr, ACC_KV: tl.constexpr,
                PART: tl.constexpr = 0, ACC_RED: tl.constexpr = False, KV_ONE: tl.constexpr = False):
    """Write a key sub-tile's dK/dV (rows ``key_rows`` of KV head ``hk`` in the contiguous
    ``[Tk, Hkv, D]`` grads). Each (KV head, key rows) has exactly one writer per launch, so they are
    stored once, directly in the output dtype (no fp32 copy when the caller wants k's dtype), or,
    when the launch holds only part of the GQA group (``ACC_KV``), added to the earlier launches'
    fp32 sums. ``PART`` 1 writes dV alone, 2 dK alone (``BwdConfig.split_dv``). ``ACC_RED``
    (``BwdConfig.acc_red``): those adds as fire-and-forget fp32 reductions in L2 (one writer per
    element and launch, launches in stream order: the same sums as load + add + store, but for
    subnormals, which the reduction flushes to zero, and for dK where the compiler contracts the
    load path's ``dk * scale + sum`` into one FFMA, as d=128 builds do: the reduction adds the
    rounded product, one more fp32 rounding a launch), so no loaded tile takes registers.
    ``KV_ONE``: DK/DV are ``[Tk, 1, D]`` and hold KV head ``hk`` alone (a split group's fp32 sums)."""
    d = tl.arange(0, D)
    if KV_ONE:
        ptr = key_rows.to(tl.int64)[:, None] * D + d[None, :]
    else:
        ptr = (key_rows.to(tl.int64)[:, None] * HKV + hk) * D + d[None, :]
    if ACC_KV and ACC_RED:
        if PART != 2:
            tl.atomic_add(DV + ptr, dv, mask=kmask[:, None], sem="relaxed")
        if PART != 1:
            tl.atomic_add(DK + ptr, dk, mask=kmask[:, None], sem="relaxed")
    elif PART == 0:  # (the two in this order: the default kernel's code as it was measured)
        if ACC_KV:
            dk += tl.load(DK + ptr, mask=kmask[:, None], other=0.0)
            dv += tl.load(DV + ptr, mask=kmask[:, None], other=0.0)
        tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=kmask[:, None])
        tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=kmask[:, None])
    elif PART == 1:
        if ACC_KV:
            dv += tl.load(DV + ptr, mask=kmask[:, None], other=0.0)
        tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=kmask[:, None])
    else:
        if ACC_KV:
            dk += tl.load(DK + ptr, mask=kmask[:, None], other=0.0)
        tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=kmask[:, None])


@triton.jit(do_not_specialize=["HK0", "HKVC", "NPJ"])
def _kv_tiles_count_kernel(OFFS, ORDER, TEND, SLOT_PJ, SLOT0, NPJ, HK0, HKVC, NBK, G, QH0, QHC, MAX_ROWS, MAX_SLOTS,
                           BLOCK: tl.constexpr):
    # One program. For each of the launch's dK/dV programs pj (in _dkdv_kernel's order) the rows
    # of its (KV head, block) over the launch's query heads; ceil(rows / MAX_ROWS) tiles (at least
    # one: an empty block's program stores its zeros), TEND their inclusive prefix sum. A block of
    # more than one tile asks for one scratch slot per tile; the requests are granted in this order
    # (longest blocks first) while their running total stays within MAX_SLOTS; from the first pj
    # past that, every pj keeps one program. A cut pj's slots are SLOT0[pj] .. + its tiles - 1
    # (SLOT0 = the slots asked before it), and SLOT_PJ[SLOT0[pj]] = pj (-1 at every other slot).
    for s0 in range(0, MAX_SLOTS, BLOCK):
        sl = s0 + tl.arange(0, BLOCK)
        tl.store(SLOT_PJ + sl, tl.full([BLOCK], -1, tl.int32), mask=sl < MAX_SLOTS)
    tl.debug_barrier()  # the -1s land before the cut pjs' slots (one program: a CTA barrier orders them)
    carry_t = 0
    carry_x = 0
    for p0 in range(0, NPJ, BLOCK):
        pj = p0 + tl.arange(0, BLOCK)
        m = pj < NPJ
        hk = HK0 + pj % HKVC
        g = tl.load(ORDER + hk * NBK + pj // HKVC, mask=m, other=0)
        cnt = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(G):
            h = hk * G + i
            inr = m & (h >= QH0) & (h < QH0 + QHC)
            b = h * NBK + g
            cnt += tl.load(OFFS + b + 1, mask=inr, other=0) - tl.load(OFFS + b, mask=inr, other=0)
        tiles = tl.maximum((cnt + MAX_ROWS - 1) // MAX_ROWS, 1)
        want = tl.where(tiles > 1, tiles, 0)  # slots asked: one per tile of a block cut in several
        cx = tl.cumsum(want, axis=0) + carry_x  # asked so far: nondecreasing, so the granted pjs
        grant = (want > 0) & (cx <= MAX_SLOTS)  # are a prefix of the askers, and cx - want their first slot
        nt = tl.where(m, tl.where(grant, tiles, 1), 0)
        tl.store(TEND + pj, tl.cumsum(nt, axis=0) + carry_t, mask=m)
        tl.store(SLOT0 + pj, cx - want, mask=m)
        tl.store(SLOT_PJ + cx - want, pj, mask=m & grant)
        carry_t += tl.sum(nt, axis=0)
        carry_x += tl.sum(want, axis=0)


@triton.jit(do_not_specialize=["HK0", "HKVC"])
def _dkdv_split_sum_kernel(SLOT_PJ, TEND, ORDER, KSTART, KLEN, SCR_DK, SCR_DV, DK, DV, NBK, HK0, HKVC, HKV,
                           SLOT_KEYS, RB: tl.constexpr, D: tl.constexpr, ACC_KV: tl.constexpr,
                           KV_ONE: tl.constexpr = False):
    # Per (a cut block's first scratch slot, RB key rows): the block's tiles' partial dK/dV, in
    # its slots SLOT0 .. SLOT0 + tiles - 1, added in tile order (the same sums every run) and
    # stored (or added, ACC_KV) as _dkdv_kernel stores an uncut block's; programs of the other
    # slots exit. RB rows, not a whole BNB-key sub-tile: two [BNB, D] fp32 tiles (and, with
    # ACC_KV, the sums they add to) on 4 warps spilled (sm_90, offline: 80 bytes a thread at
    # BNB 128, D 128; 4-6.5 KB of local memory at block 4096, where the compiler kept the tiles there).
    pj = tl.load(SLOT_PJ + tl.program_id(0))
    if pj < 0:
        return
    hk = HK0 + pj % HKVC
    g = tl.load(ORDER + hk * NBK + pj // HKVC)
    n0 = tl.program_id(1) * RB
    kl = _ld(KLEN + g)
    if n0 >= kl:
        return
    d = tl.arange(0, D)
    kk = n0 + tl.arange(0, RB)
    kmask = kk < kl
    t_before = tl.load(TEND + pj - 1, mask=pj > 0, other=0)
    n_t = tl.load(TEND + pj) - t_before
    dk = tl.zeros([RB, D], dtype=tl.float32)
    dv = tl.zeros([RB, D], dtype=tl.float32)
    for t in range(0, n_t):
        sp = (((tl.program_id(0) + t) * SLOT_KEYS).to(tl.int64) + kk)[:, None] * D + d[None, :]
        dk += tl.load(SCR_DK + sp, mask=kmask[:, None], other=0.0)
        dv += tl.load(SCR_DV + sp, mask=kmask[:, None], other=0.0)
    _store_dkdv(DK, DV, dk, dv, tl.load(KSTART + g).to(tl.int64) + kk, kmask, hk, HKV, D, ACC_KV, KV_ONE=KV_ONE)


@triton.jit
def _dq_step(q, do, lse2, dl, qp, rmask, K, V, ks, kk, kl, hk, kp0, stride_kt, stride_kh, stride_vt, stride_vh,
             dq, scale_log2, D: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """dQ of a gathered row tile from keys ``kk`` of its block (unscaled)."""
    k, v = _load_kv(K, V, ks, kk, kl, hk, stride_kt, stride_kh, stride_vt, stride_vh, D, MASK)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    if MASK:
        ok = rmask[:, None] & (kk < kl)[None, :] & ((kp0 + kk)[None, :] <= qp[:, None])
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    else:
        p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = (p * (dp - dl[:, None])).to(q.dtype)
    return dq + tl.dot(ds, k, input_precision=PREC)


@triton.jit(do_not_specialize=["H0", "HC"])
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, QPOS, ENT, OFFS, TEND, TILE_B, TILE_START, KSTART, KPOS, KLEN, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, H, W, NBK, G, H0, HC, scale, scale_log2, CHUNK,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    pid, live = _head_chunk_pid(TEND, H0, HC, NBK)
    if not live:
        return
    b, c0, c1 = _tile_rows(TILE_B, TILE_START, OFFS, pid, CHUNK)
    h = b // NBK
    g = b % NBK
    hk = h // G
    d = tl.arange(0, D)
    kl = _ld(KLEN + g)
    if kl == 0:  # a block of another source (CP slot namespace)
        return
    ks = tl.load(KSTART + g).to(tl.int64)
    kp0 = tl.load(KPOS + g)
    for r0 in range(c0, c1, BM):
        rr = r0 + tl.arange(0, BM)
        rmask = rr < c1
        t64, q, do, lse2, dl, qp = _load_rows(Q, DO, LSE, DELTA, QPOS, ENT, rr, rmask, h, H, W, stride_qt, stride_qh,
                                              stride_dot, stride_doh, D)
        dq = tl.zeros([BM, D], dtype=tl.float32)
        n_full, n_hi = _key_span(qp, rmask, kp0, kl, BN)
        for n0 in range(0, n_full, BN):
            dq = _dq_step(q, do, lse2, dl, qp, rmask, K, V, ks, n0 + tl.arange(0, BN), kl, hk, kp0,
                          stride_kt, stride_kh, stride_vt, stride_vh, dq, scale_log2, D, False, PREC)
        for n0 in range(n_full, n_hi, BN):
            dq = _dq_step(q, do, lse2, dl, qp, rmask, K, V, ks, n0 + tl.arange(0, BN), kl, hk, kp0,
                          stride_kt, stride_kh, stride_vt, stride_vh, dq, scale_log2, D, True, PREC)
        tl.atomic_add(DQ + t64[:, None] * stride_dqt + (h - H0) * D + d[None, :], dq * scale, mask=rmask[:, None],
                      sem="relaxed")


@triton.jit(do_not_specialize=["H0", "HC"])
def _dq_rows_sum_kernel(INV, DQG, DQ, n_rows, stride_dqt, stride_dqh, H0, HC, W,
                        BR: tl.constexpr, D: tl.constexpr, ADD: tl.constexpr, SLOTS: tl.constexpr = False):
    # dq[t, H0 + hl] (+)= sum over the W slots of row r = t * HC + hl: their rows in the
    # bucket-order copy DQG, found through INV [(t, hl, w)] (-1: slot not selected), or with SLOTS
    # the slot buffer's own rows r * W + w (unselected slots hold its zeros; INV unused). Summed
    # in fp32, one store per row in dq's dtype.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    m = r < n_rows
    r64 = r.to(tl.int64)
    d = tl.arange(0, D)
    acc = tl.zeros([BR, D], dtype=tl.float32)
    for w in range(W):
        if SLOTS:
            p = r64 * W + w
            live = m
        else:
            p = tl.load(INV + r64 * W + w, mask=m, other=-1).to(tl.int64)
            live = p >= 0
        acc += tl.load(DQG + p[:, None] * D + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
    ptr = DQ + (r64 // HC)[:, None] * stride_dqt + (H0 + r % HC)[:, None] * stride_dqh + d[None, :]
    if ADD:
        acc += tl.load(ptr, mask=m[:, None], other=0.0)
    tl.store(ptr, acc.to(DQ.dtype.element_ty), mask=m[:, None])


@triton.jit
def _zero_free_slots_kernel(ENT, OFFS, DQS, E, NB, H, W, H0, HC, BR: tl.constexpr, D: tl.constexpr):
    # The dq slot buffer is allocated unfilled: each selected slot is stored once by the dK/dV
    # program that owns its block, so only the unselected ones need zeros. They are the gather
    # index's tail (ent past offs[NB]: the empty slots sort last), a few percent of the buffer at
    # most; the zero fill of the whole buffer was a pass as large as the slots' own stores.
    # The tail's start is known only on the device, so a fixed grid strides over it: one program
    # a BR-entry tile of the whole index made ~300K programs at FlashMoBA's 128K nearly all of which
    # returned at once (160 us a launch on an H100, 630 us at 512K, for ~1% of the entries).
    start = tl.load(OFFS + NB)
    d = tl.arange(0, D)
    for t0 in range(start + tl.program_id(0) * BR, E, tl.num_programs(0) * BR):
        i = t0 + tl.arange(0, BR)
        m = i < E
        ent = tl.load(ENT + i, mask=m, other=0)
        h = (ent // W) % H
        m = m & (h >= H0) & (h < H0 + HC)
        slot = ((ent // (H * W)).to(tl.int64) * HC + (h - H0)) * W + ent % W
        tl.store(DQS + slot[:, None] * D + d[None, :], tl.zeros([BR, D], dtype=DQS.dtype.element_ty), mask=m[:, None])


def unfilled_rows(rows: int, d: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An unfilled ``[rows, D]`` buffer that kernels write before anything reads it: the dq slot
    buffer, and under ``BwdConfig.zero_ahead`` the next launch's fp32 dQ row copy, which the launch
    before it zeroes. A function of its own so a test can hand the backward NaNs and see that every
    element read was written."""
    return torch.empty(rows, d, dtype=dtype, device=device)


def _gathered_rows(q, do, lse, delta, qpos, gi: GatherIndex, hq: int, width: int, nbk: int, h0: int, hc: int,
                   n_rows: int, d: int, tma_rows: int = 0, inv: torch.Tensor | None = None):
    """Copies of the rows of query heads ``[h0, h0 + hc)`` in bucket order (see
    ``_gather_rows_kernel``): ``(qg, dog [n_rows, D], qgd, dogd, lse2g, dlg [n_rows] fp32, qpg [n_rows]
    int32)``, ``n_rows`` a static bound (the used prefix is ``offs[(h0 + hc) * nbk] - offs[h0 * nbk]``).
    ``tma_rows`` > 0: ``qgd``/``dogd`` are tensor descriptors of ``tma_rows``-row tiles of qg/dog and
    the ``tma_rows`` rows after the used prefix are zeroed; else they are qg/dog themselves (unused).
    ``inv``: an int32 ``[Tq, hc, W]`` filled with -1, given each selected entry's row in the copy."""
    dev = q.device
    qg = torch.empty(n_rows, d, dtype=q.dtype, device=dev)
    dog = torch.empty(n_rows, d, dtype=do.dtype, device=dev)
    lse2g = torch.empty(n_rows, dtype=torch.float32, device=dev)
    dlg = torch.empty(n_rows, dtype=torch.float32, device=dev)
    qpg = torch.empty(n_rows, dtype=torch.int32, device=dev)
    br = 64
    _gather_rows_kernel[(cdiv(n_rows, br),)](
        q, do, lse, delta, qpos, gi.ent, gi.offs, qg, dog, lse2g, dlg, qpg, qpg if inv is None else inv, q.stride(0),
        q.stride(1), do.stride(0), do.stride(1), hq, width, h0 * nbk, (h0 + hc) * nbk, n_rows, h0, hc, BR=br, D=d,
        PAD=tma_rows, WRITE_INV=inv is not None, num_warps=4,
    )
    if tma_rows:
        return (qg, dog, TensorDescriptor.from_tensor(qg, [tma_rows, d]), TensorDescriptor.from_tensor(dog, [tma_rows, d]),
                lse2g, dlg, qpg)
    return qg, dog, qg, dog, lse2g, dlg, qpg


def _row_places(gi: GatherIndex, hq: int, width: int, nbk: int, h0: int, hc: int, n_rows: int,
                inv: torch.Tensor) -> None:
    """``inv`` (int32 ``[Tq, hc, W]``, -1 filled) given each selected entry of query heads
    ``[h0, h0 + hc)`` its row in bucket order, without copying any row: the dQ rows' places for
    ``BwdConfig.dq_rows`` when the dK/dV loop reads q and dO through the index (``gather_rows`` off)."""
    br = 128
    _gather_rows_kernel[(cdiv(n_rows, br),)](
        inv, inv, inv, inv, inv, gi.ent, gi.offs, inv, inv, inv, inv, inv, inv, 0, 0, 0, 0, hq, width, h0 * nbk,
        (h0 + hc) * nbk, n_rows, h0, hc, BR=br, D=16, PAD=0, WRITE_INV=True, COPY=False, num_warps=4,
    )


def descriptor_reductions_possible(device: torch.device) -> bool:
    """Whether ``device`` can run TMA bulk reductions (``BwdConfig.tma_dq``): a CUDA GPU (the
    config's default asks for Hopper; an older GPU fails at compile time). The interpreter cannot.
    ``benchmarks/kernel_resources.py`` compiles such kernels without a GPU by answering True."""
    return torch.device(device).type == "cuda"


def sparse_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    qpos: torch.Tensor,
    blocks: KeyBlocks,
    gi: GatherIndex,
    width: int,
    softmax_scale: float,
    block_size: int,
    cfg: BwdConfig,
    dlse: torch.Tensor | None = None,
    kv_grad_dtype: torch.dtype = torch.float32,
    dq_dtype: torch.dtype = torch.float32,
    dq_acc: torch.Tensor | None = None,
    sorted_positions: bool = False,
    blocks_nonempty: bool = False,
    diag_dq: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`triton_attn_fwd.sparse_attn_fwd` given ``o``/``lse`` from outside.

    Args:
        do, o: ``[Tq, Hq, D]``; lse: ``[Tq, Hq]`` fp32 (natural log); dlse: optional gradient
            of ``lse`` (folded into ``delta``; context parallelism passes None).
        Others as the forward (same gather index and width); cfg: the backward's tiling.
        kv_grad_dtype: dtype of dk/dv (fp32 for CP owners that accumulate; k's dtype saves
            memory for the single-device op).
        dq_dtype: dtype of dq. dQ is summed with fp32 atomics; for a half ``dq_dtype`` the fp32
            scratch exists for one chunk of KV heads at a time (``cfg.dq_chunk_bytes``)
            and each chunk is cast into dq, so the scratch never costs a whole fp32 ``[Tq, Hq, D]``.
            With ``cfg.dq_rows`` the fp32 sums live in the gathered rows' copy instead, and dq is
            written once per chunk of KV heads by the per-token sum, in ``dq_dtype``.
        dq_acc: optional contiguous fp32 ``[Tq, Hq, D]`` to add dQ into (context parallelism sums
            the partials of all sources there); returned as dq, ``dq_dtype`` is then ignored.
        sorted_positions: the caller guarantees ``qpos`` is nondecreasing over the tokens of each
            bucket (true of document positions); only then may ``cfg.split_mask`` take the
            unmasked loop for the rows that see a whole key sub-tile.
        blocks_nonempty: the caller guarantees every block a selected slot names holds a key
            (true of the single-device op for a valid selection: ids of blocks of the token's own
            document, never the table's empty padding blocks). Then with ``cfg.dq_slots`` each
            selected slot is stored by its block's program, and the slot buffer is left unfilled
            but for the unselected slots; False (the CP slot form, where the other sources' slots
            are empty blocks whose programs store nothing): the buffer is zero-filled.
        diag_dq: timing diagnostic of the fused dQ by atomics (benchmarks only; dq is then wrong):
            1 stores each tile's dQ instead of adding it, 2 leaves it out.
    Returns:
        ``dq [Tq, Hq, D]`` in ``dq_dtype``, ``dk, dv [Tk, Hkv, D]`` in ``kv_grad_dtype``.
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g_sz = hq // hkv
    dev = q.device
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    do = do.contiguous() if do.stride(-1) != 1 else do
    o = o.contiguous() if o.stride(-1) != 1 else o
    delta = torch.empty(tq, hq, dtype=torch.float32, device=dev)
    if tq * hq > 0:
        _delta_kernel[(cdiv(tq * hq, 64),)](
            do, o, delta, tq * hq, do.stride(0), do.stride(1), o.stride(0), o.stride(1), hq, BR=64, D=d, num_warps=4
        )
    if dlse is not None:
        delta = delta - dlse.float()
    lse = lse.float().contiguous()
    delta = delta.contiguous()
    # Every key row belongs to exactly one (KV head, block, sub-tile) program, which stores it:
    # dk/dv need no zero fill.
    dk = torch.empty(tk, hkv, d, dtype=kv_grad_dtype, device=dev)
    dv = torch.empty(tk, hkv, d, dtype=kv_grad_dtype, device=dev)
    if dq_acc is not None:
        if dq_acc.dtype != torch.float32 or dq_acc.shape != q.shape or not dq_acc.is_contiguous():
            raise ValueError(f"sparse_attn_bwd: dq_acc must be a contiguous fp32 {tuple(q.shape)} tensor, got "
                             f"{dq_acc.dtype} {tuple(dq_acc.shape)}")
        dq, dq_dtype = dq_acc, torch.float32
    elif dq_dtype == torch.float32:
        # dq_rows / dq_slots write every row of dq once (their sum pass); the atomics need zeros.
        dq = (torch.empty if cfg.dq_rows or cfg.dq_slots else torch.zeros)(tq, hq, d, dtype=torch.float32, device=dev)
    else:
        dq = torch.empty(tq, hq, d, dtype=dq_dtype, device=dev)
    fp32_dq = dq_dtype == torch.float32
    if tq == 0 or blocks.n == 0:
        return (dq if dq_acc is not None else dq.zero_()), dk.zero_(), dv.zero_()
    cfg.check_block(block_size, d)
    bnb = cfg.key_tile(block_size, d)
    nsub = cdiv(block_size, bnb)
    fuse_dq = cfg.fuses_dq(block_size, d)
    if cfg.tma_dq and not descriptor_reductions_possible(dev):
        raise ValueError(f"sparse_attn_bwd: BwdConfig.tma_dq=True adds dQ tiles by TMA bulk reductions, which need a "
                         f"CUDA GPU (Hopper or newer); the tensors are on {dev} (the Triton interpreter has no "
                         f"descriptor reductions). Fix: tma_dq=False (dq_rows=True alone uses plain atomics).")
    slot_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    n_stages = cfg.num_stages or (3 if block_size >= 256 else 2)
    nw = cfg.num_warps or (8 if d >= 128 else 4)
    if not fuse_dq and gi.chunk % cfg.dq_bm:
        raise ValueError(f"sparse_attn_bwd: dq_bm={cfg.dq_bm} must divide the gather index's chunk {gi.chunk}")
    scale_log2 = softmax_scale * LOG2E
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    chunks = _head_chunks(tq, hkv, g_sz, width, d, q.element_size(), fp32_dq, cfg, slot_dtype.itemsize)
    split = any(hc < g_sz for _, _, _, hc, _ in chunks)
    # A split GQA group sums its launches' dK/dV in fp32, then casts them into dk/dv once; else
    # they are written once. The fp32 sums hold one KV head (split launches hold one each, in head
    # order), not all: at 128K, 16/4 heads, d=64 that is 67 MiB of the backward's transient
    # instead of 268.
    dk_out, dv_out = dk, dv
    kv_one = split and kv_grad_dtype != torch.float32
    if kv_one:
        dk, dv = (torch.empty(tk, 1, d, dtype=torch.float32, device=dev) for _ in range(2))
    cut = _BlockCuts(cfg, nsub * bnb, d, max(nkv for _, nkv, _, _, _ in chunks) * blocks.n,
                     tq * width * max(hc for *_, hc, _ in chunks), dev) if cfg.max_rows else None
    ahead = None  # zero_ahead: the dQ row copy the previous launch's dK/dV programs zeroed
    for ci, (hk0, nkv, h0, hc, acc_kv) in enumerate(chunks):
        n_rows = tq * width * hc  # static bound on the chunk's gathered rows
        zero_next = None
        if cfg.dq_rows:
            # dQ summed per row of the bucket-order copy, then per token: no fp32 [Tq, hc, D] scratch.
            dq_c = dq
            inv = torch.full((tq, hc, width), -1, dtype=torch.int32, device=dev)
            # zeros for the atomic adds (folding this fill into the row copy measured slower: session 35;
            # with zero_ahead, every launch after the first finds its copy zeroed by the one before)
            dqg = ahead if ahead is not None else torch.zeros(n_rows, d, dtype=torch.float32, device=dev)
            if cfg.zero_ahead and ci + 1 < len(chunks):
                zero_next = unfilled_rows(tq * width * chunks[ci + 1][3], d, torch.float32, dev)
            ahead = zero_next
            dq_rows = (dqg, TensorDescriptor.from_tensor(dqg, [cfg.bm, d]) if cfg.tma_dq else dqg)
        elif cfg.dq_slots:
            # each selected (token, head, slot) gets its block's whole dQ stored once by the dK/dV
            # kernel where every block is real; the unselected ones are zeroed here
            if blocks_nonempty:
                dq_c = unfilled_rows(tq * hc * width, d, slot_dtype, dev)
                n_ent = gi.ent.numel()
                _zero_free_slots_kernel[(min(cdiv(n_ent, 128), ZERO_SLOT_PROGRAMS),)](
                    gi.ent, gi.offs, dq_c, n_ent, hq * blocks.n, hq, width, h0, hc, BR=128, D=d, num_warps=4)
            else:
                dq_c = torch.zeros(tq * hc * width, d, dtype=slot_dtype, device=dev)
            inv = None
            dq_rows = (dq_c, dq_c)  # the sum pass reads the slots as its rows; the kernel's stand-ins
        else:
            dq_c = dq[:, h0:h0 + hc] if fp32_dq else torch.zeros(tq, hc, d, dtype=torch.float32, device=dev)
            inv = None
            dq_rows = (dq_c, dq_c)  # unused stand-ins
        if cfg.gather_rows:
            rows = _gathered_rows(q, do, lse, delta, qpos, gi, hq, width, blocks.n, h0, hc, n_rows, d,
                                  cfg.bm if cfg.tma else 0, inv)
        else:
            rows = (q, q, q, q, lse, lse, qpos)  # unused stand-ins: the loop reads the rows through the index
            if inv is not None:
                _row_places(gi, hq, width, blocks.n, h0, hc, n_rows, inv)
        n_prog = nkv * blocks.n
        tiles = (gi.offs,) * 6  # unused stand-ins (TILED off)
        if cut is not None:
            # cut each (KV head, block)'s rows into programs of at most max_rows (longest first)
            n_prog, tiles = cut.plan(gi, hk0, nkv, h0, hc, blocks.n, g_sz)
        grid = (n_prog * nsub,) if cfg.sub_major else (n_prog, nsub)
        # split_dv: dV in a launch of its own (no dQ there), then dK with the fused dQ
        parts = ((1, cfg.dv_bm or cfg.bm, cfg.dv_warps or nw), (2, cfg.bm, nw)) if cfg.split_dv else ((0, cfg.bm, nw),)
        for part, bm, warps in parts:
            dq_here = fuse_dq and part != 1
            zero_here = zero_next is not None and part != 2  # the first launch of the pair zeroes
            _dkdv_kernel[grid](
                q, k, v, do, lse, delta, qpos, gi.ent, gi.offs, gi.kv_order, blocks.kstart, blocks.kpos, blocks.klen,
                dq_c, dk, dv, *rows, *dq_rows, *tiles, *strides, dq_c.stride(0), hq, width, blocks.n, g_sz, hk0, nkv,
                nsub, h0, hc, cfg.max_rows, softmax_scale, scale_log2, BM=bm, BNB=bnb, D=d, FUSE_DQ=dq_here,
                PREC=prec, TRANS=cfg.trans, SPLIT=cfg.split_mask and sorted_positions, GATHERED=cfg.gather_rows,
                TMA=cfg.tma, SUB_MAJOR=cfg.sub_major, DQ_ROWS=cfg.dq_rows and dq_here, TMA_DQ=cfg.tma_dq and dq_here,
                DQ_TRANS=cfg.dq_trans, ACC_KV=acc_kv, DQ_SLOTS=cfg.dq_slots and dq_here, DQ_DIAG=diag_dq,
                TILED=cut is not None, PART=part,
                SKIP=cfg.skip_unseen and cfg.split_mask and sorted_positions and not cfg.dq_slots,
                KV_ONE=kv_one, ACC_RED=cfg.acc_red and acc_kv, num_warps=warps, num_stages=n_stages,
                **(dict(ZNEXT=zero_next, ZN=zero_next.numel(), ZERO_NEXT=True) if zero_here else {}),
            )
        if cut is not None:
            cut.store(dk, dv, gi, hk0, nkv, hkv, blocks, d, acc_kv, kv_one)
        if kv_one and h0 + hc == (hk0 + 1) * g_sz:  # the KV head's last launch: its sums are complete
            dk_out[:, hk0].copy_(dk[:, 0])
            dv_out[:, hk0].copy_(dv[:, 0])
        del rows
        if cfg.dq_rows or cfg.dq_slots:
            # each token's W dQ rows (bucket-order copy through inv, or its own slots) summed into dq
            br = 32
            _dq_rows_sum_kernel[(cdiv(tq * hc, br),)](
                dq_c if inv is None else inv, dq_rows[0], dq, tq * hc, dq.stride(0), dq.stride(1), h0, hc, width,
                BR=br, D=d, ADD=dq_acc is not None, SLOTS=cfg.dq_slots, num_warps=4,
            )
            del inv, dq_rows, dq_c
            continue
        if not fuse_dq:
            n_tiles = tq * hc * width // gi.chunk + hc * blocks.n + 1  # static bound for these heads
            _dq_kernel[(n_tiles,)](
                q, k, v, do, lse, delta, qpos, gi.ent, gi.offs, gi.tend, gi.tile_b, gi.tile_start,
                blocks.kstart, blocks.kpos, blocks.klen, dq_c, *strides, dq_c.stride(0), hq, width, blocks.n, g_sz,
                h0, hc, softmax_scale, scale_log2, gi.chunk,
                BM=cfg.dq_bm, BN=min(cfg.dq_bn, next_power_of_2(block_size)), D=d, PREC=prec,
                num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
            )
        if not fp32_dq:
            dq[:, h0:h0 + hc].copy_(dq_c)
            del dq_c
    return dq, dk_out, dv_out


class _BlockCuts:
    """``bwd.max_rows``: the dK/dV programs of one backward call cut so that none walks more than
    ``max_rows`` rows. Per launch, :meth:`plan` lists the programs (a (KV head, block) with ``n``
    rows of the launch's query heads gets ``ceil(n / max_rows)`` of them, while their partials fit
    the scratch) and :meth:`store` adds up and writes the cut blocks' partials. The scratch
    (``2 x slots x block x D`` fp32, one slot per tile of a cut block; ``slots`` within
    ``max_rows_bytes`` and at most twice a launch's rows / ``max_rows``, as many tiles as the cut
    blocks of a launch can have) is written whole by the tiles before it is read, so it is not
    zeroed. Device-side throughout: no host sync."""

    def __init__(self, cfg: BwdConfig, block_keys: int, d: int, max_prog: int, max_rows_launch: int, dev):
        self.rows = cfg.max_rows
        # a cut block (n > m rows) has ceil(n / m) < n / m + 1 < 2 n / m tiles, so a launch's cut
        # blocks have fewer than 2 x its rows / m tiles in all
        self.slots = max(1, min(cfg.max_rows_bytes // (2 * block_keys * d * 4), 2 * max_rows_launch // cfg.max_rows))
        self.scratch = torch.empty(2, self.slots, block_keys, d, dtype=torch.float32, device=dev)
        self.slot_pj = torch.empty(self.slots, dtype=torch.int32, device=dev)
        self.slot0 = torch.empty(max_prog, dtype=torch.int32, device=dev)
        self.tend = torch.empty(max_prog, dtype=torch.int32, device=dev)
        self.zeros = torch.zeros(max_prog, dtype=torch.int32, device=dev)  # _tiles_kernel's bucket starts
        self.tile_pj = torch.empty(max_prog + self.slots, dtype=torch.int32, device=dev)
        self.tile_c0 = torch.empty(max_prog + self.slots, dtype=torch.int32, device=dev)

    def plan(self, gi: GatherIndex, hk0: int, nkv: int, h0: int, hc: int, nbk: int, g: int):
        """``(n_programs, (tile_pj, tile_c0, tend, slot0, scratch dk, scratch dv))`` for one launch."""
        npj = nkv * nbk
        _kv_tiles_count_kernel[(1,)](gi.offs, gi.kv_order, self.tend, self.slot_pj, self.slot0, npj, hk0, nkv, nbk,
                                     g, h0, hc, self.rows, self.slots, BLOCK=1024)
        n_t = npj + self.slots
        _tiles_kernel[(cdiv(n_t, 1024),)](self.zeros, self.tend, self.tile_pj, self.tile_c0, npj, n_t,
                                                 self.rows, npj.bit_length() + 1, BLOCK=1024)
        return n_t, (self.tile_pj, self.tile_c0, self.tend, self.slot0, self.scratch[0], self.scratch[1])

    def store(self, dk, dv, gi: GatherIndex, hk0: int, nkv: int, hkv: int, blocks: KeyBlocks, d: int,
              acc_kv: bool, kv_one: bool = False) -> None:
        rb = max(16, SPLIT_SUM_ELEMS // d)  # rows a program: 32 fp32 of each sum a thread on 4 warps
        slot_keys = self.scratch.shape[2]
        _dkdv_split_sum_kernel[(self.slots, cdiv(slot_keys, rb))](
            self.slot_pj, self.tend, gi.kv_order, blocks.kstart, blocks.klen, self.scratch[0], self.scratch[1], dk, dv,
            blocks.n, hk0, nkv, hkv, slot_keys, RB=rb, D=d, ACC_KV=acc_kv, KV_ONE=kv_one, num_warps=4,
        )


def _balanced(n: int, most: int) -> int:
    """Heads a launch for ``n`` heads in launches of at most ``most``: as few launches as ``most``
    gives, made as even as they can be (never more than ``most``). The transient memory is the
    largest launch's: at 32K, 16/4 heads, d=64, a 1 GiB bound held 3 KV heads' rows and then 1
    (~0.8 GB of rows); 2 and 2 hold ~0.55 GB."""
    return cdiv(n, cdiv(n, most))


def _head_chunks(tq: int, hkv: int, g: int, width: int, d: int, elem: int, fp32_dq: bool,
                 cfg: BwdConfig, slot_elem: int = 4) -> list[tuple[int, int, int, int, bool]]:
    """The backward's launches as ``(hk0, nkv, h0, hc, acc_kv)``: KV heads ``[hk0, hk0 + nkv)``,
    query heads ``[h0, h0 + hc)``, and whether dK/dV add to an earlier launch's. As many KV heads
    per launch as keep its scratch within ``cfg.dq_chunk_bytes``: a half dq's fp32 scratch
    (``4 D`` bytes per token and query head) and, with ``gather_rows``, the rows copied in bucket
    order (q, dO, lse, delta, position) and with ``dq_rows`` an fp32 dQ row (with or without the
    copy): ``row_bytes`` per token, query head and slot; with ``dq_slots`` the slot buffer
    (``slot_elem * D`` bytes per token, query head and slot) replaces the fp32 scratch. One KV
    head is the smallest launch unless ``cfg.split_group``, which then splits its GQA group into
    launches of fewer query heads."""
    scratch_qh = 0 if fp32_dq else tq * d * 4  # bytes per query head
    if cfg.dq_slots:
        scratch_qh = tq * width * d * slot_elem
    row_bytes = (2 * d * elem + 12 if cfg.gather_rows else 0) + (4 * d if cfg.dq_rows else 0)
    rows_qh = tq * width * row_bytes
    per_qh = max(scratch_qh, rows_qh)
    limit = max(cfg.dq_chunk_bytes, 1)
    if cfg.split_group and g > 1 and per_qh * g > limit:
        qc = _balanced(g, max(1, min(g, limit // max(per_qh, 1))))
        return [(hk, 1, hk * g + i0, min(qc, g - i0), i0 > 0) for hk in range(hkv) for i0 in range(0, g, qc)]
    # as many whole KV heads as fit the bound (at least one): a launch never exceeds it unless a
    # single KV head's group does (a ceil-divided head count could: 5 launches of 16 heads at
    # 4 heads each hold 4/3.2 of the bound)
    hkc = hkv if not per_qh else _balanced(hkv, max(1, min(hkv, limit // (per_qh * g))))
    spans = [(hk0, min(hkc, hkv - hk0)) for hk0 in range(0, hkv, hkc)]
    return [(hk0, nkv, hk0 * g, nkv * g, False) for hk0, nkv in spans]
