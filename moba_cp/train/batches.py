"""Which samples each rank trains on, and how they become a batch on the device.

Data order is a pure function of the step: step ``s`` consumes samples ``s * global_batch``
to ``(s + 1) * global_batch - 1``, cut into contiguous micro-batches of ``micro_batch`` samples
and dealt to the data-parallel ranks. A resumed run therefore sees exactly the samples the
uninterrupted run would, whatever its data-parallel size.
"""

from __future__ import annotations

import torch

from moba_cp.megatron.cp_batch import shard_batch_for_cp

__all__ = ["BATCH_KEYS", "microbatch_indices", "collate"]

#: what each dataset sample holds (Megatron's GPT dataset layout)
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def microbatch_indices(step: int, global_batch: int, micro_batch: int, dp: int, dp_rank: int) -> list[list[int]]:
    """Sample indices of each micro-batch that data-parallel rank ``dp_rank`` of ``dp`` processes
    at ``step``: ``global_batch // (micro_batch * dp)`` lists of ``micro_batch`` indices."""
    base = step * global_batch
    n_micro = global_batch // (micro_batch * dp)
    out = []
    for m in range(n_micro):
        start = base + m * micro_batch * dp + dp_rank * micro_batch
        out.append(list(range(start, start + micro_batch)))
    return out


def collate(dataset, indices: list[int], device: torch.device) -> dict:
    """The samples ``indices`` of ``dataset`` stacked on ``device`` (``[micro_batch, S]`` each of
    :data:`BATCH_KEYS`; token ids as int64), then cut to this rank's zigzag CP shard (chunks ``r``
    and ``2cp-1-r`` of every sequence)."""
    items = [dataset[i] for i in indices]
    batch = {key: torch.stack([torch.as_tensor(it[key]) for it in items]).to(device, non_blocking=True)
             for key in BATCH_KEYS}
    for key in ("tokens", "labels", "position_ids"):
        batch[key] = batch[key].long()
    return shard_batch_for_cp(batch)
