"""Megatron's load-balancing "zigzag" context-parallel layout, and its index arithmetic.

The global sequence of length ``S`` is cut into ``2*cp`` equal chunks of ``C = S / (2*cp)``
tokens; rank ``r`` holds chunk ``r`` followed by chunk ``2*cp-1-r`` (so every rank has one
early and one late chunk and the causal work is balanced). This is exactly what
``megatron.core.utils.get_batch_on_this_cp_rank`` does (tested against it), so MoBA layers
and Megatron's RoPE slicing agree on which token sits where.

No torch.distributed here: pure index arithmetic, usable by tests and benchmarks.
"""

from __future__ import annotations

import torch

__all__ = [
    "zigzag_shard",
    "zigzag_unshard",
    "zigzag_positions",
    "chunk_owner",
    "local_chunks",
    "fold_batch",
    "unfold_batch",
]


def local_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunk numbers rank ``cp_rank`` holds, in local order: ``(r, 2*cp-1-r)``."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def chunk_owner(chunk: int, cp_size: int) -> int:
    """The rank holding global chunk ``chunk`` (``0 <= chunk < 2*cp``)."""
    return chunk if chunk < cp_size else 2 * cp_size - 1 - chunk


def _check(n: int, cp_size: int, what: str) -> int:
    if cp_size < 1:
        raise ValueError(f"{what}: cp_size={cp_size} must be >= 1")
    if n % (2 * cp_size) != 0:
        raise ValueError(
            f"{what}: sequence length {n} is not divisible by 2*cp_size={2 * cp_size}; the zigzag "
            f"layout cuts the sequence into 2*cp equal chunks. Fix: pad the sequence to a multiple "
            f"of {2 * cp_size}."
        )
    return n // (2 * cp_size)


def zigzag_shard(x: torch.Tensor, cp_rank: int, cp_size: int, seq_dim: int = 0) -> torch.Tensor:
    """This rank's zigzag shard of a global tensor.

    Args:
        x: any tensor whose dimension ``seq_dim`` is the global sequence ``S`` (e.g.
            ``[S, H, D]`` with ``seq_dim=0``, or ``[B, S, ...]`` with ``seq_dim=1`` as Megatron).
        cp_rank, cp_size: position in and size of the context-parallel group.
        seq_dim: the sequence dimension.
    Returns:
        ``x`` with dimension ``seq_dim`` reduced to ``S / cp``: chunk ``cp_rank`` then chunk
        ``2*cp-1-cp_rank`` (a new tensor; identical to Megatron's ``get_batch_on_this_cp_rank``).

    Example:
        >>> x = torch.arange(8)
        >>> zigzag_shard(x, 0, 2), zigzag_shard(x, 1, 2)
        (tensor([0, 1, 6, 7]), tensor([2, 3, 4, 5]))
    """
    seq_dim = seq_dim % x.dim()
    c = _check(x.shape[seq_dim], cp_size, "zigzag_shard")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"zigzag_shard: cp_rank={cp_rank} is outside [0, {cp_size})")
    view = x.reshape(*x.shape[:seq_dim], 2 * cp_size, c, *x.shape[seq_dim + 1:])
    idx = torch.tensor(local_chunks(cp_rank, cp_size), device=x.device)
    out = view.index_select(seq_dim, idx)
    return out.reshape(*x.shape[:seq_dim], 2 * c, *x.shape[seq_dim + 1:])


def zigzag_unshard(shards: list[torch.Tensor] | tuple[torch.Tensor, ...], seq_dim: int = 0) -> torch.Tensor:
    """Reassemble the global tensor from every rank's shard (inverse of :func:`zigzag_shard`).

    Args:
        shards: ``cp`` tensors, ``shards[r]`` = rank ``r``'s shard (e.g. from an all-gather),
            all of one shape with ``2*C`` along ``seq_dim``.
    Returns:
        The global tensor, ``2*cp*C`` along ``seq_dim``.

    Example:
        >>> zigzag_unshard([torch.tensor([0, 1, 6, 7]), torch.tensor([2, 3, 4, 5])])
        tensor([0, 1, 2, 3, 4, 5, 6, 7])
    """
    cp_size = len(shards)
    if cp_size == 0:
        raise ValueError("zigzag_unshard: no shards given")
    seq_dim = seq_dim % shards[0].dim()
    n_local = shards[0].shape[seq_dim]
    for r, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise ValueError(
                f"zigzag_unshard: shard {r} has shape {tuple(s.shape)} but shard 0 has "
                f"{tuple(shards[0].shape)}; every rank's shard must have the same shape."
            )
    if n_local % 2 != 0:
        raise ValueError(f"zigzag_unshard: shard length {n_local} along dim {seq_dim} is odd; a zigzag shard holds 2 chunks")
    halves = [s.chunk(2, dim=seq_dim) for s in shards]
    chunks = [halves[c][0] if c < cp_size else halves[2 * cp_size - 1 - c][1] for c in range(2 * cp_size)]
    return torch.cat(chunks, dim=seq_dim)


def zigzag_positions(n_local: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions ``[n_local]`` (int64) of the tokens of rank ``cp_rank``'s shard.

    Example:
        >>> zigzag_positions(4, 1, 2)
        tensor([2, 3, 4, 5])
    """
    if n_local % 2 != 0:
        raise ValueError(f"zigzag_positions: n_local={n_local} is odd; a zigzag shard holds 2 equal chunks")
    c = n_local // 2
    a, b = local_chunks(cp_rank, cp_size)
    ar = torch.arange(c, device=device)
    return torch.cat([ar + a * c, ar + b * c])


def fold_batch(x: torch.Tensor) -> torch.Tensor:
    """``[b, S, H, ...]`` -> ``[S, b*H, ...]``: batch rows become heads (row ``i``, head ``h`` ->
    head ``i*H + h``), so GQA stays exact (query head ``i*Hq + h`` -> KV head ``i*Hkv + h // g``)
    and one CP exchange serves every row."""
    return x.transpose(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def unfold_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`fold_batch`: ``[S, b*H, ...]`` -> ``[b, S, H, ...]``."""
    return x.reshape(x.shape[0], batch, x.shape[1] // batch, *x.shape[2:]).transpose(0, 1)
