"""Input checks for the MoBA ops: every error names the value, the rule and the fix."""

from __future__ import annotations

import weakref

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, op: str = "moba_attn") -> None:
    """Check packed ``q [T, Hq, D]``, ``k/v [T, Hkv, D]`` for rank, shape, dtype, device, GQA."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{op}: {name} has shape {tuple(t.shape)} ({t.dim()} dims); expected 3 dims "
                f"[T, H, D] (packed tokens). Fix: for [B, S, H, D] batches use moba_attn_bshd, "
                f"or flatten batch and sequence and pass cu_seqlens."
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{op}: {name}.dtype is {t.dtype}; expected one of fp16, bf16, fp32, fp64. "
                f"Fix: cast with {name}.to(torch.bfloat16)."
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); they must match. "
            f"Fix: cast all three to one dtype."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{op}: q, k, v are on different devices ({q.device}, {k.device}, {v.device}); "
            f"they must share one. Fix: move them with .to(q.device)."
        )
    if k.shape != v.shape:
        raise ValueError(
            f"{op}: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match [T, Hkv, D]."
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            f"{op}: q has {q.shape[0]} tokens but k/v have {k.shape[0]}; self-attention needs the "
            f"same T for all three."
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{op}: q head dim {q.shape[2]} differs from k/v head dim {k.shape[2]}; they must match."
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"{op}: Hq={hq} query heads is not divisible by Hkv={hkv} key/value heads (GQA needs "
            f"Hq % Hkv == 0). Fix: choose Hkv among the divisors of {hq}."
        )


def check_block_args(block_size, topk, *, op: str = "moba_attn") -> None:
    """``block_size >= 1`` and ``topk >= 1`` integers (topk > n_blocks is valid: full attention)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"{op}: block_size={block_size!r} is invalid; it must be an integer >= 1 "
            f"(tokens per MoBA block, e.g. 512)."
        )
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(
            f"{op}: topk={topk!r} is invalid; it must be an integer >= 1 (blocks per query, "
            f"counting the query's own block; topk=1 is block-local causal attention)."
        )


#: cu_seqlens tensors whose values passed (weak references, keyed by id, version and T): the
#: value check reads them on the host (a device sync), so each tensor is checked once, not
#: once per layer and call.
_VALIDATED: dict[tuple, weakref.ref] = {}


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
    key = (id(cu_seqlens), cu_seqlens._version, total)
    hit = _VALIDATED.get(key)
    if hit is not None and hit() is cu_seqlens:
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
    _VALIDATED[key] = weakref.ref(cu_seqlens)
    while len(_VALIDATED) > 16:
        _VALIDATED.pop(next(iter(_VALIDATED)))
