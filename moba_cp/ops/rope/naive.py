"""Rotary position embedding in plain torch: the oracle of :mod:`moba_cp.ops.rope.triton_rope`.

Megatron-Core's non-interleaved RoPE (``rope_utils._apply_rotary_pos_emb_bshd`` with
``mscale = 1``): the first ``R = freqs.shape[-1]`` channels of every head are rotated,
``y = t * cos(freqs) + rotate_half(t) * sin(freqs)`` with ``rotate_half([x1, x2]) = [-x2, x1]``
(halves of the ``R`` rotated channels), and channels ``R..D`` pass through. Megatron rounds
``cos``/``sin`` and each product to the input dtype; this oracle computes in fp32 and rounds
once, as the fused kernel does.
"""

from __future__ import annotations

import torch

__all__ = ["rope_reference"]


def rope_reference(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``t [S, B, H, D]`` rotated by ``freqs [S, 1, 1, R]`` (``R <= D``, even); differentiable.

    Returns ``[S, B, H, D]`` in ``t.dtype``.
    """
    r = freqs.shape[-1]
    tf = t.float()
    rot, rest = tf[..., :r], tf[..., r:]
    x1, x2 = rot.chunk(2, dim=-1)
    f = freqs.float()
    y = rot * torch.cos(f) + torch.cat((-x2, x1), dim=-1) * torch.sin(f)
    return torch.cat((y, rest), dim=-1).to(t.dtype)
