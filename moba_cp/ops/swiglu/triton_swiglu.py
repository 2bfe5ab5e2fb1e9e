"""Fused SwiGLU: ``y = silu(a) * b`` with ``a, b = x[..., :F], x[..., F:]``, one Triton kernel each way.

Why: Megatron-Core's MLP without Transformer Engine computes SwiGLU unfused (``torch.chunk``,
``F.silu``, multiply): several elementwise kernels forward, more backward, and autograd keeps three
tensors (``x``'s halves and ``silu(a)``). At short context these kernels cost more than the MLP's
matmuls. Here one kernel reads ``x`` once and writes ``y``; backward saves only ``x`` and one kernel
writes ``dx = [da, db]``.

Shapes:
    x  ``[..., 2F]`` fp32/fp16/bf16, any leading dims (e.g. ``[s, b, 2F]``) flattened to rows.
    y  ``[..., F]`` in ``x.dtype``, contiguous.
    dy ``[..., F]`` (any strides), dx ``[..., 2F]`` in ``x.dtype``, contiguous.

Math in fp32 with one rounding at the store, as :func:`moba_cp.ops.swiglu.naive.swiglu_reference`:
with ``s = sigmoid(a)``: ``y = a * s * b``, ``da = dy * b * s * (1 + a * (1 - s))``, ``db = dy * a * s``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moba_cp.ops.fast_launch import FastKernel
from moba_cp.ops.launch_math import cdiv, next_power_of_2

__all__ = ["swiglu"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BF = 1024  # columns of F per program: a power of two, so a ragged F costs one masked tile per row
_TILE = 2048  # elements of F per program (rows x columns): 16 per thread at 4 warps
_NUM_WARPS = 4


@triton.jit
def _tile_halves(X, n_rows, F, stride_xr, BR: tl.constexpr, BF: tl.constexpr):
    """This program's rows ``r``, columns ``c`` of F, mask, and the gate / linear halves in fp32."""
    # int64 rows: rows * 2F passes 2^31 at long context (e.g. 512K tokens x 5632 columns).
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BF + tl.arange(0, BF)
    m = (r < n_rows)[:, None] & (c < F)[None, :]
    xa = X + r[:, None] * stride_xr + c[None, :]
    a = tl.load(xa, mask=m, other=0.0).to(tl.float32)
    b = tl.load(xa + F, mask=m, other=0.0).to(tl.float32)
    return r, c, m, a, b


@triton.jit
def _swiglu_fwd_kernel(X, Y, n_rows, F, stride_xr, stride_yr, BR: tl.constexpr, BF: tl.constexpr):
    r, c, m, a, b = _tile_halves(X, n_rows, F, stride_xr, BR, BF)
    # a / (1 + exp(-a)) is torch's silu: exp overflows to inf for a << 0 and gives -0, never NaN.
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(Y + r[:, None] * stride_yr + c[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(X, DY, DX, n_rows, F, stride_xr, stride_dyr, stride_dxr,
                       BR: tl.constexpr, BF: tl.constexpr):
    r, c, m, a, b = _tile_halves(X, n_rows, F, stride_xr, BR, BF)
    dy = tl.load(DY + r[:, None] * stride_dyr + c[None, :], mask=m, other=0.0).to(tl.float32)
    # s is 0 or 1 at |a| large (exp gives inf or 0), so no inf * 0 below.
    s = 1.0 / (1.0 + tl.exp(-a))
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * a * s
    dxa = DX + r[:, None] * stride_dxr + c[None, :]
    tl.store(dxa, da.to(DX.dtype.element_ty), mask=m)
    tl.store(dxa + F, db.to(DX.dtype.element_ty), mask=m)


# Launched through FastKernel (Triton's dispatch skipped once compiled): host-bound steps feel it.
_swiglu_fwd_launch = FastKernel(_swiglu_fwd_kernel)
_swiglu_bwd_launch = FastKernel(_swiglu_bwd_kernel)


def _tiles(n_rows: int, f: int) -> tuple[tuple[int, int], int, int]:
    """Grid and ``(BR, BF)``: up to 1024 columns per program, rows filling a 2048-element tile."""
    bf = min(_MAX_BF, next_power_of_2(f))
    br = max(1, _TILE // bf)
    return (cdiv(n_rows, br), cdiv(f, bf)), br, bf


def _check(x: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] % 2:
        last = x.shape[-1] if x.dim() else "none (a 0-d tensor)"
        raise ValueError(f"swiglu needs x [..., 2F] with an even last dim (gate half, then linear half), "
                         f"got shape {tuple(x.shape)} (last dim {last}). Fix: pass the concatenated "
                         f"[gate, linear] projection, 2 * ffn_hidden_size wide")
    if x.dtype not in _DTYPES:
        raise ValueError(f"swiglu supports x of dtype float32, float16 or bfloat16, got {x.dtype}. "
                         f"Fix: cast x (e.g. x.to(torch.bfloat16)) or use swiglu_reference")


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as ``[rows, width]`` with unit column stride (a view where the layout allows)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(math.prod(t.shape[:-1]), width)  # not -1: that fails for an empty tensor


def _forward(x2: torch.Tensor, f: int) -> torch.Tensor:
    y = torch.empty(x2.shape[0], f, dtype=x2.dtype, device=x2.device)
    if y.numel():
        grid, br, bf = _tiles(x2.shape[0], f)
        _swiglu_fwd_launch[grid](x2, y, x2.shape[0], f, x2.stride(0), y.stride(0),
                                 BR=br, BF=bf, num_warps=_NUM_WARPS)
    return y


def _backward(x2: torch.Tensor, dy2: torch.Tensor, f: int) -> torch.Tensor:
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    if dx.numel():
        grid, br, bf = _tiles(x2.shape[0], f)
        _swiglu_bwd_launch[grid](x2, dy2, dx, x2.shape[0], f, x2.stride(0), dy2.stride(0), dx.stride(0),
                                 BR=br, BF=bf, num_warps=_NUM_WARPS)
    return dx


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        f = x.shape[-1] // 2
        x2 = _rows(x, 2 * f)
        ctx.save_for_backward(x2)  # only x: y's backward recomputes sigmoid(a) from it
        ctx.x_shape = x.shape
        return _forward(x2, f).view(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x2,) = ctx.saved_tensors
        f = x2.shape[1] // 2
        dy2 = _rows(dy, f)
        return _backward(x2, dy2, f).view(ctx.x_shape)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :F]) * x[..., F:]``, fused, differentiable.

    Args:
        x: ``[..., 2F]`` fp32/fp16/bf16 on a GPU (or CPU under ``TRITON_INTERPRET=1``).
    Returns:
        ``[..., F]`` in ``x.dtype``, contiguous; math in fp32 as :func:`swiglu_reference`.
    Raises:
        ValueError: odd last dim, or a dtype other than fp32/fp16/bf16.

    Example:
        >>> y = swiglu(fc1_out)  # [s, b, 2 * ffn] -> [s, b, ffn]
    """
    _check(x)
    return _SwiGLU.apply(x)
