"""Shared host-side pieces of the MoBA Triton backend: key-block tables and the gather index.

Every attention kernel reads keys through a **key-block table** (``KeyBlocks``): global block
``g`` holds key rows ``[kstart[g], kstart[g] + klen[g])`` whose first key sits at position
``kpos[g]``; a key at ``kpos[g] + j`` is visible to a query at position ``p`` iff
``kpos[g] + j <= p`` (this one rule makes the own block causal and costs nothing elsewhere).
Packed documents and context-parallel slot buffers are two ways of filling the same table,
so one set of kernels serves ``moba_attn`` and ``partial_attn_fwd/bwd``.

The attention kernels are **key-block-major** (FlashMoBA's gather-and-densify idea): the
selection ``[T, Hq, W]`` is inverted into, for every (query head, key block), the list of
(token, slot) entries that selected it (``GatherIndex``, a CSR built by one sort). A program
then gathers up to ``BM`` such query rows into a dense tile and multiplies it with the key
block, so tensor cores run on full tiles no matter how scattered the per-token selection is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["KeyBlocks", "doc_tables", "slot_tables", "GatherIndex", "build_gather_index", "check_triton_inputs"]

def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with ``int(array_of_shape_1)``,
    which NumPy >= 2.4 rejects; loop bounds loaded from memory then fail on CPU. Patch that
    one conversion (interpreter only; compiled kernels are untouched)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter as _interp

    if getattr(_interp, "_moba_index_fixed", False):
        return
    orig = _interp._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _interp._patch_lang_tensor = patched
    _interp._moba_index_fixed = True


_fix_interpreter_index()


@triton.jit
def _ld(ptr):
    """Scalar load usable as a loop bound (the interpreter returns shape-[1] arrays otherwise)."""
    return tl.max(tl.load(ptr + tl.arange(0, 1)), axis=0)


SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class KeyBlocks:
    """Global key-block table (int32 device tensors, ``[NBK]`` each)."""

    kstart: torch.Tensor
    kpos: torch.Tensor
    klen: torch.Tensor

    @property
    def n(self) -> int:
        return self.kstart.shape[0]


def doc_tables(total: int, cu_seqlens: torch.Tensor | None, block_size: int, device):
    """Tables for packed documents.

    Returns ``(blocks, qpos, base, max_blocks)``: the key-block table (documents cut into
    blocks of ``B``, numbered document after document), ``qpos [T]`` int32 document-local
    positions, ``base [T]`` int32 global id of block 0 of each token's document, and the
    largest number of blocks of any document.
    """
    cu = [0, total] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    qpos = np.zeros(total, dtype=np.int32)
    base = np.zeros(total, dtype=np.int32)
    kstart, kpos, klen = [], [], []
    g = 0
    max_blocks = 1
    for s, e in zip(cu[:-1], cu[1:]):
        n = e - s
        if n == 0:
            continue
        nb = -(-n // block_size)
        qpos[s:e] = np.arange(n, dtype=np.int32)
        base[s:e] = g
        js = np.arange(nb, dtype=np.int64) * block_size
        kstart.append(s + js)
        kpos.append(js)
        klen.append(np.minimum(block_size, n - js))
        g += nb
        max_blocks = max(max_blocks, nb)
    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32))  # noqa: E731
    blocks = KeyBlocks(cat(kstart).to(device), cat(kpos).to(device), cat(klen).to(device))
    return blocks, torch.from_numpy(qpos).to(device), torch.from_numpy(base).to(device), max_blocks


def slot_tables(slot_pos: torch.Tensor, block_size: int) -> KeyBlocks:
    """Table for a CP slot buffer: slot ``s`` = rows ``[s*B, (s+1)*B)``, first position ``slot_pos[s]``."""
    n = slot_pos.shape[0]
    dev = slot_pos.device
    return KeyBlocks(
        torch.arange(n, device=dev, dtype=torch.int32) * block_size,
        slot_pos.to(torch.int32),
        torch.full((n,), block_size, device=dev, dtype=torch.int32),
    )


@dataclass
class GatherIndex:
    """CSR of entries per (query head, key block), bucket ``b = h * NBK + g``.

    ``ent [E]`` int32 holds ``t * W + w`` (token and selection slot), grouped by bucket;
    ``offs [H*NBK + 1]`` int32 bucket starts. ``tile_b / tile_start [n_tiles]`` int32 list
    every ``BM``-row tile (bucket, first entry) so a 1-D grid has equal work per program.
    ``kv_order [Hkv*NBK]`` int32 lists (kv head, block) pairs by decreasing entry count, so
    the backward's longest programs start first.
    """

    ent: torch.Tensor
    offs: torch.Tensor
    tile_b: torch.Tensor
    tile_start: torch.Tensor
    kv_order: torch.Tensor
    n_tiles: int


def build_gather_index(sel: torch.Tensor, base: torch.Tensor | None, nbk: int, hkv: int, bm: int) -> GatherIndex:
    """Invert a selection ``sel [T, Hq, W]`` (``-1`` = none) into a :class:`GatherIndex`.

    Block ids are ``sel + base[t]`` (``base`` None means ids are already global).
    One stable sort keyed by bucket; entries of a bucket stay in token order.
    """
    t, hq, w = sel.shape
    dev = sel.device
    n_b = hq * nbk
    if base is None:
        g = sel
    else:
        g = sel + base[:, None, None]
    hh = torch.arange(hq, device=dev, dtype=torch.int32)[None, :, None]
    key = torch.where(sel >= 0, hh * nbk + g, n_b).reshape(-1)  # sentinel bucket n_b sorts last
    counts = torch.bincount(key, minlength=n_b + 1)[:n_b]
    _, perm = torch.sort(key, stable=True)
    del key
    hw = hq * w
    ent = ((perm // hw) * w + perm % w).to(torch.int32)
    del perm
    offs = torch.zeros(n_b + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=offs[1:])
    ntiles = (counts + (bm - 1)) // bm
    tile_b = torch.repeat_interleave(torch.arange(n_b, device=dev), ntiles)  # one host sync here
    first = torch.cumsum(ntiles, 0) - ntiles
    tile_start = offs[tile_b] + (torch.arange(tile_b.shape[0], device=dev) - first[tile_b]) * bm
    kv_counts = counts.reshape(hkv, hq // hkv, nbk).sum(1).reshape(-1)
    kv_order = torch.argsort(kv_counts, descending=True)
    return GatherIndex(
        ent=ent, offs=offs.to(torch.int32), tile_b=tile_b.to(torch.int32),
        tile_start=tile_start.to(torch.int32), kv_order=kv_order.to(torch.int32),
        n_tiles=int(tile_b.shape[0]),
    )


def check_triton_inputs(q: torch.Tensor, block_size: int, op: str) -> None:
    """Triton-specific limits, with errors that name the value, the rule and the fix."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{op} (backend='triton'): head dim D={d} is not supported; the Triton kernels take "
            f"D in {SUPPORTED_HEAD_DIMS} (a power of two for the tile shapes). Fix: pad the head "
            f"dim to the next supported size, or use backend='naive'."
        )
    if block_size % 16 != 0:
        raise ValueError(
            f"{op} (backend='triton'): block_size={block_size} is not a multiple of 16 (the "
            f"tensor-core tile granularity the kernels assume). Fix: choose e.g. "
            f"{max(16, (block_size // 16) * 16)} or {(block_size // 16 + 1) * 16}, or use backend='naive'."
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op} (backend='triton'): dtype {q.dtype} is not supported; the Triton kernels take "
            f"fp16, bf16 or fp32. Fix: cast to torch.bfloat16, or use backend='naive' for fp64."
        )
