"""The MoBA gate under context parallelism: centroid all-gather and local top-k selection.

Steps 1-2 of the MoBA CP protocol (``docs/design.md`` section 2; :mod:`moba_cp.parallel.moba_attn`). No rank ever sees a remote key here: only the
``[n_blocks, Hkv, D]`` fp32 centroids travel.
"""

from __future__ import annotations

import logging

import torch

from moba_cp.ops.moba import naive, triton_centroids, triton_gate
from moba_cp.parallel.exchange import RankSet, all_gather_equal

log = logging.getLogger(__name__)
#: Gate widths whose fallback to the torch gate was already logged.
_WARNED_WIDTHS: set[int] = set()

__all__ = ["gather_centroids", "select_global"]


def local_centroids(k_local: torch.Tensor, block_size: int, backend: str) -> torch.Tensor:
    """``[n // B, Hkv, D]`` fp32 centroids of this shard's blocks, computed by the same code
    as the single-device op of ``backend`` (so CP and single-device scores agree bit for bit)."""
    if backend != "triton":
        return naive.block_centroids(k_local, block_size)
    n = k_local.shape[0] // block_size
    kstart = torch.arange(n, device=k_local.device, dtype=torch.int32) * block_size
    klen = torch.full((n,), block_size, device=k_local.device, dtype=torch.int32)
    return triton_centroids.block_centroids(k_local.contiguous(), kstart, klen, block_size)


def gather_centroids(k_local: torch.Tensor, block_size: int, ranks: RankSet, backend: str = "naive") -> torch.Tensor:
    """Global centroids from every ring member's local complete blocks.

    Args:
        k_local: ``[2*C, Hkv, D]`` this rank's zigzag shard of the keys (``C % B == 0``).
        ranks: the ring (``cp = ranks.size`` zigzag shards make the sequence).
    Returns:
        ``[NB, Hkv, D]`` fp32 (fp64 for fp64 keys), row ``g`` = mean of the keys of global
        block ``g``, ``NB = 2 * cp * C / B``.

    Steps: (1) mean-pool the ``2*C/B`` local blocks (the same pooling as the single-device
    oracle, so the values are bit-identical); (2) all-gather; (3) reorder chunk by chunk into
    global order (chunk ``c < cp`` is the first half of rank ``c``'s, chunk ``c >= cp`` the
    second half of rank ``2cp-1-c``'s).
    """
    cent = local_centroids(k_local, block_size, backend)  # [2*nbc, Hkv, D]
    nbc = cent.shape[0] // 2
    cp_size = ranks.size
    parts = all_gather_equal(cent, ranks, what="moba_attn_cp (centroids)")
    chunks = [parts[c][:nbc] if c < cp_size else parts[2 * cp_size - 1 - c][nbc:] for c in range(2 * cp_size)]
    return torch.cat(chunks, dim=0)


def select_global(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    centroids: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    width: int,
    backend: str,
    mem_budget_bytes: int = 1 << 30,
    gate_cfg=None,
) -> torch.Tensor:
    """Top-k block selection for local queries against the global causal candidate set.

    Args:
        q: ``[Tq, Hq, D]`` local queries; q_pos: ``[Tq]`` their global positions.
        centroids: ``[NB, Hkv, D]`` global centroids (from :func:`gather_centroids`).
        width: result columns (``min(topk, NB)``, as the single-device op).
        backend: "triton" runs the Triton backend's fused gate + running top-k (no score
            matrix in memory; one document, ``base = 0``, positions global), else the torch path.
        mem_budget_bytes: cap on the fp32 score tile of the torch path.
        gate_cfg: the Triton gate's tiling (``triton_config.GateConfig``; None: the default).
    Returns:
        ``[Tq, Hq, width]`` int32 global block ids, ascending, own block included, -1 padded.

    The torch path runs :func:`moba_cp.ops.moba.naive.select_from_centroids` (the contract) on
    query pieces in position order, each against only the centroid prefix its causal mask can
    reach (blocks past a piece's last own block are never candidates), so the score tile stays
    under ``mem_budget_bytes`` and the causal half of the work is skipped.
    """
    if backend == "triton":
        if width <= triton_gate.MAX_GATE_WIDTH:
            base = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
            kw = {} if gate_cfg is None else {"cfg": gate_cfg}
            return triton_gate.gate_topk(q.contiguous(), centroids.float().contiguous(), q_pos.to(torch.int32), base,
                                         block_size=block_size, topk=topk, width=width, **kw)
        if width not in _WARNED_WIDTHS:  # once per process and width, not in every layer and step
            _WARNED_WIDTHS.add(width)
            log.warning("moba_attn_cp: gate width %d exceeds the Triton gate's limit (%d); using the torch gate",
                        width, triton_gate.MAX_GATE_WIDTH)
    tq, hq, _ = q.shape
    out = torch.empty(tq, hq, width, dtype=torch.int32, device=q.device)
    nb = centroids.shape[0]
    per_query = max(1, hq * nb * 4)
    piece = max(block_size, (mem_budget_bytes // per_query) // block_size * block_size)
    # Zigzag shards hold two contiguous position runs; pieces are cut inside each run.
    start = 0
    while start < tq:
        end = min(tq, start + piece)
        # keep a piece inside one contiguous run of positions (the prefix bound needs it)
        pos = q_pos[start:end]
        brk = torch.nonzero(pos[1:] != pos[:-1] + 1)
        if brk.numel():
            end = start + int(brk[0]) + 1
            pos = q_pos[start:end]
        reach = min(nb, int(pos[-1]) // block_size)  # candidates are blocks < own block
        out[start:end] = naive.select_from_centroids(
            q[start:end], pos, centroids[:reach], block_size=block_size, topk=topk, width=width
        )
        start = end
    return out
