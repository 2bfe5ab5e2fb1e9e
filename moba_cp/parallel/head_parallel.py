"""Head-parallel context parallelism: the all-to-all between sequence shards and head groups.

``comm="a2a"`` (DeepSpeed-Ulysses' exchange): every rank sends each other rank the heads it
will own, for this rank's zigzag shard of the tokens; afterwards a rank holds the *whole*
sequence for ``H / cp`` heads and runs the single-device op on it (nothing else to exchange);
the output goes back the same way. Per-rank bytes: q, k, v and o of ``S / cp`` tokens, times
``(cp - 1) / cp``, so they fall as ``1 / cp`` (a ring moves about the whole K/V whatever cp is).

``comm="a2a+ring"``: the all-to-all runs inside groups of ``a2a_size`` consecutive CP ranks (one
node), the ring across the groups. After the exchange, group ``g`` (of ``n = cp / a2a_size``)
holds chunks ``g*A .. g*A+A-1`` and their mirrors ``2cp-1-g*A-A+1 .. 2cp-1-g*A``, which is exactly
the zigzag shard of the global sequence at ``cp' = n`` for ring rank ``g``, so the ring ops run
unchanged over the ranks at the same place in every group (:attr:`CommLayout.ring`).

Shard assembly (both forms): member ``i`` of a group of ``A`` sent its two chunks (first half:
an early chunk, second half: a late one); early chunks ascend with ``i``, late ones descend, so
the gathered sequence is ``first halves i = 0..A-1, then second halves i = A-1..0``
(:func:`merge_shards`; with ``A = cp`` that is :func:`~moba_cp.parallel.zigzag.zigzag_unshard`).

Heads: member ``j`` owns query heads ``[j*Hq/A, (j+1)*Hq/A)`` and the KV heads they use. With
``A > Hkv`` (``A % Hkv == 0``) one KV head serves ``A / Hkv`` members: it is sent to each of
them (replicated) and their dK/dV are summed on its owner by autograd.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

from moba_cp.parallel.exchange import CPStats, RankSet, Tag
from moba_cp.parallel.failure import report_failure, wait_all, watch_stream

log = logging.getLogger(__name__)

__all__ = ["COMM_TYPES", "CommLayout", "comm_layout", "comm_problem", "head_parallel_attention", "merge_shards",
           "split_shards"]

COMM_TYPES = ("ring", "a2a", "a2a+ring")
_replication_announced: set = set()


@dataclasses.dataclass(frozen=True)
class CommLayout:
    """Who exchanges with whom for one comm type (every rank derives the same layout).

    ``a2a``: this rank's all-to-all group (``a2a_size`` consecutive CP ranks; one member for
    ``"ring"``); ``ring``: the ring over the groups (every CP rank for ``"ring"``, one rank per
    group for ``"a2a+ring"``, just this rank for ``"a2a"``).
    """

    comm: str
    a2a_size: int
    a2a: RankSet
    ring: RankSet


def comm_problem(comm, a2a_size, cp: int, hq: int, hkv: int) -> str | None:
    """What is wrong with ``comm`` / ``a2a_size`` for ``cp`` ranks and these heads (None: fine).

    ``hq``/``hkv``: query and KV heads per row on this rank (after tensor parallelism).
    """
    if comm not in COMM_TYPES:
        return f"comm={comm!r} is unknown; choose one of {', '.join(map(repr, COMM_TYPES))}"
    if comm == "ring":
        if a2a_size not in (None, 1):
            return f"a2a_size={a2a_size!r} is only meaningful with comm='a2a+ring' (got comm='ring')"
        return None
    size = cp if comm == "a2a" else a2a_size
    if comm == "a2a" and a2a_size not in (None, cp):
        return (f"comm='a2a' exchanges over the whole CP group (a2a_size = cp = {cp}), got a2a_size={a2a_size!r}; "
                f"for groups use comm='a2a+ring'")
    if comm == "a2a+ring":
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return f"comm='a2a+ring' needs an integer a2a_size >= 1 (ranks per all-to-all group), got {a2a_size!r}"
        if cp % size:
            return (f"a2a_size={size} does not divide the CP size {cp}; the all-to-all groups are a2a_size "
                    f"consecutive CP ranks. Fix: pick a2a_size among the divisors of {cp} (usually GPUs per node)")
    if hq % size:
        return (f"comm={comm!r} splits the {hq} query heads (per tensor-parallel rank) over {size} ranks, which does "
                f"not divide them. Fix: use {'a2a_size' if comm == 'a2a+ring' else 'cp'} dividing {hq}, or comm='ring'")
    if hkv % size and size % hkv:
        return (f"comm={comm!r} splits the {hkv} KV heads (per tensor-parallel rank) over {size} ranks: {size} must "
                f"divide {hkv}, or be a multiple of it (KV heads are then replicated). Fix: use "
                f"{'a2a_size' if comm == 'a2a+ring' else 'cp'} dividing {hkv} or a multiple of it, or comm='ring'")
    return None


def comm_layout(comm: str, a2a_size, group) -> CommLayout:
    """The :class:`CommLayout` of this rank (the checks of :func:`comm_problem` passed)."""
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    if comm == "ring":
        return CommLayout(comm, 1, RankSet.of(group, [r]), RankSet.whole(group))
    a = cp if comm == "a2a" else int(a2a_size)
    g, i = divmod(r, a)
    return CommLayout(comm, a, RankSet.of(group, range(g * a, (g + 1) * a)), RankSet.of(group, range(i, cp, a)))


# --------------------------------------------------------------------------------------------
# Layout of the gathered shards
# --------------------------------------------------------------------------------------------
def merge_shards(shards: list[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """``A`` group members' zigzag shards -> the group's shard at ``cp / A`` (whole sequence for
    ``A = cp``): first halves in member order, then second halves in reverse member order."""
    halves = [s.chunk(2, dim=seq_dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=seq_dim)


def split_shards(x: torch.Tensor, a: int, seq_dim: int = 1) -> list[torch.Tensor]:
    """Inverse of :func:`merge_shards`: member ``i``'s shard of the group's tokens."""
    chunks = x.chunk(2 * a, dim=seq_dim)
    return [torch.cat([chunks[i], chunks[2 * a - 1 - i]], dim=seq_dim) for i in range(a)]


def _head_ranges(hq: int, hkv: int, a: int) -> list[tuple[slice, slice]]:
    """Per member: its query heads and the KV heads they read (one shared head when a > hkv)."""
    group = hq // hkv
    out = []
    for j in range(a):
        q0, q1 = j * hq // a, (j + 1) * hq // a
        out.append((slice(q0, q1), slice(q0 // group, (q1 - 1) // group + 1)))
    return out


# --------------------------------------------------------------------------------------------
# The differentiable exchange
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _ExchangeSpec:
    """One all-to-all inside ``ranks``: ``n_kinds`` tensors, one piece per other member each."""

    ranks: RankSet
    n_kinds: int
    what: str
    stats: CPStats
    forward_fields: tuple[str, str]  # stats fields for (sent, received) bytes of the forward
    backward_fields: tuple[str, str]


def _exchange(spec: _ExchangeSpec, pieces, tag_base: int, fields) -> list[torch.Tensor]:
    """Send ``pieces[t * (A-1) + m]`` (tensor kind ``t``, ``m``-th other member) and receive the
    same shapes from the same members (every exchange here is shape-symmetric)."""
    rs = spec.ranks
    others = [j for j in range(rs.size) if j != rs.index]
    ops, recv = [], []
    for t in range(spec.n_kinds):
        for m, j in enumerate(others):
            send = pieces[t * len(others) + m].contiguous()
            buf = torch.empty_like(send)
            peer = rs.global_rank(j)
            ops.append(dist.P2POp(dist.isend, send, peer, rs.group, tag_base + t))
            ops.append(dist.P2POp(dist.irecv, buf, peer, rs.group, tag_base + t))
            recv.append(buf)
            nbytes = send.numel() * send.element_size()
            setattr(spec.stats, fields[0], getattr(spec.stats, fields[0]) + nbytes)
            setattr(spec.stats, fields[1], getattr(spec.stats, fields[1]) + nbytes)
    works = dist.batch_isend_irecv(ops) if ops else []
    if recv and recv[0].is_cuda:
        for w in works:
            w.wait()  # the stream waits; the watchdog bounds it
        watch_stream(rs.group, spec.what)
    else:
        wait_all(works, group=rs.group, what=spec.what, peers=[rs.members[j] for j in others])
    return recv


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: the backward sends each received piece's gradient back."""

    @staticmethod
    def forward(ctx, spec: _ExchangeSpec, *pieces):
        ctx.spec = spec
        return tuple(_exchange(spec, pieces, Tag.A2A, spec.forward_fields))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        spec = ctx.spec
        # each received piece came from one member; its gradient goes back to that member
        with report_failure(f"{spec.what} backward", spec.ranks.group):
            return (None, *_exchange(spec, grads, Tag.A2A_GRAD, spec.backward_fields))


def _all_to_all(spec: _ExchangeSpec, per_kind: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """``per_kind[t][j]``: the piece of tensor kind ``t`` for member ``j`` -> the pieces received
    from every member (own piece kept without a transfer)."""
    me, a = spec.ranks.index, spec.ranks.size
    if a == 1:
        return per_kind
    flat = [p for pieces in per_kind for j, p in enumerate(pieces) if j != me]
    if any(p.requires_grad for p in flat):
        got = _AllToAll.apply(spec, *flat)
    else:
        got = _exchange(spec, flat, Tag.A2A, spec.forward_fields)
    out, n = [], a - 1
    for t, pieces in enumerate(per_kind):
        recv = list(got[t * n:(t + 1) * n])
        recv.insert(me, pieces[me])
        out.append(recv)
    return out


# --------------------------------------------------------------------------------------------
# The head-parallel attention
# --------------------------------------------------------------------------------------------
def head_parallel_attention(q, k, v, layout: CommLayout, attend, stats: CPStats, op: str, need_lse: bool = True):
    """Exchange to head groups, ``attend``, exchange back.

    Args:
        q: ``[b, S_local, Hq, D]``, k, v: ``[b, S_local, Hkv, D]``: this rank's zigzag shard.
        layout: from :func:`comm_layout` (``"a2a"`` or ``"a2a+ring"``).
        attend: ``(q, k, v) -> (o, lse)`` on ``[b, A*S_local, h, D]`` (the group's shard at
            ``cp / A``: the whole sequence for ``"a2a"``), ``lse [b, A*S_local, hq]``.
        stats: filled with the exchange's bytes (backward bytes when the backward runs).
        need_lse: also send the LSE back (else ``lse`` is None).
    Returns:
        ``o [b, S_local, Hq, D]`` and ``lse [b, S_local, Hq]`` fp32 (no gradient) or None.
    """
    rs, a = layout.a2a, layout.a2a_size
    hq, hkv = q.shape[2], k.shape[2]
    heads = _head_ranges(hq, hkv, a)
    if a > hkv and (a, hkv) not in _replication_announced:
        _replication_announced.add((a, hkv))
        log.info("%s: comm=%r with %d KV heads over %d ranks: each KV head is sent to %d ranks (replicated) "
                 "and its gradients summed back", op, layout.comm, hkv, a, a // hkv)
    stats.kv_heads_replicated = max(1, a // hkv)
    spec = _ExchangeSpec(rs, 3, f"{op} (all-to-all q/k/v)", stats, ("a2a_bytes_sent", "a2a_bytes_recv"),
                         ("a2a_grad_bytes_sent", "a2a_grad_bytes_recv"))
    sent = [[q[:, :, qh] for qh, _ in heads], [k[:, :, kh] for _, kh in heads], [v[:, :, kh] for _, kh in heads]]
    qg, kg, vg = (merge_shards(parts) for parts in _all_to_all(spec, sent))
    o, lse = attend(qg, kg, vg)
    spec_o = dataclasses.replace(spec, n_kinds=1, what=f"{op} (all-to-all o)")
    back = _all_to_all(spec_o, [split_shards(o, a)])[0]
    o_local = torch.cat(back, dim=2)
    if not need_lse:
        return o_local, None
    spec_lse = dataclasses.replace(spec, n_kinds=1, what=f"{op} (all-to-all lse)")
    lse_back = _all_to_all(spec_lse, [split_shards(lse.detach().float().contiguous(), a)])[0]
    return o_local, torch.cat(lse_back, dim=2)
