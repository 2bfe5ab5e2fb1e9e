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

Nothing here waits for the device: the tables and the index are built by device ops into
tensors sized by static bounds (``T // B + n_docs`` blocks, ``E // chunk + buckets`` tiles),
so a call enqueues its kernels back to back and the host runs ahead of the GPU.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from moba_cp.ops.launch_math import cdiv
from moba_cp.ops.moba.kernel_limits import TRITON

__all__ = ["KeyBlocks", "DocInfo", "doc_tables", "slot_tables", "GatherIndex", "build_gather_index", "check_triton_inputs",
           "tensor_identity"]

def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with ``int(array_of_shape_1)``,
    which NumPy >= 2.4 rejects; loop bounds loaded from memory then fail on CPU. Patch that
    one conversion (interpreter only; compiled kernels are untouched)."""
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


@triton.jit
def _head_chunk_pid(TEND, H0, HC, NBK):
    """This program's index in the tile list when a launch covers query heads ``[H0, H0 + HC)``
    (their tiles are one contiguous run of the list), and whether it has a tile."""
    t_lo = tl.load(TEND + H0 * NBK - 1, mask=H0 > 0, other=0)
    pid = t_lo + tl.program_id(0)
    return pid, pid < _ld(TEND + (H0 + HC) * NBK - 1)


@triton.jit
def _tile_rows(TILE_B, TILE_START, OFFS, pid, CHUNK):
    """Tile ``pid``: its bucket and its entries ``[c0, c1)`` (at most ``CHUNK``)."""
    b = tl.load(TILE_B + pid)
    c0 = _ld(TILE_START + pid)
    c1 = tl.minimum(_ld(OFFS + b + 1), c0 + CHUNK)
    return b, c0, c1


@triton.jit
def _key_span(qp, rmask, kp0, kl, BN: tl.constexpr):
    """Keys of a block seen by a gathered row tile: ``[0, n_full)`` (whole ``BN`` sub-tiles)
    by every row, none from ``n_hi`` on (key ``j`` is seen by a row at ``qp`` iff
    ``kp0 + j <= qp``)."""
    qp_min = tl.min(tl.where(rmask, qp, 2147483647), axis=0)
    qp_max = tl.max(tl.where(rmask, qp, -1), axis=0)
    n_full = (tl.minimum(tl.maximum(qp_min - kp0 + 1, 0), kl) // BN) * BN
    n_hi = tl.minimum(tl.maximum(qp_max - kp0 + 1, 0), kl)
    return n_full, n_hi


@triton.jit
def _load_kv(K, V, ks, kk, kl, hk, stride_kt, stride_kh, stride_vt, stride_vh, D: tl.constexpr, MASK: tl.constexpr):
    """K and V rows ``ks + kk`` of KV head ``hk``; ``MASK`` guards keys past the block end."""
    d = tl.arange(0, D)
    if MASK:
        kmask = kk < kl
        k = tl.load(K + (ks + kk)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(V + (ks + kk)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(K + (ks + kk)[:, None] * stride_kt + hk * stride_kh + d[None, :])
        v = tl.load(V + (ks + kk)[:, None] * stride_vt + hk * stride_vh + d[None, :])
    return k, v


SUPPORTED_HEAD_DIMS = TRITON.head_dims
SUPPORTED_DTYPES = tuple(getattr(torch, name) for name in TRITON.dtypes)


@dataclass
class KeyBlocks:
    """Global key-block table (int32 device tensors, ``[NBK]`` each).

    For packed documents ``NBK`` is a static upper bound (``T // B + n_docs``, exact for one
    document), so no host sync is needed to size it; the padding blocks at the end have
    ``klen = 0``: no query selects them and every kernel skips them.
    """

    kstart: torch.Tensor
    kpos: torch.Tensor
    klen: torch.Tensor

    @property
    def n(self) -> int:
        return self.kstart.shape[0]


@triton.jit
def _last_le(ARR, x, n, STEPS, BLOCK: tl.constexpr):
    """Per lane: the last index ``d`` in ``[0, n)`` with ``ARR[d] <= x`` (``ARR`` non-decreasing,
    ``ARR[0] <= x``), by ``STEPS >= ceil(log2 n)`` bisection steps."""
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + n
    for _ in range(STEPS):
        act = hi - lo > 1
        mid = (lo + hi) // 2
        a = tl.load(ARR + mid, mask=act, other=0)
        ok = a <= x
        lo = tl.where(act & ok, mid, lo)
        hi = tl.where(act & (a > x), mid, hi)
    return lo


@triton.jit
def _doc_tables_kernel(CU, BOFF, QPOS, BASE, KSTART, KPOS, KLEN, T, NBK, n_docs, block_size, STEPS,
                       BLOCK: tl.constexpr):
    # Lanes are tokens (qpos, base) and, independently, global block ids (kstart, kpos, klen).
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mt = i < T
    doc = _last_le(CU, i, n_docs, STEPS, BLOCK)  # empty documents are skipped by "last"
    tl.store(QPOS + i, i - tl.load(CU + doc, mask=mt, other=0), mask=mt)
    tl.store(BASE + i, tl.load(BOFF + doc, mask=mt, other=0), mask=mt)
    mb = i < NBK
    doc = _last_le(BOFF, i, n_docs, STEPS, BLOCK)
    real = mb & (i < _ld(BOFF + n_docs))
    c0 = tl.load(CU + doc, mask=mb, other=0)
    n = tl.load(CU + doc + 1, mask=mb, other=0) - c0
    j0 = (i - tl.load(BOFF + doc, mask=mb, other=0)) * block_size
    tl.store(KSTART + i, tl.where(real, c0 + j0, 0), mask=mb)
    tl.store(KPOS + i, tl.where(real, j0, 0), mask=mb)
    tl.store(KLEN + i, tl.where(real, tl.minimum(block_size, n - j0), 0), mask=mb)


class DocInfo:
    """Per-``cu_seqlens`` facts beside the tables; ``max_blocks`` syncs once, lazily."""

    def __init__(self, total: int, cu: torch.Tensor, block_size: int):
        self.total, self.cu, self.block_size = total, cu, block_size
        self.n_docs = cu.shape[0] - 1
        self._max_blocks: int | None = None

    def max_blocks(self) -> int:
        if self._max_blocks is None:
            lens = self.cu[1:] - self.cu[:-1]
            self._max_blocks = max(1, int(((lens + self.block_size - 1) // self.block_size).max().item()))
        return self._max_blocks

    def width(self, topk: int) -> int:
        """``W = min(topk, max blocks of any document)``, without a host sync whenever the
        longest document (at least ``ceil(T / n_docs)`` tokens) surely has ``topk`` blocks."""
        if self.total == 0:
            return 1
        b = self.block_size
        longest_lb = -(-self.total // max(self.n_docs, 1))
        if topk <= -(-longest_lb // b):
            return topk
        return min(topk, self.max_blocks())


def block_table_bound(total: int, n_docs: int, block_size: int) -> int:
    """Rows of the packed-document key-block table: exact for one document, else the static
    bound ``T // B + n_docs`` (known without reading the document lengths)."""
    return -(-total // block_size) if n_docs == 1 else total // block_size + n_docs


#: The last few tables built, by (cu_seqlens identity, its version, T, B, device).
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLES_MAX = 8
#: A number per cu_seqlens tensor that no other tensor ever gets (``id()`` is reused once a
#: tensor is freed). Keyed by the tensor object weakly: the entry dies with its tensor.
_IDENTITIES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_NEXT_IDENTITY = itertools.count()


def tensor_identity(t: torch.Tensor) -> int:
    """A number for ``t`` that no other tensor object of this process ever gets."""
    ident = _IDENTITIES.get(t)
    if ident is None:
        ident = _IDENTITIES[t] = next(_NEXT_IDENTITY)
    return ident


def doc_tables(total: int, cu_seqlens: torch.Tensor | None, block_size: int, device):
    """Tables for packed documents, built on the device (no host sync, no host copy).

    Returns ``(blocks, qpos, base, info)``: the key-block table (documents cut into blocks of
    ``B``, numbered document after document, padded to the static bound ``T // B + n_docs``
    with empty blocks), ``qpos [T]`` int32 document-local positions, ``base [T]`` int32
    global id of block 0 of each token's document, and a :class:`DocInfo`.

    Cached per ``cu_seqlens`` tensor object and version (by an identity never reused, so a new
    batch's tensor never hits an old entry): selection, forward and backward of one call, and
    every layer of a model that shares one ``cu_seqlens``, build the tables once.
    """
    dev = torch.device(device)
    key = (None if cu_seqlens is None else tensor_identity(cu_seqlens),
           None if cu_seqlens is None else cu_seqlens._version, total, block_size, str(dev))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    if cu_seqlens is None:
        cu = torch.arange(2, device=dev, dtype=torch.int32) * total
    else:
        cu = cu_seqlens.to(device=dev, dtype=torch.int32)
    n_docs = cu.shape[0] - 1
    nbk = block_table_bound(total, n_docs, block_size)
    lens = cu[1:] - cu[:-1]
    boff = torch.zeros(n_docs + 1, dtype=torch.int32, device=dev)
    torch.cumsum((lens + block_size - 1) // block_size, 0, out=boff[1:])
    qpos = torch.empty(total, dtype=torch.int32, device=dev)
    base = torch.empty(total, dtype=torch.int32, device=dev)
    blocks = KeyBlocks(*(torch.empty(nbk, dtype=torch.int32, device=dev) for _ in range(3)))
    n = max(total, nbk)
    if n > 0:
        _doc_tables_kernel[(cdiv(n, 1024),)](
            cu, boff, qpos, base, blocks.kstart, blocks.kpos, blocks.klen, total, nbk, n_docs, block_size,
            max(1, n_docs).bit_length() + 1, BLOCK=1024,
        )
    out = (blocks, qpos, base, DocInfo(total, cu, block_size))
    _TABLES[key] = out
    while len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return out


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

    ``ent [E]`` int32 holds the flat selection index ``(t * Hq + h) * W + w`` of each entry
    (so ``t = ent // (Hq * W)``, ``w = ent % W``), grouped by bucket, token order inside a
    bucket; ``E = T * Hq * W`` (unselected slots sort last, past ``offs[-1]``).
    ``offs [Hq*NBK + 1]`` int32 bucket starts; ``tend [Hq*NBK]`` int32 inclusive prefix sum of
    tiles per bucket. ``tile_b / tile_start [n_tiles]`` int32 list every ``chunk``-entry tile
    (bucket, first entry), so a 1-D grid has equal work per program; ``n_tiles`` is a static
    upper bound (``E // chunk + Hq*NBK + 1``: no host sync sizes the grid) and surplus tiles
    have ``tile_b = -1`` (their programs exit at once). ``kv_order [Hkv, NBK]`` int32 lists each
    KV head's blocks by decreasing entry count (longest backward programs first).
    ``chunk``: entries per tile, which every kernel walking the tile list must use (it travels
    with the index, so a backward reads the forward's saved index as it was built).
    """

    ent: torch.Tensor
    offs: torch.Tensor
    tend: torch.Tensor
    tile_b: torch.Tensor
    tile_start: torch.Tensor
    kv_order: torch.Tensor
    n_tiles: int
    chunk: int

    @staticmethod
    def sizes(t: int, hq: int, w: int, nbk: int, hkv: int, chunk: int) -> list[int]:
        """Lengths of (ent, offs, tend, tile_b, tile_start, kv_order): all static."""
        e, n_buckets = t * hq * w, hq * nbk
        nt = e // chunk + n_buckets + 1
        return [e, n_buckets + 1, n_buckets, nt, nt, hkv * nbk]

    @classmethod
    def from_flat(cls, flat: torch.Tensor, t, hq, w, nbk, hkv, chunk) -> "GatherIndex":
        """Views of one int32 buffer (how the forward saves the index for the backward)."""
        sz = cls.sizes(t, hq, w, nbk, hkv, chunk)
        ent, offs, tend, tb, ts, kvo = torch.split(flat, sz)
        return cls(ent, offs, tend, tb, ts, kvo.view(hkv, nbk), sz[3], chunk)


@triton.jit
def _keys_kernel(SEL, BASE, KEY, n, HW, W, NBK, NB, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    # key = bucket h * NBK + global block id, or the sentinel NB for an empty slot.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    s = tl.load(SEL + i, mask=m, other=-1)
    g = s
    if HAS_BASE:
        g = s + tl.load(BASE + i // HW, mask=m, other=0)
    key = tl.where(s >= 0, ((i % HW) // W) * NBK + g, NB)
    tl.store(KEY + i, key.to(KEY.dtype.element_ty), mask=m)  # int16 or int32 (build_gather_index)


@triton.jit
def _finish_kernel(SKEY, PERM, ENT, OFFS, E, NB, STEPS, BLOCK: tl.constexpr):
    # Lanes < E: ent = perm (int32). Lanes <= NB: offs[b] = first sorted position with key >= b.
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(ENT + i, tl.load(PERM + i, mask=i < E, other=0).to(tl.int32), mask=i < E)
    if pid * BLOCK <= NB:
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        hi = tl.zeros([BLOCK], dtype=tl.int32) + E
        for _ in range(STEPS):
            act = lo < hi
            mid = (lo + hi) // 2
            below = tl.load(SKEY + mid, mask=act, other=0) < i
            lo = tl.where(act & below, mid + 1, lo)
            hi = tl.where(act & ~below, mid, hi)
        tl.store(OFFS + i, lo, mask=i <= NB)


@triton.jit
def _scan_kernel(OFFS, TEND, KVC, NB, NKV, NBK, G, CHUNK, BLOCK: tl.constexpr):
    # One program: tend = inclusive prefix sum of ceil(count / CHUNK) over the buckets, and the
    # entry count of every (KV head, block) summed over the GQA group (for the backward order).
    carry = 0
    for b0 in range(0, NB, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < NB
        cnt = tl.load(OFFS + b + 1, mask=m, other=0) - tl.load(OFFS + b, mask=m, other=0)
        nt = (cnt + CHUNK - 1) // CHUNK
        tl.store(TEND + b, tl.cumsum(nt, axis=0) + carry, mask=m)
        carry += tl.sum(nt, axis=0)
    for c0 in range(0, NKV, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < NKV
        first = (c // NBK) * G * NBK + c % NBK  # bucket of head hk * G, block g
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(G):
            acc += tl.load(OFFS + first + i * NBK + 1, mask=m, other=0) - tl.load(OFFS + first + i * NBK, mask=m, other=0)
        tl.store(KVC + c, acc, mask=m)


@triton.jit
def _tiles_kernel(OFFS, TEND, TILE_B, TILE_START, n_buckets, n_tiles, CHUNK, STEPS, BLOCK: tl.constexpr):
    # Tile i belongs to the first bucket whose inclusive tile count exceeds i.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n_tiles
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + n_buckets
    for _ in range(STEPS):
        act = lo < hi
        mid = (lo + hi) // 2
        right = tl.load(TEND + mid, mask=act, other=0) <= i
        lo = tl.where(act & right, mid + 1, lo)
        hi = tl.where(act & ~right, mid, hi)
    valid = m & (i < _ld(TEND + n_buckets - 1))
    b = tl.minimum(lo, n_buckets - 1)
    first = tl.load(TEND + b - 1, mask=valid & (b > 0), other=0)
    start = tl.load(OFFS + b, mask=valid, other=0) + (i - first) * CHUNK
    tl.store(TILE_B + i, tl.where(valid, b, -1), mask=m)
    tl.store(TILE_START + i, tl.where(valid, start, 0), mask=m)


#: The gather index sorts 16-bit bucket keys where the buckets (plus the empty-slot sentinel) fit
#: them: a stable radix sort then makes 2 passes over the entries instead of 4 (by bytes moved,
#: ~0.35 of ~1.3 ms at 128K tokens x 16 heads x top-12). Same order, so the same index.
NARROW_KEYS = True


def build_gather_index(
    sel: torch.Tensor, base: torch.Tensor | None, nbk: int, hkv: int, chunk: int, out: torch.Tensor | None = None,
    narrow_keys: bool | None = None,
) -> GatherIndex:
    """Invert a selection ``sel [T, Hq, W]`` (``-1`` = none) into a :class:`GatherIndex`.

    Block ids are ``sel + base[t]`` (``base`` None means ids are already global). Seven
    launches, none waiting for the device: bucket keys; one stable sort of the keys (int16 where
    ``Hq * nbk < 32767`` and ``narrow_keys``, default :data:`NARROW_KEYS`; else int32);
    ``ent`` and bucket starts (binary search in the sorted keys); tile counts (one scan
    program); the tile list; the backward's per-KV-head block order (argsort, copy).
    ``out``: an int32 buffer of ``sum(GatherIndex.sizes(...))`` to build into (the forward
    saves it for the backward).
    """
    t, hq, w = sel.shape
    dev = sel.device
    n_buckets = hq * nbk
    e = t * hq * w
    if e >= 2**31:
        raise ValueError(
            f"MoBA Triton backend: T * Hq * W = {t} * {hq} * {w} = {e} selection entries exceed the "
            f"int32 index range (2^31). Fix: split the sequence, or use fewer heads per call."
        )
    sz = GatherIndex.sizes(t, hq, w, nbk, hkv, chunk)
    if out is None:
        out = torch.empty(sum(sz), dtype=torch.int32, device=dev)
    gi = GatherIndex.from_flat(out, t, hq, w, nbk, hkv, chunk)
    if n_buckets == 0 or e == 0:
        gi.offs.zero_()
        gi.tend.zero_()
        gi.tile_b.fill_(-1)
        return gi
    sel = sel.to(torch.int32).contiguous()
    narrow = (NARROW_KEYS if narrow_keys is None else narrow_keys) and n_buckets < 2**15 - 1  # keys 0..n_buckets
    key = torch.empty(e, dtype=torch.int16 if narrow else torch.int32, device=dev)
    _keys_kernel[(cdiv(e, 1024),)](
        sel, sel if base is None else base, key, e, hq * w, w, nbk, n_buckets, HAS_BASE=base is not None, BLOCK=1024
    )
    skey, perm = torch.sort(key, stable=True)
    del key
    _finish_kernel[(cdiv(max(e, n_buckets + 1), 1024),)](skey, perm, gi.ent, gi.offs, e, n_buckets, e.bit_length() + 1, BLOCK=1024)
    del skey, perm
    kv_counts = torch.empty(hkv, nbk, dtype=torch.int32, device=dev)
    _scan_kernel[(1,)](gi.offs, gi.tend, kv_counts, n_buckets, hkv * nbk, nbk, hq // hkv, chunk, BLOCK=1024)
    _tiles_kernel[(cdiv(gi.n_tiles, 1024),)](
        gi.offs, gi.tend, gi.tile_b, gi.tile_start, n_buckets, gi.n_tiles, chunk, n_buckets.bit_length() + 1, BLOCK=1024
    )
    gi.kv_order.copy_(torch.argsort(kv_counts, dim=1, descending=True))
    return gi


def reg_cap(maxnreg: int, device: torch.device) -> dict:
    """Launch options capping a kernel's registers per thread at ``maxnreg`` (PTX ``.maxnreg``;
    0: none). The interpreter (CPU) has no registers, so it gets none either."""
    return {"maxnreg": maxnreg} if maxnreg and torch.device(device).type == "cuda" else {}


def check_triton_inputs(q: torch.Tensor, block_size: int, op: str) -> None:
    """Triton-specific limits, with errors that name the value, the rule and the fix."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{op} (backend='triton'): head dim D={d} is not supported; the Triton kernels take "
            f"D in {SUPPORTED_HEAD_DIMS} (a power of two for the tile shapes). Fix: pad the head "
            f"dim to the next supported size, or use backend='naive'."
        )
    if block_size % TRITON.block_multiple != 0:
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
