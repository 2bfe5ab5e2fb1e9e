"""Triton MoBA gate (block selection) against the naive oracle (CPU: Triton interpreter).

Selections are compared tolerating a disagreement only where the two choices score the same
within rounding (:func:`tests.moba_triton_helpers._assert_same_selection`); the gate's loop
variants are compared with each other bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from moba_cp.ops.moba import naive

pytest.importorskip("triton")
tb = pytest.importorskip("moba_cp.ops.moba.triton_backend")
from moba_cp.ops.moba.triton_common import doc_tables  # noqa: E402
from moba_cp.ops.moba.triton_config import GateConfig, choose_config  # noqa: E402
from tests.moba_triton_helpers import DEV, _assert_same_selection, _cu, _inputs  # noqa: E402


# ------------------------------------------------------------------------------- selection
SEL_CASES = [
    # T, Hq, Hkv, D, B, topk, doc lengths (None = one document)
    (150, 4, 2, 32, 16, 3, [40, 0, 110]),
    (97, 2, 1, 16, 16, 100, None),  # topk > n_blocks: every past block
    (130, 3, 3, 16, 32, 1, [1, 129]),  # topk 1: own block only; a 1-token document
    (200, 2, 2, 16, 16, 6, [7, 193]),
]


@pytest.mark.parametrize("case", SEL_CASES, ids=lambda c: f"T{c[0]}-B{c[4]}-k{c[5]}")
def test_select_matches_naive_fp32(case):
    t, hq, hkv, d, b, topk, docs = case
    q, k, _ = _inputs(t, hq, hkv, d, torch.float32, seed=t + topk)
    cu = None if docs is None else _cu(docs)
    idx_n = naive.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    idx_t = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    _assert_same_selection(idx_t, idx_n, q, k, b, cu, rtol=1e-5, max_frac=0.01)


GATE_VARIANTS = {
    "masked-prefilter": GateConfig(bm=16, bn=16, split_edges=False, prefilter=True, loop="while"),  # before session 13
    "split-edges": GateConfig(bm=16, bn=16, split_edges=True, loop="while"),
    "no-prefilter": GateConfig(bm=16, bn=16, prefilter=False, loop="while"),
    "split-edges-no-prefilter": GateConfig(bm=32, bn=16, split_edges=True, prefilter=False, loop="while", slots=16),
    "counted": GateConfig(bm=16, bn=16, loop="counted"),
    "counted-8-slots": GateConfig(bm=32, bn=16, loop="counted", slots=8),
    "keys-8-slots": GateConfig(bm=16, bn=16, loop="keys", slots=8),  # fp32 inputs: runs counted
}


@pytest.mark.parametrize("variant", list(GATE_VARIANTS))
@pytest.mark.parametrize("case", [(600, 2, 1, 16, 16, 5, [37, 563]), (300, 2, 2, 32, 16, 4, None),
                                  (150, 4, 2, 32, 16, 3, [40, 0, 110])], ids=lambda c: f"T{c[0]}-k{c[5]}")
def test_gate_variants_select_as_naive(case, variant):
    """The gate's loop options, at lengths where programs have unmasked middle tiles (rows far
    past the first 16-block tiles of their document) as well as masked edges, and documents
    that begin inside a program's rows."""
    t, hq, hkv, d, b, topk, docs = case
    q, k, _ = _inputs(t, hq, hkv, d, torch.float32, seed=t + topk + 1)
    cu = None if docs is None else _cu(docs)
    cfg = choose_config(b, d, hq // hkv, t).replace(gate=GATE_VARIANTS[variant])
    idx_n = naive.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    idx_t = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu, config=cfg)
    _assert_same_selection(idx_t, idx_n, q, k, b, cu, rtol=1e-5, max_frac=0.01)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEV == "cpu", reason="the Triton 3.6 interpreter's bf16 gate products disagree with the oracle whichever way the "
    "centroids are split (both paths matched it on about half the slots); bf16 runs on the GPU"))])
def test_gate_presplit_selects_bit_for_bit_as_the_in_kernel_split(dtype):
    """``presplit``: the centroids' hi + lo parts made once per call are the parts each program
    made, so the selection is identical (documents, GQA, masked edges and unmasked middles)."""
    docs, b, hq, hkv, d, topk = [37, 563], 16, 4, 2, 16, 5
    q, k, _ = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=11)
    q, k = q.to(dtype), k.to(dtype)
    cu = _cu(docs)
    base = choose_config(b, d, hq // hkv, sum(docs)).replace(gate={"bm": 16, "bn": 16, "presplit": False})
    on = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu, config=base.replace(gate={"presplit": True}))
    off = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu, config=base)
    assert torch.equal(on, off)
    idx_n = naive.select_blocks(q.float(), k.float(), block_size=b, topk=topk, cu_seqlens=cu)
    _assert_same_selection(on, idx_n, q.float(), k.float(), b, cu, rtol=1e-4, max_frac=0.01)


@pytest.mark.parametrize("loop,slots", [("keys", 16), ("keys", 8), ("counted", 8), ("below", 8)])
@pytest.mark.parametrize("case", [(600, 2, 1, 16, 16, 5, [37, 563]), (97, 2, 1, 16, 16, 100, None),
                                  (130, 3, 3, 16, 32, 1, [1, 129])], ids=lambda c: f"T{c[0]}-k{c[5]}")
def test_gate_loops_at_half_precision_select_as_naive(case, loop, slots):
    """The counted and int32-key loops at fp16 (hi + lo products; keys order the scores to
    ~2^-17, so a disagreement must be a near-tie): documents, GQA, top-k 1 and top-k above the
    blocks, unmasked middles and masked edges."""
    t, hq, hkv, d, b, topk, docs = case
    q, k, _ = _inputs(t, hq, hkv, d, torch.float32, seed=t + topk + 2)
    q, k = q.half(), k.half()
    cu = None if docs is None else _cu(docs)
    cfg = choose_config(b, d, hq // hkv, t).replace(gate=GateConfig(bm=16, bn=16, loop=loop, slots=slots))
    idx_n = naive.select_blocks(q.float(), k.float(), block_size=b, topk=topk, cu_seqlens=cu)
    idx_t = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu, config=cfg)
    _assert_same_selection(idx_t, idx_n, q.float(), k.float(), b, cu, rtol=1e-4, max_frac=0.01)


@pytest.mark.parametrize("case", [(600, 2, 1, 16, 16, 5, [37, 563]), (97, 2, 1, 16, 16, 100, None),
                                  (130, 3, 3, 16, 32, 2, [1, 129]), (900, 2, 1, 16, 16, 9, [500, 5, 395])],
                         ids=lambda c: f"T{c[0]}-k{c[5]}")
def test_gate_below_loop_selects_bit_for_bit_as_the_keys_loop(case):
    """``below`` takes each row's keys in the order ``keys`` does (the largest below the last
    one taken, by an unsigned min instead of a max and a rewrite of the tile), so the selection
    is identical: rows with fewer candidates than the tile's step count (top-k above the blocks:
    the sequence runs past the empty key and wraps), several unmasked middle tiles, documents."""
    t, hq, hkv, d, b, topk, docs = case
    q, k, _ = _inputs(t, hq, hkv, d, torch.float32, seed=t + topk + 3)
    q, k = q.half(), k.half()
    cu = None if docs is None else _cu(docs)
    # 64 rows over 16-key blocks: a program's rows differ in their candidates by up to 3 blocks,
    # so the rows with fewer run past their empty key while the busiest row still takes
    cfg = choose_config(b, d, hq // hkv, t).replace(gate=GateConfig(bm=64, bn=16, loop="keys"))
    keys = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu, config=cfg)
    below = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu, config=cfg.replace(gate={"loop": "below"}))
    assert torch.equal(below, keys)
    assert (keys >= 0).sum() > t * hq  # real selections, not two empty results


def test_gate_config_refuses_unknown_loops_bad_slots_and_prefilter_outside_the_while_loop():
    with pytest.raises(ValueError, match=r"GateConfig.loop='heap'; choose one of \('while', 'counted', 'keys', 'below'\)"):
        GateConfig(loop="heap")
    with pytest.raises(ValueError, match=r"GateConfig.slots=12 must be a power of two"):
        GateConfig(slots=12)
    with pytest.raises(ValueError, match=r"prefilter=True belongs to loop='while'.*Fix: gate.prefilter=false"):
        GateConfig(loop="keys", prefilter=True)


def test_gate_scores_only_diagnostic_runs_the_same_programs_and_refuses_unknown_names():
    """``gate_topk(diag="scores")`` (the benchmark's split of the gate's time) runs the kernel
    without its running top-k: it compiles, writes every slot, and leaves the real path as it was."""
    from moba_cp.ops.moba.triton_centroids import block_centroids
    from moba_cp.ops.moba.triton_common import doc_tables
    from moba_cp.ops.moba.triton_gate import gate_topk

    docs, b, hq, hkv, d, topk = [37, 163], 16, 4, 2, 16, 4
    t = sum(docs)
    q, k, _ = _inputs(t, hq, hkv, d, torch.float32, seed=12)
    cu = _cu(docs)
    blocks, qpos, base, info = doc_tables(t, cu, b, DEV)
    cent = block_centroids(k, blocks.kstart, blocks.klen, b)
    gate = choose_config(b, d, hq // hkv, t).gate
    args = dict(block_size=b, topk=topk, width=info.width(topk), cfg=gate)
    real = gate_topk(q, cent, qpos, base, **args)
    assert torch.equal(real, tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu))
    diag = gate_topk(q, cent, qpos, base, diag="scores", **args)
    assert diag.shape == real.shape and diag.dtype == torch.int32
    with pytest.raises(ValueError, match=r"diag='loop' is not one of None, 'scores'"):
        gate_topk(q, cent, qpos, base, diag="loop", **args)
