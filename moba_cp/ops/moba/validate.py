"""The MoBA op's input rules, defined once: every error names the value, the rule and the fix.

Used by the public op (:mod:`moba_cp.ops.moba.api`) and the Megatron core-attention modules
(:mod:`moba_cp.megatron.core_attention`). Each rule comes in two forms: ``*_error(...)`` returns
the exception a violation raises (None when the inputs are valid), for callers that must first
agree with other ranks before raising (the context-parallel ops send the message around);
``check_*(...)`` raises it.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["qkv_error", "check_qkv", "block_args_error", "check_block_args", "check_cu_seqlens", "FLOAT_DTYPES", "PACKED"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: the packed layout of the public op; other callers pass their own (e.g. ``"[s, b, H, D]"``)
PACKED = "[T, H, D]"


def _ndims(layout: str) -> int:
    return layout.count(",") + 1


def qkv_error(q, k, v, *, op: str = "moba_attn", layouts: tuple[str, ...] = (PACKED,)) -> Exception | None:
    """What is wrong with ``q [..., Hq, D]``, ``k/v [..., Hkv, D]`` (None if nothing).

    Rules: tensors of one of ``layouts`` (the last two dims are heads and head dim), a float dtype
    shared by all three, one device, ``k`` and ``v`` of one shape, the same leading dims (tokens,
    batch) and head dim for ``q`` and ``k``, and ``Hq % Hkv == 0`` (GQA).
    """
    allowed = sorted({_ndims(lay) for lay in layouts})
    expected = " or ".join(layouts)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in allowed:
            fix = ("Fix: for [B, S, H, D] batches use moba_attn_bshd, or flatten batch and sequence and "
                   "pass cu_seqlens." if layouts == (PACKED,) else f"Fix: pass {expected} tensors.")
            return ValueError(
                f"{op}: {name} has shape {tuple(t.shape)} ({t.dim()} dims); expected "
                f"{' or '.join(map(str, allowed))} dims {expected}"
                f"{' (packed tokens)' if layouts == (PACKED,) else ''}. {fix}"
            )
        if t.dtype not in FLOAT_DTYPES:
            return TypeError(
                f"{op}: {name}.dtype is {t.dtype}; expected one of fp16, bf16, fp32, fp64. "
                f"Fix: cast with {name}.to(torch.bfloat16)."
            )
    if not (q.dim() == k.dim() == v.dim()):
        return ValueError(f"{op}: q, k, v have {q.dim()}, {k.dim()}, {v.dim()} dims; they must match {expected}.")
    if not (q.dtype == k.dtype == v.dtype):
        return TypeError(
            f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); they must match. "
            f"Fix: cast all three to one dtype."
        )
    if not (q.device == k.device == v.device):
        return ValueError(
            f"{op}: q, k, v are on different devices ({q.device}, {k.device}, {v.device}); "
            f"they must share one. Fix: move them with .to(q.device)."
        )
    if k.shape != v.shape:
        return ValueError(
            f"{op}: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match {expected}."
        )
    if q.shape[:-2] != k.shape[:-2]:
        if q.dim() == 3:
            return ValueError(
                f"{op}: q has {q.shape[0]} tokens but k/v have {k.shape[0]}; self-attention needs the "
                f"same T for all three."
            )
        return ValueError(
            f"{op}: q has leading dims {tuple(q.shape[:-2])} but k/v have {tuple(k.shape[:-2])} "
            f"(layout {expected}); self-attention needs the same tokens and batch for all three."
        )
    if q.shape[-1] != k.shape[-1]:
        return ValueError(
            f"{op}: q head dim {q.shape[-1]} differs from k/v head dim {k.shape[-1]}; they must match."
        )
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv < 1 or hq % hkv != 0:
        return ValueError(
            f"{op}: Hq={hq} query heads is not divisible by Hkv={hkv} key/value heads (GQA needs "
            f"Hq % Hkv == 0). Fix: choose Hkv among the divisors of {hq}."
        )
    return None


def check_qkv(q, k, v, *, op: str = "moba_attn", layouts: tuple[str, ...] = (PACKED,)) -> None:
    """Raise :func:`qkv_error`'s exception, if any."""
    err = qkv_error(q, k, v, op=op, layouts=layouts)
    if err is not None:
        raise err


def block_args_error(block_size, topk, *, op: str = "moba_attn") -> Exception | None:
    """``block_size >= 1`` and ``topk >= 1`` integers (topk > n_blocks is valid: full attention)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        return ValueError(
            f"{op}: block_size={block_size!r} is invalid; it must be an integer >= 1 "
            f"(tokens per MoBA block, e.g. 512)."
        )
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        return ValueError(
            f"{op}: topk={topk!r} is invalid; it must be an integer >= 1 (blocks per query, "
            f"counting the query's own block; topk=1 is block-local causal attention)."
        )
    return None


def check_block_args(block_size, topk, *, op: str = "moba_attn") -> None:
    """Raise :func:`block_args_error`'s exception, if any."""
    err = block_args_error(block_size, topk, op=op)
    if err is not None:
        raise err


#: cu_seqlens tensors whose values passed -> (tensor version, T). The value check reads them on
#: the host (a device sync), so each tensor is checked once, not once per layer and call. Keyed
#: by the tensor object itself (weakly): an entry dies with its tensor, so a new tensor that
#: happens to get the same ``id()`` can never inherit it.
_VALIDATED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, total: int, device, *, op: str = "moba_attn") -> None:
    """int32 1-D, starts at 0, non-decreasing, ends at ``total`` tokens, on the inputs' device.
    The value checks run once per tensor object and version (see ``_VALIDATED``)."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cu_seqlens must be a torch.Tensor (int32), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(
            f"{op}: cu_seqlens.dtype is {cu_seqlens.dtype}; it must be torch.int32 (flash-attn "
            f"varlen convention). Fix: cu_seqlens.to(torch.int32)."
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{op}: cu_seqlens has shape {tuple(cu_seqlens.shape)}; expected 1-D [n_docs + 1] "
            f"with at least 2 entries, e.g. tensor([0, T], dtype=torch.int32)."
        )
    if cu_seqlens.device != torch.device(device):
        raise ValueError(
            f"{op}: cu_seqlens is on {cu_seqlens.device} but q is on {device}. "
            f"Fix: cu_seqlens.to(q.device)."
        )
    stamp = (cu_seqlens._version, total)
    if _VALIDATED.get(cu_seqlens) == stamp:
        return  # values already checked (this tensor object, unmodified): no host sync again
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{op}: cu_seqlens[0] = {cu[0]}; it must be 0 (offsets start at the first token).")
    for i in range(len(cu) - 1):
        if cu[i + 1] < cu[i]:
            raise ValueError(
                f"{op}: cu_seqlens decreases at index {i + 1} ({cu[i]} -> {cu[i + 1]}); offsets "
                f"must be non-decreasing (cumulative document lengths)."
            )
    if cu[-1] != total:
        raise ValueError(
            f"{op}: cu_seqlens[-1] = {cu[-1]} but q holds T={total} tokens; the last offset must "
            f"equal T. Fix: build it as cumsum of the document lengths with a leading 0."
        )
    _VALIDATED[cu_seqlens] = stamp
