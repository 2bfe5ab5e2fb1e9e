"""Partial MoBA attention over a buffer of whole KV blocks ("slots"): the CP building block.

Context parallelism computes, per source of K/V (this rank, then each ring step), the
attention of the local queries over the blocks that source provided, and merges the
partials by LSE (``moba_cp.ops.lse_merge``). The blocks of one source sit in a *slot buffer*:

- ``k_buf, v_buf [n_slots * B, Hkv, D]``: slot ``s`` holds rows ``[s*B, (s+1)*B)``;
- ``slot_pos [n_slots]`` int: the global position of the first key of each slot;
- ``slot_idx [Tq, Hq, W]`` int32: per query token and head, the slots it attends (-1 = none);
- ``q_pos [Tq]`` int: global positions of the queries. A key at ``slot_pos[s] + j`` is seen
  by a query only if it is not in the query's future (this makes the own block causal).

Several sources can share one *slot namespace*: ``slot_idx`` then holds ids over all of them
and a buffer holds the contiguous range ``[slot_offset, slot_offset + n_slots)``; ids outside
it are ignored. :func:`partial_index` prepares such a selection once per call (the Triton
backend builds its gather index once and reuses it for every source, forward and backward).

Queries with no slot in a source get ``o = 0``, ``lse = -inf``. The backward accepts the
*merged* ``o``/``lse`` from outside (no dLSE), and returns fp32 ``dk_buf``/``dv_buf`` so the
owner accumulates remote contributions in fp32.

``backend``: "naive" (pure torch, any device) or "triton" (CUDA, or CPU under
``TRITON_INTERPRET=1``), resolved by ``moba_cp.ops.moba.api.choose_backend``.
"""

from __future__ import annotations

import torch

from moba_cp.ops.moba import naive, triton_backend

__all__ = ["partial_index", "partial_attn_fwd", "partial_attn_bwd"]


def partial_index(slot_idx: torch.Tensor, n_slots: int, hkv: int, head_dim: int, *, backend: str = "naive",
                  kernel: str = ""):
    """Prepare ``slot_idx [Tq, Hq, W]`` (ids in ``[0, n_slots)`` over all sources of a call) for
    repeated partial calls; pass the result as ``index=`` (with ``slot_idx`` the same tensor).
    Returns an opaque object for "triton" (its gather index, built once, with ``kernel``'s tiling
    overrides), None for "naive" (which takes no overrides: the caller refuses them)."""
    if backend == "triton":
        return triton_backend.partial_index(slot_idx, n_slots, hkv, head_dim, kernel)
    return None


def _naive_positions(slot_pos: torch.Tensor, slot_idx: torch.Tensor, block_size: int, slot_offset: int = 0):
    """Key positions of the buffer, and slot ids translated to block ids of the position space
    (ids outside ``[slot_offset, slot_offset + n_slots)`` dropped)."""
    n_slots = slot_pos.shape[0]
    inside = (slot_idx >= slot_offset) & (slot_idx < slot_offset + n_slots)
    slot_idx = torch.where(inside, slot_idx - slot_offset, -1)
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
    slot_offset: int = 0,
    index=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [Tq, Hq, D]`` over the slots it selected in one slot buffer.

    The buffer holds slots ``[slot_offset, slot_offset + n_slots)`` of ``slot_idx``'s
    namespace; ``index``: :func:`partial_index` of the same ``slot_idx`` (or None).
    Returns ``o [Tq, Hq, D]`` (q's dtype) and ``lse [Tq, Hq]`` fp32; no autograd graph.
    """
    if backend == "triton":
        return triton_backend.partial_attn_fwd(
            q, q_pos, k_buf, v_buf, slot_pos, slot_idx, block_size=block_size, softmax_scale=softmax_scale,
            slot_offset=slot_offset, index=index,
        )
    _check_slots(slot_pos, block_size)
    k_pos, idx = _naive_positions(slot_pos, slot_idx, block_size, slot_offset)
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
    slot_offset: int = 0,
    index=None,
    dq_acc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of this partial given the merged ``o [Tq, Hq, D]`` and ``lse [Tq, Hq]``.

    ``slot_offset``, ``index`` as :func:`partial_attn_fwd`. ``dq_acc``: optional contiguous
    fp32 ``[Tq, Hq, D]`` that dQ is added into (and returned as dq), so the sources of one
    call sum their dQ in one buffer.
    Returns ``dq [Tq, Hq, D]``, ``dk_buf``, ``dv_buf [n_slots * B, Hkv, D]``, all fp32.
    """
    if backend == "triton":
        return triton_backend.partial_attn_bwd(
            do, q, q_pos, k_buf, v_buf, slot_pos, slot_idx, o, lse,
            block_size=block_size, softmax_scale=softmax_scale, slot_offset=slot_offset, index=index, dq_acc=dq_acc,
        )
    _check_slots(slot_pos, block_size)
    k_pos, idx = _naive_positions(slot_pos, slot_idx, block_size, slot_offset)
    dq, dk, dv = naive.attend_selected_backward(
        do, q, k_buf, v_buf, o, lse, idx, q_pos, k_pos, block_size=block_size, softmax_scale=softmax_scale
    )
    if dq_acc is not None:
        dq_acc += dq.float()
        dq = dq_acc
    return dq.float(), dk.float(), dv.float()
