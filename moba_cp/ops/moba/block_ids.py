"""Selection bookkeeping for context parallelism: which blocks a selection uses, and renaming
block ids through a table, without int64 copies of the selection.

A CP rank's selection ``[S_local, Hq, W]`` int32 has ~10^8 entries at 1M tokens (block 128,
top-k 8). Torch indexing needs int64 indices, i.e. a 1 GiB copy of the selection per use, and
``index_put`` on top (measured 2 x ~11 ms per call on an H200 at 1M tokens). On CUDA these two
helpers read the int32 selection once with a Triton kernel; elsewhere they use torch (the
reference the tests compare against).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_cp.ops.launch_math import cdiv

__all__ = ["selected_mask", "remap_ids"]

_BLOCK = 4096


@triton.jit
def _mark_kernel(IDX, MASK, n_idx, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(IDX + i, mask=i < n_idx, other=-1)
    ok = (g >= 0) & (g < n)
    # Every writer stores the same 1: concurrent stores to one flag are harmless.
    tl.store(MASK + g, tl.full([BLOCK], 1, tl.int8), mask=ok)


@triton.jit
def _remap_kernel(IDX, TABLE, OUT, n_idx, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n_idx
    g = tl.load(IDX + i, mask=m, other=-1)
    t = tl.load(TABLE + g, mask=m & (g >= 0), other=-1)
    tl.store(OUT + i, tl.where(g >= 0, t, -1), mask=m)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda


def selected_mask(idx: torch.Tensor, n: int, *, use_triton: bool | None = None) -> torch.Tensor:
    """``[n]`` bool: which ids in ``[0, n)`` occur in ``idx`` (any shape, int; ``-1`` = none).

    Example:
        >>> selected_mask(torch.tensor([[2, -1], [0, 2]], dtype=torch.int32), 4)
        tensor([ True, False,  True, False])
    """
    use_triton = _use_triton(idx) if use_triton is None else use_triton
    if not use_triton:
        seen = torch.zeros(n + 1, dtype=torch.bool, device=idx.device)
        seen[idx.flatten().long().clamp(min=-1) + 1] = True
        return seen[1:]
    flat = idx.reshape(-1).to(torch.int32).contiguous()
    mask = torch.zeros(n, dtype=torch.int8, device=idx.device)
    if flat.numel():
        _mark_kernel[(cdiv(flat.numel(), _BLOCK),)](flat, mask, flat.numel(), n, BLOCK=_BLOCK)
    return mask.bool()


def remap_ids(idx: torch.Tensor, table: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """``table[idx]`` as int32 where ``idx >= 0``, ``-1`` elsewhere; shape of ``idx``.

    ``table``: int32 ``[n]`` with every id of ``idx`` in ``[0, n)``.
    """
    use_triton = _use_triton(idx) if use_triton is None else use_triton
    table = table.to(device=idx.device, dtype=torch.int32)
    if not use_triton:
        return torch.where(idx >= 0, table[idx.long().clamp(min=0)], -1).to(torch.int32)
    flat = idx.reshape(-1).to(torch.int32).contiguous()
    out = torch.empty_like(flat)
    if flat.numel():
        _remap_kernel[(cdiv(flat.numel(), _BLOCK),)](flat, table.contiguous(), out, flat.numel(), BLOCK=_BLOCK)
    return out.view(idx.shape)
