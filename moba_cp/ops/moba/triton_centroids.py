"""Triton kernel: MoBA block centroids (mean of each block's keys), varlen-aware.

Blocks are described by a *key-block table* (see ``triton_common.KeyBlocks``): block ``g``
holds key rows ``[kstart[g], kstart[g] + klen[g])`` of ``k``. For packed documents the table
cuts every document into blocks of ``B`` (the last may be short), so no block ever spans two
documents. The centroid of a short (incomplete) block is computed too (mean over ``B``, i.e.
scaled down) but is never used: an incomplete block is never a *past* block of any query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_cp.ops.launch_math import next_power_of_2
from moba_cp.ops.moba.triton_common import _ld

__all__ = ["block_centroids"]


@triton.jit
def _centroid_kernel(
    K, KSTART, KLEN, CENT,
    stride_kt, stride_kh, stride_cg, stride_ch,
    inv_block,
    CB: tl.constexpr, D: tl.constexpr,
):
    g = tl.program_id(0)
    hk = tl.program_id(1)
    ks = tl.load(KSTART + g).to(tl.int64)
    kl = _ld(KLEN + g)
    d = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    # Sum in fp32 chunk by chunk: one pass over the block's keys, nothing materialised.
    for r0 in range(0, kl, CB):
        r = r0 + tl.arange(0, CB)
        x = tl.load(K + (ks + r)[:, None] * stride_kt + hk * stride_kh + d[None, :],
                    mask=(r < kl)[:, None], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(CENT + g * stride_cg + hk * stride_ch + d, acc * inv_block)


def block_centroids(k: torch.Tensor, kstart: torch.Tensor, klen: torch.Tensor, block_size: int) -> torch.Tensor:
    """Centroids of every block of a key-block table.

    Args:
        k: ``[Tk, Hkv, D]`` keys (fp16/bf16/fp32), last dim contiguous.
        kstart, klen: int32 ``[NBK]`` first row and length of each block.
        block_size: ``B`` (the mean divides by ``B``; only complete blocks are meaningful).
    Returns:
        ``[NBK, Hkv, D]`` fp32 centroids.
    """
    nbk = kstart.shape[0]
    hkv, d = k.shape[1], k.shape[2]
    cent = torch.empty(nbk, hkv, d, dtype=torch.float32, device=k.device)
    if nbk == 0:
        return cent
    cb = min(64, next_power_of_2(block_size))
    _centroid_kernel[(nbk, hkv)](
        k, kstart, klen, cent,
        k.stride(0), k.stride(1), cent.stride(0), cent.stride(1),
        1.0 / block_size,
        CB=cb, D=d, num_warps=4,
    )
    return cent
