"""Numerically stable merge of partial attention results by log-sum-exp (fp32).

The one shared helper for every place that combines attention computed over disjoint key
sets (context-parallel ring steps, split kernels). Not a copy anywhere else.
"""

from __future__ import annotations

import torch

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


def merge_into(
    o: torch.Tensor, lse: torch.Tensor, o_new: torch.Tensor, lse_new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one partial (``o_new``, ``lse_new``) into an fp32 running result (``o``, ``lse``).

    Shapes as :func:`merge_partials`. Returns new fp32 tensors (inputs are not modified).
    """
    lse_new = lse_new.float()
    m = torch.maximum(lse, lse_new)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_old = torch.exp(lse - m_safe)  # exp(-inf) = 0: an empty partial contributes nothing
    w_new = torch.exp(lse_new - m_safe)
    total = w_old + w_new
    out_lse = torch.where(total > 0, m_safe + torch.log(total), torch.full_like(m, float("-inf")))
    denom = torch.where(total > 0, total, torch.ones_like(total))
    o_out = (o.float() * w_old[..., None] + o_new.float() * w_new[..., None]) / denom[..., None]
    return o_out, out_lse
