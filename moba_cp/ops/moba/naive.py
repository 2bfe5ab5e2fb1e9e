"""Pure-torch MoBA oracle: short, readable, fp32 math inside, runs on CPU.

This file *is* the contract of ``docs/design.md`` section 1 written as code. Every fast
backend (Triton, context-parallel) is tested against it. It materialises dense
``[T, H, T]`` masks, so it is meant for small shapes and tests, not for speed.

Block indices
-------------
Selection returns ``indices [T, Hq, W]`` int32: for each query token and query head the
*document-local* block numbers it attends (block ``j`` holds positions ``[j*B, (j+1)*B)`` of
its document), the query's own block included, sorted ascending, padded with ``-1`` at the
end. ``W = min(topk, max blocks of any document)``.

The general form used by context parallelism is :func:`attend_selected`: queries and keys
carry explicit positions, and a key at position ``p`` belongs to block ``p // B``. Block
indices then live in that position space (global block ids under CP).
"""

from __future__ import annotations

import torch

__all__ = [
    "block_centroids",
    "select_from_centroids",
    "select_blocks",
    "attend_selected",
    "attend_selected_backward",
    "block_attn",
    "moba_attn_naive",
]


def _up(x: torch.Tensor) -> torch.Tensor:
    """Compute dtype: fp32 for half types and fp32, fp64 kept (so this oracle can be the fp64 reference)."""
    return x if x.dtype == torch.float64 else x.float()


def _doc_bounds(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, total)]
    cu = cu_seqlens.tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def block_centroids(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean-pooled keys of the complete blocks of one document.

    Args:
        k: ``[n, Hkv, D]`` keys of one document (any float dtype).
        block_size: ``B``.
    Returns:
        ``[n // B, Hkv, D]`` fp32 (fp64 for fp64 keys) centroids (a trailing partial block has none: it can never
        be a *past* block of any query).
    """
    n_full = k.shape[0] // block_size
    kb = _up(k[: n_full * block_size]).reshape(n_full, block_size, *k.shape[1:])
    return kb.mean(dim=1)


def select_from_centroids(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    centroids: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    width: int | None = None,
) -> torch.Tensor:
    """The MoBA gate: own block plus the ``topk - 1`` best complete past blocks.

    Args:
        q: ``[Tq, Hq, D]`` queries.
        q_pos: ``[Tq]`` integer positions of the queries (block of a query = ``pos // B``).
        centroids: ``[NB, Hkv, D]`` centroid of block ``j`` at row ``j`` (rows that are not
            past blocks of a query are ignored for it, so a trailing partial block may hold
            anything).
        block_size: ``B``.
        topk: blocks per query, the own block included.
        width: columns of the result (default ``min(topk, NB + 1)``).
    Returns:
        ``[Tq, Hq, width]`` int32 block ids, ascending, ``-1`` padded at the end.

    Steps: (1) score every centroid in fp32 with the query head's KV group; (2) mask blocks
    that are not complete past blocks (``j >= pos // B``); (3) take the ``topk - 1`` best;
    (4) add the own block; (5) sort ascending, padding last. The gate has no gradient.
    """
    tq, hq, _ = q.shape
    nb, hkv, _ = centroids.shape
    group = hq // hkv
    own = torch.div(q_pos.long(), block_size, rounding_mode="floor")  # [Tq]
    width = min(topk, nb + 1) if width is None else width
    n_past = min(topk - 1, nb)
    with torch.no_grad():
        cent = _up(centroids).repeat_interleave(group, dim=1)  # [NB, Hq, D]
        scores = torch.einsum("thd,jhd->thj", _up(q).to(cent.dtype), cent)  # [Tq, Hq, NB]
        is_past = torch.arange(nb, device=q.device)[None, :] < own[:, None]  # [Tq, NB]
        scores = scores.masked_fill(~is_past[:, None, :], float("-inf"))
        if n_past > 0:
            best = scores.topk(n_past, dim=-1)
            past = torch.where(torch.isfinite(best.values), best.indices, -1)
        else:
            past = torch.empty(tq, hq, 0, dtype=torch.long, device=q.device)
        chosen = torch.cat([past, own[:, None, None].expand(tq, hq, 1)], dim=-1)
        # Sort ascending with the -1 padding moved to the end.
        big = torch.iinfo(torch.long).max
        chosen = torch.where(chosen < 0, big, chosen).sort(dim=-1).values
        chosen = torch.where(chosen == big, -1, chosen)
        out = torch.full((tq, hq, width), -1, dtype=torch.int32, device=q.device)
        keep = min(width, chosen.shape[-1])
        out[..., :keep] = chosen[..., :keep].to(torch.int32)
    return out


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoBA block selection for packed documents (no validation: see ``api``).

    Args:
        q: ``[T, Hq, D]``; k: ``[T, Hkv, D]``; cu_seqlens: int32 ``[n_docs + 1]`` or None.
    Returns:
        ``[T, Hq, W]`` int32 document-local block ids (own block included, ascending,
        ``-1`` padded), ``W = min(topk, max blocks of any document)``.
    """
    docs = _doc_bounds(cu_seqlens, q.shape[0])
    max_blocks = max([-(-(e - s) // block_size) for s, e in docs] + [1])
    width = min(topk, max_blocks)
    out = torch.full((q.shape[0], q.shape[1], width), -1, dtype=torch.int32, device=q.device)
    for s, e in docs:
        if e == s:
            continue
        pos = torch.arange(e - s, device=q.device)
        cent = block_centroids(k[s:e], block_size)
        out[s:e] = select_from_centroids(
            q[s:e], pos, cent, block_size=block_size, topk=topk, width=width
        )
    return out


def _allowed_mask(
    indices: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``[Tq, Hq, Tk]`` bool: key block selected by the query head, and key not in its future."""
    k_blk = torch.div(k_pos.long(), block_size, rounding_mode="floor")  # [Tk]
    # selected[t, h, kk] = any_w indices[t, h, w] == k_blk[kk]   (-1 never equals a block id)
    selected = (indices.long()[..., :, None] == k_blk[None, None, None, :]).any(dim=-2)
    causal = k_pos.long()[None, :] <= q_pos.long()[:, None]  # [Tq, Tk]
    return selected & causal[:, None, :]


def _scores(q, k, scale):
    group = q.shape[1] // k.shape[1]
    kf = _up(k).repeat_interleave(group, dim=1)
    return torch.einsum("thd,shd->hts", _up(q), kf) * scale, kf  # [Hq, Tq, Tk]


def attend_selected(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query head over the keys of its selected blocks, causally.

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]``.
        indices: ``[Tq, Hq, W]`` block ids in the position space (``-1`` = none).
        q_pos: ``[Tq]``, k_pos: ``[Tk]`` integer positions.
    Returns:
        ``o [Tq, Hq, D]`` in q's dtype and ``lse [Tq, Hq]`` fp32 (fp64 for fp64 inputs). A query with no allowed key
        gets ``o = 0`` and ``lse = -inf`` (what a partial result from a source holding none of
        its blocks must be, so the LSE merge ignores it). Differentiable in q, k, v.
    """
    allowed = _allowed_mask(indices, q_pos, k_pos, block_size).permute(1, 0, 2)  # [Hq,Tq,Tk]
    s, _ = _scores(q, k, softmax_scale)
    s = s.masked_fill(~allowed, float("-inf"))
    # Rows with no allowed key: take the LSE of a zero row (finite, so autograd stays NaN-free)
    # and report -inf.
    has_key = allowed.any(dim=-1)  # [Hq, Tq]
    safe_lse = torch.logsumexp(torch.where(has_key[..., None], s, torch.zeros_like(s)), dim=-1)
    lse = torch.where(has_key, safe_lse, torch.full_like(safe_lse, float("-inf")))
    p = torch.exp(s - safe_lse[..., None])  # exp(-inf) = 0 for masked keys
    group = q.shape[1] // k.shape[1]
    vf = _up(v).repeat_interleave(group, dim=1)
    o = torch.einsum("hts,shd->thd", p, vf)
    return o.to(q.dtype), lse.transpose(0, 1).contiguous()


def attend_selected_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attend_selected` given an output and LSE from *outside*.

    When ``o``/``lse`` are the LSE-merged results of several partial attentions (context
    parallelism), this returns the gradient contribution of *this* partial's keys:
    ``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * o))``,
    ``dQ = scale dS K``, ``dK = scale dS^T Q``. All math in fp32.

    Args:
        do, o: ``[Tq, Hq, D]``; lse: ``[Tq, Hq]`` fp32; the rest as :func:`attend_selected`.
    Returns:
        ``dq [Tq, Hq, D]``, ``dk [Tk, Hkv, D]``, ``dv [Tk, Hkv, D]``, all fp32 (fp64 for fp64
        inputs; callers cast or accumulate).
    """
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    allowed = _allowed_mask(indices, q_pos, k_pos, block_size).permute(1, 0, 2)
    s, kf = _scores(q, k, softmax_scale)
    lse_h = lse.to(s.dtype).transpose(0, 1)  # [Hq, Tq]
    lse_safe = torch.where(torch.isfinite(lse_h), lse_h, torch.zeros_like(lse_h))
    p = torch.exp(s - lse_safe[..., None]).masked_fill(~allowed, 0.0)  # [Hq, Tq, Tk]
    dof = _up(do)
    vf = _up(v).repeat_interleave(group, dim=1)
    delta = (dof * _up(o)).sum(-1).transpose(0, 1)  # [Hq, Tq]
    dp = torch.einsum("thd,shd->hts", dof, vf)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("hts,shd->thd", ds, kf) * softmax_scale
    dk_h = torch.einsum("hts,thd->shd", ds, _up(q)) * softmax_scale  # [Tk, Hq, D]
    dv_h = torch.einsum("hts,thd->shd", p, dof)
    fold = lambda x: x.reshape(x.shape[0], hkv, group, x.shape[-1]).sum(2)  # noqa: E731
    return dq, fold(dk_h), fold(dv_h)


def block_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    block_size: int,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend given document-local block ``indices`` (from :func:`select_blocks`).

    Args:
        q ``[T, Hq, D]``; k, v ``[T, Hkv, D]``; indices ``[T, Hq, W]`` int32.
    Returns:
        ``o [T, Hq, D]`` (q's dtype), ``lse [T, Hq]`` fp32.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    os, lses = [], []
    for s, e in _doc_bounds(cu_seqlens, q.shape[0]):
        pos = torch.arange(e - s, device=q.device)
        o, lse = attend_selected(
            q[s:e], k[s:e], v[s:e], indices[s:e], pos, pos,
            block_size=block_size, softmax_scale=scale,
        )
        os.append(o)
        lses.append(lse)
    return torch.cat(os), torch.cat(lses)


def moba_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA = :func:`select_blocks` then :func:`block_attn`. Returns ``(o, lse)``."""
    idx = select_blocks(q, k, block_size=block_size, topk=topk, cu_seqlens=cu_seqlens)
    return block_attn(
        q, k, v, idx, block_size=block_size, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale
    )
