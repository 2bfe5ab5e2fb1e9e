"""The gate step simulation (``benchmarks/gate_steps_offline.py``) on scores whose step counts are known."""

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gate_steps_offline import tile_steps  # noqa: E402


def test_falling_scores_fill_the_top_k_in_the_first_tile_only():
    # every later score is below all kept ones: K steps on the first tile, none after
    s = torch.arange(200, 0, -1, dtype=torch.float32).repeat(3, 1)
    assert tile_steps(s, k=7, bn=64) == (7, 4)


def test_rising_scores_cost_k_steps_every_tile():
    s = torch.arange(200, dtype=torch.float32).repeat(2, 1)
    assert tile_steps(s, k=5, bn=64) == (5 * 4, 4)


def test_the_busiest_row_sets_a_tiles_steps():
    # row 0 falls (nothing new after tile 1); row 1 gets exactly two new bests in tile 2
    fall = torch.arange(16, 0, -1, dtype=torch.float32)
    other = torch.tensor([10., 9, 8, 7, -1, -2, -3, -4, 11, 12, -5, -6, -7, -8, -9, -10])
    s = torch.stack([fall, other])
    assert tile_steps(s, k=3, bn=8) == (3 + 2, 2)


def test_fewer_candidates_than_k():
    s = torch.randn(4, 3)
    assert tile_steps(s, k=7, bn=64) == (3, 1)
    assert tile_steps(s[:, :0], k=7, bn=64) == (0, 0)


def test_script_prints_a_line_per_bm():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "benchmarks/gate_steps_offline.py", "--blocks", "64", "--topk", "4",
                          "--bm", "32", "8", "--samples", "4"], cwd=root, capture_output=True, text=True, check=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("bm")]
    assert len(lines) == 2 and "1.00 of bm 32's" in lines[0]
