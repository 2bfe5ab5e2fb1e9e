"""RMSNorm in plain torch: the oracle the Triton kernels are tested against.

Shapes: ``x [..., N]``, ``weight [N]``; returns ``[..., N]`` in ``x.dtype``. The math is fp32
(one rounding at the end), which is the contract the Triton version must meet; autograd
through it gives the reference ``dx`` and ``dweight``.
"""

from __future__ import annotations

import torch

__all__ = ["rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` in fp32, returned in ``x.dtype``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)
