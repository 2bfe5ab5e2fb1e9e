"""MoBA Triton backend: the entry points ``api.py`` and ``partial.py`` call.

Pipeline of ``moba_attn`` (packed documents, ``docs/design.md`` section 1):
    1. ``triton_centroids``: mean key of every block of every document (fp32);
    2. ``triton_gate``: fused gate + running top-k -> ``indices [T, Hq, W]`` (no ``T x n``
       score matrix in memory);
    3. ``triton_common.build_gather_index``: invert the selection into per-(head, block)
       lists of query rows (one sort);
    4. ``triton_attn_fwd``: key-block-major sparse attention on gathered query tiles (per-entry
       partials merged by LSE, or two passes, or a one-pass walk for large blocks: the
       tiling is a ``triton_config.KernelConfig`` chosen from the shape) -> ``o``, fp32 ``lse``;
    5. backward ``triton_attn_bwd``: dK/dV per key block (GQA group folded in, no atomics),
       dQ by fp32 atomics; takes ``o``/``lse`` from outside, and the forward's gather index.

No step waits for the device (tables and index are sized by static bounds; the tables are
cached per ``cu_seqlens`` tensor), so one call is ~20 launches enqueued back to back.

``select_blocks``, ``block_attn`` and ``moba_attn`` are ``torch.library.custom_op``s with fake
implementations (``moba_cp::triton_*``), so ``torch.compile`` traces around them; autograd
of ``block_attn`` goes through the registered backward op. Eager calls skip the custom-op
machinery (same implementations through a plain ``autograd.Function``: less host time per
call), and short CUDA calls replay CUDA graphs (``cuda_graphs``). ``partial_attn_fwd/bwd`` are the
slot-buffer form for context parallelism (plain functions, called inside its own autograd).
"""

from __future__ import annotations

import torch

from moba_cp.ops.moba.triton_attn_bwd import sparse_attn_bwd
from moba_cp.ops.moba.triton_attn_fwd import sparse_attn_fwd, sparse_attn_fwd_onepass
from moba_cp.ops.moba.triton_attn_fwd_qmajor import sparse_attn_fwd_query_major
from moba_cp.ops.moba.triton_centroids import block_centroids
from moba_cp.ops.moba.triton_common import (
    GatherIndex,
    KeyBlocks,
    block_table_bound,
    build_gather_index,
    check_triton_inputs,
    doc_tables,
    slot_tables,
    tensor_identity,
)
from moba_cp.ops.moba.cuda_graphs import GraphedCall, graph_mode, graphs_enabled
from moba_cp.ops.moba.triton_config import SELECTION_FWD_METHODS, KernelConfig, compact_selection_dtype, tiling_for
from moba_cp.ops.moba.triton_gate import MAX_GATE_WIDTH, gate_topk

__all__ = ["moba_attn", "select_blocks", "gather_index", "block_attn", "partial_index", "partial_attn_fwd",
           "partial_attn_bwd"]


def _c(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------- selection
def call_config(q: torch.Tensor, k: torch.Tensor, block_size: int, kernel: str = "") -> KernelConfig:
    """The tiling :func:`choose_config` picks for a call on ``q [T, Hq, D]``, ``k [T, Hkv, D]``,
    with ``kernel``'s overrides (``triton_config.parse_overrides``) applied."""
    return tiling_for(block_size, q.shape[-1], q.shape[1] // max(k.shape[1], 1), q.shape[0], q.device, kernel)


def _config(config: str, q: torch.Tensor, k: torch.Tensor, block_size: int) -> KernelConfig:
    """The call's tiling: decoded from ``config``, or ("") chosen from the shape."""
    if config:
        return KernelConfig.decode(config)
    return call_config(q, k, block_size)


def _select_impl(q, k, cu_seqlens, block_size: int, topk: int, config: str = "") -> torch.Tensor:
    check_triton_inputs(q, block_size, "select_blocks")
    q, k = _c(q), _c(k)
    blocks, qpos, base, info = doc_tables(q.shape[0], cu_seqlens, block_size, q.device)
    width = info.width(topk)
    if width > MAX_GATE_WIDTH:
        raise ValueError(
            f"select_blocks (backend='triton'): min(topk={topk}, blocks per document={info.max_blocks()}) = "
            f"{width} exceeds the Triton gate's register top-k limit of {MAX_GATE_WIDTH}. Fix: use "
            f"topk <= {MAX_GATE_WIDTH}, or a larger block_size, or full attention for this case."
        )
    cent = block_centroids(k, blocks.kstart, blocks.klen, block_size)
    cfg = _config(config, q, k, block_size)
    return gate_topk(q, cent, qpos, base, block_size=block_size, topk=topk, width=width, cfg=cfg.gate)


@torch.library.custom_op("moba_cp::triton_select_blocks", mutates_args=())
def _select_op(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None, block_size: int, topk: int,
               config: str = "") -> torch.Tensor:
    return _select_impl(q, k, cu_seqlens, block_size, topk, config)


@_select_op.register_fake
def _(q, k, cu_seqlens, block_size, topk, config=""):
    if cu_seqlens is None:
        width = min(topk, max(1, -(-q.shape[0] // block_size)))
    else:  # depends on the document lengths (data)
        width = torch.library.get_ctx().new_dynamic_size()
    return q.new_empty((q.shape[0], q.shape[1], width), dtype=torch.int32)


def select_blocks(q, k, *, block_size: int, topk: int, cu_seqlens=None, config: KernelConfig | None = None) -> torch.Tensor:
    """Triton MoBA selection. ``q [T, Hq, D]``, ``k [T, Hkv, D]`` -> ``[T, Hq, W]`` int32
    document-local block ids, own block included, ascending, ``-1`` padded (see ``naive``).
    ``config``: the tiling (None: :func:`choose_config` from the shape)."""
    if torch.compiler.is_compiling():
        return _select_op(q, k, cu_seqlens, block_size, topk, config.encode() if config else "")
    return _select_impl(q, k, cu_seqlens, block_size, topk, config.encode() if config else "")


# ----------------------------------------------------------------------------- attention
def _index_numel(q, k, indices, cu_seqlens, block_size: int, cfg: KernelConfig) -> int:
    """Length of the saved gather index (0 for the forwards that read the selection itself:
    ``one_pass`` and ``query_major``; their backward builds the index)."""
    if cfg.fwd.method in SELECTION_FWD_METHODS:
        return 0
    t, hq, w = indices.shape
    n_docs = 1 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    nbk = block_table_bound(t, n_docs, block_size)
    return sum(GatherIndex.sizes(t, hq, w, nbk, k.shape[1], cfg.fwd.chunk))


def _attn_fwd_impl(q, k, v, indices, cu_seqlens, block_size: int, softmax_scale: float, config: str = "",
                   index: torch.Tensor | None = None):
    """Returns ``o``, ``lse`` and the gather index as one int32 buffer, saved for the backward
    (so it is built once per call; empty after the ``one_pass`` and ``query_major`` forwards).
    ``index``: that buffer, built before by :func:`gather_index` for the same arguments (None:
    built here)."""
    check_triton_inputs(q, block_size, "block_attn")
    flat = _index_impl(q, k, indices, cu_seqlens, block_size, config) if index is None else index
    o, lse = _attn_fwd_from_index(q, k, v, indices, flat, cu_seqlens, block_size, softmax_scale, config)
    return o, lse, flat


def _index_impl(q, k, indices, cu_seqlens, block_size: int, config: str = "") -> torch.Tensor:
    """The gather index of ``indices`` as one int32 buffer (empty for the forwards that read the
    selection itself: ``one_pass`` builds its own chunk index, ``query_major`` needs none)."""
    cfg = _config(config, q, k, block_size)
    if cfg.fwd.method in SELECTION_FWD_METHODS:
        return indices.new_empty(0, dtype=torch.int32)
    blocks, _, base, _ = doc_tables(q.shape[0], cu_seqlens, block_size, q.device)
    flat = torch.empty(_index_numel(q, k, indices, cu_seqlens, block_size, cfg), dtype=torch.int32, device=q.device)
    build_gather_index(indices.to(torch.int32), base, blocks.n, k.shape[1], cfg.fwd.chunk, out=flat)
    return flat


def gather_index(q, k, indices, *, block_size: int, cu_seqlens=None, config: KernelConfig | None = None) -> torch.Tensor:
    """The int32 gather index :func:`block_attn` builds from ``indices [T, Hq, W]`` before its
    kernels (empty for the forwards that read the selection itself), for the same ``q``, ``k``
    shapes, ``block_size``, ``cu_seqlens`` and ``config``: built once, it can serve several
    :func:`block_attn` calls on that selection (a recomputed forward)."""
    return _index_impl(q, k, indices, cu_seqlens, block_size, config.encode() if config is not None else "")


def _check_index(index: torch.Tensor, q, k, indices, cu_seqlens, block_size: int, config: str) -> None:
    """A given gather index must be the one these arguments build (its length is checked: free)."""
    n = _index_numel(q, k, indices, cu_seqlens, block_size, _config(config, q, k, block_size))
    if index.dtype != torch.int32 or index.dim() != 1 or index.numel() != n or index.device != q.device:
        raise ValueError(
            f"block_attn: index is a {index.dtype} {tuple(index.shape)} tensor on {index.device}; this call's "
            f"gather index is int32 [{n}] on {q.device}. Fix: build it with gather_index on the same q, k, "
            f"indices, block_size, cu_seqlens and config, or pass index=None.")


def _fwd_from_selection(q, k, v, qpos, blocks, sel, base, softmax_scale: float, cfg: KernelConfig):
    """The forward methods that read the selection, not a gather index (``SELECTION_FWD_METHODS``)."""
    fwd = sparse_attn_fwd_query_major if cfg.fwd.method == "query_major" else sparse_attn_fwd_onepass
    return fwd(q, k, v, qpos, blocks, sel, base, softmax_scale, cfg.fwd)


def _attn_fwd_from_index(q, k, v, indices, flat, cu_seqlens, block_size: int, softmax_scale: float,
                         config: str = ""):
    """The attention forward over a gather index from :func:`_index_impl`: ``o``, ``lse``."""
    q, k, v = _c(q), _c(k), _c(v)
    cfg = _config(config, q, k, block_size)
    blocks, qpos, base, _ = doc_tables(q.shape[0], cu_seqlens, block_size, q.device)
    if cfg.fwd.method in SELECTION_FWD_METHODS:
        return _fwd_from_selection(q, k, v, qpos, blocks, indices.to(torch.int32), base, softmax_scale, cfg)
    t, hq, w = indices.shape
    gi = GatherIndex.from_flat(flat, t, hq, w, blocks.n, k.shape[1], cfg.fwd.chunk)
    return sparse_attn_fwd(q, k, v, qpos, blocks, gi, w, softmax_scale, block_size, cfg.fwd)


@torch.library.custom_op("moba_cp::triton_block_attn_fwd", mutates_args=())
def _attn_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
    cu_seqlens: torch.Tensor | None, block_size: int, softmax_scale: float, config: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attn_fwd_impl(q, k, v, indices, cu_seqlens, block_size, softmax_scale, config)


@_attn_fwd_op.register_fake
def _(q, k, v, indices, cu_seqlens, block_size, softmax_scale, config=""):
    n = _index_numel(q, k, indices, cu_seqlens, block_size, _config(config, q, k, block_size))
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32), q.new_empty(n, dtype=torch.int32)


def _attn_bwd_impl(do, dlse, q, k, v, o, lse, indices, index, cu_seqlens, block_size: int, softmax_scale: float,
                   config: str = ""):
    q, k, v = _c(q), _c(k), _c(v)
    cfg = _config(config, q, k, block_size)
    blocks, qpos, base, _ = doc_tables(q.shape[0], cu_seqlens, block_size, q.device)
    t, hq, w = indices.shape
    # The saved index was cut in the forward config's chunks: the same config decodes it.
    if index.numel() == 0:  # one-pass forward, or keep_index off: build the index now
        gi = build_gather_index(indices.to(torch.int32), base, blocks.n, k.shape[1], cfg.fwd.chunk)
    else:
        gi = GatherIndex.from_flat(index, t, hq, w, blocks.n, k.shape[1], cfg.fwd.chunk)
    return sparse_attn_bwd(
        _c(do), q, k, v, o, lse, qpos, blocks, gi, w, softmax_scale, block_size, cfg.bwd, dlse=dlse,
        kv_grad_dtype=k.dtype, dq_dtype=q.dtype, sorted_positions=True,  # document positions
        blocks_nonempty=True,  # document blocks: every one holds a key
    )


@torch.library.custom_op("moba_cp::triton_block_attn_bwd", mutates_args=())
def _attn_bwd_op(
    do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor, index: torch.Tensor,
    cu_seqlens: torch.Tensor | None, block_size: int, softmax_scale: float, config: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attn_bwd_impl(do, dlse, q, k, v, o, lse, indices, index, cu_seqlens, block_size, softmax_scale, config)


@_attn_bwd_op.register_fake
def _(do, dlse, q, k, v, o, lse, indices, index, cu_seqlens, block_size, softmax_scale, config=""):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def compact_selection(indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """``indices [T, Hq, W]`` (document-local block ids, ``-1`` = none) in the smallest signed
    integer type that holds every id a ``T``-token call can have (:func:`compact_selection_dtype`):
    what the backward keeps instead of the gather index when ``BwdConfig.keep_index`` is off."""
    return indices.to(compact_selection_dtype(indices.shape[0], block_size))


def _save_for_backward(ctx, inputs, o, lse, index) -> None:
    """What the backward needs, for the custom op's autograd and the eager Function alike."""
    q, k, v, indices, cu_seqlens, block_size, softmax_scale, config = inputs
    if index.numel() > 0 and not _config(config, q, k, block_size).bwd.keep_index:
        # Only the selection, compacted; the backward builds the index again (``keep_index``).
        indices, index = compact_selection(indices, block_size), index.new_empty(0)
    elif index.numel() > 0:
        # The backward decodes the saved gather index and reads only the selection's shape: keep a
        # zero-stride stand-in, not [T, Hq, W] int32 per layer (0.1 GB at 128K x 16 heads x 13,
        # 2.4 GB over 24 layers when core attention is not recomputed).
        indices = indices.new_zeros(()).expand(indices.shape)
    else:  # the one-pass forward builds no index: the backward builds it from the selection
        indices = compact_selection(indices, block_size)
    ctx.save_for_backward(q, k, v, o, lse, indices, index, cu_seqlens)
    ctx.block_size = block_size
    ctx.softmax_scale = softmax_scale
    ctx.config = config  # the index's chunk travels with it: the backward decodes it with this


def _grads(ctx, do, dlse, attn_bwd) -> tuple:
    """``(dq, dk, dv, None x 5)`` from the saved state; ``attn_bwd`` is the op or its implementation."""
    q, k, v, o, lse, indices, index, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = attn_bwd(do, dlse, q, k, v, o, lse, indices, index, cu_seqlens, ctx.block_size,
                          ctx.softmax_scale, ctx.config)
    return dq, dk, dv, None, None, None, None, None


def _setup_context(ctx, inputs, output):
    o, lse, index = output
    _save_for_backward(ctx, inputs, o, lse, index)
    ctx.mark_non_differentiable(index)


def _backward(ctx, do, dlse, _dindex):
    return _grads(ctx, do, dlse, _attn_bwd_op)


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _BlockAttnEager(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls.

    A custom op's call passes the dispatcher, its autograd wrapper, a dynamo guard and an
    aliasing check, twice per step (forward and backward): on short sequences the host spent
    longer enqueuing a MoBA call than the GPU ran it (4 x 8K tokens, 6 heads: 2.3 ms host,
    1.6 ms of kernels; ``benchmarks/profile_moba.py --host``). ``torch.compile`` keeps tracing
    the custom ops (``block_attn`` picks them while compiling).
    """

    @staticmethod
    def forward(ctx, q, k, v, indices, cu_seqlens, block_size, softmax_scale, config, index):
        o, lse, index = _attn_fwd_impl(q, k, v, indices, cu_seqlens, block_size, softmax_scale, config, index)
        _save_for_backward(ctx, (q, k, v, indices, cu_seqlens, block_size, softmax_scale, config), o, lse, index)
        ctx.set_materialize_grads(False)  # an unused lse gets no dLSE (the kernels skip that term)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return *_grads(ctx, do, dlse, _attn_bwd_impl), None


def block_attn(q, k, v, indices, *, block_size: int, cu_seqlens=None, softmax_scale: float,
               config: KernelConfig | None = None, index: torch.Tensor | None = None):
    """Triton attention over given document-local block ``indices [T, Hq, W]``.

    ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` -> ``o [T, Hq, D]`` (q's dtype), ``lse [T, Hq]``
    fp32; differentiable in q, k, v (and through ``lse``). ``config``: the tiling (None:
    :func:`choose_config` from the shape; the backward uses the forward's). ``index``: the
    :func:`gather_index` of these arguments, built before (None: built here); the backward keeps
    it as it keeps its own.
    """
    # None travels as "": the op chooses from the shape (torch.compile traces no config here).
    cfg = config.encode() if config is not None else ""
    if index is not None:
        _check_index(index, q, k, indices, cu_seqlens, block_size, cfg)
    if torch.compiler.is_compiling():  # the traced op builds its own index (the same one)
        o, lse, _ = _attn_fwd_op(q, k, v, indices, cu_seqlens, block_size, float(softmax_scale), cfg)
        return o, lse
    return _BlockAttnEager.apply(q, k, v, indices, cu_seqlens, block_size, float(softmax_scale), cfg, index)


_FWD_GRAPHS = GraphedCall("moba forward")
_BWD_GRAPHS = GraphedCall("moba backward")
_INDEX_GRAPHS = GraphedCall("moba selection and index")


def _pack_saved(lse: torch.Tensor, idx: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``lse [T, Hq]`` fp32, ``idx [T, Hq, W]`` int32 and the int32 gather ``index`` as one int32
    buffer (lse's bits): a graphed call clones and copies one tensor instead of three (each launch
    costs host time, which decides short calls; see :class:`_MobaGraphed`)."""
    return torch.cat((lse.reshape(-1).view(torch.int32), idx.reshape(-1).to(torch.int32), index))


def _unpack_saved(saved: torch.Tensor, t: int, hq: int, width: int):
    """Views ``(lse, idx, index)`` of :func:`_pack_saved`'s buffer."""
    n_lse, n_idx = t * hq, t * hq * width
    return (saved[:n_lse].view(torch.float32).view(t, hq), saved[n_lse:n_lse + n_idx].view(t, hq, width),
            saved[n_lse + n_idx:])


class _MobaGraphed(torch.autograd.Function):
    """Selection + attention forward as one CUDA graph per shape, the backward as another
    (``cuda_graphs``: short calls, where enqueuing ~30 operations took longer than running
    them). Same kernels, same results as the eager path; a call that needs dLSE runs its
    backward eagerly (the graph holds the common case, lse unused). With
    ``MOBA_CP_CUDA_GRAPHS=index`` only the selection and the gather index are a graph; the
    attention forward and the backward run eagerly on the caller's tensors (no copies of v, o,
    do, no clones of o, dq, dk, dv).

    In the whole-call mode the forward graph packs lse, the selection and the gather index into
    one int32 buffer (:func:`_pack_saved`), cloned once and saved for the backward as one tensor,
    and ``lse`` is returned as a view of it: per call 2 fewer clones after the forward and 2 fewer
    copies into the backward's graph (at 4 x 8K tokens, 6 heads, on one H200 a MoBA layer's
    forward+backward took 1.36 ms of host time to enqueue against SDPA's 0.89 ms, more than the
    0.2 ms its kernels saved; ``benchmarks/profile_moba.py --layer``).

    ``MOBA_CP_CUDA_GRAPHS=shared``: the backward's graph reads q, k, v, o and the saved state in the
    forward graph's buffers (``GraphedCall``'s ``bound``) and copies do alone; if the forward graph
    replayed for another call since this one (its ``holds`` token changed), the backward first
    copies this call's tensors back into those buffers. The backward's graph is captured into the
    forward graph's memory pool."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, block_size, topk, softmax_scale, config):
        key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, q.device,
               None if cu_seqlens is None else tensor_identity(cu_seqlens), block_size, topk, softmax_scale, config)
        tables = doc_tables(q.shape[0], cu_seqlens, block_size, q.device)  # read by address: kept
        width = tables[3].width(topk)  # may read the offsets on the host once: never inside a capture

        ctx.mode = graph_mode()
        if ctx.mode == "index":  # the small operations in a graph, the attention kernels eager
            def sel_index(q, k):
                idx = _select_impl(q, k, cu_seqlens, block_size, topk, config)
                return idx, _index_impl(q, k, idx, cu_seqlens, block_size, config)

            idx, index = _INDEX_GRAPHS(key, sel_index, (q, k), keep=(tables, cu_seqlens))
            o, lse = _attn_fwd_from_index(q, k, v, idx, index, cu_seqlens, block_size, softmax_scale, config)
            ctx.save_for_backward(q, k, v, o, lse, idx, index)
        else:
            def fwd(q, k, v):
                idx = _select_impl(q, k, cu_seqlens, block_size, topk, config)
                o, lse, index = _attn_fwd_impl(q, k, v, idx, cu_seqlens, block_size, softmax_scale, config)
                return o, _pack_saved(lse, idx, index)

            o, saved = _FWD_GRAPHS(key, fwd, (q, k, v), keep=(tables, cu_seqlens))
            lse = _unpack_saved(saved, q.shape[0], q.shape[1], width)[0]
            ctx.save_for_backward(q, k, v, o, saved)
            ctx.width = width
            # shared: the graph that just replayed (None on a shape's first, eager call) and the
            # token saying its buffers hold this call's q, k, v, o and saved state
            g = _FWD_GRAPHS.graph(key) if ctx.mode == "shared" else None
            ctx.fwd_graph = None if g is None else (g, g.holds)
        ctx.key, ctx.keep = key, (tables, cu_seqlens)
        ctx.args = (cu_seqlens, block_size, softmax_scale, config)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, *rest = ctx.saved_tensors  # rest: (lse, idx, index), or their packed buffer
        if do is None:
            do = torch.zeros_like(o)
        if ctx.mode == "index":
            dq, dk, dv = _attn_bwd_impl(do, dlse, q, k, v, o, *rest, *ctx.args)
            return dq, dk, dv, None, None, None, None, None
        saved = rest[0]
        shape = (q.shape[0], q.shape[1], ctx.width)
        if dlse is not None:
            dq, dk, dv = _attn_bwd_impl(do, dlse, q, k, v, o, *_unpack_saved(saved, *shape), *ctx.args)
            return dq, dk, dv, None, None, None, None, None
        args = ctx.args

        def bwd(do, q, k, v, o, saved):
            return _attn_bwd_impl(do, None, q, k, v, o, *_unpack_saved(saved, *shape), *args)

        if ctx.fwd_graph is None:
            dq, dk, dv = _BWD_GRAPHS(ctx.key + (do.dtype,), bwd, (do, q, k, v, o, saved), keep=ctx.keep)
        else:  # shared: q, k, v, o and the saved state are read in the forward graph's buffers
            g, token = ctx.fwd_graph
            buffers = (*g.inputs, *g.outputs)  # q, k, v, then o and the saved state
            if g.holds is not token:  # another call replayed the forward since: put this call's back
                for b, x in zip(buffers, (q, k, v, o, saved)):
                    b.copy_(x)
                g.holds = token
            # keyed by the forward graph too: a backward graph reads one forward graph's buffers,
            # and is captured into its memory pool (each clones its outputs at once, and neither
            # needs the other's intermediates, so one pool serves both)
            dq, dk, dv = _BWD_GRAPHS(ctx.key + (do.dtype, id(g)), bwd, (do,), keep=(ctx.keep, g), bound=buffers,
                                     pool_of=g)
        return dq, dk, dv, None, None, None, None, None


def moba_attn(q, k, v, *, block_size: int, topk: int, cu_seqlens=None, softmax_scale: float,
              config: KernelConfig | None = None):
    """Triton MoBA: :func:`select_blocks` (no gradient) then :func:`block_attn`.

    Example:
        >>> o, lse = moba_attn(q, k, v, block_size=128, topk=8, softmax_scale=q.shape[-1] ** -0.5)
    """
    if graphs_enabled(q, cu_seqlens):
        return _MobaGraphed.apply(q, k, v, cu_seqlens, block_size, topk, float(softmax_scale),
                                  config.encode() if config is not None else "")
    with torch.no_grad():
        idx = select_blocks(q.detach(), k.detach(), block_size=block_size, topk=topk, cu_seqlens=cu_seqlens,
                            config=config)
    return block_attn(q, k, v, idx, block_size=block_size, cu_seqlens=cu_seqlens, softmax_scale=softmax_scale,
                      config=config)


# ----------------------------------------------------------------------------- CP slot form
class SlotIndex:
    """The selection of one CP call in one slot namespace, shared by every source's partial.

    ``sel [Tq, Hq, W]`` int32 holds slot ids in ``[0, n_slots)`` (``-1`` = none); each source
    (local blocks, each ring step's received blocks) owns a contiguous slot range. The gather
    index over the whole namespace is built once, on first use, with the tiling of that call
    (which it keeps: ``config``), and then serves every source's forward and backward: a
    source's kernels see the other sources' slots as empty blocks and skip them. ``kernel``:
    tiling overrides (``triton_config.parse_overrides``) applied to the shape's default.
    """

    def __init__(self, sel: torch.Tensor, n_slots: int, hkv: int, head_dim: int, kernel: str = ""):
        self.sel = sel.to(torch.int32).contiguous()
        self.n_slots, self.hkv, self.head_dim = int(n_slots), int(hkv), int(head_dim)
        self.kernel = kernel
        self.config: KernelConfig | None = None
        self._gi: GatherIndex | None = None

    def tiling(self, block_size: int) -> KernelConfig:
        """The tiling of this call (chosen from the shape on first use, then fixed)."""
        if self.config is None:
            hq = self.sel.shape[1]
            self.config = tiling_for(block_size, self.head_dim, hq // max(self.hkv, 1), self.sel.shape[0],
                                     self.sel.device, self.kernel)
        return self.config

    def gather(self, block_size: int) -> GatherIndex:
        if self._gi is None:
            self._gi = build_gather_index(self.sel, None, self.n_slots, self.hkv, self.tiling(block_size).fwd.chunk)
        return self._gi


def partial_index(slot_idx: torch.Tensor, n_slots: int, hkv: int, head_dim: int, kernel: str = "") -> SlotIndex:
    """A :class:`SlotIndex` for ``slot_idx [Tq, Hq, W]`` over ``n_slots`` slots of all sources
    (``kernel``: tiling overrides on the shape's default)."""
    return SlotIndex(slot_idx, n_slots, hkv, head_dim, kernel)


def _source_tables(slot_pos: torch.Tensor, slot_offset: int, n_total: int, block_size: int) -> KeyBlocks:
    """Key-block table of one source over the whole namespace: its slots
    ``[slot_offset, slot_offset + n)`` are its buffer's table (:func:`slot_tables`), every other
    slot is empty (zeros, so ``klen = 0``)."""
    own = slot_tables(slot_pos, block_size)
    pad = (slot_offset, n_total - slot_offset - slot_pos.shape[0])
    if pad == (0, 0):
        return own
    return KeyBlocks(*(torch.nn.functional.pad(x, pad) for x in (own.kstart, own.kpos, own.klen)))


def _partial_setup(q, k_buf, slot_pos, slot_idx, block_size, slot_offset, index):
    """Checks (no device sync), this source's table and the shared index."""
    check_triton_inputs(q, block_size, "partial attention")
    n = slot_pos.shape[0]
    if slot_pos.device.type == "cpu" and n and bool((slot_pos % block_size != 0).any()):  # free on the host
        raise ValueError(
            f"partial attention: slot_pos must be multiples of block_size={block_size} (slots hold "
            f"whole blocks); got {slot_pos.tolist()[:8]}..."
        )
    if k_buf.shape[0] != n * block_size:
        raise ValueError(
            f"partial attention: k_buf has {k_buf.shape[0]} rows but {n} slots of "
            f"block_size={block_size} need {n * block_size}."
        )
    if index is None:  # a one-off call: this source's slots only, renumbered from 0
        sel = slot_idx.to(torch.int32)
        if slot_offset:
            sel = torch.where((sel >= slot_offset) & (sel < slot_offset + n), sel - slot_offset, -1)
        index, slot_offset = SlotIndex(sel, n, k_buf.shape[1], q.shape[-1]), 0
    elif slot_offset + n > index.n_slots:
        raise ValueError(
            f"partial attention: slots [{slot_offset}, {slot_offset + n}) exceed the index's {index.n_slots} slots"
        )
    return _source_tables(slot_pos, slot_offset, index.n_slots, block_size), index


def partial_attn_fwd(q, q_pos, k_buf, v_buf, slot_pos, slot_idx, *, block_size: int, softmax_scale: float,
                     slot_offset: int = 0, index: SlotIndex | None = None):
    """Attention of ``q [Tq, Hq, D]`` over the slots ``slot_idx [Tq, Hq, W]`` it selected in
    ``k_buf, v_buf [n_slots*B, Hkv, D]`` (see ``partial.py``); keys after ``q_pos`` masked.
    The buffer holds slots ``[slot_offset, slot_offset + n_slots)`` of the namespace of ``index``
    (:func:`partial_index`, shared by all sources of a call; None: built for this call).

    Returns ``o [Tq, Hq, D]`` (q's dtype) and ``lse [Tq, Hq]`` fp32; rows with no visible key
    get ``o = 0``, ``lse = -inf``. No autograd graph.
    """
    q, k_buf, v_buf = _c(q), _c(k_buf), _c(v_buf)
    blocks, index = _partial_setup(q, k_buf, slot_pos, slot_idx, block_size, slot_offset, index)
    qpos = q_pos.to(torch.int32)
    cfg = index.tiling(block_size)
    with torch.no_grad():
        if cfg.fwd.method in SELECTION_FWD_METHODS:
            return _fwd_from_selection(q, k_buf, v_buf, qpos, blocks, index.sel, None, float(softmax_scale), cfg)
        return sparse_attn_fwd(q, k_buf, v_buf, qpos, blocks, index.gather(block_size), index.sel.shape[-1],
                               float(softmax_scale), block_size, cfg.fwd)


def partial_attn_bwd(do, q, q_pos, k_buf, v_buf, slot_pos, slot_idx, o, lse, *, block_size: int, softmax_scale: float,
                     slot_offset: int = 0, index: SlotIndex | None = None, dq_acc: torch.Tensor | None = None):
    """Gradients of this partial given merged ``o [Tq, Hq, D]`` and ``lse [Tq, Hq]`` (no dLSE).
    ``slot_offset``/``index`` as :func:`partial_attn_fwd`; ``dq_acc``: fp32 ``[Tq, Hq, D]`` to
    add dQ into (then returned as dq).

    Returns ``dq [Tq, Hq, D]``, ``dk_buf, dv_buf [n_slots*B, Hkv, D]``, all fp32.
    """
    q, k_buf, v_buf = _c(q), _c(k_buf), _c(v_buf)
    blocks, index = _partial_setup(q, k_buf, slot_pos, slot_idx, block_size, slot_offset, index)
    with torch.no_grad():
        return sparse_attn_bwd(
            _c(do), q, k_buf, v_buf, o, lse, q_pos.to(torch.int32), blocks, index.gather(block_size),
            index.sel.shape[-1], float(softmax_scale), block_size, index.tiling(block_size).bwd, dq_acc=dq_acc,
        )
