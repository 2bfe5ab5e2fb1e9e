"""A MoBA layer's block selection, kept from its checkpointed forward for its recomputation.

With ``train.recompute: selective`` Megatron-Core runs a layer's core attention twice: inside
``tensor_parallel.checkpoint`` without autograd (the forward pass), then again in the backward
pass on the checkpoint's saved ``query``, ``key`` and ``value`` to rebuild what the attention's
backward needs. MoBA's selection (block centroids, the gate's scores, the top-k) is a function of
``query``, ``key``, the documents and the block arguments only, so the recomputation would select
exactly the same blocks again. :class:`SelectionMemo` keeps the first pass's selection, compacted
to 1-2 bytes a block id, until the recomputation, which then runs only the attention: the
centroids and the gate run once per layer and step instead of twice, and the result is the same
bits (the attention runs on the same selection either way).

Identity, not equality, finds an entry: its key holds, for every input, a weak reference to the
tensor's storage (which never keeps it alive), the view (offset, shape, strides, dtype, device)
and the version counter, which every in-place write bumps. The recomputation's inputs are the
checkpoint's saved tensors, detached: same storages, same views, same versions. A freed storage
never matches (its weak reference has expired, and the storage's address is not reused while a
weak reference lives), so a kept selection never serves other data. An entry whose inputs died
without a backward (a forward under ``torch.no_grad`` in training mode) is dropped at the next
:meth:`SelectionMemo.put`; an entry not found (the memo switched on between the two passes, say)
means the recomputation selects again, as without the memo.

What is kept besides the selection: the Triton backend's gather index of it (``api.gather_index``,
int32, ~4 bytes a selected block plus small tables), when it is at most :data:`INDEX_MAX_BYTES`, so
the recomputation does not build it again either. Measured on one H200 (session 21) building it
took 0.25 ms at 32K tokens x 16 heads, top-3 (more than the gate's 0.18 ms) and 1.3 ms at 128K,
top-12, where it is ~110 MB a layer: 2.6 GB over 24 layers would leave under 2 GiB of an H200
free beside the 128K recipe's 135 GiB peak, too thin a margin, so there only the selection is kept.

``MOBA_CP_REUSE_SELECTION=0`` turns the reuse off (both passes select), for measuring it.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["SelectionMemo", "reuse_enabled", "INDEX_MAX_BYTES"]

#: The largest gather index a layer keeps with its selection (bytes of one call's index): 32K
#: tokens x 16 heads x top-3 is ~6.3 MB; 128K x 16 heads x top-12 (~110 MB) keeps the selection only.
INDEX_MAX_BYTES = 32 << 20


def reuse_enabled() -> bool:
    """``MOBA_CP_REUSE_SELECTION``: ``1`` (default) reuses the selection under selective
    recomputation, ``0`` selects in both passes."""
    value = os.environ.get("MOBA_CP_REUSE_SELECTION", "1")
    if value not in ("0", "1"):
        raise ValueError(
            f"MOBA_CP_REUSE_SELECTION={value!r}: choose 1 (the recomputed MoBA forward reuses the first "
            f"pass's block selection, the default) or 0 (it selects again).")
    return value == "1"


class _TensorKey:
    """One input's identity: its storage (weakly), its view and its version."""

    __slots__ = ("ref", "view")

    def __init__(self, t: torch.Tensor):
        self.ref = StorageWeakRef(t.untyped_storage())
        self.view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)

    def alive(self) -> bool:
        return not self.ref.expired()

    def same(self, other: "_TensorKey | None") -> bool:
        """The same live tensor view (a method, not ``__eq__``: a tuple's ``==`` takes an element
        as equal to itself without asking it, which would let a dead key match)."""
        return (other is not None and self.view == other.view and self.ref == other.ref
                and self.alive() and other.alive())


def _same(a: tuple, b: tuple) -> bool:
    """Whether two keys name the same live inputs and the same extra arguments."""
    (ta, xa), (tb, xb) = a, b
    return xa == xb and len(ta) == len(tb) and all(
        y is None if x is None else x.same(y) for x, y in zip(ta, tb))


class SelectionMemo:
    """Selections of one layer, each under the identity of the inputs it was made from.

    Example (what :class:`~moba_cp.megatron.core_attention.MoBACoreAttention` does)::

        key = memo.key([query, key], extra=(block_size, topk))
        memo.put(key, selection)            # checkpointed forward (no autograd)
        selection = memo.take(key)          # recomputation: the same tensors find it (or None)
    """

    def __init__(self):
        self._entries: list[tuple[tuple, object]] = []

    @staticmethod
    def key(tensors: Iterable[Optional[torch.Tensor]], extra: tuple = ()) -> tuple:
        """The identity of ``tensors`` (None allowed: an absent input) and ``extra`` (hashable
        arguments that the selection depends on)."""
        return tuple(None if t is None else _TensorKey(t) for t in tensors), tuple(extra)

    def put(self, key: tuple, selection) -> None:
        """Keep ``selection`` (a tensor, or a tuple of tensors and Nones) under ``key``; drops
        entries whose inputs have been freed."""
        self._entries = [(k, s) for k, s in self._entries
                         if all(t is None or t.alive() for t in k[0])]
        self._entries.append((key, selection))

    def take(self, key: tuple):
        """The selection kept under ``key`` (removed from the memo), or None."""
        for i, (k, selection) in enumerate(self._entries):
            if _same(k, key):
                del self._entries[i]
                return selection
        return None

    def __len__(self) -> int:
        return len(self._entries)
