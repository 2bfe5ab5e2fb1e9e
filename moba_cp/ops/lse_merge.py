"""Numerically stable merge of partial attention results by log-sum-exp (fp32).

The one shared helper for every place that combines attention computed over disjoint key
sets (context-parallel ring steps, split kernels). Not a copy anywhere else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_cp.ops.launch_math import cdiv, next_power_of_2

__all__ = ["merge_partials", "merge_into"]


def merge_partials(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attentions over disjoint key sets into the attention over their union.

    Args:
        outs: each ``[..., H, D]``, the softmax-normalised output over its own key set
            (rows with no key hold 0).
        lses: each ``[..., H]`` fp32 natural-log LSE of its key set (``-inf`` for no key).
    Returns:
        ``o [..., H, D]`` fp32 and ``lse [..., H]`` fp32, with
        ``lse = log(sum_i exp(lse_i))`` and ``o = sum_i exp(lse_i - lse) * o_i``.
        Rows with no key in any partial get ``o = 0``, ``lse = -inf``.

    Example:
        >>> o, lse = merge_partials([o_local, o_remote], [lse_local, lse_remote])
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_partials needs as many outputs as LSEs (>0), got {len(outs)} and {len(lses)}")
    o = outs[0].float()
    lse = lses[0].float()
    for o_i, lse_i in zip(outs[1:], lses[1:]):
        o, lse = merge_into(o, lse, o_i, lse_i)
    return o, lse


@triton.jit
def _merge_kernel(O, LSE, ON, LSEN, OUT, LOUT, n_rows, D, BR: tl.constexpr, DP: tl.constexpr):
    # One pass over both partials: rows are the flattened [..., H], D the head dim.
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m = r < n_rows
    la = tl.load(LSE + r, mask=m, other=float("-inf"))
    lb = tl.load(LSEN + r, mask=m, other=float("-inf"))
    mx = tl.maximum(la, lb)
    ms = tl.where(mx == float("-inf"), 0.0, mx)
    wa = tl.exp(la - ms)
    wb = tl.exp(lb - ms)
    tot = wa + wb
    den = tl.where(tot > 0, tot, 1.0)
    tl.store(LOUT + r, tl.where(tot > 0, ms + tl.log(den), float("-inf")), mask=m)
    d = tl.arange(0, DP)
    m2 = m[:, None] & (d < D)[None, :]
    off = r[:, None] * D + d[None, :]
    a = tl.load(O + off, mask=m2, other=0.0).to(tl.float32)
    b = tl.load(ON + off, mask=m2, other=0.0).to(tl.float32)
    out = (a * (wa / den)[:, None] + b * (wb / den)[:, None])
    tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=m2)


def _merge_triton(o, lse, o_new, lse_new, out_dtype):
    o, o_new = o.contiguous(), o_new.contiguous()
    lse, lse_new = lse.float().contiguous(), lse_new.float().contiguous()
    d = o.shape[-1]
    out = torch.empty(o.shape, dtype=out_dtype, device=o.device)
    lout = torch.empty(lse.shape, dtype=torch.float32, device=o.device)
    n = lse.numel()
    if n:
        br = max(1, 4096 // next_power_of_2(d))
        _merge_kernel[(cdiv(n, br),)](o, lse, o_new, lse_new, out, lout, n, d, BR=br,
                                      DP=next_power_of_2(d), num_warps=4)
    return out, lout


def merge_into(
    o: torch.Tensor, lse: torch.Tensor, o_new: torch.Tensor, lse_new: torch.Tensor,
    out_dtype: torch.dtype = torch.float32, use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one partial (``o_new``, ``lse_new``) into a running result (``o``, ``lse``).

    Shapes as :func:`merge_partials`. Returns new tensors (inputs are not modified): ``o`` in
    ``out_dtype`` (computed in fp32; fp32 keeps a running result exact between merges, the last
    merge may write the output dtype directly), ``lse`` fp32.
    ``use_triton``: one fused pass (default on CUDA: the torch form makes ~6 fp32 temporaries of
    the size of ``o``, 8 GiB each at 512K tokens x 32 heads); the torch form is its reference.
    """
    if use_triton is None:
        use_triton = o.is_cuda
    if use_triton and o.shape == o_new.shape and lse.shape == lse_new.shape == o.shape[:-1]:
        return _merge_triton(o, lse, o_new, lse_new, out_dtype)
    lse_new = lse_new.float()
    m = torch.maximum(lse, lse_new)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_old = torch.exp(lse - m_safe)  # exp(-inf) = 0: an empty partial contributes nothing
    w_new = torch.exp(lse_new - m_safe)
    total = w_old + w_new
    out_lse = torch.where(total > 0, m_safe + torch.log(total), torch.full_like(m, float("-inf")))
    denom = torch.where(total > 0, total, torch.ones_like(total))
    o_out = (o.float() * w_old[..., None] + o_new.float() * w_new[..., None]) / denom[..., None]
    return o_out.to(out_dtype), out_lse
