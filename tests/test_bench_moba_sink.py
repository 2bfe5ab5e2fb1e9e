"""``bench_moba.py --sink``: the inputs' attention sink makes every query of every document
select that document's first block (what an attention sink in a trained model would do, and
random inputs do not), so the backward's block-0 bucket holds every row; without it the selection
stays spread. The table's footer names the inputs."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_moba  # noqa: E402

from moba_cp.ops.moba import naive  # noqa: E402


def _block0_share(monkeypatch, sink):
    monkeypatch.setattr(bench_moba, "SINK", sink)
    b, s, block, topk = 2, 1024, 64, 3
    cu, q, k, v, do = bench_moba.make_inputs(b, s, 4, 2, 64, "cpu", torch.float32, block=block)
    idx = naive.select_blocks(q, k, block_size=block, topk=topk, cu_seqlens=cu)  # document-local ids
    later = torch.cat([idx[i * s + block:(i + 1) * s] for i in range(b)])  # rows past their first block
    return (later == 0).any(-1).float().mean().item()


def test_sink_puts_every_row_in_block_0(monkeypatch):
    assert _block0_share(monkeypatch, 8.0) == 1.0
    # random inputs: block 0 is one of 16 past blocks, picked by a minority of rows (top-3 of 16)
    assert _block0_share(monkeypatch, 0.0) < 0.5


def test_table_footer_names_the_inputs(monkeypatch):
    monkeypatch.setattr(bench_moba, "SINK", 0.0)
    assert bench_moba.inputs_note() == "Inputs: random (the selection spread over the blocks)."
    monkeypatch.setattr(bench_moba, "SINK", 8.0)
    assert "attention sink (8 x a shared unit vector" in bench_moba.inputs_note()
