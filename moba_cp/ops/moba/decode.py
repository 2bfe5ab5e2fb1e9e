"""MoBA for decoding: queries that continue a sequence whose keys sit in a KV cache.

Training and the full forward run MoBA on a whole sequence (``q``, ``k``, ``v`` of the same
length). Generation runs it on a *suffix*: a prefill chunk or one new token at positions
``q_start .. q_start + Tq - 1`` against the cached keys of positions ``0 .. q_start + Tq - 1``
(the cache already holds the new tokens' own keys). The contract is ``docs/design.md`` section
1 unchanged, so decoding token by token gives the full forward's outputs at every position:

- the query's own block ``pos // B`` attends causally (it may be partial: the block being
  written);
- the ``topk - 1`` best *complete past* blocks by ``q . centroid`` (fp32), per token and head.

Only the gate touches every block, and it reads centroids, not keys: :class:`BlockCentroids`
keeps them incrementally (a block's centroid is computed once, from the cache, when its last
key arrives), and the attention gathers the keys of the selected blocks only, so one decode
step reads ``n_blocks`` centroids plus ``topk * B`` keys per head instead of the whole cache.

Everything here is pure torch, single device (it is the oracle of any faster decode kernel).
A prefill from an empty cache is the whole-sequence op itself (``moba_cp.ops.moba.moba_attn``,
Triton on GPU); :func:`moba_decode_attn` is for the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moba_cp.ops.moba.naive import block_centroids, select_from_centroids
from moba_cp.ops.moba.validate import check_block_args

__all__ = ["BlockCentroids", "moba_decode_attn", "causal_decode_attn"]

#: Elements of the gathered ``[Tq, Hq, W*B, D]`` key tile per query chunk (bounds the memory of
#: a long prefill chunk; single-token decoding is one chunk).
_GATHER_BUDGET = 1 << 24


class BlockCentroids:
    """Running centroids of the complete blocks of one layer's cached keys.

    Call :meth:`update` with the layer's whole cached keys after each append, passing the cache
    length before the appended tokens (``unchanged_upto``). Blocks completed since the last call
    get their centroid (the mean of their keys in fp32, by
    :func:`~moba_cp.ops.moba.naive.block_centroids`, so the numbers are the full forward's);
    older ones are kept. A cache cropped and refilled (a rolled-back speculation, a reused cache)
    shows as ``unchanged_upto`` below the length seen last time: blocks reaching past it are
    computed again.

    Example:
        >>> cent = BlockCentroids(block_size=64)
        >>> c = cent.update(k_cache, unchanged_upto=k_cache.shape[1] - 1)   # [b, Tk // 64, Hkv, D] fp32
    """

    def __init__(self, block_size: int) -> None:
        check_block_args(block_size, 1, op="BlockCentroids")
        self.block_size = int(block_size)
        self.centroids: torch.Tensor | None = None  # [b, n_blocks, Hkv, D] fp32

    def update(self, keys: torch.Tensor, unchanged_upto: int | None = None) -> torch.Tensor:
        """``keys [b, Tk, Hkv, D]`` (the whole cache) -> centroids ``[b, Tk // B, Hkv, D]`` fp32.

        ``unchanged_upto``: keys at positions below it are the ones of the previous call (default:
        all of them); at most the blocks inside that prefix are reused.
        """
        b, tk, hkv, d = keys.shape
        n = tk // self.block_size
        have = 0 if self.centroids is None or self.centroids.shape[0] != b else self.centroids.shape[1]
        keep = tk if unchanged_upto is None else int(unchanged_upto)
        have = min(have, n, keep // self.block_size)
        if self.centroids is not None and have == n:
            self.centroids = self.centroids[:, :n]
            return self.centroids
        start = have * self.block_size
        new = torch.stack([block_centroids(keys[i, start: n * self.block_size], self.block_size) for i in range(b)])
        old = self.centroids[:, :have].to(new.dtype) if have else new[:, :0]
        self.centroids = torch.cat([old, new], dim=1)
        return self.centroids


def _gathered_attention(q, k, v, sel, q_pos, *, block_size, scale):
    """Attention of ``q [Tq, Hq, D]`` over the keys of its selected blocks only.

    ``sel [Tq, Hq, W]`` block ids (``-1`` padding); ``k, v [Tk, Hkv, D]`` at positions
    ``0 .. Tk-1``. Returns ``o [Tq, Hq, D]`` (q's dtype) and ``lse [Tq, Hq]`` (fp32; fp64 for fp64).
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    up = torch.float64 if q.dtype == torch.float64 else torch.float32
    offs = torch.arange(block_size, device=q.device)
    pos = (sel.long().clamp(min=0)[..., None] * block_size + offs).flatten(-2)  # [Tq, Hq, W*B]
    ok = ((sel >= 0)[..., None].expand(*sel.shape, block_size).flatten(-2)) & (pos <= q_pos[:, None, None])
    pos = pos.clamp(max=tk - 1)
    heads = (torch.arange(hq, device=q.device) // group)[None, :, None]  # query head -> its KV head
    kg = k[pos, heads].to(up)  # [Tq, Hq, W*B, D]
    vg = v[pos, heads].to(up)
    s = torch.einsum("thd,thkd->thk", q.to(up), kg) * scale
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # every query keeps at least its own key
    o = torch.einsum("thk,thkd->thd", torch.exp(s - lse[..., None]), vg)
    return o.to(q.dtype), lse


def moba_decode_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int,
    block_size: int,
    topk: int,
    centroids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """MoBA of queries that continue a cached sequence (prefill chunk or single token).

    Args:
        q: ``[b, Tq, Hq, D]`` queries (RoPE applied) at positions ``q_start .. q_start + Tq - 1``.
        k, v: ``[b, Tk, Hkv, D]`` the cache *including* the new tokens, ``Tk = q_start + Tq``
            (longer caches, e.g. a pre-allocated static cache, are cut to ``Tk``).
        q_start: position of ``q[:, 0]`` (the cache length before these tokens).
        block_size, topk: the layer's MoBA parameters (``topk`` counts the own block).
        centroids: ``[b, >= Tk // B, Hkv, D]`` centroids of the complete blocks (e.g. from
            :class:`BlockCentroids`); None computes them from ``k``.
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return ``lse [b, Tq, Hq]`` (fp32).
    Returns:
        ``o [b, Tq, Hq, D]`` in q's dtype (and ``lse``): what the whole-sequence op gives at these
        positions.

    Steps per batch row and query chunk: (1) gate ``q . centroid_j`` over complete past blocks
    ``j < pos // B`` and keep the ``topk - 1`` best plus the own block
    (:func:`~moba_cp.ops.moba.naive.select_from_centroids`); (2) gather the selected blocks'
    keys and values (``W * B`` per query and head); (3) one causal softmax over them.

    Example:
        >>> o = moba_decode_attn(q_new, k_cache, v_cache, q_start=k_cache.shape[1] - 1,
        ...                      block_size=64, topk=3)
    """
    check_block_args(block_size, topk, op="moba_decode_attn")
    b, tq, hq, d = q.shape
    tk = q_start + tq
    if k.dim() != 4 or k.shape[0] != b or k.shape[1] < tk or v.shape[:2] != k.shape[:2] or hq % k.shape[2]:
        raise ValueError(
            f"moba_decode_attn: q{tuple(q.shape)} at q_start={q_start} needs k, v of shape "
            f"[{b}, >= {tk}, Hkv, {d}] with Hq % Hkv == 0 (the cache including the new tokens); got "
            f"k{tuple(k.shape)}, v{tuple(v.shape)}.")
    k, v = k[:, :tk], v[:, :tk]
    if centroids is None:
        centroids = BlockCentroids(block_size).update(k)
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    n_blocks = tk // block_size
    width = min(topk, n_blocks + 1)
    chunk = max(1, _GATHER_BUDGET // (hq * width * block_size * d))
    out = torch.empty_like(q)
    lse = torch.empty(b, tq, hq, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    for i in range(b):
        cent = centroids[i, :n_blocks]
        for a in range(0, tq, chunk):
            z = min(tq, a + chunk)
            q_pos = torch.arange(q_start + a, q_start + z, device=q.device)
            sel = select_from_centroids(q[i, a:z], q_pos, cent, block_size=block_size, topk=topk, width=width)
            out[i, a:z], lse[i, a:z] = _gathered_attention(
                q[i, a:z], k[i], v[i], sel, q_pos, block_size=block_size, scale=scale)
    return (out, lse) if return_lse else out


def causal_decode_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int, softmax_scale: float | None = None
) -> torch.Tensor:
    """Full causal attention of queries at ``q_start ..`` against the cache (full-attention layers).

    Args:
        q: ``[b, Tq, Hq, D]``; k, v: ``[b, >= q_start + Tq, Hkv, D]`` (cut to ``q_start + Tq``).
    Returns:
        ``o [b, Tq, Hq, D]`` (SDPA, GQA without expanded copies).
    """
    tq, hq = q.shape[1], q.shape[2]
    tk = q_start + tq
    k, v = k[:, :tk], v[:, :tk]
    mask = torch.arange(tk, device=q.device)[None, :] <= torch.arange(q_start, tk, device=q.device)[:, None]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=softmax_scale, enable_gqa=hq != k.shape[2],
    )
    return o.transpose(1, 2)
