"""Context-parallel full causal attention on the zigzag layout (ring attention).

For the full-attention layers of hybrid models, and the dense baseline of MoBA CP. Same
layout, same P2P helper, same LSE merge as :mod:`moba_cp.parallel.moba_attn`, and the same
comm types (``comm="ring" | "a2a" | "a2a+ring"``, see :mod:`moba_cp.parallel.head_parallel`).

Which chunks a step needs (rank ``r`` holds chunks ``r`` and ``2cp-1-r``; at step ``s`` it
gets K/V from ``p = r - s``, which holds ``p`` and ``2cp-1-p``):
- step 0 (own K/V): one causal call over the local ``2C`` tokens is exact, because in local
  order chunk ``r`` precedes chunk ``2cp-1-r`` and both are contiguous position runs;
- ``p < r``: both local query chunks see all of chunk ``p`` and none of ``2cp-1-p``, so ``p``
  sends only its first chunk (half the bytes) and all queries attend it in full;
- ``p > r``: only the late query chunk ``2cp-1-r`` sees anything, and it sees both chunks of
  ``p`` in full.

Kernels (``impl``): "flash" = PyTorch's FlashAttention-2 (``aten._scaled_dot_product_flash_attention``
on CUDA, its CPU twin on CPU), "cudnn" = ``aten._scaled_dot_product_cudnn_attention`` (CUDA),
"math" = the fp32/fp64 torch oracle (any device, tests). "auto": flash on CUDA, math on CPU.
(The flash-attn package is not used: it is installed on none of the machines this runs on.)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from moba_cp.ops.lse_merge import merge_into
from moba_cp.ops.moba import naive
from moba_cp.parallel.exchange import (
    DTYPE_CODES, CPStats, RankSet, RingComm, Tag, _record, agree_on_layout, shard_problem,
)
from moba_cp.parallel.failure import report_failure
from moba_cp.parallel.head_parallel import COMM_TYPES, comm_layout, comm_problem, head_parallel_attention
from moba_cp.parallel.zigzag import fold_batch, unfold_batch, zigzag_positions

__all__ = ["ring_attn_cp", "dense_fwd", "dense_bwd"]

_NAMES = ["ndim", "batch", "S_local", "Hq", "Hkv", "D", "dtype", "impl", "comm", "a2a_size"]
_IMPLS = ("math", "flash", "cudnn")
_ALL = 1 << 40  # a "block size" that puts every key in block 0: the oracle then is full attention


def _to4(x, group=1):
    """``[T, H, D]`` -> ``[1, H*group, T, D]`` (GQA heads expanded for kernels without GQA)."""
    if group > 1:
        x = x.repeat_interleave(group, dim=1)
    return x.transpose(0, 1).unsqueeze(0)


def _from4(x):
    return x.squeeze(0).transpose(0, 1)


def dense_fwd(q, k, v, q_pos, k_pos, *, causal: bool, scale: float, impl: str):
    """Attention of ``q [Tq, Hq, D]`` over ``k, v [Tk, Hkv, D]``.

    ``causal`` (kernels) means top-left aligned local causality; ``q_pos``/``k_pos`` (oracle)
    give the same mask in positions. Returns ``o [Tq, Hq, D]`` (q's dtype), ``lse [Tq, Hq]`` fp32.
    """
    if impl == "math":
        idx = torch.zeros(q.shape[0], q.shape[1], 1, dtype=torch.int32, device=q.device)
        with torch.no_grad():
            o, lse = naive.attend_selected(q, k, v, idx, q_pos, k_pos, block_size=_ALL, softmax_scale=scale)
        return o, lse.float()
    g = q.shape[1] // k.shape[1]
    q4, k4, v4 = _to4(q), _to4(k, g), _to4(v, g)
    if impl == "flash":
        if q.is_cuda:
            out = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal, False, scale=scale)
        else:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, causal, scale=scale)
    elif impl == "cudnn":
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, causal, False, scale=scale)
    else:
        raise ValueError(f"ring_attn_cp: impl={impl!r} unknown; choose one of {_IMPLS} or 'auto'")
    o, lse = out[0], out[1]
    return _from4(o), lse.reshape(q.shape[1], q.shape[0]).transpose(0, 1).float()


def dense_bwd(do, q, k, v, o, lse, q_pos, k_pos, *, causal: bool, scale: float, impl: str):
    """Gradients of :func:`dense_fwd`'s partial given the *merged* ``o``/``lse`` (fp32 out).

    Returns ``dq [Tq, Hq, D]``, ``dk, dv [Tk, Hkv, D]``.
    """
    if impl == "math":
        idx = torch.zeros(q.shape[0], q.shape[1], 1, dtype=torch.int32, device=q.device)
        dq, dk, dv = naive.attend_selected_backward(do, q, k, v, o, lse, idx, q_pos, k_pos, block_size=_ALL,
                                                    softmax_scale=scale)
        return dq, dk, dv
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    q4, k4, v4, o4, do4 = _to4(q), _to4(k, g), _to4(v, g), _to4(o), _to4(do)
    lse4 = lse.transpose(0, 1).contiguous().unsqueeze(0)  # [1, H, Tq] fp32
    tq, tk = q.shape[0], k.shape[0]
    if impl == "flash":
        if q.is_cuda:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                do4, q4, k4, v4, o4, lse4, None, None, tq, tk, 0.0, causal, None, None, scale=scale)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do4, q4, k4, v4, o4, lse4, 0.0, causal, scale=scale)
    else:  # cudnn: its LSE carries a trailing unit dim
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do4, q4, k4, v4, o4, lse4.unsqueeze(-1), None, None, None, None, None, tq, tk, 0.0, causal,
            scale=scale)
    dq, dk, dv = _from4(dq).float(), _from4(dk), _from4(dv)
    if g > 1:  # fold the expanded heads back onto their KV head, summing in fp32 without an fp32
        # copy of the expanded grads (2 x 16 GiB at 1M tokens per rank and 32 query heads)
        dk = torch.sum(dk.reshape(tk, hkv, g, -1), dim=2, dtype=torch.float32)
        dv = torch.sum(dv.reshape(tk, hkv, g, -1), dim=2, dtype=torch.float32)
    else:
        dk, dv = dk.float(), dv.float()
    return dq, dk, dv


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "flash" if device.type == "cuda" else "math"
    if impl not in _IMPLS:
        raise ValueError(f"ring_attn_cp: impl={impl!r} unknown; choose one of {_IMPLS} or 'auto'")
    if impl == "cudnn" and device.type != "cuda":
        raise RuntimeError("ring_attn_cp: impl='cudnn' needs a CUDA device")
    return impl


def _local_problem(q, k, v, impl, comm, a2a_size, cp) -> tuple[str | None, str]:
    """(what is wrong with this rank's inputs or None, the resolved impl)."""
    problem = shard_problem(q, k, v, "ring_attn_cp")
    if problem:
        return problem, "math"
    try:
        impl_name = _resolve_impl(impl, q.device)
    except (ValueError, RuntimeError) as e:
        return str(e), "math"
    return comm_problem(comm, a2a_size, cp, q.shape[-2], k.shape[-2]), impl_name


def ring_attn_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cp_group,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    comm: str = "ring",
    a2a_size: int | None = None,
):
    """Causal full attention over a zigzag-sharded sequence (ring P2P, LSE merge, backward).

    Args:
        q: ``[S_local, Hq, D]`` (or ``[batch, S_local, Hq, D]``): this rank's zigzag shard.
        k, v: ``[S_local, Hkv, D]`` (or batched), ``Hq % Hkv == 0``.
        cp_group: the CP process group.
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return the fp32 LSE ``[..., S_local, Hq]`` (no gradient into it).
        impl: "auto" (flash on CUDA, math on CPU), "flash", "cudnn" or "math".
        comm: ``"ring"`` (full K/V ring), ``"a2a"`` (head-parallel, causal attention on whole
            sequences) or ``"a2a+ring"`` (all-to-all in groups of ``a2a_size``, ring across);
            the head rules are those of :func:`moba_cp.parallel.moba_attn_cp`.
        a2a_size: ranks per all-to-all group for ``"a2a+ring"``.
    Returns:
        ``o`` like ``q``, and ``lse`` when ``return_lse``: equal to causal attention on the
        unsharded sequence, then sharded. Traffic: ``last_stats("ring_attn_cp")``.

    Ring algorithm:
        0. agree on shapes across ranks (fail fast on every rank);
        1. post step 1's transfer (rank ``r-1`` sends what ``r`` needs of its K/V), then run the
           causal local step;
        2. for ``s = 1..cp-1``: wait for ``rank - s``'s K/V, post step ``s+1``, attend (all
           queries on its first chunk if ``r - s`` is an earlier rank, else the late query
           chunk on both its chunks) and LSE-merge in fp32;
        backward: the same steps with the kernel's backward on the merged ``o``/``lse``; K/V
        fetched again (no copy kept), dQ local, dK/dV (fp32) sent straight back to the owner.

    Example:
        >>> o = ring_attn_cp(zigzag_shard(q, r, cp), zigzag_shard(k, r, cp), zigzag_shard(v, r, cp),
        ...                  cp_group=group)
    """
    cp = dist.get_world_size(cp_group)
    problem, impl_name = _local_problem(q, k, v, impl, comm, a2a_size, cp)
    values = [0] * len(_NAMES) if problem else [
        q.dim(), q.shape[0] if q.dim() == 4 else 1, q.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1],
        DTYPE_CODES[q.dtype], _IMPLS.index(impl_name), COMM_TYPES.index(comm), int(a2a_size or 0)]
    agree_on_layout("ring_attn_cp", values, problem, _NAMES, cp_group, like=q if isinstance(q, torch.Tensor) else None)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    layout = comm_layout(comm, a2a_size, cp_group)
    stats = CPStats(op="ring_attn_cp", comm=comm, a2a_size=layout.a2a_size, cp_size=cp, cp_rank=dist.get_rank(cp_group))
    with report_failure("ring_attn_cp", cp_group):
        if comm == "ring":
            o, lse = _ring_on_shard(q, k, v, scale, impl_name, layout.ring, stats)
        else:
            q4, k4, v4 = (x if x.dim() == 4 else x.unsqueeze(0) for x in (q, k, v))
            ring = layout.ring  # a2a: this rank alone, so the "ring" is the local causal step

            def attend(qg, kg, vg):
                return _ring_on_shard(qg, kg, vg, scale, impl_name, ring, stats)

            o, lse = head_parallel_attention(q4, k4, v4, layout, attend, stats, "ring_attn_cp", need_lse=return_lse)
            if q.dim() == 3:
                o, lse = o[0], (lse[0] if lse is not None else None)
    _record(stats)
    return (o, lse) if return_lse else o


def _ring_on_shard(q, k, v, scale, impl, ranks: RankSet, stats):
    """The ring over ``ranks`` for ``[S, H, D]`` or ``[b, S, H, D]`` (batch folded into heads)."""
    if q.dim() == 3:
        return _RingAttn.apply(q, k, v, RingParams(scale, impl), ranks, stats)
    b = q.shape[0]
    o, lse = _RingAttn.apply(fold_batch(q), fold_batch(k), fold_batch(v), RingParams(scale, impl), ranks, stats)
    return unfold_batch(o, b), unfold_batch(lse, b)


@dataclasses.dataclass(frozen=True)
class RingParams:
    scale: float
    impl: str


@dataclasses.dataclass
class RingState:
    """What the backward needs besides the saved q, k, v, o, lse."""

    params: RingParams
    ranks: RankSet
    stats: CPStats


class _Ring:
    """Shared step arithmetic of forward and backward."""

    def __init__(self, ranks: RankSet, s_loc, dev, op):
        self.cp, self.r = ranks.size, ranks.index
        self.c = s_loc // 2
        self.comm = RingComm(ranks, dev, op=op)

    def src(self, s):
        return (self.r - s) % self.cp

    def sent_len(self, receiver, sender):
        """Tokens of ``sender``'s K/V that ``receiver`` needs: first chunk if sender is earlier."""
        return self.c if sender < receiver else 2 * self.c

    def post_kv(self, k, v, s, stats):
        dst, src = (self.r + s) % self.cp, self.src(s)
        n_send, n_recv = self.sent_len(dst, self.r), self.sent_len(self.r, src)
        if stats is not None:
            stats.kv_bytes_sent += 2 * n_send * k[0].numel() * k.element_size()
            stats.kv_bytes_recv += 2 * n_recv * k[0].numel() * k.element_size()
        pack = lambda: torch.stack([k[:n_send], v[:n_send]])  # noqa: E731
        return self.comm.post(pack, s, (2, n_recv, *k.shape[1:]), k.dtype, k.device, -s, tag=Tag.kv(s))


def ring_forward(q, k, v, params: RingParams, ranks: RankSet, stats: CPStats):
    """Forward of the full-K/V ring on ``[S_local, H, D]`` shards: ``o`` (q's dtype), ``lse`` fp32."""
    s_loc = q.shape[0]
    scale, impl = params.scale, params.impl
    ring = _Ring(ranks, s_loc, q.device, "ring_attn_cp ring")
    cp, r, c = ring.cp, ring.r, ring.c
    pos = zigzag_positions(s_loc, r, cp, device=q.device)
    elem = k.element_size()
    stats.n_blocks = 2 * cp
    stats.full_ring_kv_bytes = (cp - 1) * 2 * k.numel() * elem
    stats.full_ring_bwd_bytes = (cp - 1) * 2 * k.numel() * (elem + 4)
    pending = ring.post_kv(k, v, 1, stats) if cp > 1 else None
    o, lse = dense_fwd(q, k, v, pos, pos, causal=True, scale=scale, impl=impl)
    o, lse = o.float(), lse.float()
    for s in range(1, cp):
        buf = ring.comm.wait(pending)
        pending = ring.post_kv(k, v, s + 1, stats) if s + 1 < cp else None
        p = ring.src(s)
        k_pos = zigzag_positions(2 * c, p, cp, device=q.device)[: buf.shape[1]]
        if p < r:
            o_s, lse_s = dense_fwd(q, buf[0], buf[1], pos, k_pos, causal=False, scale=scale, impl=impl)
            o, lse = merge_into(o, lse, o_s, lse_s)
        else:
            o_s, lse_s = dense_fwd(q[c:], buf[0], buf[1], pos[c:], k_pos, causal=False, scale=scale, impl=impl)
            o2, lse2 = merge_into(o[c:], lse[c:], o_s, lse_s)
            o, lse = torch.cat([o[:c], o2]), torch.cat([lse[:c], lse2])
    return o.to(q.dtype), lse


def ring_backward(do, q, k, v, o, lse, state: RingState):
    """Backward of :func:`ring_forward`: ``dq, dk, dv`` in the inputs' dtypes."""
    scale, impl, stats = state.params.scale, state.params.impl, state.stats
    s_loc = q.shape[0]
    ring = _Ring(state.ranks, s_loc, q.device, "ring_attn_cp ring backward")
    cp, r, c = ring.cp, ring.r, ring.c
    pos = zigzag_positions(s_loc, r, cp, device=q.device)
    pending = ring.post_kv(k, v, 1, None) if cp > 1 else None
    dq, dk, dv = dense_bwd(do, q, k, v, o, lse, pos, pos, causal=True, scale=scale, impl=impl)
    dq, dk, dv = dq.float(), dk.float(), dv.float()
    grads = []
    for s in range(1, cp):
        buf = ring.comm.wait(pending)
        pending = ring.post_kv(k, v, s + 1, None) if s + 1 < cp else None
        stats.kv_refetch_bytes_recv += buf.numel() * buf.element_size()
        p = ring.src(s)
        k_pos = zigzag_positions(2 * c, p, cp, device=q.device)[: buf.shape[1]]
        if p < r:
            dq_s, dk_s, dv_s = dense_bwd(do, q, buf[0], buf[1], o, lse, pos, k_pos, causal=False, scale=scale,
                                         impl=impl)
            dq += dq_s
        else:
            dq_s, dk_s, dv_s = dense_bwd(do[c:], q[c:], buf[0], buf[1], o[c:], lse[c:], pos[c:], k_pos,
                                         causal=False, scale=scale, impl=impl)
            dq[c:] += dq_s
        g = torch.stack([dk_s.float(), dv_s.float()])
        n_back = ring.sent_len((r + s) % cp, r)  # what rank r+s used of this rank's K/V
        stats.grad_bytes_sent += g.numel() * 4
        stats.grad_bytes_recv += 2 * n_back * k[0].numel() * 4
        grads.append((n_back, ring.comm.post(lambda g=g: g, -s, (2, n_back, *k.shape[1:]), torch.float32,
                                             q.device, s, tag=Tag.grad(s))))
    for n_back, p_ in grads:
        g = ring.comm.wait(p_)
        dk[:n_back] += g[0]
        dv[:n_back] += g[1]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttn(torch.autograd.Function):
    """The full-K/V ring as an autograd Function: ``[S_local, H, D]`` shards -> ``o, lse``."""

    @staticmethod
    def forward(ctx, q, k, v, params: RingParams, ranks: RankSet, stats: CPStats):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = ring_forward(q, k, v, params, ranks, stats)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.state = RingState(params, ranks, stats)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        state = ctx.state
        with report_failure("ring_attn_cp backward", state.ranks.group):
            dq, dk, dv = ring_backward(do.contiguous(), *ctx.saved_tensors, state)
        return dq, dk, dv, None, None, None
