"""The key convolution under context parallelism: each zigzag chunk gets its halo from its owner.

Rank ``r`` of ``cp`` holds global chunks ``r`` and ``2cp-1-r`` (:mod:`.zigzag`). A causal
convolution of width ``W`` needs, for the first token of a chunk, the ``W - 1`` keys just before
it, which are the tail of the previous global chunk:

================  ==================================  ========================================
local chunk        needs the tail of global chunk       held by
================  ==================================  ========================================
first  (``r``)     ``r - 1``                            rank ``r - 1``'s first chunk (rank 0: none,
                                                        the sequence starts: zeros)
second (``2cp-1-r``)  ``2cp-2-r``                       rank ``r + 1``'s second chunk (rank cp-1:
                                                        its own first chunk, chunk ``cp - 1``)
================  ==================================  ========================================

So every rank sends its first chunk's tail to ``r + 1`` and its second chunk's tail to ``r - 1``:
two P2P messages of ``(W-1) x H x D`` keys per row, on the ring of :class:`.exchange.RingComm`
(bounded waits, the failure message of :mod:`.failure`). The backward sends the halos'
gradients back the same way, to the owners of the keys. The wrap-around messages (rank ``cp-1``
to rank 0 and back) keep the ring symmetric and are dropped on arrival.

The result equals :func:`moba_cp.ops.key_conv.key_conv` on the unsplit sequence, then sharded
(``tests/test_key_conv.py``, gloo, 2 and 4 ranks, outputs and gradients).
"""

from __future__ import annotations

import torch

from moba_cp.ops.key_conv import check_key_conv_args, key_conv
from moba_cp.parallel.exchange import RankSet, RingComm
from moba_cp.parallel.failure import report_failure

__all__ = ["key_conv_cp"]

# Message tags, apart from exchange.Tag's ranges (0.., 1000.., 2000.., 3000..): with cp = 2 both
# halos travel between the same two ranks, and gloo matches a receive on (source, tag).
_TAG_FIRST, _TAG_SECOND, _TAG_GRAD_FIRST, _TAG_GRAD_SECOND = 4000, 4001, 4002, 4003


class _HaloExchange(torch.autograd.Function):
    """``tails [2, .., W-1, H, D]`` (this rank's two chunk tails) -> ``halos`` of the same shape:
    the keys before this rank's first and second chunk."""

    @staticmethod
    def forward(ctx, tails: torch.Tensor, ranks: RankSet):
        ctx.ranks = ranks
        halos = _swap(tails[0], tails[1], ranks, (_TAG_FIRST, _TAG_SECOND), forward=True)
        first = torch.zeros_like(tails[0]) if ranks.index == 0 else halos[0]
        second = tails[0] if ranks.index == ranks.size - 1 else halos[1]
        return torch.stack([first, second])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        ranks = ctx.ranks
        with report_failure("key_conv_cp backward", ranks.group):
            # the first halo came from rank r-1, the second from rank r+1: their gradients go back there
            back = _swap(grad[0].contiguous(), grad[1].contiguous(), ranks, (_TAG_GRAD_FIRST, _TAG_GRAD_SECOND),
                         forward=False)
        last = ranks.index == ranks.size - 1
        d_first = grad[1] if last else back[0]  # rank cp-1's second halo was its own first tail
        d_second = torch.zeros_like(grad[1]) if ranks.index == 0 else back[1]  # nobody reads chunk 2cp-1
        return torch.stack([d_first, d_second]), None


def _swap(a: torch.Tensor, b: torch.Tensor, ranks: RankSet, tags: tuple[int, int], forward: bool):
    """Forward: send ``a`` to ``r+1`` and ``b`` to ``r-1``; receive ``r-1``'s ``a`` and ``r+1``'s ``b``.
    Backward (reversed): send ``a`` to ``r-1`` and ``b`` to ``r+1``; receive ``r+1``'s ``a`` and ``r-1``'s ``b``."""
    if ranks.size == 1:
        return a, b
    comm = RingComm(ranks, a.device, op="key_conv_cp")
    step = 1 if forward else -1
    pa = comm.post(lambda: a.contiguous(), step, a.shape, a.dtype, a.device, -step, tag=tags[0])
    pb = comm.post(lambda: b.contiguous(), -step, b.shape, b.dtype, b.device, step, tag=tags[1])
    return comm.wait(pa), comm.wait(pb)


def key_conv_cp(k: torch.Tensor, weight: torch.Tensor, *, cp_group) -> torch.Tensor:
    """:func:`moba_cp.ops.key_conv.key_conv` on this rank's zigzag shard of a sequence.

    Args:
        k: this rank's keys ``[S_local, H, D]`` or ``[B, S_local, H, D]`` (chunk ``r`` then chunk
            ``2cp-1-r``, Megatron's layout; every row its own sequence).
        weight: ``[H, D, W]`` (the same on every rank of the CP group: a replicated parameter).
        cp_group: the context-parallel process group (every rank calls this at the same time).
    Returns:
        the convolved keys, ``k``'s shape: equal to ``zigzag_shard(key_conv(k_global))``.

    Raises:
        ValueError: bad shapes, or a chunk shorter than the ``W - 1`` keys a halo needs (a rank
            that raises publishes its message, so its peers fail with it instead of waiting).
    """
    ranks = RankSet.whole(cp_group)
    with report_failure("key_conv_cp", cp_group):
        w = check_key_conv_args(k, weight, op="key_conv_cp")
        seq = k.dim() - 3
        s_local = k.shape[seq]
        c = s_local // 2
        if s_local % 2 or c < w - 1:
            raise ValueError(
                f"key_conv_cp: the local shard has {s_local} tokens, i.e. zigzag chunks of {s_local / 2:g}; "
                f"a width-{w} key convolution needs chunks of at least {w - 1} whole tokens. Fix: a longer "
                f"model.seq_length or a smaller parallel.cp (chunks are seq_length / (2 * cp)).")
        first, second = k.narrow(seq, 0, c), k.narrow(seq, c, c)
        tails = torch.stack([first.narrow(seq, c - (w - 1), w - 1), second.narrow(seq, c - (w - 1), w - 1)])
        halos = _HaloExchange.apply(tails.contiguous(), ranks)
    return torch.cat([key_conv(first, weight, halo=halos[0]), key_conv(second, weight, halo=halos[1])], dim=seq)

