"""This rank's context-parallel shard of a training batch (Megatron's zigzag layout)."""

from __future__ import annotations

from megatron.core import parallel_state

from moba_cp.parallel.zigzag import zigzag_shard

__all__ = ["shard_batch_for_cp"]


def shard_batch_for_cp(batch: dict, cp_group=None) -> dict:
    """This rank's zigzag CP shard of a batch of ``[b, S, ...]`` tensors (``attention_mask``: dim 2).

    The layout of ``megatron.core.utils.get_batch_on_this_cp_rank`` (chunks ``r`` and
    ``2cp-1-r``), which RoPE and the moba_cp attentions assume, but with one signature for every
    megatron-core version: 0.19 made ``get_batch_on_this_cp_rank(batch, is_hybrid_cp, ...)``
    take a required ``is_hybrid_cp``, so 0.16.1-style calls fail there. ``None`` values pass
    through; with cp == 1 the batch is returned unchanged.
    """
    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group()
    cp = cp_group.size()
    if cp == 1:
        return batch
    r = cp_group.rank()
    return {k: (None if v is None else zigzag_shard(v, r, cp, seq_dim=2 if k == "attention_mask" else 1))
            for k, v in batch.items()}
