"""Which samples each rank trains on, and how they become a batch on the device.

Data order is a pure function of the step: step ``s`` consumes samples ``s * global_batch``
to ``(s + 1) * global_batch - 1``, cut into contiguous micro-batches of ``micro_batch`` samples
and dealt to the data-parallel ranks. A resumed run therefore sees exactly the samples the
uninterrupted run would, whatever its data-parallel size.
"""

from __future__ import annotations

import torch

from moba_cp.megatron.cp_batch import shard_batch_for_cp

__all__ = ["BATCH_KEYS", "microbatch_indices", "host_batch", "to_device", "collate"]

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


def host_batch(dataset, indices: list[int], *, pin: bool = False, cp_group=None) -> dict:
    """The samples ``indices`` of ``dataset`` stacked on the host (``[micro_batch, S / cp]`` each of
    :data:`BATCH_KEYS`, token ids, labels and positions as int64), cut to this rank's zigzag CP
    shard (chunks ``r`` and ``2cp-1-r`` of every sequence) before any copy, so a rank moves only
    its shard to the GPU. ``pin``: in page-locked memory, so :func:`to_device`'s copy neither stages
    through a bounce buffer nor holds the host (set it only where CUDA is there to pin with)."""
    items = [dataset[i] for i in indices]
    batch = {key: torch.stack([torch.as_tensor(it[key]) for it in items]) for key in BATCH_KEYS}
    for key in ("tokens", "labels", "position_ids"):
        batch[key] = batch[key].long()
    batch = shard_batch_for_cp(batch, cp_group)
    return {key: v.pin_memory() for key, v in batch.items()} if pin else batch


def to_device(batch: dict, device: torch.device) -> dict:
    """A :func:`host_batch` on ``device``; asynchronous where the batch is pinned."""
    return {key: v.to(device, non_blocking=True) for key, v in batch.items()}


def collate(dataset, indices: list[int], device: torch.device) -> dict:
    """:func:`host_batch` of ``indices`` moved to ``device`` (pinned on the way where it is a GPU)."""
    return to_device(host_batch(dataset, indices, pin=device.type == "cuda"), device)
