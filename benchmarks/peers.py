"""Peers for ``bench_moba.py`` that run on our GPUs: FlexAttention MoBA and FLA's NSA kernel.

Both take the *same* block selection as our kernels: ``idx [T, Hq, W]`` int32 document-local
block ids from ``moba_cp.ops.moba.api.select_blocks`` (own block included, ascending, ``-1``
padded; ``docs/design.md`` section 1). Packed ("THD") inputs: ``q [T, Hq, D]``,
``k, v [T, Hkv, D]``, ``cu_seqlens`` int32 ``[n_docs + 1]`` or None.

1. FlexAttention (``torch.nn.attention.flex_attention``): MoBA written the way a PyTorch user
   would write it. A ``mask_mod`` reads a per-token, per-head selected-block table
   (:func:`flex_moba_mask_mod`): key ``kv`` is allowed for query ``q`` of head ``h`` iff
   same document, ``kv <= q``, and the document-local block of ``kv`` is one of
   ``table[h, q, :]``. The ``BlockMask`` (:func:`flex_moba_block_mask`) is built directly
   from KV-tile indices: for each head and query tile, the union of the tiles covered by the
   blocks any query of the tile selected (tiles that every query of the tile may see entirely
   are marked *full*, so flex skips ``mask_mod`` there). It is never built through
   ``create_block_mask`` with explicit B, H (that evaluates the mask at every element; at 32K
   it tried to allocate 128 GiB). Exact: same output as MoBA attention on ``idx``; the work
   is the tile union, which is larger than each token's own selection.

2. flash-linear-attention's NSA selected-attention kernel (``fla.ops.nsa.parallel``, wheel
   ``fla-core`` 0.6.0), imported lazily. It attends given top-k block indices, causally in
   the query's own block, like MoBA's attention step, but differs:
   - indices are per *KV head* (``[B, T, Hkv, S]``), shared by the ``G = Hq / Hkv`` query
     heads of the group; MoBA selects per query head. We feed it the selection of the
     first query head of each group (:func:`fla_group_indices`);
   - ``G`` must be a power of 2 and ``>= 16`` (it is a ``tl.dot`` tile dimension), so it cannot
     run at MHA or at GQA groups of 4: the benchmark runs it at ``Hkv = Hq / 16``;
   - ``block_size`` must be a power of 2 (``tl.arange(0, BS)``; one block is one tile
     ``[G, BS]``, so very large blocks may not fit on chip); the number of selected slots
     ``S`` must be a power of 2 for its backward (``prepare_block_csr``): we pad with ``-1``
     (skipped, like ours); head dim ``<= 256``;
   - no gate (MoBA's mean-key gate is ours, outside its time) and no LSE output;
   - varlen needs batch 1 and its own ``cu_seqlens``; the benchmark uses the batched
     ``[B, S, H, D]`` form (one document per row), where its block ids are per row, i.e.
     document-local like ours.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

TILE = 128  # FlexAttention's default (and CUDA kernel) block size


# ---------------------------------------------------------------------------------------------
# Shared: per-token document tables
# ---------------------------------------------------------------------------------------------

def token_doc_tables(t: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per packed token: ``doc [T]`` int32 document number, ``start [T]`` int64 first token of
    its document, ``length [T]`` int64 its document's length."""
    if cu_seqlens is None:
        cu = torch.tensor([0, t], dtype=torch.int64, device=device)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens, output_size=t)
    return doc.to(torch.int32), cu[:-1][doc], lens[doc]


# ---------------------------------------------------------------------------------------------
# FlexAttention
# ---------------------------------------------------------------------------------------------

def flex_moba_mask_mod(table: torch.Tensor, doc: torch.Tensor, lpos: torch.Tensor, block_size: int):
    """The MoBA ``mask_mod``.

    Args:
        table: ``[Hq, T, W]`` int32 selected document-local block ids per head and query
            (``idx.permute(1, 0, 2)``; ``-1`` never matches).
        doc: ``[T]`` int32 document of each token; lpos: ``[T]`` int32 document-local position.
    Returns:
        ``mask_mod(b, h, q_idx, kv_idx) -> bool``: same document, causal, and the key's block
        selected by ``(h, q_idx)``. The ``W`` comparisons are unrolled (``W <= topk``).
    """
    w = table.shape[-1]

    def mask_mod(b, h, q_idx, kv_idx):
        kb = lpos[kv_idx] // block_size
        sel = table[h, q_idx, 0] == kb
        for i in range(1, w):
            sel = sel | (table[h, q_idx, i] == kb)
        return sel & (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    return mask_mod


def flex_moba_tiles(idx: torch.Tensor, cu_seqlens: torch.Tensor | None, block_size: int, tile: int = TILE):
    """Which KV tiles each (head, query tile) must visit, and which of them are full.

    Args:
        idx: ``[T, Hq, W]`` int32 document-local block ids (``select_blocks``).
        tile: flex block size (query and key tiles of ``tile`` packed tokens).
    Returns:
        ``partial, full``: ``[Hq, nQ, nK]`` bool, ``nQ = nK = ceil(T / tile)``; ``partial`` tiles
        need ``mask_mod``; ``full`` tiles are visible entirely to every query of the tile (a
        strictly earlier tile lying inside one block that every query of the tile selected).

    Work is O(T Hq W) plus the ``[Hq, nQ, n_blocks]`` block-level union (never a
    ``[T, T]`` mask).
    """
    t, hq, w = idx.shape
    dev = idx.device
    n = -(-t // tile)
    doc, start, length = token_doc_tables(t, cu_seqlens, dev)
    # Global block numbering: document d's block j is gbase[d] + j.
    if cu_seqlens is None:
        cu = torch.tensor([0, t], dtype=torch.int64, device=dev)
    else:
        cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    nblk = -(-(cu[1:] - cu[:-1]) // block_size)
    gbase = torch.cumsum(nblk, 0) - nblk
    ng = int(nblk.sum().item())
    d_of_g = torch.repeat_interleave(torch.arange(nblk.numel(), device=dev), nblk, output_size=ng)
    j_of_g = torch.arange(ng, device=dev) - gbase[d_of_g]
    g_lo = cu[:-1][d_of_g] + j_of_g * block_size  # first token of global block g
    g_hi = torch.minimum(g_lo + block_size, cu[1:][d_of_g])  # one past its last token

    # Block-level union and count per (head, query tile, global block).
    valid = idx >= 0
    g = (gbase[doc.long()][:, None, None] + idx.long()).clamp_min(0)  # [T, Hq, W]
    qt = (torch.arange(t, device=dev) // tile)[:, None, None].expand(t, hq, w)
    hh = torch.arange(hq, device=dev)[None, :, None].expand(t, hq, w)
    flat = ((hh * n + qt) * ng + g)[valid]
    cnt = torch.zeros(hq * n * ng, dtype=torch.int32, device=dev)
    cnt.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    cnt = cnt.view(hq, n, ng)

    # Blocks -> tiles: every tile a selected block touches, up to the query tile itself.
    h_i, q_i, g_i = cnt.nonzero(as_tuple=True)
    t_lo, t_hi = g_lo[g_i] // tile, (g_hi[g_i] - 1) // tile
    span = int((t_hi - t_lo).max().item()) + 1 if g_i.numel() else 1
    kt = t_lo[:, None] + torch.arange(span, device=dev)[None, :]
    keep = (kt <= t_hi[:, None]) & (kt <= q_i[:, None])
    partial = torch.zeros(hq, n, n, dtype=torch.bool, device=dev)
    partial[h_i[:, None].expand_as(kt)[keep], q_i[:, None].expand_as(kt)[keep], kt[keep]] = True

    # Full tiles: key tile strictly before the query tile, inside one block g, which all the
    # tile's queries selected.
    tiles = torch.arange(n, device=dev)
    k_first, k_last = tiles * tile, torch.clamp((tiles + 1) * tile, max=t) - 1
    g_first = gbase[doc[k_first].long()] + (k_first - start[k_first]) // block_size
    g_last = gbase[doc[k_last].long()] + (k_last - start[k_last]) // block_size
    one_block = g_first == g_last  # [nK]
    q_count = (torch.clamp((tiles + 1) * tile, max=t) - tiles * tile).to(torch.int32)  # [nQ]
    c = cnt.gather(2, g_first.view(1, 1, n).expand(hq, n, n))  # [Hq, nQ, nK]: count of the key tile's block
    full = (c == q_count.view(1, n, 1)) & one_block.view(1, 1, n) & (tiles.view(1, 1, n) < tiles.view(1, n, 1))
    return partial & ~full, full


def _to_kv_blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Hq, nQ, nK]`` bool -> flex's ``kv_num_blocks [1, Hq, nQ]``, ``kv_indices [1, Hq, nQ, nK]``
    int32 (the selected tiles first, ascending; ``from_kv_blocks`` needs the full width ``nK``)."""
    num = m.sum(-1, dtype=torch.int32)
    order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
    return num[None], order.to(torch.int32)[None].contiguous()


def flex_moba_block_mask(idx: torch.Tensor, cu_seqlens: torch.Tensor | None, block_size: int, tile: int = TILE):
    """The FlexAttention ``BlockMask`` for MoBA on selection ``idx [T, Hq, W]``.

    Batch 1 (packed documents), one mask per query head; ``BLOCK_SIZE = tile``; its
    ``mask_mod`` is :func:`flex_moba_mask_mod` on ``idx``'s table. Built with
    ``BlockMask.from_kv_blocks`` from :func:`flex_moba_tiles`.
    """
    from torch.nn.attention.flex_attention import BlockMask

    t = idx.shape[0]
    doc, start, _ = token_doc_tables(t, cu_seqlens, idx.device)
    lpos = (torch.arange(t, device=idx.device) - start).to(torch.int32)
    table = idx.permute(1, 0, 2).contiguous()
    mask_mod = flex_moba_mask_mod(table, doc, lpos, block_size)
    partial, full = flex_moba_tiles(idx, cu_seqlens, block_size, tile)
    kv_num, kv_idx = _to_kv_blocks(partial)
    f_num, f_idx = _to_kv_blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, f_num, f_idx, BLOCK_SIZE=tile, mask_mod=mask_mod,
                                    seq_lengths=(t, t))


def flex_moba_dense_mask(idx: torch.Tensor, cu_seqlens: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """``[Hq, T, T]`` bool: the mask :func:`flex_moba_mask_mod` implies (small shapes, tests)."""
    t = idx.shape[0]
    doc, start, _ = token_doc_tables(t, cu_seqlens, idx.device)
    lpos = (torch.arange(t, device=idx.device) - start).to(torch.int32)
    mm = flex_moba_mask_mod(idx.permute(1, 0, 2).contiguous(), doc, lpos, block_size)
    h = torch.arange(idx.shape[1], device=idx.device)[:, None, None]
    qi = torch.arange(t, device=idx.device)[None, :, None]
    ki = torch.arange(t, device=idx.device)[None, None, :]
    return mm(0, h, qi, ki)


_compiled = {}


def flex_fn(compiled: bool = True):
    """``flex_attention``, compiled once per process (``torch.compile``, as a user would)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fa" not in _compiled:
        # One compile per shape and grad mode: a whole suite passes dynamo's default limit of 8,
        # after which it would fall back to eager flex (a dense [T, T] mask).
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _compiled["fa"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["fa"]


def to_bhsd(x: torch.Tensor) -> torch.Tensor:
    """Packed ``[T, H, D]`` -> flex's ``[1, H, T, D]`` (contiguous copy)."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def flex_moba_attn(q4, k4, v4, block_mask, *, softmax_scale: float, compiled: bool = True, return_lse: bool = False):
    """MoBA attention through FlexAttention.

    Args:
        q4: ``[1, Hq, T, D]``; k4, v4: ``[1, Hkv, T, D]`` (:func:`to_bhsd`);
        block_mask: from :func:`flex_moba_block_mask`.
    Returns:
        ``o [1, Hq, T, D]``; with ``return_lse`` also ``lse [1, Hq, T]`` fp32 (natural log).
    """
    fa = flex_fn(compiled)
    gqa = q4.shape[1] != k4.shape[1]
    if not return_lse:
        return fa(q4, k4, v4, block_mask=block_mask, scale=softmax_scale, enable_gqa=gqa)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # older torch
        return fa(q4, k4, v4, block_mask=block_mask, scale=softmax_scale, enable_gqa=gqa, return_lse=True)
    o, aux = fa(q4, k4, v4, block_mask=block_mask, scale=softmax_scale, enable_gqa=gqa,
                return_aux=AuxRequest(lse=True))
    return o, aux.lse


# ---------------------------------------------------------------------------------------------
# flash-linear-attention NSA
# ---------------------------------------------------------------------------------------------

FLA_MIN_GROUP = 16


def fla_unavailable_reason() -> str | None:
    """Why the FLA NSA peer cannot run (None when it can)."""
    if importlib.util.find_spec("fla") is None:
        return "fla-core not installed"
    try:
        importlib.import_module("fla.ops.nsa.parallel")
    except Exception as e:  # e.g. a missing dependency (einops)
        return f"fla.ops.nsa.parallel failed to import: {type(e).__name__}: {str(e)[:80]}"
    return None


def fla_shape_reason(hq: int, hkv: int, d: int, block_size: int) -> str | None:
    """Why FLA's NSA kernel refuses this shape (None when it accepts it)."""
    g = hq // hkv
    if g < FLA_MIN_GROUP or g & (g - 1):
        return f"group Hq/Hkv = {g}: must be a power of 2 >= {FLA_MIN_GROUP}"
    if block_size & (block_size - 1):
        return f"block {block_size}: must be a power of 2"
    if d > 256:
        return f"head dim {d} > 256"
    return None


def fla_group_indices(idx: torch.Tensor, hkv: int, batch: int = 1) -> torch.Tensor:
    """Our selection -> FLA's ``block_indices``.

    Args:
        idx: ``[T, Hq, W]`` int32 (``T = batch * S``, one document per batch row).
        hkv: KV heads; each group uses the selection of its *first* query head.
    Returns:
        ``[batch, S, Hkv, S2]`` int32, ``S2 = next power of 2 >= W``, ``-1`` padded.
    """
    t, hq, w = idx.shape
    g = idx[:, :: hq // hkv, :]
    s2 = 1 << max(0, (w - 1).bit_length())
    if s2 > w:
        g = torch.cat([g, g.new_full((t, hkv, s2 - w), -1)], dim=-1)
    return g.reshape(batch, t // batch, hkv, s2).contiguous()


def fla_shared_to_heads(block_indices: torch.Tensor, hq: int) -> torch.Tensor:
    """FLA ``[B, S, Hkv, S2]`` indices -> ours ``[B*S, Hq, S2]`` (each query head gets its group's)."""
    b, s, hkv, s2 = block_indices.shape
    return block_indices.reshape(b * s, hkv, s2).repeat_interleave(hq // hkv, dim=1).contiguous()


def fla_interpreter_shims():
    """Let FLA's NSA kernels run under the Triton interpreter (CPU tests and ``--smoke`` only).

    Two patches: every FLA autotuner keeps its first config (the interpreter has no
    benchmarker to autotune with), and interpreter scalars (1-element arrays) get an
    ``__index__`` numpy 2 accepts (``for i in range(NS)`` with a loaded ``NS``). Call after
    importing ``fla.ops.nsa.parallel``. Returns a function that undoes both.
    """
    import sys

    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    undo = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("fla"):
            continue
        for obj in list(vars(mod).values()):
            for _ in range(4):  # heuristics / autotune / jit wrappers
                if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                    undo.append((obj, "configs", obj.configs))
                    obj.configs = obj.configs[:1]
                obj = getattr(obj, "fn", None)
                if obj is None:
                    break
    orig = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    undo.append((interpreter, "_patch_lang_tensor", orig))
    interpreter._patch_lang_tensor = patched

    def restore():
        for obj, attr, val in reversed(undo):
            setattr(obj, attr, val)

    return restore


def fla_nsa_attn(q, k, v, block_indices, *, block_size: int, softmax_scale: float):
    """FLA's selected attention: ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]``,
    ``block_indices [B, S, Hkv, S2]`` (:func:`fla_group_indices`) -> ``o [B, S, Hq, D]``.
    Differentiable (its own Triton backward)."""
    from fla.ops.nsa.parallel import parallel_nsa

    return parallel_nsa(q, k, v, block_indices=block_indices, block_counts=block_indices.shape[-1],
                        block_size=block_size, scale=softmax_scale)
