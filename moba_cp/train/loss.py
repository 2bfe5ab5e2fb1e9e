"""The training loss's reduction over a global batch: per token or per sample.

Megatron's per-token convention (``calculate_per_token_loss=True``): each rank's ``loss_func``
returns a local loss *sum* and a local *count*; ``finalize_model_grads`` all-reduces the counts
over data x context parallel ranks and divides the summed gradients by that total. Both
reductions below fit that convention, so they need nothing else from the schedule:

- ``token`` (default): every loss token weighs the same: ``sum(loss * mask) / sum(mask)`` over
  the global batch. A sample with few loss tokens (a retrieval document whose loss is on its
  ~6 answer tokens, beside 32K-token text samples) then barely moves the model.
- ``sample``: every sample with at least one loss token weighs the same: the mean over samples of
  each sample's own token mean. A sample's tokens are split over the context-parallel ranks, so
  its token count is all-reduced over the CP group first; each rank then adds its tokens' share
  of the sample's mean, and the sample is counted once (on CP rank 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["LOSS_NORMALIZATIONS", "masked_loss_sums"]

LOSS_NORMALIZATIONS = ("token", "sample")


def masked_loss_sums(per_token_loss: torch.Tensor, mask: torch.Tensor, normalization: str = "token",
                     cp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(loss_sum, count)`` of a micro-batch under ``normalization``.

    Args:
        per_token_loss: ``[B, S_local]`` losses of this rank's tokens (differentiable).
        mask: ``[B, S_local]`` loss weights (0/1) of the same tokens.
        normalization: ``"token"`` or ``"sample"`` (module docstring).
        cp_group: the context-parallel group the sequence is split over (None or size 1: not split).

    Returns:
        ``loss_sum`` (fp32 scalar, differentiable) and ``count`` (int scalar); summed over every
        rank of the global batch, ``sum(loss_sum) / sum(count)`` is the batch's loss.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss normalization {normalization!r}: choose one of {', '.join(LOSS_NORMALIZATIONS)}.")
    if per_token_loss.shape != mask.shape or per_token_loss.dim() != 2:
        raise ValueError(f"per-token loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} must both be [B, S].")
    mask = mask.float()
    weighted = per_token_loss.float() * mask
    if normalization == "token":
        return weighted.sum(), mask.sum().to(torch.int)
    counts = mask.sum(dim=1)  # this rank's loss tokens per sample
    split = cp_group is not None and dist.get_world_size(cp_group) > 1
    if split:
        dist.all_reduce(counts, group=cp_group)  # the whole sample's count (counts is a fresh tensor)
    has_loss = counts > 0
    loss_sum = (weighted.sum(dim=1) / counts.clamp_min(1.0)).sum()
    first = not split or dist.get_rank(cp_group) == 0
    count = has_loss.sum() if first else torch.zeros((), dtype=torch.long, device=mask.device)
    return loss_sum, count.to(torch.int)
