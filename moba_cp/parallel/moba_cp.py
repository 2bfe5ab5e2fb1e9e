"""Context-parallel MoBA: centroids all-gathered, only the selected K/V blocks exchanged.

The protocol of ``docs/design.md`` section 2, as one autograd Function over the local zigzag
shard. See :func:`moba_attn_cp`.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from moba_cp.ops.lse_merge import merge_into
from moba_cp.ops.moba.api import choose_backend
from moba_cp.ops.moba.block_ids import remap_ids, selected_mask
from moba_cp.ops.moba.partial import partial_attn_bwd, partial_attn_fwd, partial_index
from moba_cp.parallel.exchange import CPStats, RingComm, _record, agree_on_layout, build_plan
from moba_cp.parallel.gate import gather_centroids, select_global
from moba_cp.parallel.zigzag import local_chunks, zigzag_positions

log = logging.getLogger(__name__)

__all__ = ["moba_attn_cp"]

_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_LAYOUT_NAMES = ["ndim", "batch", "S_local", "Hq", "Hkv", "D", "dtype", "block_size", "topk", "keep_kv"]


def _local_problem(q, k, v, block_size, topk) -> str | None:
    """What is wrong with this rank's inputs on their own (None if nothing)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() not in (3, 4):
            return f"{name} has shape {tuple(t.shape)}; expected [S_local, H, D] or [batch, S_local, H, D]"
        if t.dtype not in _DTYPES:
            return f"{name}.dtype is {t.dtype}; expected fp16, bf16, fp32 or fp64"
    if not (q.dim() == k.dim() == v.dim()):
        return f"q, k, v have {q.dim()}, {k.dim()}, {v.dim()} dims; they must match"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if not (q.device == k.device == v.device):
        return f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    if k.shape != v.shape:
        return f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}"
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head dim"
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv < 1 or hq % hkv:
        return f"Hq={hq} is not a multiple of Hkv={hkv} (GQA)"
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        return f"block_size={block_size!r} must be an integer >= 1"
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        return f"topk={topk!r} must be an integer >= 1 (blocks per query, own block included)"
    s_local = q.shape[-3]
    if s_local == 0 or s_local % 2:
        return (f"the local shard has S_local={s_local} tokens; a zigzag shard is 2 equal chunks, so "
                f"S_local must be even and > 0")
    chunk = s_local // 2
    if chunk % block_size:
        return (f"a zigzag chunk holds {chunk} tokens (S_local={s_local} / 2), which is not a multiple "
                f"of block_size={block_size}; every chunk must hold whole MoBA blocks. Fix: make the "
                f"global length a multiple of 2*cp*block_size (pad), or pick a block_size dividing {chunk}")
    return None


def moba_attn_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    cp_group,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    keep_kv: bool = False,
):
    """MoBA over a sequence sharded across a context-parallel group (zigzag layout).

    Args:
        q: ``[S_local, Hq, D]`` (or ``[batch, S_local, Hq, D]``): this rank's zigzag shard
            (chunk ``r`` then chunk ``2cp-1-r``, see :mod:`moba_cp.parallel.zigzag`), RoPE applied.
        k, v: ``[S_local, Hkv, D]`` (or batched), ``Hq % Hkv == 0``.
        block_size: ``B``; each zigzag chunk (``S_local / 2`` tokens) must hold whole blocks.
        topk: blocks per query including its own (``>= n_blocks`` = causal full attention).
        cp_group: the ``torch.distributed`` process group of the CP ranks.
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return the fp32 LSE ``[S_local, Hq]`` (no gradient flows into it).
        backend: partial-attention backend, "naive", "triton" or "auto" (Triton on CUDA).
        keep_kv: keep the received K/V blocks from forward to backward (True: no second
            transfer) or fetch them again in backward (False, default). Measured on 2 H200s
            (``benchmarks/results/cp_h200x2_2026-11-22.md``): re-fetching cost +0.1-0.2% of the
            fwd+bwd time (10 ms of 8.3 s at 1M tokens; the transfer overlaps the local partial
            backward), while keeping holds the received blocks (up to (cp-1)/cp of the global
            K/V: 2 GiB per rank per layer at 1M tokens, 8 KV heads, d=128, bf16) from each
            layer's forward until its backward, i.e. times the number of layers. So re-fetch.
            Memory kept from forward to backward besides q, k, v, o: the selection
            (int32 ``[S_local, Hq, W]``) and, with the Triton backend at block < 2048, the
            gather index built from it (another ~``S_local * Hq * W`` int32), as the
            single-GPU op keeps it.
    Returns:
        ``o`` shaped like ``q`` (q's dtype), and ``lse`` ``[..., S_local, Hq]`` fp32 when
        ``return_lse``. Equal to ``moba_attn`` on the unsharded sequence, then sharded.
        Traffic of the call: :func:`moba_cp.parallel.last_stats`.

    Algorithm (every rank; collective over ``cp_group``):
        0. all-gather a few ints (shapes, dtype, block_size, topk): any invalid or mismatched
           input raises the same ``ValueError`` on every rank before other traffic;
        1. centroids of the local blocks, all-gathered to the global ``[NB, Hkv, D]``;
        2. top-k for the local queries over the global causal candidates (own block always);
        3. request bitmasks all-gathered, so every rank knows every count; then for ring steps
           ``s = 1..cp-1`` the requested K/V blocks go to ``rank + s`` and arrive from
           ``rank - s`` (only selected blocks move), step ``s+1`` in flight while attention
           runs on step ``s`` (on CUDA, transfers on a side stream);
        4. partial attention per source (local first), merged by LSE in fp32. All sources
           share one slot namespace (local slots, then each step's received blocks), so the
           selection is renamed once and the Triton gather index is built once per call.
        Backward: dQ local; dK/dV of received blocks (fp32) go back to their owners (send to
        ``rank - s``, receive from ``rank + s``) and are added into fp32 accumulators there.

    Example:
        >>> # every rank of a CP group of 2, global sequence of 8192 tokens:
        >>> ql, kl, vl = (zigzag_shard(x, rank, 2) for x in (q, k, v))   # [4096, H, D]
        >>> o = moba_attn_cp(ql, kl, vl, block_size=512, topk=3, cp_group=group)
    """
    problem = _local_problem(q, k, v, block_size, topk)
    if problem is None:
        batch = q.shape[0] if q.dim() == 4 else 1
        values = [q.dim(), batch, q.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1], _DTYPES[q.dtype],
                  block_size, topk, int(bool(keep_kv))]
    else:
        values = [0] * len(_LAYOUT_NAMES)
    like = q if isinstance(q, torch.Tensor) else None
    agree_on_layout("moba_attn_cp", values, problem, _LAYOUT_NAMES, cp_group, like=like)
    name = choose_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)

    batched = q.dim() == 4
    if batched:
        # Fold the batch into the heads: every row shares the layout, and query head b*Hq + h
        # maps to kv head (b*Hq + h) // group = b*Hkv + h // group, so GQA stays exact.
        bsz, s_loc = q.shape[:2]
        fold = lambda x: x.transpose(0, 1).reshape(s_loc, bsz * x.shape[2], x.shape[3])  # noqa: E731
        q3, k3, v3 = fold(q), fold(k), fold(v)
    else:
        q3, k3, v3 = q, k, v
    o, lse = _MobaCP.apply(q3, k3, v3, block_size, topk, scale, name, bool(keep_kv), cp_group)
    if batched:
        o = o.reshape(s_loc, bsz, q.shape[2], q.shape[3]).transpose(0, 1)
        lse = lse.reshape(s_loc, bsz, q.shape[2]).transpose(0, 1)
    return (o, lse) if return_lse else o


def _rows_of_slots(slots: torch.Tensor, block_size: int) -> torch.Tensor:
    return (slots[:, None] * block_size + torch.arange(block_size, device=slots.device)[None, :]).flatten()


class _MobaCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_size, topk, scale, backend, keep_kv, group):
        cp, r = dist.get_world_size(group), dist.get_rank(group)
        s_loc, hq, d = q.shape
        hkv = k.shape[1]
        dev = q.device
        B = block_size
        chunk = s_loc // 2
        nbc = chunk // B
        nb = 2 * cp * nbc
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        q_pos = zigzag_positions(s_loc, r, cp, device=dev)

        # 1-2. centroids all-gathered; gate over global causal candidates.
        cent = gather_centroids(k, B, cp, group, backend)
        width = min(topk, nb)
        idx = select_global(q, q_pos, cent, block_size=B, topk=topk, width=width, backend=backend)

        # 3. request bitmask: the remote blocks any local query/head selected.
        want = selected_mask(idx, nb)
        a, b = local_chunks(r, cp)
        want[a * nbc:(a + 1) * nbc] = False
        want[b * nbc:(b + 1) * nbc] = False
        plan, mask_bytes = build_plan(want, nbc, group, q)

        # One slot namespace for the call: local slots [0, 2*nbc), then each ring step's
        # received blocks in arrival order. The selection is translated once, and its index
        # (Triton: one gather index) serves every source's partial, forward and backward.
        n_recv = [t.numel() for t in plan.recv_blocks]
        src_off = [0] + [2 * nbc + sum(n_recv[1:s]) for s in range(1, cp)]
        n_slots = 2 * nbc + sum(n_recv[1:])
        ns_of_block = torch.full((nb,), -1, dtype=torch.int32)  # host
        have = plan.source_of_block >= 0
        ns_of_block[have] = (torch.tensor(src_off)[plan.source_of_block[have]]
                             + plan.slot_of_block[have]).to(torch.int32)
        sel = remap_ids(idx, ns_of_block)
        index = partial_index(sel, n_slots, hkv, d, backend=backend)
        send_slots = [t.to(dev) for t in plan.send_slots]
        recv_pos = [(t * B).to(dev) for t in plan.recv_blocks]
        loc_slot_pos = torch.cat([torch.arange(nbc, device=dev) * B + a * chunk,
                                  torch.arange(nbc, device=dev) * B + b * chunk])

        elem = k.element_size()
        stats = CPStats(
            op="moba_attn_cp", cp_size=cp, cp_rank=r, n_blocks=nb, block_bytes=2 * B * hkv * d * elem,
            global_union_blocks=plan.global_union_blocks,
            recv_block_ids=sorted(int(g) for t in plan.recv_blocks for g in t),
            meta_bytes_recv=mask_bytes + (cp - 1) * 2 * nbc * hkv * d * cent.element_size(),
            full_ring_kv_bytes=(cp - 1) * 2 * s_loc * hkv * d * elem,
            full_ring_bwd_bytes=(cp - 1) * 2 * s_loc * hkv * d * (elem + 4),
        )
        comm = RingComm(group, dev)

        def post_kv(s):
            n_send, n_recv = send_slots[s].numel(), plan.recv_blocks[s].numel()
            stats.kv_blocks_sent += n_send
            stats.kv_blocks_recv += n_recv
            pack = None
            if n_send:
                rows = _rows_of_slots(send_slots[s], B)
                pack = lambda: torch.stack([k.index_select(0, rows), v.index_select(0, rows)])  # noqa: E731
            shape = (2, n_recv * B, hkv, d) if n_recv else None
            return comm.post(pack, s, shape, k.dtype, dev, -s, tag=s)

        part = dict(block_size=B, softmax_scale=scale, backend=backend, index=index)

        # 4. local partial first (step 1's transfer already in flight), then each arrival.
        pending = post_kv(1) if cp > 1 else None
        o_acc, lse_acc = partial_attn_fwd(q, q_pos, k, v, loc_slot_pos, sel, **part)
        kept = {}
        for s in range(1, cp):
            buf = comm.wait(pending)
            pending = post_kv(s + 1) if s + 1 < cp else None
            if buf is None:
                continue
            o_s, lse_s = partial_attn_fwd(q, q_pos, buf[0], buf[1], recv_pos[s], sel, slot_offset=src_off[s], **part)
            # fp32 between merges; the last one writes q's dtype directly
            o_acc, lse_acc = merge_into(o_acc, lse_acc, o_s, lse_s,
                                        out_dtype=q.dtype if s == cp - 1 else torch.float32)
            if keep_kv:
                kept[s] = buf
        stats.kv_bytes_sent = stats.kv_blocks_sent * stats.block_bytes
        stats.kv_bytes_recv = stats.kv_blocks_recv * stats.block_bytes
        stats.kept_kv_bytes = sum(t.numel() * t.element_size() for t in kept.values())
        _record(stats)
        log.debug("moba_attn_cp rank %d: %s", r, stats)

        o = o_acc.to(q.dtype)
        lse = lse_acc.float()
        ctx.save_for_backward(q, k, v, o, lse, sel)
        ctx.kept = kept
        ctx.index = index  # Triton: the gather index when the forward built it (two-pass), kept for backward
        ctx.meta = (B, scale, backend, keep_kv, group, q_pos, loc_slot_pos, recv_pos, send_slots, plan, src_off,
                    stats)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, sel = ctx.saved_tensors
        (B, scale, backend, keep_kv, group, q_pos, loc_slot_pos, recv_pos, send_slots, plan, src_off,
         stats) = ctx.meta
        kept, index = ctx.kept, ctx.index
        part = dict(block_size=B, softmax_scale=scale, backend=backend, index=index)
        cp = plan.cp_size
        s_loc, hq, d = q.shape
        hkv = k.shape[1]
        dev = q.device
        do = do.contiguous()
        comm = RingComm(group, dev)

        def post_kv(s):  # re-fetch (keep_kv=False): the forward's transfer again
            n_send, n_recv = send_slots[s].numel(), plan.recv_blocks[s].numel()
            stats.kv_refetch_bytes_recv += n_recv * stats.block_bytes
            pack = None
            if n_send:
                rows = _rows_of_slots(send_slots[s], B)
                pack = lambda: torch.stack([k.index_select(0, rows), v.index_select(0, rows)])  # noqa: E731
            return comm.post(pack, s, (2, n_recv * B, hkv, d) if n_recv else None, k.dtype, dev, -s, tag=s)

        pending_kv = post_kv(1) if (cp > 1 and not keep_kv) else None
        dq = torch.zeros(q.shape, dtype=torch.float32, device=dev)  # every source adds its dQ here
        _, dk, dv = partial_attn_bwd(do, q, q_pos, k, v, loc_slot_pos, sel, o, lse, dq_acc=dq, **part)
        grad_pending = []
        for s in range(1, cp):
            if keep_kv:
                buf = kept.get(s)
            else:
                buf = comm.wait(pending_kv)
                pending_kv = post_kv(s + 1) if s + 1 < cp else None
            gpack = None
            if buf is not None:
                _, dk_b, dv_b = partial_attn_bwd(do, q, q_pos, buf[0], buf[1], recv_pos[s], sel, o, lse,
                                                 slot_offset=src_off[s], dq_acc=dq, **part)
                gpack = torch.stack([dk_b, dv_b])
            n_back = send_slots[s].numel()  # the blocks this rank sent to rank + s come back
            stats.grad_bytes_sent += 0 if gpack is None else gpack.numel() * 4
            stats.grad_bytes_recv += n_back * B * hkv * d * 4 * 2
            grad_pending.append((s, comm.post((lambda g=gpack: g) if gpack is not None else None, -s,
                                              (2, n_back * B, hkv, d) if n_back else None, torch.float32, dev, s,
                                              tag=1000 + s)))
        for s, p in grad_pending:
            g = comm.wait(p)
            if g is not None:
                rows = _rows_of_slots(send_slots[s], B)
                dk.index_add_(0, rows, g[0])
                dv.index_add_(0, rows, g[1])
        ctx.kept = ctx.index = None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None
