"""Triton kernels: block-sparse MoBA attention forward (key-block-major, gathered queries).

Work unit: one tile of up to ``BM`` *entries* of one bucket (query head ``h``, key block
``g``), i.e. ``BM`` query rows that all selected block ``g``, gathered into a dense tile and
multiplied with the block's keys in sub-tiles of ``BN``. Every tile has the same size, so a
1-D grid is balanced however unevenly blocks are selected.

A query's blocks are spread over several programs, so the softmax is done in two passes:

1. ``PASS=1``: per entry, the log-sum-exp of the query's scores over that block (online over
   the block's key sub-tiles), stored at ``part[t, h, w]`` (fp32, ``T*Hq*W`` floats);
2. host: ``lse[t, h] = logsumexp_w part[t, h, w]`` (fp32);
3. ``PASS=2``: per entry, ``exp(s - lse) @ V`` (already normalised, so partial sums from
   different blocks simply add) accumulated into an fp32 ``[T, Hq, D]`` buffer with atomic
   adds, one ``D``-vector per entry and key block.

Cost: three matrix products per entry-block instead of two (QK^T twice), plus one fp32 atomic
row per entry; no ``[T, Hq, W, D]`` partial outputs are ever stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_cp.ops.moba.triton_common import _ld

from moba_cp.ops.moba.triton_common import GatherIndex, KeyBlocks

__all__ = ["sparse_attn_fwd", "fwd_tile_m"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _fwd_rows(Q, QPOS, ENT, LSE, r0, r_end, h, H, W, stride_qt, stride_qh,
              BM: tl.constexpr, D: tl.constexpr, PASS: tl.constexpr):
    """Gather BM entries [r0, r0+BM) of a bucket: rows, query tile, positions (and lse)."""
    rr = r0 + tl.arange(0, BM)
    rmask = rr < r_end
    ent = tl.load(ENT + rr, mask=rmask, other=0)
    t64 = (ent // W).to(tl.int64)
    w = ent % W
    d = tl.arange(0, D)
    q = tl.load(Q + t64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    qp = tl.load(QPOS + t64, mask=rmask, other=0)
    lse2 = tl.zeros([BM], dtype=tl.float32)
    if PASS == 2:
        lse2 = tl.load(LSE + t64 * H + h, mask=rmask, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    return rmask, t64, w, q, qp, lse2


@triton.jit
def _fwd_kernel(
    Q, K, V, QPOS, ENT, OFFS, TILE_B, TILE_START, KSTART, KPOS, KLEN, LSE, PART, OACC,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    H, W, NBK, G, scale_log2, CHUNK,
    PASS: tl.constexpr, SINGLE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):
    # One program = one chunk of up to CHUNK entries of one bucket (head h, key block g),
    # walked in BM-row tiles; with SINGLE (block <= BN keys) K/V are loaded once per chunk.
    pid = tl.program_id(0)
    b = tl.load(TILE_B + pid)
    c0 = _ld(TILE_START + pid)
    c1 = tl.minimum(_ld(OFFS + b + 1), c0 + CHUNK)
    h = b // NBK
    g = b % NBK
    hk = h // G
    d = tl.arange(0, D)
    ks = tl.load(KSTART + g).to(tl.int64)
    kp0 = tl.load(KPOS + g)
    kl = _ld(KLEN + g)
    nn = tl.arange(0, BN)
    if SINGLE:
        kmask = nn < kl
        k = tl.load(K + (ks + nn)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kmask[:, None], other=0.0)
        if PASS == 2:
            v = tl.load(V + (ks + nn)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kmask[:, None], other=0.0)
        for r0 in range(c0, c1, BM):
            rmask, t64, w, q, qp, lse2 = _fwd_rows(Q, QPOS, ENT, LSE, r0, c1, h, H, W, stride_qt, stride_qh, BM, D, PASS)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            ok = kmask[None, :] & ((kp0 + nn)[None, :] <= qp[:, None])
            if PASS == 1:
                s = tl.where(ok, s, float("-inf"))
                m = tl.max(s, axis=1)
                m_safe = tl.where(m == float("-inf"), 0.0, m)
                l = tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                lse = tl.where(l > 0, (m_safe + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453, float("-inf"))
                tl.store(PART + (t64 * H + h) * W + w, lse, mask=rmask)
            else:
                p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
                acc = tl.dot(p.to(V.dtype.element_ty), v, input_precision=PREC)
                tl.atomic_add(OACC + (t64[:, None] * H + h) * D + d[None, :], acc, mask=rmask[:, None], sem="relaxed")
    else:
        for r0 in range(c0, c1, BM):
            rmask, t64, w, q, qp, lse2 = _fwd_rows(Q, QPOS, ENT, LSE, r0, c1, h, H, W, stride_qt, stride_qh, BM, D, PASS)
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
                tl.store(PART + (t64 * H + h) * W + w, lse, mask=rmask)
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


#: Tile shapes of the forward (and of the non-fused dQ kernel, which shares its tiles).
#: ``bm`` rows per gathered tile, ``bn`` keys per sub-tile (None: whole block up to 128).
#: ``chunk`` entries per program (a multiple of ``bm``; the gather index is cut in chunks).
CONFIG = {"bm": 64, "bn": 64, "chunk": 256, "num_warps": 4, "num_stages": 2}


def fwd_tile_m(d: int) -> int:
    """Entries per program chunk; the gather index is built with this."""
    return CONFIG["chunk"]


def _bn(block_size: int, d: int) -> int:
    """Keys per sub-tile: a whole block of up to 128 keys, so B=128 needs one step."""
    return min(128, triton.next_power_of_2(block_size))


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
    fwd_bn: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of ``q`` over the key blocks its entries selected.

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]`` (same dtype; last dim contiguous).
        qpos: int32 ``[Tq]`` query positions (same space as ``blocks.kpos``).
        blocks: key-block table; gi: gather index of the selection (``BM = fwd_tile_m``).
        width: ``W`` of the selection the index was built from.
    Returns:
        ``o [Tq, Hq, D]`` (q's dtype; 0 for rows without keys) and ``lse [Tq, Hq]`` fp32
        (``-inf`` for rows without keys).
    """
    tq, hq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    bm = CONFIG["bm"]
    bn = fwd_bn or CONFIG["bn"] or _bn(block_size, d)
    single = block_size <= bn
    nw, ns = CONFIG["num_warps"], CONFIG["num_stages"]
    part = torch.full((tq, hq, max(width, 1)), float("-inf"), dtype=torch.float32, device=dev)
    oacc = torch.zeros(tq, hq, d, dtype=torch.float32, device=dev)
    scale_log2 = softmax_scale * LOG2E
    common = (q, k, v, qpos, gi.ent, gi.offs, gi.tile_b, gi.tile_start, blocks.kstart, blocks.kpos, blocks.klen)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    if gi.n_tiles > 0:
        _fwd_kernel[(gi.n_tiles,)](
            *common, part, part, oacc, *strides, hq, width, blocks.n, hq // hkv, scale_log2, fwd_tile_m(d),
            PASS=1, SINGLE=single, BM=bm, BN=bn, D=d, PREC=prec, num_warps=nw, num_stages=ns,
        )
    lse = torch.logsumexp(part, dim=-1)  # all -inf rows -> -inf
    if gi.n_tiles > 0:
        _fwd_kernel[(gi.n_tiles,)](
            *common, lse, part, oacc, *strides, hq, width, blocks.n, hq // hkv, scale_log2, fwd_tile_m(d),
            PASS=2, SINGLE=single, BM=bm, BN=bn, D=d, PREC=prec, num_warps=nw, num_stages=ns,
        )
    return oacc.to(q.dtype), lse
