"""Triton kernel: MoBA attention forward, query-major (``FwdConfig.method = "query_major"``).

Work unit: ``BM`` consecutive query rows of one head, as a dense tile (no gather). The program
walks the union of the key blocks its rows selected, in ascending block id, and for each block
streams the block's keys in ``BN``-key sub-tiles with an online softmax, masking per row: a row
that did not select the block, or a key after the row's position, gets ``-inf``. ``o`` and
``lse`` are written once per row, so there is no gather index, no partial outputs and no merge.

Why: on short calls the partials forward's fixed costs (the gather index: a sort and four small
kernels; the partials and their merge) are a real share of its time (4 x 8K tokens, 6 heads,
d=64, block 512, top-3 in 8K training on one H200: index and merge ~0.13 of the ~0.46 ms of a
forward's kernels, the tile kernel 0.27, the selection 0.06). The price is work: every row of
a tile is multiplied with every block of the tile's union, so the products grow with
``BM x |union|`` instead of each row's own ``W`` blocks (``moba-cp analyze selection
--tile-rows`` measures that ratio on a trained model). The backward builds the gather index from
the selection, as after the ``one_pass`` forward.

The next block is the smallest selected id above the current one (one min-reduction over the
``[BM, W]`` selection tile per block), so the loop runs exactly ``|union|`` times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_cp.ops.launch_math import cdiv, next_power_of_2
from moba_cp.ops.moba.triton_attn_fwd import _attn_step
from moba_cp.ops.moba.triton_common import KeyBlocks, _ld
from moba_cp.ops.moba.triton_config import FwdConfig

__all__ = ["sparse_attn_fwd_query_major"]

LOG2E = 1.4426950408889634
_NONE = tl.constexpr(2147483647)  # "no further block" (int32 max)


@triton.jit
def _fwd_qmajor_kernel(
    Q, K, V, QPOS, SEL, BASE, KSTART, KPOS, KLEN, O, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    T, H, W, NT, G, scale_log2,
    HAS_BASE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WP: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid % H
    tile = NT - 1 - pid // H  # late tiles (the most past blocks) start first
    hk = h // G
    rows = tile * BM + tl.arange(0, BM)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    d = tl.arange(0, D)
    nn = tl.arange(0, BN)
    q = tl.load(Q + r64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    qp = tl.load(QPOS + rows, mask=rmask, other=0)
    w = tl.arange(0, WP)
    sel = tl.load(SEL + (r64 * H + h)[:, None] * W + w[None, :], mask=rmask[:, None] & (w < W)[None, :], other=-1)
    if HAS_BASE:
        # document-local ids -> global block ids (KSTART, KPOS, KLEN are indexed globally)
        sel = tl.where(sel >= 0, sel + tl.load(BASE + rows, mask=rmask, other=0)[:, None], -1)
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    g = tl.min(tl.where(sel >= 0, sel, _NONE))
    while g < _NONE:
        hit = tl.max((sel == g).to(tl.int32), axis=1) > 0  # the rows that selected block g
        # a row that did not select g gets position -1: the causal mask then hides every key
        qp_g = tl.where(hit, qp, -1)
        ks = tl.load(KSTART + g).to(tl.int64)
        kp0 = tl.load(KPOS + g)
        kl = _ld(KLEN + g)  # 0 for a block of another source (CP slot namespace): nothing to add
        for n0 in range(0, kl, BN):
            m, l, acc = _attn_step(q, K, V, ks, n0 + nn, kl, hk, stride_kt, stride_kh, stride_vt, stride_vh, kp0,
                                   qp_g, m, l, acc, scale_log2, D, True, PREC)
        g = tl.min(tl.where(sel > g, sel, _NONE))
    has = l > 0
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))
    o = acc / tl.where(has, l, 1.0)[:, None]
    tl.store(O + r64[:, None] * stride_ot + h * stride_oh + d[None, :], o.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(LSE + r64 * H + h, lse, mask=rmask)


def sparse_attn_fwd_query_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor,
                                blocks: KeyBlocks, sel: torch.Tensor, base: torch.Tensor | None,
                                softmax_scale: float, cfg: FwdConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-major forward; the contract of :func:`~moba_cp.ops.moba.triton_attn_fwd.sparse_attn_fwd`,
    from the selection instead of a gather index (as ``sparse_attn_fwd_onepass``).

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]`` (last dim contiguous).
        qpos: int32 ``[Tq]`` query positions (the space of ``blocks.kpos``).
        sel: int32 ``[Tq, Hq, W]`` selected block ids (``-1`` = none); ``base`` int32 ``[Tq]`` is
            added to make them global (None: already global, e.g. CP slot ids).
        cfg: ``bm`` rows a program, ``bn`` keys a sub-tile (0: 64), warps and stages.
    Returns:
        ``o [Tq, Hq, D]`` (q's dtype; 0 for rows without keys) and ``lse [Tq, Hq]`` fp32 (``-inf``
        for rows without keys).
    """
    tq, hq, d = q.shape
    hkv = k.shape[1]
    w = sel.shape[-1]
    o = torch.empty_like(q)
    lse = torch.empty(tq, hq, dtype=torch.float32, device=q.device)
    if tq * hq == 0:
        return o, lse
    if blocks.n == 0 or w == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    sel = sel.to(torch.int32).contiguous()
    nt = cdiv(tq, cfg.bm)
    _fwd_qmajor_kernel[(nt * hq,)](
        q, k, v, qpos, sel, base if base is not None else sel, blocks.kstart, blocks.kpos, blocks.klen, o, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        tq, hq, w, nt, hq // hkv, softmax_scale * LOG2E,
        HAS_BASE=base is not None, BM=cfg.bm, BN=cfg.bn or 64, D=d, WP=next_power_of_2(w),
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse
