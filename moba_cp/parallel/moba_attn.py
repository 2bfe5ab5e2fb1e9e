"""Context-parallel MoBA: :func:`moba_attn_cp` and its three comm types.

- ``"ring"``: centroids all-gathered, only the selected K/V blocks travel, ring-style
  (:class:`_MobaRing`, plain :func:`ring_forward` / :func:`ring_backward` functions);
- ``"a2a"``: head-parallel (:mod:`moba_cp.parallel.head_parallel`), then the single-device
  ``moba_cp.ops.moba.api.moba_attn`` on whole sequences;
- ``"a2a+ring"``: the all-to-all inside groups of ``a2a_size`` ranks, the ring across groups.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

from moba_cp.ops.lse_merge import merge_into
from moba_cp.ops.moba.api import batch_cu_seqlens, choose_backend, kernel_on_naive_problem, moba_attn
from moba_cp.ops.moba.block_ids import remap_ids, selected_mask
from moba_cp.ops.moba.partial import partial_attn_bwd, partial_attn_fwd, partial_index
from moba_cp.ops.moba.triton_config import tiling_for
from moba_cp.ops.moba.validate import block_args_error
from moba_cp.parallel.exchange import (
    DTYPE_CODES, CPStats, ExchangePlan, RankSet, RingComm, Tag, _record, agree_on_layout, build_plan, shard_problem,
)
from moba_cp.parallel.failure import report_failure
from moba_cp.parallel.gate import gather_centroids, select_global
from moba_cp.parallel.head_parallel import COMM_TYPES, comm_layout, comm_problem, head_parallel_attention
from moba_cp.parallel.zigzag import fold_batch, local_chunks, unfold_batch, zigzag_positions

log = logging.getLogger(__name__)

__all__ = ["moba_attn_cp", "ring_forward", "ring_backward"]

_LAYOUT_NAMES = ["ndim", "batch", "S_local", "Hq", "Hkv", "D", "dtype", "block_size", "topk", "keep_kv", "comm",
                 "a2a_size"]


def _kernel_problem(kernel: str, backend: str, q, k, block_size: int, cp: int) -> str | None:
    """Tiling overrides the call cannot take: malformed, for the naive backend (no tiling), or
    rejected on the default tiling of the calls this op makes (the ring's slot form over the
    local shard; the all-to-all's whole sequences)."""
    if not kernel:
        return None
    if backend == "naive" or (backend == "auto" and q.device.type != "cuda"):  # as choose_backend resolves
        return kernel_on_naive_problem(kernel, backend, q.device.type)
    d, group, s_loc = q.shape[-1], q.shape[-2] // max(k.shape[-2], 1), q.shape[-3]
    batch = q.shape[0] if q.dim() == 4 else 1
    try:
        for tokens in (s_loc, s_loc * cp * batch):
            tiling_for(block_size, d, group, tokens, q.device, kernel)
    except ValueError as e:
        return str(e)
    return None


def _local_problem(q, k, v, block_size, topk, comm, a2a_size, cp, kernel="", backend="auto") -> str | None:
    """What is wrong with this rank's inputs on their own (None if nothing)."""
    problem = shard_problem(q, k, v, "moba_attn_cp")
    if problem:
        return problem
    err = block_args_error(block_size, topk, op="moba_attn_cp")
    if err is not None:
        return str(err)
    problem = comm_problem(comm, a2a_size, cp, q.shape[-2], k.shape[-2])
    if problem:
        return problem
    chunk = q.shape[-3] // 2
    if comm != "a2a" and chunk % block_size:
        return (f"a zigzag chunk holds {chunk} tokens (S_local={2 * chunk} / 2), which is not a multiple "
                f"of block_size={block_size}; every chunk must hold whole MoBA blocks. Fix: make the "
                f"global length a multiple of 2*cp*block_size (pad), or pick a block_size dividing {chunk}")
    return _kernel_problem(kernel, backend, q, k, block_size, cp)


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
    comm: str = "ring",
    a2a_size: int | None = None,
    kernel: str = "",
):
    """MoBA over a sequence sharded across a context-parallel group (zigzag layout).

    Args:
        q: ``[S_local, Hq, D]`` (or ``[batch, S_local, Hq, D]``): this rank's zigzag shard
            (chunk ``r`` then chunk ``2cp-1-r``, see :mod:`moba_cp.parallel.zigzag`), RoPE applied.
        k, v: ``[S_local, Hkv, D]`` (or batched), ``Hq % Hkv == 0``.
        block_size: ``B``; with ``"ring"``/``"a2a+ring"`` each zigzag chunk (``S_local / 2``
            tokens) must hold whole blocks.
        topk: blocks per query including its own (``>= n_blocks`` = causal full attention).
        cp_group: the ``torch.distributed`` process group of the CP ranks.
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return the fp32 LSE ``[S_local, Hq]`` (no gradient flows into it).
        backend: attention backend, "naive", "triton" or "auto" (Triton on CUDA).
        keep_kv: (ring level) keep the received K/V blocks from forward to backward (True: no
            second transfer) or fetch them again in backward (False, default). Measured on 2
            H200s (``benchmarks/results/cp_h200x2_2026-11-22.md``): re-fetching cost +0.1-0.2%
            of the fwd+bwd time (the transfer overlaps the local partial backward), while
            keeping holds up to (cp-1)/cp of the global K/V per layer until its backward.
        comm: ``"ring"`` (default; selected K/V blocks ring-style), ``"a2a"`` (head-parallel:
            all-to-all to whole sequences x ``H/cp`` heads, single-device MoBA, all-to-all
            back; needs ``Hq % cp == 0`` and ``Hkv % cp == 0`` or ``cp % Hkv == 0``, the latter
            replicating KV heads) or ``"a2a+ring"`` (all-to-all inside groups of ``a2a_size``
            consecutive ranks, the ring across groups; the head rules with ``a2a_size``).
        a2a_size: ranks per all-to-all group for ``"a2a+ring"`` (must divide cp; a node's GPUs).
        kernel: Triton tiling overrides on each call's default (``"bwd.dq_rows=true"``; see
            ``triton_config.parse_overrides``): the gate, the ring's partial kernels and the
            all-to-all's single-device calls take them; an error with the naive backend.
    Returns:
        ``o`` shaped like ``q`` (q's dtype), and ``lse`` ``[..., S_local, Hq]`` fp32 when
        ``return_lse``. Equal to ``moba_attn`` on the unsharded sequence, then sharded, for
        every comm type. Traffic of the call: :func:`moba_cp.parallel.last_stats`.

    Ring algorithm (every ring member; collective over ``cp_group``):
        0. all-gather a few ints (shapes, dtype, block_size, topk, comm): any invalid or
           mismatched input raises the same ``ValueError`` on every rank before other traffic;
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
        Memory kept from forward to backward besides q, k, v, o: the selection (int32
        ``[S_local, Hq, W]``) and, with the Triton backend at block < 2048, its gather index.

    Example:
        >>> # every rank of a CP group of 4, global sequence of 16384 tokens:
        >>> ql, kl, vl = (zigzag_shard(x, rank, 4) for x in (q, k, v))   # [4096, H, D]
        >>> o = moba_attn_cp(ql, kl, vl, block_size=512, topk=3, cp_group=group)
        >>> o = moba_attn_cp(ql, kl, vl, block_size=512, topk=3, cp_group=group, comm="a2a+ring", a2a_size=2)
    """
    cp = dist.get_world_size(cp_group)
    problem = _local_problem(q, k, v, block_size, topk, comm, a2a_size, cp, kernel, backend)
    if problem is None:
        batch = q.shape[0] if q.dim() == 4 else 1
        values = [q.dim(), batch, q.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1], DTYPE_CODES[q.dtype],
                  block_size, topk, int(bool(keep_kv)), COMM_TYPES.index(comm), int(a2a_size or 0)]
    else:
        values = [0] * len(_LAYOUT_NAMES)
    like = q if isinstance(q, torch.Tensor) else None
    agree_on_layout("moba_attn_cp", values, problem, _LAYOUT_NAMES, cp_group, like=like)
    params = MobaParams(block_size, topk, q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale),
                        choose_backend(backend, q.device), bool(keep_kv), kernel)
    layout = comm_layout(comm, a2a_size, cp_group)
    stats = CPStats(op="moba_attn_cp", comm=comm, a2a_size=layout.a2a_size, cp_size=cp, cp_rank=dist.get_rank(cp_group))
    with report_failure("moba_attn_cp", cp_group):
        if comm == "ring":
            o, lse = _ring_on_shard(q, k, v, params, layout.ring, stats)
        else:
            q4, k4, v4 = (x if x.dim() == 4 else x.unsqueeze(0) for x in (q, k, v))
            if comm == "a2a":
                def attend(qg, kg, vg):
                    return _whole_sequences(qg, kg, vg, params)
            else:
                def attend(qg, kg, vg):
                    o3, lse3 = _ring_on_shard(qg, kg, vg, params, layout.ring, stats)
                    return o3, lse3
            o, lse = head_parallel_attention(q4, k4, v4, layout, attend, stats, "moba_attn_cp", need_lse=return_lse)
            if q.dim() == 3:
                o, lse = o[0], (lse[0] if lse is not None else None)
    _record(stats)
    log.debug("moba_attn_cp rank %d: %s", stats.cp_rank, stats)
    return (o, lse) if return_lse else o


def _ring_on_shard(q, k, v, params, ranks: RankSet, stats):
    """The ring over ``ranks`` for ``[S, H, D]`` or ``[b, S, H, D]`` (batch folded into heads)."""
    if q.dim() == 3:
        return _MobaRing.apply(q, k, v, params, ranks, stats)
    b = q.shape[0]
    o, lse = _MobaRing.apply(fold_batch(q), fold_batch(k), fold_batch(v), params, ranks, stats)
    return unfold_batch(o, b), unfold_batch(lse, b)


def _whole_sequences(q, k, v, params):
    """Single-device MoBA on ``[b, S, h, D]`` whole sequences (rows as documents of one packed call)."""
    b, s, hq, d = q.shape
    cu = None if b == 1 else batch_cu_seqlens(b, s, q.device)  # one tensor per shape: no sync per call
    pack = lambda x: x.reshape(b * s, x.shape[2], d)  # noqa: E731
    o, lse = moba_attn(pack(q), pack(k), pack(v), block_size=params.block_size, topk=params.topk, cu_seqlens=cu,
                       softmax_scale=params.scale, return_lse=True, backend=params.backend, kernel=params.kernel)
    return o.view(b, s, hq, d), lse.view(b, s, hq)


# --------------------------------------------------------------------------------------------
# The selective ring
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MobaParams:
    """The op's arguments the ring needs (backend already resolved)."""

    block_size: int
    topk: int
    scale: float
    backend: str
    keep_kv: bool
    kernel: str = ""  # Triton tiling overrides ('' = each call's default)


@dataclasses.dataclass
class RingState:
    """What the ring's backward needs besides the saved tensors (q, k, v, o, lse, selection)."""

    params: MobaParams
    ranks: RankSet
    stats: CPStats
    plan: ExchangePlan
    q_pos: torch.Tensor  # [S_local] global positions of the local tokens
    local_slot_pos: torch.Tensor  # [2*nbc] first position of each local block
    recv_pos: list  # per ring step: [n] first position of each received block
    send_slots: list  # per ring step: [n] local slots sent to rank + s
    src_off: list  # per ring step: first slot id of its blocks in the call's slot namespace
    index: object  # Triton: the gather index of the selection (built once), else None
    kept: dict  # keep_kv: ring step -> received [2, n*B, Hkv, D]


def _rows_of_slots(slots: torch.Tensor, block_size: int) -> torch.Tensor:
    return (slots[:, None] * block_size + torch.arange(block_size, device=slots.device)[None, :]).flatten()


def _post_kv(comm: RingComm, k, v, state: RingState, s: int):
    """Post ring step ``s``: the blocks ``rank + s`` asked for out, the ones asked of ``rank - s`` in."""
    B = state.params.block_size
    send, n_recv = state.send_slots[s], state.plan.recv_blocks[s].numel()
    pack = None
    if send.numel():
        rows = _rows_of_slots(send, B)
        pack = lambda: torch.stack([k.index_select(0, rows), v.index_select(0, rows)])  # noqa: E731
    shape = (2, n_recv * B, k.shape[1], k.shape[2]) if n_recv else None
    return comm.post(pack, s, shape, k.dtype, k.device, -s, tag=Tag.kv(s))


def ring_forward(q, k, v, params: MobaParams, ranks: RankSet, stats: CPStats):
    """Forward of the selective ring on ``[S_local, H, D]`` shards. Returns ``o, lse, sel, state``."""
    cp, r = ranks.size, ranks.index
    s_loc, hq, d = q.shape
    hkv, dev, B = k.shape[1], q.device, params.block_size
    chunk = s_loc // 2
    nbc = chunk // B
    nb = 2 * cp * nbc
    q_pos = zigzag_positions(s_loc, r, cp, device=dev)

    # 1-2. centroids all-gathered; gate over global causal candidates.
    cent = gather_centroids(k, B, ranks, params.backend)
    gate_cfg = tiling_for(B, d, hq // hkv, s_loc, dev, params.kernel).gate if params.kernel else None
    idx = select_global(q, q_pos, cent, block_size=B, topk=params.topk, width=min(params.topk, nb),
                        backend=params.backend, gate_cfg=gate_cfg)

    # 3. request bitmask: the remote blocks any local query/head selected.
    want = selected_mask(idx, nb)
    a, b = local_chunks(r, cp)
    want[a * nbc:(a + 1) * nbc] = False
    want[b * nbc:(b + 1) * nbc] = False
    plan, mask_bytes = build_plan(want, nbc, ranks, q)

    # One slot namespace for the call: local slots [0, 2*nbc), then each ring step's received
    # blocks in arrival order. The selection is translated once, and its index (Triton: one
    # gather index) serves every source's partial, forward and backward.
    n_recv = [t.numel() for t in plan.recv_blocks]
    src_off = [0] + [2 * nbc + sum(n_recv[1:s]) for s in range(1, cp)]
    ns_of_block = torch.full((nb,), -1, dtype=torch.int32)  # host
    have = plan.source_of_block >= 0
    ns_of_block[have] = (torch.tensor(src_off)[plan.source_of_block[have]] + plan.slot_of_block[have]).to(torch.int32)
    sel = remap_ids(idx, ns_of_block)
    state = RingState(
        params=params, ranks=ranks, stats=stats, plan=plan, q_pos=q_pos,
        local_slot_pos=torch.cat([torch.arange(nbc, device=dev) * B + a * chunk,
                                  torch.arange(nbc, device=dev) * B + b * chunk]),
        recv_pos=[(t * B).to(dev) for t in plan.recv_blocks], send_slots=[t.to(dev) for t in plan.send_slots],
        src_off=src_off, index=partial_index(sel, 2 * nbc + sum(n_recv[1:]), hkv, d, backend=params.backend,
                                             kernel=params.kernel),
        kept={},
    )
    elem = k.element_size()
    stats.n_blocks, stats.block_bytes = nb, 2 * B * hkv * d * elem
    stats.global_union_blocks = plan.global_union_blocks
    stats.recv_block_ids = sorted(int(g) for t in plan.recv_blocks for g in t)
    stats.meta_bytes_recv = mask_bytes + (cp - 1) * 2 * nbc * hkv * d * cent.element_size()
    stats.full_ring_kv_bytes = (cp - 1) * 2 * s_loc * hkv * d * elem
    stats.full_ring_bwd_bytes = (cp - 1) * 2 * s_loc * hkv * d * (elem + 4)
    stats.kv_blocks_sent = sum(t.numel() for t in plan.send_slots)
    stats.kv_blocks_recv = sum(n_recv)
    stats.kv_bytes_sent = stats.kv_blocks_sent * stats.block_bytes
    stats.kv_bytes_recv = stats.kv_blocks_recv * stats.block_bytes
    comm = RingComm(ranks, dev, op="moba_attn_cp ring")
    part = dict(block_size=B, softmax_scale=params.scale, backend=params.backend, index=state.index)

    # 4. local partial first (step 1's transfer already in flight), then each arrival.
    pending = _post_kv(comm, k, v, state, 1) if cp > 1 else None
    o_acc, lse_acc = partial_attn_fwd(q, q_pos, k, v, state.local_slot_pos, sel, **part)
    for s in range(1, cp):
        buf = comm.wait(pending)
        pending = _post_kv(comm, k, v, state, s + 1) if s + 1 < cp else None
        if buf is None:
            continue
        o_s, lse_s = partial_attn_fwd(q, q_pos, buf[0], buf[1], state.recv_pos[s], sel, slot_offset=src_off[s], **part)
        # fp32 between merges; the last one writes q's dtype directly
        o_acc, lse_acc = merge_into(o_acc, lse_acc, o_s, lse_s, out_dtype=q.dtype if s == cp - 1 else torch.float32)
        if params.keep_kv:
            state.kept[s] = buf
    stats.kept_kv_bytes = sum(t.numel() * t.element_size() for t in state.kept.values())
    return o_acc.to(q.dtype), lse_acc.float(), sel, state


def ring_backward(do, q, k, v, o, lse, sel, state: RingState):
    """Backward of :func:`ring_forward`: ``dq, dk, dv`` in the inputs' dtypes."""
    params, stats, plan = state.params, state.stats, state.plan
    B, cp = params.block_size, state.ranks.size
    hkv, d, dev = k.shape[1], k.shape[2], q.device
    part = dict(block_size=B, softmax_scale=params.scale, backend=params.backend, index=state.index)
    comm = RingComm(state.ranks, dev, op="moba_attn_cp ring backward")

    def refetch(s):  # keep_kv=False: the forward's transfer again
        stats.kv_refetch_bytes_recv += plan.recv_blocks[s].numel() * stats.block_bytes
        return _post_kv(comm, k, v, state, s)

    pending_kv = refetch(1) if (cp > 1 and not params.keep_kv) else None
    dq = torch.zeros(q.shape, dtype=torch.float32, device=dev)  # every source adds its dQ here
    _, dk, dv = partial_attn_bwd(do, q, state.q_pos, k, v, state.local_slot_pos, sel, o, lse, dq_acc=dq, **part)
    grad_pending = []
    for s in range(1, cp):
        if params.keep_kv:
            buf = state.kept.get(s)
        else:
            buf = comm.wait(pending_kv)
            pending_kv = refetch(s + 1) if s + 1 < cp else None
        gpack = None
        if buf is not None:
            _, dk_b, dv_b = partial_attn_bwd(do, q, state.q_pos, buf[0], buf[1], state.recv_pos[s], sel, o, lse,
                                             slot_offset=state.src_off[s], dq_acc=dq, **part)
            gpack = torch.stack([dk_b, dv_b])
        n_back = state.send_slots[s].numel()  # the blocks this rank sent to rank + s come back
        stats.grad_bytes_sent += 0 if gpack is None else gpack.numel() * 4
        stats.grad_bytes_recv += n_back * B * hkv * d * 4 * 2
        grad_pending.append((s, comm.post((lambda g=gpack: g) if gpack is not None else None, -s,
                                          (2, n_back * B, hkv, d) if n_back else None, torch.float32, dev, s,
                                          tag=Tag.grad(s))))
    for s, p in grad_pending:
        g = comm.wait(p)
        if g is not None:
            rows = _rows_of_slots(state.send_slots[s], B)
            dk.index_add_(0, rows, g[0])
            dv.index_add_(0, rows, g[1])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _MobaRing(torch.autograd.Function):
    """The selective ring as an autograd Function: ``[S_local, H, D]`` shards -> ``o, lse``."""

    @staticmethod
    def forward(ctx, q, k, v, params: MobaParams, ranks: RankSet, stats: CPStats):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse, sel, state = ring_forward(q, k, v, params, ranks, stats)
        ctx.save_for_backward(q, k, v, o, lse, sel)
        ctx.state = state
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        state = ctx.state
        with report_failure("moba_attn_cp backward", state.ranks.group):
            dq, dk, dv = ring_backward(do.contiguous(), *ctx.saved_tensors, state)
        ctx.state = None
        return dq, dk, dv, None, None, None
