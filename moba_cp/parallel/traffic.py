"""Bytes each CP comm type moves per attention layer and rank: plain arithmetic, no communication.

Read by ``moba-cp train --dry-run`` and ``moba-cp analyze selection``; the formulas are those the
ops record in :class:`~moba_cp.parallel.exchange.CPStats` (tested against them).

Per layer, per rank, per sequence of ``S`` tokens; ``kv_row = 2 * Hkv * D * elem`` (K and V of
one token, heads per tensor-parallel rank):

- ``"ring"`` (MoBA): the requested remote blocks, ``union`` x the remote past of the busiest
  rank (rank 0 holds the last chunk, whose past is every other rank's tokens):
  ``union * (S - S/cp) * kv_row`` forward; backward re-fetches them and sends fp32 dK/dV back.
  Full attention (``union = 1``) is the same bound.
- ``"a2a"``: each rank sends ``(A-1)/A`` of its q, k, v and receives the o of its tokens back:
  ``(A-1) * S/cp * D * elem * (2*Hq/A + 2*max(1, Hkv/A))`` forward (KV heads replicated when
  ``A > Hkv``); the backward moves the same (do in, dq, dk, dv out).
- ``"a2a+ring"``: that all-to-all with ``A = a2a_size`` (inside a node) plus the ring over
  ``n = cp / A`` groups on ``S/n``-token shards with ``max(1, Hkv/A)`` KV heads (across nodes).
"""

from __future__ import annotations

import dataclasses

from moba_cp.parallel.head_parallel import COMM_TYPES, comm_problem

__all__ = ["CommTraffic", "comm_traffic", "candidate_comms", "DEFAULT_INTRA_GBPS", "DEFAULT_INTER_GBPS"]

DEFAULT_INTRA_GBPS = 3600.0  # NVLink 4 (H100/H200): 450 GB/s per direction
DEFAULT_INTER_GBPS = 400.0  # one 400 Gb/s InfiniBand NIC per GPU


@dataclasses.dataclass
class CommTraffic:
    """Bytes one rank sends (= receives) per layer and sequence, split by link."""

    comm: str
    a2a_size: int
    intra_fwd: float = 0.0  # inside a node (NVLink)
    inter_fwd: float = 0.0  # between nodes (InfiniBand)
    intra_bwd: float = 0.0
    inter_bwd: float = 0.0

    @property
    def fwd(self) -> float:
        return self.intra_fwd + self.inter_fwd

    @property
    def bwd(self) -> float:
        return self.intra_bwd + self.inter_bwd

    @property
    def total(self) -> float:
        return self.fwd + self.bwd

    def seconds(self, intra_gbps: float = DEFAULT_INTRA_GBPS, inter_gbps: float = DEFAULT_INTER_GBPS) -> float:
        """Forward + backward transfer time at these link speeds (Gb/s per direction), no overlap."""
        return (self.intra_fwd + self.intra_bwd) * 8 / (intra_gbps * 1e9) + \
            (self.inter_fwd + self.inter_bwd) * 8 / (inter_gbps * 1e9)

    @property
    def name(self) -> str:
        return f"a2a+ring(a2a_size={self.a2a_size})" if self.comm == "a2a+ring" else self.comm


def _ring(seq_len: int, n: int, hkv: int, head_dim: int, elem: int, union: float) -> tuple[float, float]:
    """Forward and backward bytes of the selective ring over ``n`` ranks."""
    if n <= 1:
        return 0.0, 0.0
    remote = union * (seq_len - seq_len / n)
    fwd = remote * 2 * hkv * head_dim * elem
    bwd = fwd + remote * 2 * hkv * head_dim * 4  # re-fetch + fp32 dK/dV back
    return fwd, bwd


def _a2a(tokens_local: float, a: int, hq: int, hkv: int, head_dim: int, elem: int) -> float:
    if a <= 1:
        return 0.0
    return (a - 1) * tokens_local * head_dim * elem * (2 * hq / a + 2 * max(1, hkv // a))


def comm_traffic(comm: str, *, seq_len: int, cp: int, hq: int, hkv: int, head_dim: int, elem_bytes: int,
                 union: float = 1.0, a2a_size: int | None = None, cp_ranks_per_node: int | None = None) -> CommTraffic:
    """Per-layer, per-rank bytes of ``comm`` (see the module docstring).

    Args:
        hq, hkv: query / KV heads per tensor-parallel rank.
        union: fraction of the remote causal past a rank's queries select (1.0 = every block, what
            trained models measured; ``moba-cp analyze selection`` measures it for a checkpoint).
        cp_ranks_per_node: CP ranks sharing a node (default: all of them); traffic between ranks
            of different nodes counts as inter-node.
    """
    per_node = cp if cp_ranks_per_node is None else max(1, min(cp, cp_ranks_per_node))
    crosses = per_node < cp
    a = cp if comm == "a2a" else (a2a_size or 1) if comm == "a2a+ring" else 1
    t = CommTraffic(comm, a)
    a2a = _a2a(seq_len / cp, a, hq, hkv, head_dim, elem_bytes)
    ring_f, ring_b = _ring(seq_len, cp // a, max(1, hkv // a) if a > 1 else hkv, head_dim, elem_bytes,
                           union) if comm != "a2a" else (0.0, 0.0)
    a2a_inter = crosses and a > per_node
    if a2a_inter:
        t.inter_fwd, t.inter_bwd = a2a, a2a
    else:
        t.intra_fwd, t.intra_bwd = a2a, a2a
    if crosses:
        t.inter_fwd += ring_f
        t.inter_bwd += ring_b
    else:
        t.intra_fwd += ring_f
        t.intra_bwd += ring_b
    return t


def candidate_comms(cp: int, hq: int, hkv: int, cp_ranks_per_node: int | None = None) -> list[tuple[str, int | None]]:
    """The valid ``(comm, a2a_size)`` choices: the ring, a2a, and a2a+ring with one node's CP ranks."""
    out = [("ring", None)]
    if cp > 1 and comm_problem("a2a", None, cp, hq, hkv) is None:
        out.append(("a2a", None))
    per_node = cp_ranks_per_node or cp
    for a in sorted({per_node, 2, 4, 8}):
        if 1 < a < cp and comm_problem("a2a+ring", a, cp, hq, hkv) is None and a <= per_node:
            out.append(("a2a+ring", a))
    assert all(c in COMM_TYPES for c, _ in out)
    return out
