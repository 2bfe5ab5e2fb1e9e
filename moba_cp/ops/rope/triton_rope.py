"""Triton kernel: rotary position embedding, forward and backward, one kernel each way.

Why: Megatron-Core without Transformer Engine applies RoPE with ~10 torch operations per tensor
(cos, sin, two casts, chunk, neg, cat, two products, a sum), and autograd runs as many backward
ones; on one H200 in 8K training the ``mul``, ``cat`` and ``neg`` kernels (most of them RoPE's,
some SwiGLU's) took ~18% of the device time of a step with full attention
(``benchmarks/results/profile_train8k_h200_2026-12-03/``), more than the linear layers. One kernel reads ``t`` once and writes ``y`` once.

Shapes: ``t [S, B, H, D]`` (Megatron's ``sbhd``; any strides with the last one 1, e.g. the query
view of the fused QKV projection), tables ``cos, sin [S, R]`` fp32 (``R <= D`` even), output
``[S, B, H, D]`` contiguous in ``t.dtype``. With ``[x1, x2]`` the halves of the first ``R``
channels and ``c1, c2, s1, s2`` the matching halves of the tables:

    forward:   y1 = x1 c1 - x2 s1      y2 = x2 c2 + x1 s2
    backward:  g1 = d1 c1 + d2 s2      g2 = d2 c2 - d1 s1    (the transpose)

and channels ``R..D`` pass through. Math in fp32, one rounding at the store (Megatron's unfused
path rounds ``cos``/``sin`` and each product to ``t.dtype``: the results differ in the last bits).
The tables are ``torch.cos``/``torch.sin`` of Megatron's ``freqs``, made once per ``freqs`` tensor
(:func:`rope_tables`), not per layer: every layer of a forward gets the same ``freqs``.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from moba_cp.ops.fast_launch import FastKernel
from moba_cp.ops.launch_math import cdiv, next_power_of_2

__all__ = ["apply_rope", "rope_tables"]

#: Elements a program handles per half (rows x padded half width): memory-bound, so large tiles.
_TILE_ELEMS = 2048


@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_rows, B, H, stride_xs, stride_xb, stride_xh, stride_cs,
                 HALF: tl.constexpr, HP: tl.constexpr, REST: tl.constexpr, RP: tl.constexpr,
                 D: tl.constexpr, BR: tl.constexpr, BACKWARD: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)  # flattened (s, b, h)
    rmask = rows < n_rows
    h = rows % H
    sb = rows // H
    b = sb % B
    s = sb // B
    x_row = s.to(tl.int64) * stride_xs + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    y_row = rows.to(tl.int64) * D
    c_row = s.to(tl.int64) * stride_cs
    j = tl.arange(0, HP)
    m = rmask[:, None] & (j < HALF)[None, :]
    x1 = tl.load(X + x_row[:, None] + j[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_row[:, None] + HALF + j[None, :], mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(COS + c_row[:, None] + j[None, :], mask=m, other=0.0)
    c2 = tl.load(COS + c_row[:, None] + HALF + j[None, :], mask=m, other=0.0)
    s1 = tl.load(SIN + c_row[:, None] + j[None, :], mask=m, other=0.0)
    s2 = tl.load(SIN + c_row[:, None] + HALF + j[None, :], mask=m, other=0.0)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + y_row[:, None] + j[None, :], y1.to(Y.dtype.element_ty), mask=m)
    tl.store(Y + y_row[:, None] + HALF + j[None, :], y2.to(Y.dtype.element_ty), mask=m)
    if REST > 0:  # channels past the rotated ones: copied (forward) / passed back (backward)
        k = tl.arange(0, RP)
        mk = rmask[:, None] & (k < REST)[None, :]
        rest = tl.load(X + x_row[:, None] + 2 * HALF + k[None, :], mask=mk, other=0.0)
        tl.store(Y + y_row[:, None] + 2 * HALF + k[None, :], rest.to(Y.dtype.element_ty), mask=mk)


# Launched through FastKernel: at 8K a step is host-bound, and this runs 4x a layer (q, k; fwd, bwd).
_rope_launch = FastKernel(_rope_kernel)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    s, b, h, d = x.shape
    r = cos.shape[1]
    y = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    n_rows = s * b * h
    if n_rows == 0:
        return y
    hp = next_power_of_2(r // 2)
    rest = d - r
    br = max(1, min(256, _TILE_ELEMS // hp))
    _rope_launch[(cdiv(n_rows, br),)](
        x, cos, sin, y, n_rows, b, h, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
        HALF=r // 2, HP=hp, REST=rest, RP=next_power_of_2(max(rest, 1)), D=d, BR=br,
        BACKWARD=backward, num_warps=4,
    )
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(t, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return _launch(dy, cos, sin, backward=True), None, None


def _check(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"apply_rope: t has shape {tuple(t.shape)}; it must be [S, B, H, D] (Megatron's sbhd).")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"apply_rope: t is {t.dtype}; use fp32, fp16 or bf16.")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != t.shape[0]:
        raise ValueError(f"apply_rope: tables {tuple(cos.shape)} / {tuple(sin.shape)} must both be [S, R] with "
                         f"S = {t.shape[0]} (t's first dim); build them with rope_tables(freqs).")
    r = cos.shape[1]
    if r % 2 or r > t.shape[3] or r == 0:
        raise ValueError(f"apply_rope: rotary dim R = {r} must be even, positive and at most the head dim "
                         f"{t.shape[3]}.")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.stride(1) != 1 or sin.stride(1) != 1 \
            or cos.stride(0) != sin.stride(0):
        raise ValueError("apply_rope: the tables must be fp32 with rows of one stride and stride-1 columns "
                         "(rope_tables(freqs) makes them).")
    if cos.device != t.device or sin.device != t.device:
        raise ValueError(f"apply_rope: t is on {t.device}, the tables on {cos.device}/{sin.device}.")


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``t [S, B, H, D]`` rotated by the tables ``cos, sin [S, R]`` (fp32); differentiable in ``t``.

    Returns a contiguous ``[S, B, H, D]`` tensor in ``t.dtype`` (module docstring for the math).
    """
    _check(t, cos, sin)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return _Rope.apply(t, cos, sin)


class _TableCache:
    """The tables of the last ``freqs`` tensor seen: a forward's layers share one ``freqs``, so it
    is made once per forward (or once per run, where Megatron caches ``freqs`` too). Keyed by the
    tensor's identity and version: another or a rewritten ``freqs`` never finds a stale entry."""

    def __init__(self):
        self._ref = None
        self._key = None
        self._tables = None

    def get(self, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if freqs.is_inference():
            # an inference tensor has no version counter, so a rewrite could not be seen: not cached
            return self._make(freqs)
        key = (freqs.data_ptr(), freqs._version, tuple(freqs.shape), freqs.dtype, freqs.device)
        if self._ref is not None and self._ref() is freqs and self._key == key:
            return self._tables
        tables = self._make(freqs)
        self._ref, self._key, self._tables = weakref.ref(freqs), key, tables
        return tables

    @staticmethod
    def _make(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = freqs.detach().reshape(freqs.shape[0], freqs.shape[-1]).float()
        return torch.cos(f).contiguous(), torch.sin(f).contiguous()


_TABLES = _TableCache()


def rope_tables(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin) [S, R]`` fp32 of Megatron's ``freqs [S, 1, 1, R]`` (angles), cached per tensor."""
    if freqs.dim() != 4 or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise ValueError(f"rope_tables: freqs has shape {tuple(freqs.shape)}; expected [S, 1, 1, R] (one angle "
                         f"table shared by the batch and the heads, as Megatron's RotaryEmbedding makes it).")
    return _TABLES.get(freqs)
