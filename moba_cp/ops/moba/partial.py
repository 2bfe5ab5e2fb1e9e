"""Partial MoBA attention over a buffer of whole KV blocks ("slots"): the CP building block.

Context parallelism computes, per source of K/V (this rank, then each ring step), the
attention of the local queries over the blocks that source provided, and merges the
partials by LSE (``moba_cp.ops.lse_merge``). The blocks of one source sit in a *slot buffer*:

- ``k_buf, v_buf [n_slots * B, Hkv, D]``: slot ``s`` holds rows ``[s*B, (s+1)*B)``;
- ``slot_pos [n_slots]`` int: the global position of the first key of each slot;
- ``slot_idx [Tq, Hq, W]`` int32: per query token and head, the slots it attends (-1 = none);
- ``q_pos [Tq]`` int: global positions of the queries. A key at ``slot_pos[s] + j`` is seen
  by a query only if it is not in the query's future (this makes the own block causal).

Queries with no slot in a source get ``o = 0``, ``lse = -inf``. The backward accepts the
*merged* ``o``/``lse`` from outside (no dLSE), and returns fp32 ``dk_buf``/``dv_buf`` so the
owner accumulates remote contributions in fp32.

``backend``: "naive" (pure torch, any device) or "triton" (CUDA, or CPU under
``TRITON_INTERPRET=1``), resolved by ``moba_cp.ops.moba.api.choose_backend``.
"""

from __future__ import annotations

import torch

from moba_cp.ops.moba import naive

__all__ = ["partial_attn_fwd", "partial_attn_bwd"]


def _naive_positions(slot_pos: torch.Tensor, slot_idx: torch.Tensor, block_size: int):
    """Key positions of the buffer, and slot ids translated to block ids of the position space."""
    n_slots = slot_pos.shape[0]
    offs = torch.arange(block_size, device=slot_pos.device)
    k_pos = (slot_pos.long()[:, None] + offs[None, :]).reshape(n_slots * block_size)
    blk_of_slot = torch.div(slot_pos.long(), block_size, rounding_mode="floor")
    idx = torch.where(slot_idx >= 0, blk_of_slot[slot_idx.long().clamp(min=0)], -1)
    return k_pos, idx


def _check_slots(slot_pos: torch.Tensor, block_size: int) -> None:
    if slot_pos.numel() and bool((slot_pos % block_size != 0).any()):
        raise ValueError(
            f"partial attention: slot_pos must be multiples of block_size={block_size} (slots hold "
            f"whole blocks); got {slot_pos.tolist()[:8]}..."
        )


def partial_attn_fwd(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_idx: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float,
    backend: str = "naive",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [Tq, Hq, D]`` over the slots it selected in one slot buffer.

    Returns ``o [Tq, Hq, D]`` (q's dtype) and ``lse [Tq, Hq]`` fp32; no autograd graph.
    """
    if backend == "triton":
        from moba_cp.ops.moba import triton_backend

        return triton_backend.partial_attn_fwd(
            q, q_pos, k_buf, v_buf, slot_pos, slot_idx, block_size=block_size, softmax_scale=softmax_scale
        )
    _check_slots(slot_pos, block_size)
    k_pos, idx = _naive_positions(slot_pos, slot_idx, block_size)
    with torch.no_grad():
        o, lse = naive.attend_selected(
            q, k_buf, v_buf, idx, q_pos, k_pos, block_size=block_size, softmax_scale=softmax_scale
        )
    return o, lse.float()


def partial_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_idx: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float,
    backend: str = "naive",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of this partial given the merged ``o [Tq, Hq, D]`` and ``lse [Tq, Hq]``.

    Returns ``dq [Tq, Hq, D]``, ``dk_buf``, ``dv_buf [n_slots * B, Hkv, D]``, all fp32.
    """
    if backend == "triton":
        from moba_cp.ops.moba import triton_backend

        return triton_backend.partial_attn_bwd(
            do, q, q_pos, k_buf, v_buf, slot_pos, slot_idx, o, lse,
            block_size=block_size, softmax_scale=softmax_scale,
        )
    _check_slots(slot_pos, block_size)
    k_pos, idx = _naive_positions(slot_pos, slot_idx, block_size)
    dq, dk, dv = naive.attend_selected_backward(
        do, q, k_buf, v_buf, o, lse, idx, q_pos, k_pos, block_size=block_size, softmax_scale=softmax_scale
    )
    return dq.float(), dk.float(), dv.float()
