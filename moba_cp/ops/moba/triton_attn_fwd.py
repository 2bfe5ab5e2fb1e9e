"""Triton kernels: block-sparse MoBA attention forward (key-block-major, gathered queries).

Work unit: one tile of up to ``BM`` *entries* of one bucket (query head ``h``, key block
``g``), i.e. ``BM`` query rows that all selected block ``g``, gathered into a dense tile and
multiplied with the block's keys in sub-tiles of ``BN``. Every tile has the same size, so a
1-D grid is balanced however unevenly blocks are selected.

A query's blocks are spread over several programs, so the softmax over a row's blocks is
combined in one of three ways (``FwdConfig.method``, chosen from the shape by
``triton_config.choose_config``):

* ``partials``: each program streams its gathered rows over the block's keys with an online
  softmax (two products per key tile, like a dense flash kernel) and writes each entry's
  normalised partial output (fp32) and LSE; a merge kernel combines a row's ``W`` partials by
  LSE. The partials exist for one chunk of query heads at a time (bounded memory). A block that
  fits one key sub-tile (blocks of up to 128 keys with ``bn=0``) stays in registers for the
  program's whole chunk of rows; there the partials' bytes bound the kernel, so the default
  writes them in q's half dtype (``half_partials``).
* ``two_pass``: pass 1 stores each entry's LSE, a small kernel reduces them per row, pass 2
  adds the normalised ``exp(s - lse) @ V`` into an fp32 ``o`` with atomics (three products per
  key tile, no partial buffer).
* ``one_pass``: a program owns a chunk of tokens of one head and walks the key blocks in order,
  keeping each row's online-softmax state in fp32 scratch (no atomics, no partials).

In the partials forward (and the backward's dQ kernel) key sub-tiles that every row of a tile
sees in full (all of a past block's) skip the causal mask; only the own block's diagonal (and
a short last block) pays for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moba_cp.ops.launch_math import cdiv, next_power_of_2
from moba_cp.ops.moba.triton_common import (GatherIndex, KeyBlocks, _head_chunk_pid, _key_span, _ld, _load_kv, _tile_rows,
                                            reg_cap)
from moba_cp.ops.moba.triton_config import FwdConfig

__all__ = ["sparse_attn_fwd", "sparse_attn_fwd_onepass", "build_chunk_index", "partial_heads_per_launch"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _fwd_rows(Q, QPOS, ENT, LSE, r0, r_end, h, H, W, stride_qt, stride_qh,
              BM: tl.constexpr, D: tl.constexpr, PASS: tl.constexpr):
    """Gather BM entries [r0, r0+BM) of a bucket: rows, query tile, positions (and lse).
    ``ent`` is the flat selection index ``(t * H + h) * W + w``, i.e. also the PART offset."""
    rr = r0 + tl.arange(0, BM)
    rmask = rr < r_end
    ent = tl.load(ENT + rr, mask=rmask, other=0)
    t64 = (ent // (H * W)).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + t64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    qp = tl.load(QPOS + t64, mask=rmask, other=0)
    lse2 = tl.zeros([BM], dtype=tl.float32)
    if PASS == 2:
        lse2 = tl.load(LSE + t64 * H + h, mask=rmask, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    return rmask, t64, ent, q, qp, lse2


@triton.jit
def _fwd_kernel(
    Q, K, V, QPOS, ENT, OFFS, TILE_B, TILE_START, KSTART, KPOS, KLEN, LSE, PART, OACC,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    H, W, NBK, G, scale_log2, CHUNK,
    PASS: tl.constexpr, SINGLE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr, ATOMIC: tl.constexpr = True,
):
    # One program = one chunk of up to CHUNK entries of one bucket (head h, key block g),
    # walked in BM-row tiles; with SINGLE (block <= BN keys) K/V are loaded once per chunk.
    pid = tl.program_id(0)
    if tl.load(TILE_B + pid) < 0:  # the grid is a static upper bound on the tiles; surplus programs stop here
        return
    b, c0, c1 = _tile_rows(TILE_B, TILE_START, OFFS, pid, CHUNK)
    h = b // NBK
    g = b % NBK
    hk = h // G
    d = tl.arange(0, D)
    kl = _ld(KLEN + g)
    if kl == 0:  # a block of another source (CP slot namespace): PART stays -inf, adds nothing
        return
    ks = tl.load(KSTART + g).to(tl.int64)
    kp0 = tl.load(KPOS + g)
    nn = tl.arange(0, BN)
    if SINGLE:
        kmask = nn < kl
        k = tl.load(K + (ks + nn)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kmask[:, None], other=0.0)
        if PASS == 2:
            v = tl.load(V + (ks + nn)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kmask[:, None], other=0.0)
        for r0 in range(c0, c1, BM):
            rmask, t64, ent, q, qp, lse2 = _fwd_rows(Q, QPOS, ENT, LSE, r0, c1, h, H, W, stride_qt, stride_qh, BM, D, PASS)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            ok = kmask[None, :] & ((kp0 + nn)[None, :] <= qp[:, None])
            if PASS == 1:
                s = tl.where(ok, s, float("-inf"))
                m = tl.max(s, axis=1)
                m_safe = tl.where(m == float("-inf"), 0.0, m)
                l = tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                lse = tl.where(l > 0, (m_safe + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453, float("-inf"))
                tl.store(PART + ent, lse, mask=rmask)
            else:
                p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
                acc = tl.dot(p.to(V.dtype.element_ty), v, input_precision=PREC)
                if ATOMIC:
                    tl.atomic_add(OACC + (t64[:, None] * H + h) * D + d[None, :], acc, mask=rmask[:, None], sem="relaxed")
                else:  # diagnostic only (wrong sums): measures what the atomics cost
                    tl.store(OACC + (t64[:, None] * H + h) * D + d[None, :], acc, mask=rmask[:, None])
    else:
        for r0 in range(c0, c1, BM):
            rmask, t64, ent, q, qp, lse2 = _fwd_rows(Q, QPOS, ENT, LSE, r0, c1, h, H, W, stride_qt, stride_qh, BM, D, PASS)
            if PASS == 1:
                m = tl.full([BM], float("-inf"), dtype=tl.float32)
                l = tl.zeros([BM], dtype=tl.float32)
                for n0 in range(0, kl, BN):
                    kk = n0 + nn
                    kmask = kk < kl
                    k = tl.load(K + (ks + kk)[:, None] * stride_kt + hk * stride_kh + d[None, :],
                                mask=kmask[:, None], other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
                    ok = kmask[None, :] & ((kp0 + kk)[None, :] <= qp[:, None])
                    s = tl.where(ok, s, float("-inf"))
                    m_new = tl.maximum(m, tl.max(s, axis=1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                    m = m_new
                lse = tl.where(l > 0, (m + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453, float("-inf"))
                tl.store(PART + ent, lse, mask=rmask)
            else:
                acc = tl.zeros([BM, D], dtype=tl.float32)
                for n0 in range(0, kl, BN):
                    kk = n0 + nn
                    kmask = kk < kl
                    k = tl.load(K + (ks + kk)[:, None] * stride_kt + hk * stride_kh + d[None, :],
                                mask=kmask[:, None], other=0.0)
                    v = tl.load(V + (ks + kk)[:, None] * stride_vt + hk * stride_vh + d[None, :],
                                mask=kmask[:, None], other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
                    ok = kmask[None, :] & ((kp0 + kk)[None, :] <= qp[:, None])
                    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
                    acc += tl.dot(p.to(V.dtype.element_ty), v, input_precision=PREC)
                tl.atomic_add(OACC + (t64[:, None] * H + h) * D + d[None, :], acc, mask=rmask[:, None], sem="relaxed")


@triton.jit
def _lse_kernel(PART, LSE, n_rows, W, BR: tl.constexpr, WP: tl.constexpr):
    # lse[r] = logsumexp_w part[r, w] in fp32 (all -inf -> -inf): one launch instead of torch's
    # several for logsumexp.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    w = tl.arange(0, WP)
    m2 = (r < n_rows)[:, None] & (w < W)[None, :]
    x = tl.load(PART + r.to(tl.int64)[:, None] * W + w[None, :], mask=m2, other=float("-inf"))
    m = tl.max(x, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    tl.store(LSE + r, tl.where(l > 0, m_safe + tl.log(tl.where(l > 0, l, 1.0)), float("-inf")), mask=r < n_rows)


def _key_bn(cfg: FwdConfig, block_size: int) -> int:
    """Keys per sub-tile: ``cfg.bn``, or (0) a whole block of up to 128 keys."""
    return cfg.bn or min(128, next_power_of_2(block_size))


def sparse_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qpos: torch.Tensor,
    blocks: KeyBlocks,
    gi: GatherIndex,
    width: int,
    softmax_scale: float,
    block_size: int,
    cfg: FwdConfig,
    diag_pass: int | None = None,
    diag_no_atomic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of ``q`` over the key blocks its entries selected (``two_pass``
    or ``partials``, by ``cfg.method``).

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]`` (same dtype; last dim contiguous).
        qpos: int32 ``[Tq]`` query positions (same space as ``blocks.kpos``).
        blocks: key-block table; gi: gather index of the selection (built with ``cfg.chunk``).
        width: ``W`` of the selection the index was built from.
        diag_pass, diag_no_atomic: timing diagnostics (benchmarks only): run one pass of the
            two-pass form (1 or 2), or the partials form's tile kernel alone (1; no merge, so o
            and lse are not written); store instead of add in the two-pass form's second pass (wrong sums).
    Returns:
        ``o [Tq, Hq, D]`` (q's dtype; 0 for rows without keys) and ``lse [Tq, Hq]`` fp32
        (``-inf`` for rows without keys).
    """
    if gi.chunk != cfg.chunk:
        raise ValueError(f"sparse_attn_fwd: the gather index was cut in chunks of {gi.chunk}, the config "
                         f"walks chunks of {cfg.chunk}; build the index with the same config")
    if cfg.method == "partials":
        return _sparse_attn_fwd_partials(q, k, v, qpos, blocks, gi, width, softmax_scale, block_size, cfg, diag_pass)
    tq, hq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    bn = _key_bn(cfg, block_size)
    single = block_size <= bn
    part = torch.full((tq, hq, max(width, 1)), float("-inf"), dtype=torch.float32, device=dev)
    oacc = torch.zeros(tq, hq, d, dtype=torch.float32, device=dev)
    scale_log2 = softmax_scale * LOG2E
    common = (q, k, v, qpos, gi.ent, gi.offs, gi.tile_b, gi.tile_start, blocks.kstart, blocks.kpos, blocks.klen)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    launch = dict(SINGLE=single, BM=cfg.bm, BN=bn, D=d, PREC=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if gi.n_tiles > 0 and diag_pass in (None, 1):
        _fwd_kernel[(gi.n_tiles,)](
            *common, part, part, oacc, *strides, hq, width, blocks.n, hq // hkv, scale_log2, cfg.chunk,
            PASS=1, **launch,
        )
    lse = torch.empty(tq, hq, dtype=torch.float32, device=dev)
    if tq * hq > 0:
        wp = next_power_of_2(max(width, 1))
        _lse_kernel[(cdiv(tq * hq, 128),)](part, lse, tq * hq, max(width, 1), BR=128, WP=wp, num_warps=4)
    if gi.n_tiles > 0 and diag_pass in (None, 2):
        _fwd_kernel[(gi.n_tiles,)](
            *common, lse, part, oacc, *strides, hq, width, blocks.n, hq // hkv, scale_log2, cfg.chunk,
            PASS=2, ATOMIC=not diag_no_atomic, **launch,
        )
    return oacc.to(q.dtype), lse


# ----------------------------------------------------------------------------- partials
# One pass over the same gathered tiles: a program streams its rows over the block's keys with
# an online softmax (two products per key tile, as a dense flash kernel) and writes, per entry,
# the normalised partial output (fp32) and its LSE; a merge kernel then combines each row's
# ``W`` partials by LSE. Key sub-tiles that every row of the tile sees in full (all of them
# for a past block) run without a mask; only the own block's diagonal pays for one.


@triton.jit
def _attn_step(q, K, V, ks, kk, kl, hk, stride_kt, stride_kh, stride_vt, stride_vh, kp0, qp, m, l, acc,
               scale_log2, D: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step of a gathered tile over keys ``kk`` of a block (log2 domain)."""
    k, v = _load_kv(K, V, ks, kk, kl, hk, stride_kt, stride_kh, stride_vt, stride_vh, D, MASK)
    return _softmax_step(q, k, v, kk, kl, kp0, qp, m, l, acc, scale_log2, MASK, PREC)


@triton.jit
def _softmax_step(q, k, v, kk, kl, kp0, qp, m, l, acc, scale_log2, MASK: tl.constexpr, PREC: tl.constexpr):
    """The online-softmax update of a gathered tile ``q [BM, D]`` with one key sub-tile
    ``k, v [BN, D]`` (keys ``kk`` of the block; log2 domain)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    if MASK:
        ok = (kk < kl)[None, :] & ((kp0 + kk)[None, :] <= qp[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = m_new
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l, acc


@triton.jit
def _store_partial(PO, PL, t64, ent, rmask, h, H0, HC, W, m, l, acc, D: tl.constexpr):
    """An entry tile's normalised partial output and LSE (log2-domain max ``m``, sum ``l``) into
    its slots ``(t * HC + h - H0) * W + w`` of the head chunk's partials."""
    has = l > 0
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
    o = acc / tl.where(has, l, 1.0)[:, None]
    slot = (t64 * HC + (h - H0)) * W + (ent % W)
    d = tl.arange(0, D)
    tl.store(PL + slot, lse, mask=rmask)
    tl.store(PO + slot[:, None] * D + d[None, :], o.to(PO.dtype.element_ty), mask=rmask[:, None])


@triton.jit(do_not_specialize=["H0", "HC"])
def _fwd_partial_kernel(
    Q, K, V, QPOS, ENT, OFFS, TEND, TILE_B, TILE_START, KSTART, KPOS, KLEN, PO, PL,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    H, W, NBK, G, H0, HC, scale_log2, CHUNK, KD, VD,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, SINGLE: tl.constexpr = False,
    TMA_KV: tl.constexpr = False,
):
    # SINGLE (the block fits one BN sub-tile, e.g. 128-key blocks): K and V are loaded once per
    # program and every row tile of its chunk reuses them; a row's softmax over one sub-tile
    # needs no running rescale. TMA_KV: KD, VD are tensor descriptors of K, V as rows of tokens
    # (head hk's features at columns hk * stride_h ...) in [BN, D] boxes; the unmasked sub-tiles
    # come through them.
    pid, live = _head_chunk_pid(TEND, H0, HC, NBK)
    if not live:
        return
    b, c0, c1 = _tile_rows(TILE_B, TILE_START, OFFS, pid, CHUNK)
    h = b // NBK
    g = b % NBK
    hk = h // G
    kl = _ld(KLEN + g)
    if kl == 0:  # a block of another source (CP slot namespace): PL stays -inf
        return
    ks = tl.load(KSTART + g).to(tl.int64)
    kp0 = tl.load(KPOS + g)
    nn = tl.arange(0, BN)
    if SINGLE:
        k, v = _load_kv(K, V, ks, nn, kl, hk, stride_kt, stride_kh, stride_vt, stride_vh, D, True)
        for r0 in range(c0, c1, BM):
            rmask, t64, ent, q, qp, _ = _fwd_rows(Q, QPOS, ENT, PL, r0, c1, h, H, W, stride_qt, stride_qh, BM, D, 1)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            # A tile whose every row sees the whole (full) block, as a bucket's rows of later
            # blocks do, needs no mask. Offline at FlashMoBA (d=128, 64-row tiles;
            # benchmarks/sass_loops.py) a masked tile needs 1898 ALU clocks and 1873 issue
            # slots, an unmasked one 1212 and 1530 (the test for it costs a row minimum).
            n_full, _ = _key_span(qp, rmask, kp0, kl, BN)
            if n_full < BN:
                s = tl.where((nn < kl)[None, :] & ((kp0 + nn)[None, :] <= qp[:, None]), s, float("-inf"))
            m = tl.max(s, axis=1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(s - m_safe[:, None])
            l = tl.sum(p, axis=1)
            acc = tl.dot(p.to(V.dtype.element_ty), v, input_precision=PREC)
            _store_partial(PO, PL, t64, ent, rmask, h, H0, HC, W, m_safe, l, acc, D)
    else:  # (an if/else, not a return inside the constexpr branch: the compiler refuses that)
        for r0 in range(c0, c1, BM):
            rmask, t64, ent, q, qp, _ = _fwd_rows(Q, QPOS, ENT, PL, r0, c1, h, H, W, stride_qt, stride_qh, BM, D, 1)
            n_full, n_hi = _key_span(qp, rmask, kp0, kl, BN)
            m = tl.full([BM], float("-inf"), dtype=tl.float32)
            l = tl.zeros([BM], dtype=tl.float32)
            acc = tl.zeros([BM, D], dtype=tl.float32)
            if TMA_KV:
                row0 = ks.to(tl.int32)
                for n0 in range(0, n_full, BN):
                    k = KD.load([row0 + n0, hk * stride_kh])
                    v = VD.load([row0 + n0, hk * stride_vh])
                    m, l, acc = _softmax_step(q, k, v, n0 + nn, kl, kp0, qp, m, l, acc, scale_log2, False, PREC)
            else:
                for n0 in range(0, n_full, BN):
                    m, l, acc = _attn_step(q, K, V, ks, n0 + nn, kl, hk, stride_kt, stride_kh, stride_vt, stride_vh,
                                           kp0, qp, m, l, acc, scale_log2, D, False, PREC)
            for n0 in range(n_full, n_hi, BN):
                m, l, acc = _attn_step(q, K, V, ks, n0 + nn, kl, hk, stride_kt, stride_kh, stride_vt, stride_vh,
                                       kp0, qp, m, l, acc, scale_log2, D, True, PREC)
            _store_partial(PO, PL, t64, ent, rmask, h, H0, HC, W, m, l, acc, D)


@triton.jit(do_not_specialize=["H0", "HC"])
def _merge_kernel(PO, PL, O, LSE, n_rows, H, H0, HC, W, stride_ot, stride_oh,
                  BR: tl.constexpr, WP: tl.constexpr, D: tl.constexpr, UNROLL: tl.constexpr = False,
                  AT_ONCE: tl.constexpr = False):
    # Rows r = t * HC + (h - H0) of one head chunk: o = sum_w exp(lse_w - lse) o_w, in fp32.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = r < n_rows
    r64 = r.to(tl.int64)
    w = tl.arange(0, WP)
    d = tl.arange(0, D)
    if AT_ONCE:
        # FwdConfig.merge_at_once: every partial of the program's rows in one load issued first,
        # masked by nothing the LSEs decide, so it is in flight with the LSE load (a slot nobody
        # wrote holds whatever memory held: selected away below, never multiplied in)
        po3 = tl.load(PO + ((r64[:, None] * W + w[None, :])[:, :, None] * D + d[None, None, :]),
                      mask=(rm[:, None] & (w < W)[None, :])[:, :, None], other=0.0)
    pl = tl.load(PL + r64[:, None] * W + w[None, :], mask=rm[:, None] & (w < W)[None, :], other=float("-inf"))
    m = tl.max(pl, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lsum = tl.sum(tl.exp(pl - m_safe[:, None]), axis=1)
    lse = tl.where(lsum > 0, m_safe + tl.log(tl.where(lsum > 0, lsum, 1.0)), float("-inf"))
    lse_safe = tl.where(lsum > 0, lse, 0.0)
    acc = tl.zeros([BR, D], dtype=tl.float32)
    if AT_ONCE:
        live = pl > float("-inf")
        wt = tl.where(live, tl.exp(pl - lse_safe[:, None]), 0.0)
        acc = tl.sum(tl.where(live[:, :, None], wt[:, :, None] * po3.to(tl.float32), 0.0), axis=1)
    elif UNROLL:  # slots past W are masked: they load nothing and add exact zeros
        for j in tl.static_range(WP):
            pj = tl.load(PL + r64 * W + j, mask=rm & (j < W), other=float("-inf"))
            live = pj > float("-inf")
            wt = tl.where(live, tl.exp(pj - lse_safe), 0.0)
            po = tl.load(PO + (r64 * W + j)[:, None] * D + d[None, :], mask=(rm & live)[:, None], other=0.0)
            acc += wt[:, None] * po.to(tl.float32)
    else:
        for j in range(0, W):
            pj = tl.load(PL + r64 * W + j, mask=rm, other=float("-inf"))
            live = pj > float("-inf")
            wt = tl.where(live, tl.exp(pj - lse_safe), 0.0)
            po = tl.load(PO + (r64 * W + j)[:, None] * D + d[None, :], mask=(rm & live)[:, None], other=0.0)
            acc += wt[:, None] * po.to(tl.float32)
    t = r64 // HC
    h = H0 + r % HC
    tl.store(O + (t * stride_ot + h * stride_oh)[:, None] + d[None, :], acc.to(O.dtype.element_ty), mask=rm[:, None])
    tl.store(LSE + t * H + h, lse, mask=rm)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, bn: int):
    """Tensor descriptors of ``k``, ``v [T, Hkv, D]`` (``FwdConfig.tma_kv``) as 2-D tensors of rows
    (tokens, stride ``x.stride(0)``) and columns (head ``h``'s features at ``h * x.stride(1)``),
    in ``[bn, D]`` boxes. Any head stride works, so views such as Megatron's V (a slice of the
    fused QKV projection) need no copy; TMA needs 16-byte aligned base and strides."""
    descs = []
    for name, x in (("k", k), ("v", v)):
        t, hkv, d = x.shape
        elt = x.element_size()
        # one KV head: its stride is never used (column 0), so any value a view gives it is fine
        heads_ok = hkv == 1 or (x.stride(1) >= d and (x.stride(1) * elt) % 16 == 0)
        ok = x.stride(2) == 1 and heads_ok and (x.stride(0) * elt) % 16 == 0 and x.data_ptr() % 16 == 0
        if not ok:
            raise ValueError(f"FwdConfig.tma_kv=True reads {name} through a tensor descriptor, which needs contiguous "
                             f"features, heads apart by at least D and 16-byte aligned base and strides; got shape "
                             f"{tuple(x.shape)}, strides {tuple(x.stride())}, {elt}-byte elements. Fix: tma_kv=False, "
                             f"or pass {name}.contiguous()")
        descs.append(TensorDescriptor(x, [t, (hkv - 1) * x.stride(1) + d if hkv > 1 else d], [x.stride(0), 1], [bn, d]))
    return descs[0], descs[1]


def partial_heads_per_launch(tq: int, hq: int, w: int, d: int, part_itemsize: int, q_bytes: int,
                             cfg: FwdConfig) -> int:
    """Query heads per launch of the ``partials`` forward: as many as keep a launch's partials
    (``tq * w * d`` elements a head) within ``cfg.partial_bytes`` and, with ``cfg.partials_q_bound``,
    within q's own size (at least 256 MiB, so short calls run in one launch), so the forward's
    transient stays near the inputs'. One head is the floor. Chunking changes no bit of o or lse:
    each (row, slot) partial is computed alone and a row's partials are merged in slot order."""
    budget = cfg.partial_bytes
    if cfg.partials_q_bound:
        budget = min(budget, max(q_bytes, 256 << 20))
    per_head = tq * w * d * part_itemsize
    return max(1, min(hq, budget // max(per_head, 1)))


#: Most partial elements one ``merge_at_once`` program loads: 16 rows x 16 slots x 64 at d=64 took
#: 122 registers a thread on 4 warps (sm_90, offline); 32 rows x 16 x 128 (FlashMoBA) took 255 and spilled.
MERGE_AT_ONCE_ELEMS = 1 << 14


def merge_rows(cfg: FwdConfig, w: int, d: int) -> int:
    """Rows per merge program: ``cfg.merge_rows``; with ``merge_at_once`` at most as many as keep
    the program's ``[rows, next_pow2(w), d]`` tile within :data:`MERGE_AT_ONCE_ELEMS` (a power of two)."""
    if not cfg.merge_at_once:
        return cfg.merge_rows
    fit = max(1, MERGE_AT_ONCE_ELEMS // (next_power_of_2(w) * next_power_of_2(d)))
    return min(cfg.merge_rows, 1 << (fit.bit_length() - 1))


def _sparse_attn_fwd_partials(q, k, v, qpos, blocks: KeyBlocks, gi: GatherIndex, width: int, softmax_scale: float,
                              block_size: int, cfg: FwdConfig, diag_pass: int | None = None):
    """``partials`` forward (see :class:`FwdConfig`): per chunk of query heads, one pass of the
    tile kernel writing partials ``[T, HC, W, D]`` (fp32, or q's half dtype with
    ``cfg.half_partials``) and their fp32 LSE, then one merge in fp32."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    w = max(width, 1)
    o = torch.empty_like(q)
    lse = torch.empty(tq, hq, dtype=torch.float32, device=dev)
    if tq == 0:
        return o, lse
    part_dtype = q.dtype if cfg.half_partials and q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    hc = partial_heads_per_launch(tq, hq, w, d, part_dtype.itemsize, q.numel() * q.element_size(), cfg)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    bn = _key_bn(cfg, block_size)
    scale_log2 = softmax_scale * LOG2E
    po = torch.empty(tq * hc * w * d, dtype=part_dtype, device=dev)
    pl = torch.empty(tq * hc * w, dtype=torch.float32, device=dev)
    single = block_size <= bn
    tma_kv = cfg.tma_kv and not single  # a single-sub-tile block loads K/V once per program: no loop to feed
    kd, vd = _kv_descriptors(k, v, bn) if tma_kv else (k, v)
    br = merge_rows(cfg, w, d)
    for h0 in range(0, hq, hc):
        n = min(hc, hq - h0)
        pl[: tq * n * w].fill_(float("-inf"))
        n_tiles = tq * n * w // cfg.chunk + n * blocks.n + 1  # static bound for these heads
        if blocks.n > 0:
            _fwd_partial_kernel[(n_tiles,)](
                q, k, v, qpos, gi.ent, gi.offs, gi.tend, gi.tile_b, gi.tile_start, blocks.kstart, blocks.kpos,
                blocks.klen, po, pl, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                hq, w, blocks.n, hq // hkv, h0, n, scale_log2, cfg.chunk, kd, vd,
                BM=cfg.bm, BN=bn, D=d, PREC=prec, SINGLE=single, TMA_KV=tma_kv, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **reg_cap(cfg.maxnreg, q.device),
            )
        rows = tq * n
        if diag_pass == 1:
            continue
        _merge_kernel[(cdiv(rows, br),)](
            po, pl, o, lse, rows, hq, h0, n, w, o.stride(0), o.stride(1),
            BR=br, WP=next_power_of_2(w), D=d, UNROLL=cfg.merge_unroll, AT_ONCE=cfg.merge_at_once,
            num_warps=cfg.merge_warps,
        )
    return o, lse


# ----------------------------------------------------------------------------- one pass
# For large blocks (hundreds to thousands of keys) a FlashMoBA-like layout wins: a program
# owns one chunk of ``QC`` consecutive query tokens of one head, walks the key blocks in
# order and, per block, gathers the chunk's entries that selected it; the online-softmax
# state (m, l, acc) of those rows lives in fp32 scratch and is read/updated/written once per
# entry and block. One program owns each row, so no atomics, and one pass (two products per
# key tile instead of three). The state traffic (~1 KB per entry and block) is negligible
# next to a large block's ``B * D * 4`` flops, but not for B=128 (whole-block partials there).


@triton.jit
def _fwd_onepass_kernel(
    Q, K, V, QPOS, ENT, OFFS, KSTART, KPOS, KLEN, M, L, ACC,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    H, W, NBK, NQC, G, scale_log2,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid % H
    qc = NQC - 1 - pid // H  # late chunks (the most past blocks) start first
    hk = h // G
    b0 = (h * NQC + qc) * NBK
    d = tl.arange(0, D)
    nn = tl.arange(0, BN)
    for g in range(0, NBK):
        r_lo = _ld(OFFS + b0 + g)
        r_hi = _ld(OFFS + b0 + g + 1)
        ks = tl.load(KSTART + g).to(tl.int64)
        kp0 = tl.load(KPOS + g)
        kl = _ld(KLEN + g)
        if kl == 0:  # empty block (padding, or another CP source's slot): its rows keep their state
            r_hi = r_lo
        for r0 in range(r_lo, r_hi, BM):
            rr = r0 + tl.arange(0, BM)
            rmask = rr < r_hi
            ent = tl.load(ENT + rr, mask=rmask, other=0)
            t64 = (ent // (H * W)).to(tl.int64)
            q = tl.load(Q + t64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
            qp = tl.load(QPOS + t64, mask=rmask, other=0)
            st = t64 * H + h
            m = tl.load(M + st, mask=rmask, other=float("-inf"))
            l = tl.load(L + st, mask=rmask, other=0.0)
            acc = tl.load(ACC + st[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
            for n0 in range(0, kl, BN):
                kk = n0 + nn
                kmask = kk < kl
                k = tl.load(K + (ks + kk)[:, None] * stride_kt + hk * stride_kh + d[None, :],
                            mask=kmask[:, None], other=0.0)
                v = tl.load(V + (ks + kk)[:, None] * stride_vt + hk * stride_vh + d[None, :],
                            mask=kmask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
                ok = kmask[None, :] & ((kp0 + kk)[None, :] <= qp[:, None])
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PREC)
                m = m_new
            tl.store(M + st, m, mask=rmask)
            tl.store(L + st, l, mask=rmask)
            tl.store(ACC + st[:, None] * D + d[None, :], acc, mask=rmask[:, None])
        # The next block's rows overlap this block's rows, possibly in other threads.
        tl.debug_barrier()


def onepass_qchunk(t: int, hq: int, device, cfg: FwdConfig) -> int:
    """Tokens per one-pass program: 4096, doubled (up to 32768) while the doubled chunk still
    leaves >= 6 programs per SM. Why: a program's rows for one key block are ~``qchunk * (topk-1)
    / past blocks``, cut in 128-row tiles; at 1M tokens and block 4096 a 4096-token chunk gives
    ~177 rows per block, i.e. 2 tiles 69% full. Measured on H100 (1M, block 4096, top-k 12):
    4096 -> 3014 ms, 8192 -> 2783, 16384 -> 2722, 32768 -> 2686 ms; at 128K 4096 stays."""
    if cfg.qchunk:
        return cfg.qchunk
    dev = torch.device(device)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    qc = 4096
    while qc < 32768 and t * hq // (2 * qc) >= 6 * sms:
        qc *= 2
    return qc


def build_chunk_index(sel: torch.Tensor, base: torch.Tensor | None, nbk: int, qchunk: int):
    """CSR of entries keyed by (head, query chunk ``t // qchunk``, key block).

    Returns ``ent [E]`` int32 (flat selection index ``(t * Hq + h) * W + w``), ``offs
    [H * NQC * NBK + 1]`` int32, ``NQC``. One stable sort, bucket starts by binary search
    (no host sync).
    """
    t, hq, w = sel.shape
    dev = sel.device
    nqc = max(1, -(-t // qchunk))
    g = sel if base is None else sel + base[:, None, None]
    qc = (torch.arange(t, device=dev, dtype=torch.int32) // qchunk)[:, None, None]
    hh = torch.arange(hq, device=dev, dtype=torch.int32)[None, :, None]
    n_buckets = hq * nqc * nbk
    key = torch.where(sel >= 0, (hh * nqc + qc) * nbk + g, n_buckets).to(torch.int32).reshape(-1)
    skey, perm = torch.sort(key, stable=True)
    del key
    ent = perm.to(torch.int32)
    del perm
    offs = torch.searchsorted(skey, torch.arange(n_buckets + 1, device=dev, dtype=torch.int32), out_int32=True)
    return ent, offs, nqc


def sparse_attn_fwd_onepass(q, k, v, qpos, blocks: KeyBlocks, sel, base, softmax_scale: float, cfg: FwdConfig):
    """One-pass forward for large blocks; same contract as :func:`sparse_attn_fwd`, but
    takes the selection ``sel [Tq, Hq, W]`` (+ ``base``) and builds its own chunk index.
    Measured on H100 (benchmarks/NOTES_moba_kernels.md): at block 4096 one pass with 4 stages
    268 ms vs two passes 394 ms (128K, 32 heads); at block 512 two passes won (5.4 vs 6.5 ms
    at 32K)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    ent, offs, nqc = build_chunk_index(sel, base, blocks.n, onepass_qchunk(tq, hq, dev, cfg))
    m = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=dev)
    l = torch.zeros(tq, hq, dtype=torch.float32, device=dev)
    acc = torch.zeros(tq, hq, d, dtype=torch.float32, device=dev)
    if tq > 0 and blocks.n > 0:
        _fwd_onepass_kernel[(hq * nqc,)](
            q, k, v, qpos, ent, offs, blocks.kstart, blocks.kpos, blocks.klen, m, l, acc,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            hq, sel.shape[-1], blocks.n, nqc, hq // hkv, softmax_scale * LOG2E,
            BM=cfg.bm, BN=cfg.bn or 64, D=d, PREC="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    has = l > 0
    lse = torch.where(has, (m + torch.log2(torch.where(has, l, torch.ones_like(l)))) * LN2, float("-inf"))
    acc.div_(torch.where(has, l, torch.ones_like(l))[..., None])
    return acc.to(q.dtype), lse
