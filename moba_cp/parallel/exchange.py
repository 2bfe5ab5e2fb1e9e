"""Communication for context-parallel attention: shape handshake, request bitmasks, the
symmetric pairwise P2P ring, and byte accounting.

Everything that talks to ``torch.distributed`` for the CP ops lives in ``moba_cp.parallel``;
the collectives of this file (and the head-parallel exchange of :mod:`.head_parallel`) are the
only ones the ops use. Every wait is bounded (:mod:`.failure`).

A ring runs over a :class:`RankSet`: all ranks of the CP group (``comm="ring"``) or one rank of
each all-to-all group (``comm="a2a+ring"``: the ranks at the same place in every group).
Collectives always run over the whole CP group (every rank calls the op at the same time) and
a ring keeps its members' rows, so no extra process group is ever created.

Ring convention (``docs/design.md`` section 2): at step ``s = 1 .. cp-1`` rank ``r`` sends
to ``(r + s) % cp`` and receives from ``(r - s) % cp``; gradients go back the reverse way
(send to ``r - s``, receive from ``r + s``). Every rank knows every count before anything is
posted (the request matrix is all-gathered), so a send is always matched by a receive of the
same size and no rank can wait on a message that is never sent.
"""

from __future__ import annotations

import dataclasses
import enum
import logging

import torch
import torch.distributed as dist

from moba_cp.ops.moba.validate import qkv_error
from moba_cp.parallel.failure import wait_all, watch_stream

log = logging.getLogger(__name__)

__all__ = [
    "DTYPE_CODES",
    "shard_problem",
    "Tag",
    "RankSet",
    "CPStats",
    "last_stats",
    "agree_on_layout",
    "all_gather_equal",
    "RingComm",
    "ExchangePlan",
    "build_plan",
]


# --------------------------------------------------------------------------------------------
# Message tags and ring members
# --------------------------------------------------------------------------------------------
class Tag(enum.IntEnum):
    """Message kinds between the same two ranks (gloo matches a receive on source and tag)."""

    KV = 0  # + ring step s: K/V (blocks) from rank - s
    GRAD = 1000  # + ring step s: fp32 dK/dV back to their owner
    A2A = 2000  # + tensor number: head-parallel exchange (q, k, v; o back; lse)
    A2A_GRAD = 3000  # + tensor number: the backward of that exchange

    @staticmethod
    def kv(step: int) -> int:
        return Tag.KV + step

    @staticmethod
    def grad(step: int) -> int:
        return Tag.GRAD + step


@dataclasses.dataclass(frozen=True)
class RankSet:
    """Ranks of a CP group that exchange with each other, in ring (or all-to-all) order.

    ``members`` are ranks *within* ``group``; this process is ``members[index]``.
    """

    group: object
    members: tuple[int, ...]
    index: int

    @staticmethod
    def whole(group) -> "RankSet":
        """Every rank of ``group``."""
        return RankSet(group, tuple(range(dist.get_world_size(group))), dist.get_rank(group))

    @staticmethod
    def of(group, members) -> "RankSet":
        members = tuple(int(m) for m in members)
        return RankSet(group, members, members.index(dist.get_rank(group)))

    @property
    def size(self) -> int:
        return len(self.members)

    def global_rank(self, i: int) -> int:
        """Global rank of member ``i`` (mod size)."""
        return dist.get_global_rank(self.group, self.members[i % self.size])

    def peer(self, offset: int) -> int:
        """Global rank of the member ``offset`` places after this one."""
        return self.global_rank(self.index + offset)


# --------------------------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CPStats:
    """Per-call, per-rank traffic of a CP attention call (forward filled at forward, backward
    fields when the backward runs). Bytes are payload bytes as sent.

    ``full_ring_*`` are what a full-KV ring (every rank's K/V visits every rank, as in
    ring attention) moves for the same call, so benchmarks can print the ratio.

    ``comm`` is the call's comm type. ``a2a_*`` count the head-parallel all-to-all (q, k, v out
    and o back, plus lse when returned; ``a2a_grad_*`` its backward). With ``"a2a+ring"`` the
    ring fields describe the ring level: ``cp / a2a_size`` ranks, ``heads / a2a_size`` heads.
    """

    op: str = ""
    comm: str = "ring"
    a2a_size: int = 1
    cp_size: int = 1
    cp_rank: int = 0
    a2a_bytes_sent: int = 0
    a2a_bytes_recv: int = 0
    a2a_grad_bytes_sent: int = 0
    a2a_grad_bytes_recv: int = 0
    kv_heads_replicated: int = 1  # ranks sharing one KV head after the all-to-all (cp > Hkv)
    n_blocks: int = 0  # global blocks of the sequence (MoBA) / chunks (ring)
    block_bytes: int = 0  # K+V bytes of one block, all heads
    kv_blocks_sent: int = 0
    kv_blocks_recv: int = 0  # = distinct remote blocks this rank's queries selected
    kv_bytes_sent: int = 0
    kv_bytes_recv: int = 0
    global_union_blocks: int = 0  # distinct blocks that leave their owner (any requester)
    meta_bytes_recv: int = 0  # handshake + centroids + request bitmasks
    full_ring_kv_bytes: int = 0  # forward K/V bytes a full-KV ring sends per rank
    # backward
    grad_bytes_sent: int = 0
    grad_bytes_recv: int = 0
    kv_refetch_bytes_recv: int = 0
    full_ring_bwd_bytes: int = 0  # K/V re-rotation + fp32 dK/dV a full ring sends per rank
    kept_kv_bytes: int = 0  # received K/V held from forward to backward (keep_kv=True)
    recv_block_ids: list = dataclasses.field(default_factory=list)  # global ids received (MoBA)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_LAST: dict[str, CPStats] = {}


def last_stats(op: str = "moba_attn_cp") -> CPStats | None:
    """The :class:`CPStats` of the latest call of ``op`` in this process (its backward fields
    are filled once that call's backward has run)."""
    return _LAST.get(op)


def _record(stats: CPStats) -> None:
    _LAST[stats.op] = stats


# --------------------------------------------------------------------------------------------
# Input checks shared by the CP ops
# --------------------------------------------------------------------------------------------
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}  # for the handshake


#: the shard layouts the CP ops take: one sequence's zigzag shard, or a batch of them
SHARD_LAYOUTS = ("[S_local, H, D]", "[batch, S_local, H, D]")


def shard_problem(q, k, v, op: str) -> str | None:
    """What is wrong with one rank's ``[S_local, H, D]`` / ``[batch, S_local, H, D]`` shards
    (None if nothing): the op's input rules, defined once in
    :func:`moba_cp.ops.moba.validate.qkv_error` (the single-device op and the core-attention
    modules use the same rules and messages), plus the zigzag rule that a shard is two chunks."""
    err = qkv_error(q, k, v, op=op, layouts=SHARD_LAYOUTS)
    if err is not None:
        return str(err)
    if q.shape[-3] == 0 or q.shape[-3] % 2:
        return (f"the local shard has S_local={q.shape[-3]} tokens; a zigzag shard is 2 equal chunks, so "
                f"S_local must be even and > 0")
    return None


# --------------------------------------------------------------------------------------------
# Small collectives
# --------------------------------------------------------------------------------------------
def _comm_device(group, like: torch.Tensor | None) -> torch.device:
    """Device for collective tensors: NCCL needs CUDA, gloo takes CPU tensors."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return like.device if (like is not None and like.is_cuda) else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_equal(t: torch.Tensor, ranks, what: str = "all-gather") -> list[torch.Tensor]:
    """All-gather a tensor of the same shape on every rank (shapes are agreed beforehand).

    ``ranks``: a process group (all its rows) or a :class:`RankSet` (its members' rows, in its
    order; the gather itself runs over the whole group, which calls it at the same time).
    """
    rs = ranks if isinstance(ranks, RankSet) else RankSet.whole(ranks)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(rs.group))]
    work = dist.all_gather(out, t.contiguous(), group=rs.group, async_op=True)
    if t.is_cuda:
        work.wait()  # the stream waits; the watchdog bounds it
        watch_stream(rs.group, what)
    else:
        wait_all([work], group=rs.group, what=what)
    return [out[m] for m in rs.members]


def agree_on_layout(op: str, values: list[int], local_error: str | None, names: list[str], group, like=None) -> None:
    """Fail fast, on every rank, when any rank's inputs are invalid or ranks disagree.

    1. Every rank all-gathers ``[ok, *values]`` (a few int64s).
    2. If some rank flagged a local error, the messages are all-gathered and every rank raises
       the same ``ValueError`` naming the failing ranks.
    3. If the values differ between ranks, every rank raises the same ``ValueError`` listing
       them per rank.
    Collective: every rank of ``group`` must call it (they all do, before any other traffic).
    """
    dev = _comm_device(group, like)
    vec = torch.tensor([0 if local_error else 1, *[int(x) for x in values]], dtype=torch.int64, device=dev)
    rows = torch.stack(all_gather_equal(vec, group, what=f"{op} (layout handshake)")).cpu()
    world = rows.shape[0]
    if not bool(rows[:, 0].all()):
        msgs: list = [None] * world
        dist.all_gather_object(msgs, local_error, group=group)
        detail = "; ".join(f"rank {i}: {m}" for i, m in enumerate(msgs) if m)
        raise ValueError(f"{op}: invalid inputs on {sum(1 for m in msgs if m)} of {world} ranks -> {detail}")
    if not bool((rows[:, 1:] == rows[0:1, 1:]).all()):
        diff = [j for j in range(len(names)) if not bool((rows[:, 1 + j] == rows[0, 1 + j]).all())]
        per_rank = "; ".join(
            f"rank {i}: " + ", ".join(f"{names[j]}={int(rows[i, 1 + j])}" for j in diff) for i in range(world)
        )
        raise ValueError(
            f"{op}: the ranks of the CP group disagree on {', '.join(names[j] for j in diff)} ({per_rank}). "
            f"Every rank must pass its zigzag shard of the same sequence: same local length, heads, head "
            f"dim, dtype, block_size and topk."
        )


# --------------------------------------------------------------------------------------------
# The pairwise P2P ring, with a side stream on CUDA
# --------------------------------------------------------------------------------------------
class _Pending:
    def __init__(self, works, recv, keep_alive, peers=(), tag=0):
        self.works, self.recv, self.keep_alive, self.peers, self.tag = works, recv, keep_alive, peers, tag


class RingComm:
    """Posts one ring step (a send and/or a receive of agreed sizes) and waits for it.

    On CUDA the packing of the send buffer and the NCCL calls are issued on a separate stream,
    so the compute stream goes on with attention on what is already present; :meth:`wait`
    makes the compute stream wait for the transfer only when its result is needed.
    """

    def __init__(self, ranks: RankSet, device: torch.device, op: str = "ring"):
        self.ranks = ranks
        self.group = ranks.group
        self.rank = ranks.index
        self.size = ranks.size
        self.op = op
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    def peer(self, offset: int) -> int:
        """Global rank of the ring member ``offset`` places after this one."""
        return self.ranks.peer(offset)

    def post(self, pack, dst_off: int, recv_shape, recv_dtype, recv_device, src_off: int, tag: int = 0) -> _Pending:
        """Send ``pack()`` (a callable building the send tensor, or None for nothing) to
        ``rank + dst_off`` and receive a ``recv_shape`` tensor (None for nothing) from
        ``rank + src_off``. Both sides derived the same sizes from the same agreed plan. ``tag``
        keeps different message kinds between the same two ranks apart (gloo matches on it)."""
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream())
            ctx = torch.cuda.stream(self.stream)
        else:
            ctx = _nullctx()
        with ctx:
            send = pack() if pack is not None else None
            recv = torch.empty(recv_shape, dtype=recv_dtype, device=recv_device) if recv_shape is not None else None
            ops = []
            if send is not None:
                ops.append(dist.P2POp(dist.isend, send, self.peer(dst_off), self.group, tag))
            if recv is not None:
                ops.append(dist.P2POp(dist.irecv, recv, self.peer(src_off), self.group, tag))
            works = dist.batch_isend_irecv(ops) if ops else []
        peers = [self.ranks.members[(self.rank + o) % self.size] for o, t in ((dst_off, send), (src_off, recv))
                 if t is not None]
        return _Pending(works, recv, send, peers, tag)

    def wait(self, p: _Pending) -> torch.Tensor | None:
        """Block (the host on CPU, the compute stream on CUDA) until ``p`` completed; returns the
        received tensor."""
        if self.cuda:
            for w in p.works:
                w.wait()  # the compute stream waits (the watchdog bounds it), not the host
            if p.works:
                watch_stream(self.group, f"{self.op} (tag {p.tag})")
        else:
            wait_all(p.works, group=self.group, what=f"{self.op} (tag {p.tag})", peers=p.peers)
        if self.cuda:
            cur = torch.cuda.current_stream()
            cur.wait_stream(self.stream)
            if p.recv is not None:
                p.recv.record_stream(cur)
            if p.keep_alive is not None:
                p.keep_alive.record_stream(cur)
        p.keep_alive = None
        return p.recv


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------------------------
# MoBA exchange plan: who sends which blocks to whom
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExchangePlan:
    """The agreed block traffic of one MoBA CP call, identical arithmetic on every rank.

    Block ids are global (position space: block ``g`` holds positions ``[g*B, (g+1)*B)``);
    local slot ``j`` of rank ``r`` is row block ``j`` of its shard (``2 * nbc`` slots: chunk
    ``r`` then chunk ``2cp-1-r``, ``nbc`` blocks each).

    ``send_slots[s]``: local slots this rank sends to ``rank + s`` (ascending global id);
    ``recv_blocks[s]``: global ids it receives from ``rank - s`` (ascending), which is exactly
    the order ``rank - s`` packs them in. Index 0 is unused (the local step).
    """

    cp_size: int
    cp_rank: int
    nbc: int
    send_slots: list[torch.Tensor]
    recv_blocks: list[torch.Tensor]
    global_union_blocks: int
    slot_of_block: torch.Tensor  # [NB] slot inside its source's buffer
    source_of_block: torch.Tensor  # [NB] ring offset s of the source (0 = local)


def block_owner_and_slot(nb: int, nbc: int, cp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every global block: the owning rank and its local slot there."""
    g = torch.arange(nb)
    chunk = g // nbc
    owner = torch.where(chunk < cp_size, chunk, 2 * cp_size - 1 - chunk)
    slot = torch.where(chunk < cp_size, g - chunk * nbc, nbc + g - chunk * nbc)
    return owner, slot


def build_plan(want_local: torch.Tensor, nbc: int, ranks: RankSet, like: torch.Tensor) -> tuple[ExchangePlan, int]:
    """All-gather the request bitmasks and derive every send/receive of the call.

    Args:
        want_local: ``[NB]`` bool, the remote blocks this rank's queries selected (local
            blocks already cleared).
        nbc: blocks per zigzag chunk.
    Returns:
        the plan (host-side index tensors) and the bitmask bytes received.

    Steps: (1) all-gather ``[cp, NB]`` uint8 requests; (2) for each ring step ``s`` the blocks
    this rank owns that ``rank + s`` requested are sent, the blocks this rank requested that
    ``rank - s`` owns are received: both derived from the same matrix, so counts always match.
    """
    cp, r = ranks.size, ranks.index
    nb = want_local.numel()
    dev = _comm_device(ranks.group, like)
    rows = all_gather_equal(want_local.to(device=dev, dtype=torch.uint8), ranks, what="moba_attn_cp (requests)")
    want = torch.stack(rows).cpu().bool()  # [cp, NB]
    owner, slot = block_owner_and_slot(nb, nbc, cp)
    send_slots, recv_blocks = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dtype=torch.long)]
    for s in range(1, cp):
        dst, src = (r + s) % cp, (r - s) % cp
        send_ids = torch.nonzero(want[dst] & (owner == r)).flatten()
        send_slots.append(slot[send_ids])
        recv_blocks.append(torch.nonzero(want[r] & (owner == src)).flatten())
    slot_of_block = torch.full((nb,), -1, dtype=torch.long)
    source_of_block = torch.full((nb,), -1, dtype=torch.long)
    mine = owner == r
    slot_of_block[mine] = slot[mine]
    source_of_block[mine] = 0
    for s in range(1, cp):
        ids = recv_blocks[s]
        slot_of_block[ids] = torch.arange(ids.numel())
        source_of_block[ids] = s
    union = int(want.any(dim=0).sum())
    plan = ExchangePlan(cp, r, nbc, send_slots, recv_blocks, union, slot_of_block, source_of_block)
    return plan, (cp - 1) * nb
