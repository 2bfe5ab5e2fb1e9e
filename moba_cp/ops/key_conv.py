"""Key convolution (FlashMoBA's routing fix): a learned short causal depthwise convolution over keys.

Every key becomes itself plus a learned mix of the ``W - 1`` keys before it and itself, per KV
head and per channel (depthwise: no mixing across channels or heads)::

    k'[t, h, c] = k[t, h, c] + sum_{j=0}^{W-1} weight[h, c, j] * k[t - (W - 1) + j, h, c]

with keys before the start of a sequence (or of a packed document) taken as zero. ``weight[..., W-1]``
multiplies the key itself. The residual form with a zero-initialised ``weight`` makes a new layer
start exactly as plain MoBA (``k' = k``) and weight decay pull it back towards plain MoBA, not
towards zero keys. Why it helps routing (docs/design.md, "Key convolution"): a block's centroid is
the mean of its keys; mixing each key with its neighbours makes a relevant token's signal appear in
several keys of its block, which raises the centroid's signal against the noise of the others.

Single-device math only: the context-parallel version (each zigzag chunk needs the ``W - 1`` keys
before it from the rank that owns them) is :func:`moba_cp.parallel.key_conv_halo.key_conv_cp`,
which calls :func:`key_conv` with the received ``halo``.

Shapes: ``k`` is ``[S, H, D]``, ``[B, S, H, D]`` (every row its own sequence) or ``[T, H, D]``
with ``cu_seqlens`` (packed documents); ``weight`` is ``[H, D, W]``; the result has ``k``'s shape
and dtype (the sum runs in fp32, or fp64 for fp64 keys).
"""

from __future__ import annotations

import torch

__all__ = ["key_conv", "check_key_conv_args", "KEY_CONV_WIDTHS"]

#: the widths a recipe may ask for (0 = off); the op itself takes any W >= 2
KEY_CONV_WIDTHS = (0, 3, 5)


def check_key_conv_args(k: torch.Tensor, weight: torch.Tensor, halo: torch.Tensor | None = None,
                        op: str = "key_conv") -> int:
    """Check shapes; returns the width ``W``. Raises ``ValueError`` naming the tensor and the rule."""
    if k.dim() not in (3, 4):
        raise ValueError(f"{op}: k is {tuple(k.shape)}; expected [S, H, D] or [B, S, H, D].")
    if weight.dim() != 3 or tuple(weight.shape[:2]) != tuple(k.shape[-2:]):
        raise ValueError(f"{op}: weight is {tuple(weight.shape)}; expected [H, D, W] = "
                         f"[{k.shape[-2]}, {k.shape[-1]}, W] for k {tuple(k.shape)} (one filter per KV head "
                         f"and channel).")
    w = weight.shape[-1]
    if w < 2:
        raise ValueError(f"{op}: width W={w}; a key convolution needs W >= 2 (W=1 is a per-channel scale).")
    if halo is not None:
        want = (*k.shape[:-3], w - 1, *k.shape[-2:])
        if tuple(halo.shape) != want:
            raise ValueError(f"{op}: halo is {tuple(halo.shape)}; expected {want} (the W-1={w - 1} keys "
                             f"before k[0] of every row).")
    return w


def _position_in_document(n: int, cu_seqlens: torch.Tensor, device) -> torch.Tensor:
    """``[n]`` int64: each token's offset from the start of its packed document (tokens after the last
    document count from ``cu_seqlens[-1]``, so padding never reads a document's keys)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    idx = torch.arange(n, device=device)
    start = cu[torch.searchsorted(cu, idx, right=True) - 1].clamp_min(0)
    return idx - start


def key_conv(k: torch.Tensor, weight: torch.Tensor, *, halo: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """``k + causal_depthwise_conv(k)`` along the sequence (see the module docstring).

    Args:
        k: keys ``[S, H, D]`` / ``[B, S, H, D]``, or ``[T, H, D]`` packed with ``cu_seqlens``.
        weight: ``[H, D, W]``, ``W >= 2``; ``weight[..., W-1]`` multiplies the key itself.
        halo: the ``W - 1`` keys just before ``k[0]`` of each row (``[W-1, H, D]`` /
            ``[B, W-1, H, D]``), as under context parallelism; None = ``k`` starts a sequence (zeros).
        cu_seqlens: ``int [n_docs + 1]`` document boundaries of a packed ``[T, H, D]``; the
            convolution restarts at every document (no halo then).
    Returns:
        the convolved keys, ``k``'s shape and dtype.
    """
    w = check_key_conv_args(k, weight, halo)
    if cu_seqlens is not None and (k.dim() != 3 or halo is not None):
        raise ValueError("key_conv: cu_seqlens takes packed keys [T, H, D] and no halo.")
    seq = k.dim() - 3  # the sequence dimension
    n = k.shape[seq]
    acc = torch.promote_types(k.dtype, torch.float32)  # bf16/fp16 sum in fp32; fp64 stays fp64
    kf = k.to(acc)
    if halo is None:
        halo = kf.new_zeros((*k.shape[:-3], w - 1, *k.shape[-2:]))
    ext = torch.cat([halo.to(acc), kf], dim=seq)  # [.., W-1+S, H, D]: ext[i + W-1] = k[i]
    wf = weight.to(acc)
    pos = _position_in_document(n, cu_seqlens, k.device) if cu_seqlens is not None else None
    out = kf
    for j in range(w):
        lag = w - 1 - j  # weight[..., j] multiplies k[t - lag]
        shifted = ext.narrow(seq, j, n)
        if pos is not None and lag:
            shifted = shifted * (pos >= lag).view(n, 1, 1)  # nothing from the previous document
        out = out + shifted * wf[..., j]
    return out.to(k.dtype)
