"""How many insertion steps the gate's running top-k takes, simulated on the CPU (no GPU, no Triton).

The gate kernel (``moba_cp/ops/moba/triton_gate.py``) folds each tile of ``bn`` centroid scores
into a per-row top-``K`` (``K = topk - 1``); a tile takes ``max over the program's bm rows of
min(#scores above the row's k-th best, K)`` steps, each a pass over the whole ``[bm, bn]`` tile.
So the rows a program holds decide how many steps every row pays for. This script replays that
rule on random scores (what ``bench_moba.py`` feeds the gate without ``--sink``: standard-normal q
and keys, so given q a row's centroid scores are i.i.d.) for rows that all have ``n`` candidate blocks (a program's rows
share one query block whenever ``bm <= block_size``), and prints steps per tile, averaged over a
document's query blocks (block i has i candidates), for several ``bm``.

Usage:
    python benchmarks/gate_steps_offline.py --blocks 4096 --topk 8            # FlashMoBA 512K, block 128
    python benchmarks/gate_steps_offline.py --blocks 128 --topk 12 --bm 64     # 128K, block 1024

Output, per ``bm``: mean steps per tile over the document, and the step passes a row pays for
relative to the first ``bm`` given. Only the insertion loop scales with it: session 24's SASS model
puts a FlashMoBA tile at ~1312 clocks of products + ~1024 of key build and count + ~296 a step.
"""

from __future__ import annotations

import argparse

import torch

from moba_cp.ops.launch_math import cdiv


def tile_steps(s: torch.Tensor, k: int, bn: int) -> tuple[int, int]:
    """Steps and tiles of one program scanning its rows' scores ``s`` (``[rows, n]``, in candidate
    order) in tiles of ``bn`` with a running top-``k``: a tile costs the most steps any row needs,
    ``min(#scores above the row's k-th best before the tile, k)``."""
    rows, n = s.shape
    if n == 0 or k == 0:
        return 0, 0
    top = torch.full((rows, k), float("-inf"))
    steps = 0
    for g in range(0, n, bn):
        tile = s[:, g:g + bn]
        thr = top[:, 0]  # ascending: column 0 is the row's k-th best
        steps += int((tile > thr[:, None]).sum(1).clamp(max=k).max())
        top = torch.cat([top, tile], 1).topk(k, dim=1).values.flip(1)
    return steps, cdiv(n, bn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, required=True, help="key blocks of the document (e.g. 4096 = 512K / 128)")
    ap.add_argument("--topk", type=int, required=True, help="blocks a query attends to, its own included")
    ap.add_argument("--bn", type=int, default=64, help="centroids a tile (GateConfig.bn)")
    ap.add_argument("--bm", type=int, nargs="+", default=[128, 64, 32], help="rows a program (GateConfig.bm)")
    ap.add_argument("--samples", type=int, default=24, help="query blocks sampled over the document")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.blocks < 2 or a.topk < 2 or a.bn < 1 or a.samples < 1 or min(a.bm) < 1:
        raise SystemExit(f"need --blocks >= 2, --topk >= 2, --bn, --bm, --samples >= 1 (got {vars(a)})")
    k = a.topk - 1
    # evenly spaced query blocks i (i candidates each), so the mean is over the document's rows
    blocks = sorted({max(1, round((j + 0.5) * a.blocks / a.samples)) for j in range(a.samples)})
    first = 0.0
    print(f"{a.blocks} blocks, top-{a.topk} (K = {k}), {a.bn}-centroid tiles, {len(blocks)} query blocks sampled")
    for bm in a.bm:
        gen = torch.Generator().manual_seed(a.seed)
        steps = tiles = 0
        for n in blocks:
            st, ti = tile_steps(torch.randn(bm, n, generator=gen), k, a.bn)
            steps, tiles = steps + st, tiles + ti
        per_tile = steps / max(tiles, 1)
        if not first:
            first = per_tile  # > 0: the first tile of a row with candidates costs at least one step
        print(f"bm {bm:4d}: {per_tile:.2f} steps a tile ({per_tile / first:.2f} of bm {a.bm[0]}'s)")


if __name__ == "__main__":
    main()
