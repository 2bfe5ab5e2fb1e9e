"""Pure-torch SwiGLU oracle: ``x [..., 2F] -> silu(x[..., :F]) * x[..., F:]  [..., F]``.

The math Megatron-Core's MLP does without Transformer Engine (``torch.chunk``, ``F.silu``,
multiply), done in fp32 with one rounding to ``x.dtype`` at the end: the contract that the fused
kernel (``triton_swiglu.py``) is tested against. Differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu_reference"]


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` with ``a, b = x.chunk(2, dim=-1)``, computed in fp32.

    Args:
        x: ``[..., 2F]`` (the MLP's first projection: gate half, then linear half).
    Returns:
        ``[..., F]`` in ``x.dtype``.
    """
    a, b = x.float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(x.dtype)
