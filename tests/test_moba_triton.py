"""Triton MoBA attention (forward and backward) against the naive oracle (CPU: Triton interpreter).

Attention is compared on the *same* block indices (selection ties can never make these
flaky), on every kernel path of :data:`tests.moba_triton_helpers.PATH_CONFIGS` at awkward shapes
(GQA, several documents, an empty one, T not a multiple of the block), with tolerances relative
to the naive op's own error against its fp64 run; exact options are compared bit for bit.
Selection is tested in ``test_moba_triton_gate.py``, launch bounds, the CP slot form, the
device tables and errors in ``test_moba_triton_launches.py``, the GPU cases in
``test_moba_triton_gpu.py``.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from moba_cp.ops.moba import naive

triton = pytest.importorskip("triton")
tb = pytest.importorskip("moba_cp.ops.moba.triton_backend")
from moba_cp.ops.moba.triton_attn_bwd import sparse_attn_bwd  # noqa: E402
from moba_cp.ops.moba.triton_attn_fwd import _merge_kernel, merge_rows, sparse_attn_fwd  # noqa: E402
from moba_cp.ops.moba.triton_common import build_gather_index, doc_tables  # noqa: E402
from moba_cp.ops.moba.triton_config import BwdConfig, FwdConfig, KernelConfig, choose_config  # noqa: E402
from tests.moba_triton_helpers import (DEV, PATH_CONFIGS, SMALL, _check, _cu, _inputs, _triton_grads,  # noqa: E402
                                       check_attn_fwd_bwd)


# ------------------------------------------------------------------------------- attention
ATTN_CASES = [
    (150, 4, 2, 32, 16, 3, [40, 0, 110]),  # GQA, empty doc, T not a multiple of B
    (63, 2, 2, 16, 16, 8, None),  # topk > n_blocks: causal full attention
    (120, 4, 1, 16, 32, 2, [5, 17, 98]),  # MQA, short docs
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"T{c[0]}-H{c[1]}/{c[2]}-B{c[4]}-k{c[5]}")
def test_block_attn_fwd_bwd_matches_naive(case):
    check_attn_fwd_bwd(case)


@pytest.mark.parametrize("name", list(PATH_CONFIGS))
def test_kernel_paths_match_naive(name):
    """Each path at an awkward shape: GQA, documents not a multiple of the block (48, which is
    three 16-key sub-tiles), a short document."""
    check_attn_fwd_bwd((130, 4, 2, 16, 48, 3, [20, 110]), config=PATH_CONFIGS[name])


@pytest.mark.parametrize("name", ["partials", "partials-whole-block", "partials-tma-kv", "dq-slots", "one-pass", "query-major", "split-dv-dq-rows-split-group-cut", "two-pass-unfused-split-mask", "gathered-rows-split-kv-chunks",
                                  "gathered-rows-tma-split", "gathered-rows-sub-major-fused-dq-split",
                                  "dq-rows-split-kv-chunks", "dq-rows-through-index-split-kv-chunks"])
def test_kernel_paths_head_dim_64_and_empty_doc(name):
    """Head dim 64, an empty document, and top-k larger than a document's blocks."""
    check_attn_fwd_bwd((150, 2, 1, 64, 32, 3, [40, 0, 110]), config=PATH_CONFIGS[name])


#: The small case of the skip's bitwise test: two documents (150 and 90 tokens, a short last
#: block), GQA 4/2, head dim 16, blocks of 64 keys, top-2.
TWO_DOCS = dict(docs=[150, 90], b=64, hq=4, hkv=2, d=16, topk=2)


def _two_doc_grads(bwd: BwdConfig, seed: int, dtype: torch.dtype = torch.float32):
    """dq, dk, dv (``dtype``) of the partials forward and the backward ``bwd`` on the ``TWO_DOCS`` case."""
    docs, b, hq, hkv, d, topk = (TWO_DOCS[n] for n in ("docs", "b", "hq", "hkv", "d", "topk"))
    t = sum(docs)
    q, k, v = (x.to(dtype) for x in _inputs(t, hq, hkv, d, torch.float32, seed=seed))
    do = torch.randn(t, hq, d, generator=torch.Generator().manual_seed(seed + 1)).to(DEV, dtype)
    cu = _cu(docs)
    idx = naive.select_blocks(q.float(), k.float(), block_size=b, topk=topk, cu_seqlens=cu)
    cfg = KernelConfig(FwdConfig(method="partials", **SMALL), bwd)
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    o, _ = tb.block_attn(qq, kk, vv, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=cfg)
    (o * do).sum().backward()
    return qq.grad, kk.grad, vv.grad


def _assert_same_bits(on, off):
    for name, a, z in zip(("dq", "dk", "dv"), on, off):
        assert torch.equal(a, z), f"{name}: max |diff| {(a - z).abs().max().item()}"


@pytest.mark.parametrize("bwd", [
    dict(bnb=16, bm=16, fuse_dq=True, split_mask=True),
    dict(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True, sub_major=True, dq_chunk_bytes=1,
         split_group=True, max_rows=16),
], ids=["fused-dq", "dq-rows-split-group-cut"])
def test_skipping_unseen_rows_changes_no_bit(bwd):
    """``bwd.skip_unseen``: a key sub-tile's program starts at the first row that sees one of its
    keys instead of at its block's first row. The rows it skips add exact zeros, so dq, dk and dv
    are the same bits with it on or off (fp32). Blocks of 64 keys are four 16-key sub-tiles, so
    the later ones skip up to 48 of the block's own rows; two documents, GQA, a short last block,
    and (second case) blocks cut into 16-row programs whose tiles start inside the skipped rows.
    (Paths with the skip on against the oracle: ``test_kernel_paths_match_naive``, e.g.
    ``dq-rows-split-kv-chunks``.)"""
    _assert_same_bits(_two_doc_grads(BwdConfig(**bwd, skip_unseen=True), seed=31),
                      _two_doc_grads(BwdConfig(**bwd, skip_unseen=False), seed=31))


_ACC_RED_CASES = {
    "dq-rows-split-group-cut": dict(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True, sub_major=True,
                                    dq_chunk_bytes=1, split_group=True, max_rows=64),
    "split-dv-split-group": dict(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True, dq_chunk_bytes=1,
                                 split_group=True, split_dv=True),
    # 8-warp programs (d=128's default): refused in session 37, allowed since (see BwdConfig.acc_red)
    "8-warps-split-group": dict(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True, dq_chunk_bytes=1,
                                split_group=True, num_warps=8),
}


def _acc_red_param(case, dtype, slow=False):
    # each case runs in the default suite at one dtype; the other pairings (20-35 s each in the
    # interpreter) are marked slow to keep the suite near its time budget (`-m slow` runs them)
    return pytest.param(_ACC_RED_CASES[case], dtype, id=f"{case}-{str(dtype).split('.')[-1]}",
                        marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("bwd, dtype", [
    _acc_red_param("dq-rows-split-group-cut", torch.float32),
    _acc_red_param("split-dv-split-group", torch.float16),
    _acc_red_param("8-warps-split-group", torch.float32, slow=True),
    _acc_red_param("dq-rows-split-group-cut", torch.float16, slow=True),
    _acc_red_param("split-dv-split-group", torch.float32, slow=True),
    _acc_red_param("8-warps-split-group", torch.float16, slow=True),
])
def test_reduced_kv_sums_change_no_bit(bwd, dtype):
    """``bwd.acc_red``: a split GQA group's later launches add their dK/dV to the earlier ones'
    fp32 sums by reductions instead of a load, add and store; one writer per element and launch,
    so the same sums in the same order (the interpreter's fp32 adds have no subnormal flush), with
    dk/dv in fp32 (summed in place) and in fp16 (one KV head's fp32 sums, cast at its last launch).
    Two documents, GQA 4/2 split into one query head a launch, blocks of more than 64 rows cut
    (those are summed by their own kernel; the short last blocks are not), dV and dK in launches
    of their own, and 8-warp programs (the interpreter contracts nothing, so bit for bit there too;
    on a GPU at d=128 dK moves by one rounding, see the GPU test)."""
    def grads(acc_red):
        return _two_doc_grads(BwdConfig(**bwd, acc_red=acc_red), seed=37, dtype=dtype)

    on, off = grads(True), grads(False)
    assert on[1].dtype == dtype
    _assert_same_bits(on, off)


@pytest.mark.parametrize("bwd", [
    # zero_ahead is off by default: its two longer cases (30-45 s each in the interpreter) run with -m slow
    pytest.param(dict(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True, sub_major=True, dq_chunk_bytes=1,
                      split_group=True, max_rows=16, acc_red=True), id="split-group-cut-sub-major",
                 marks=pytest.mark.slow),
    pytest.param(dict(bnb=16, bm=16, split_mask=True, gather_rows=True, dq_rows=True, dq_chunk_bytes=1,
                      split_group=True, split_dv=True), id="split-dv-split-group", marks=pytest.mark.slow),
    pytest.param(dict(bnb=16, bm=16, gather_rows=True, dq_rows=True, dq_chunk_bytes=1), id="kv-head-chunks"),
])
def test_dq_rows_zeroed_ahead_change_no_bit(bwd, monkeypatch):
    """``bwd.zero_ahead``: each dK/dV launch zeroes the next launch's fp32 dQ row copy instead of a
    fill pass before it. The copies are allocated NaN-filled here, so an element no program zeroed
    would turn dq into NaN; with every element zeroed the adds are the same, so dq, dk and dv are
    the same bits as with the fill (fp32). Two documents, GQA 4/2 over four launches of one query
    head (the first case also cuts blocks into 16-row programs, whose grid has programs that
    return at once: they zero their share first), dV and dK in launches of their own (the first
    of the pair zeroes), and whole KV heads a launch (two launches, no split group)."""
    from moba_cp.ops.moba import triton_attn_bwd

    allocated = []

    def poisoned(rows, d, dtype, device):
        allocated.append(rows * d)
        return torch.full((rows, d), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_attn_bwd, "unfilled_rows", poisoned)
    on = _two_doc_grads(BwdConfig(**bwd, zero_ahead=True), seed=41)
    assert allocated, "zero_ahead allocated no unfilled copy: the case has one launch"
    assert all(torch.isfinite(g).all() for g in on)
    _assert_same_bits(on, _two_doc_grads(BwdConfig(**bwd), seed=41))


def test_zero_ahead_without_the_dq_row_copy_changes_nothing(monkeypatch):
    """Without ``dq_rows`` (the defaults of a GPU without TMA) there is no dQ row copy to zero:
    ``zero_ahead`` allocates nothing and the gradients are the same bits, so a recipe's
    ``moba.kernel: bwd.zero_ahead=true`` is valid on either kind of GPU."""
    from moba_cp.ops.moba import triton_attn_bwd

    def refuse(rows, d, dtype, device):
        raise AssertionError("zero_ahead allocated a dQ row copy without dq_rows")

    monkeypatch.setattr(triton_attn_bwd, "unfilled_rows", refuse)
    bwd = dict(bnb=16, bm=16, fuse_dq=True, split_mask=True, gather_rows=True, dq_chunk_bytes=1, split_group=True)
    _assert_same_bits(_two_doc_grads(BwdConfig(**bwd, zero_ahead=True), seed=43),
                      _two_doc_grads(BwdConfig(**bwd), seed=43))


@pytest.mark.parametrize("bwd", [
    # an option, off by default: its longest case (~65 s in the interpreter; its GPU test covers the
    # same features at full size) runs with -m slow
    pytest.param(dict(bnb=16, bm=16, split_mask=True, dq_rows=True, sub_major=True, dq_chunk_bytes=1,
                      split_group=True, max_rows=16, acc_red=True, zero_ahead=True),
                 id="split-group-cut-sub-major-zero-ahead", marks=pytest.mark.slow),
    pytest.param(dict(bnb=16, bm=16, dq_rows=True, dq_chunk_bytes=1, split_dv=True), id="kv-head-chunks-split-dv"),
])
def test_dq_rows_read_through_the_index_change_no_bit(bwd, monkeypatch):
    """``bwd.dq_rows`` without ``gather_rows``: the dK/dV loop reads q, dO, lse, delta and the
    position of each row through the index instead of from the bucket-order copy, while its dQ
    still goes into fp32 rows in bucket order (their places written by a pass of their own for
    the per-token sum). The loaded values and every add are the same, so dq, dk and dv are the same
    bits as with the copy (fp32), and no row is copied. Two documents, GQA 4/2; split groups
    over four launches with blocks cut into 16-row programs, the split mask's searches on
    positions read through the index, and the next launch's rows zeroed ahead; then whole KV heads
    a launch with dV and dK in launches of their own."""
    from moba_cp.ops.moba import triton_attn_bwd

    with_copy = _two_doc_grads(BwdConfig(**bwd, gather_rows=True), seed=47)

    def refuse(*args, **kwargs):
        raise AssertionError("the rows were copied although gather_rows is off")

    monkeypatch.setattr(triton_attn_bwd, "_gathered_rows", refuse)
    _assert_same_bits(_two_doc_grads(BwdConfig(**bwd), seed=47), with_copy)


def test_dq_rows_without_the_copy_bound_launches_by_their_dq_rows():
    """The head chunks count what a launch holds: without ``gather_rows`` only the fp32 dQ rows
    (``4 D`` bytes per token, query head and slot), not the q/dO copy's bytes as well."""
    from moba_cp.ops.moba.triton_attn_bwd import _head_chunks

    tq, hkv, g, w, d = 1000, 2, 4, 3, 64
    dq_rows_qh = tq * w * 4 * d  # one query head's dQ rows; with the copy a head holds more than twice that
    # without the copy two query heads fit the bound, with it one (all 2 x 4 heads covered either way)
    assert [hc for *_, hc, _ in _head_chunks(tq, hkv, g, w, d, 2, False, BwdConfig(
        dq_rows=True, split_group=True, dq_chunk_bytes=2 * dq_rows_qh))] == [2, 2, 2, 2]
    assert [hc for *_, hc, _ in _head_chunks(tq, hkv, g, w, d, 2, False, BwdConfig(
        dq_rows=True, gather_rows=True, split_group=True, dq_chunk_bytes=2 * dq_rows_qh))] == [1] * 8


def test_whole_block_forward_skips_the_mask_only_for_tiles_after_a_full_block():
    """The partials forward with each block in one sub-tile (blocks of 16 keys, ``bn`` 16, as
    block 128 at full size) runs a row tile without the causal mask when every row comes after a
    full block. GQA, three documents of 16-unaligned lengths (short last blocks stay masked), 16-row
    tiles that lie inside a block, straddle it or come after it, and top-k 4 of up to 9 blocks."""
    cfg = KernelConfig(FwdConfig(method="partials", bm=16, bn=16, chunk=32, num_warps=4, num_stages=2),
                       BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16))
    check_attn_fwd_bwd((205, 4, 2, 16, 16, 4, [70, 135]), config=cfg)


def test_config_is_immutable_and_round_trips():
    cfg = choose_config(512, 64, 4, 32768)
    with pytest.raises(Exception):
        cfg.fwd.bm = 1  # frozen
    assert KernelConfig.decode(cfg.encode()) == cfg
    new = cfg.replace(fwd={"bm": 32, "chunk": 64})
    assert (new.fwd.bm, new.fwd.chunk, new.fwd.method, new.bwd) == (32, 64, cfg.fwd.method, cfg.bwd)
    assert cfg == choose_config(512, 64, 4, 32768)  # the original is unchanged
    with pytest.raises(ValueError, match="multiple of bm"):
        FwdConfig(bm=64, chunk=96)
    with pytest.raises(ValueError, match="method"):
        FwdConfig(method="three_pass")
    with pytest.raises(ValueError, match=r"BwdConfig.dv_bm=24: a power of two \(>= 16 rows for dv_bm\)"):
        BwdConfig(split_dv=True, dv_bm=24)
    with pytest.raises(ValueError, match=r"split_dv with tma=True .* bm=32 rows; dv_bm=64 .* Fix: dv_bm=0"):
        BwdConfig(split_dv=True, dv_bm=64, bm=32, gather_rows=True, tma=True)
    with pytest.raises(ValueError, match=r"tma=True reads the rows copied .* needs gather_rows=True"):
        BwdConfig(tma=True)
    with pytest.raises(ValueError, match=r"dq_rows=True .* needs fuse_dq True or None \(got fuse_dq=False\)\. Fix"):
        BwdConfig(dq_rows=True, gather_rows=True, fuse_dq=False)
    assert BwdConfig(dq_rows=True).fuses_dq(512, 64)  # the rows read through the index: valid, dQ fused
    with pytest.raises(ValueError, match="tma_dq=True .* needs dq_rows=True"):
        BwdConfig(tma_dq=True, gather_rows=True)


def test_tma_dq_off_the_gpu_is_a_clear_error():
    q, k, v = _inputs(64, 2, 1, 16, torch.float32, seed=1)
    idx = naive.select_blocks(q, k, block_size=16, topk=2)
    cfg = KernelConfig(FwdConfig(method="partials", **SMALL),
                       BwdConfig(bnb=16, bm=16, gather_rows=True, dq_rows=True, tma_dq=True))
    q.requires_grad_()
    o, _ = tb.block_attn(q, k, v, idx, block_size=16, softmax_scale=0.25, config=cfg)
    with pytest.raises(ValueError, match="tma_dq=True .* need a CUDA GPU .* Fix: tma_dq=False"):
        o.sum().backward()


def test_unrolled_merge_sums_the_same_partials_in_the_same_order():
    """``fwd.merge_unroll`` (and other merge tiles) changes how the loads are issued, not the sums:
    o and lse bit for bit the rolled merge's, with W (3 blocks + the own) not a power of two."""
    docs, b, hq, hkv, d = [70, 0, 61], 16, 4, 2, 32
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=21)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    assert idx.shape[-1] not in (1, 2, 4, 8)
    cfg = KernelConfig(FwdConfig(method="partials", **SMALL), BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16))
    rolled = tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=cfg)
    unrolled = tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                             config=cfg.replace(fwd={"merge_unroll": True, "merge_rows": 16, "merge_warps": 2}))
    assert torch.equal(rolled[0], unrolled[0]) and torch.equal(rolled[1], unrolled[1])
    with pytest.raises(ValueError, match="merge_rows=48 must be a power of two"):
        FwdConfig(merge_rows=48)


def test_merge_at_once_ignores_unwritten_slots_and_keeps_the_sums():
    """``fwd.merge_at_once``: the kernel alone on partials whose unwritten slots (LSE -inf) hold
    NaN and inf: o finite and equal to the slot loop's within fp32 rounding (the slots are summed
    as a tree), lse bit for bit; rows with no slot at all give zeros and -inf; then the whole op
    against the oracle, o and gradients, with documents and W not a power of two."""
    gen = torch.Generator().manual_seed(31)
    rows, hc, w, d, br = 37, 3, 5, 32, 8
    po = torch.randn(rows * w, d, generator=gen)
    pl = torch.randn(rows, w, generator=gen)
    dead = torch.rand(rows, w, generator=gen) < 0.3
    dead[:2] = True  # rows with no partial
    pl[dead] = float("-inf")
    po.view(rows, w, d)[dead] = torch.where(torch.rand(int(dead.sum()), d, generator=gen) < 0.5,
                                            float("nan"), float("inf"))
    outs = []
    for at_once in (False, True):
        o = torch.full((rows // hc + 1, hc, d), 7.0)
        lse = torch.full((rows // hc + 1, hc), 7.0)
        _merge_kernel[(triton.cdiv(rows, br),)](po, pl, o, lse, rows, hc, 0, hc, w, o.stride(0), o.stride(1),
                                                 BR=br, WP=8, D=d, UNROLL=True, AT_ONCE=at_once)
        outs.append((o.reshape(-1, d)[:rows], lse.reshape(-1)[:rows]))
    (o_loop, l_loop), (o_once, l_once) = outs
    assert torch.isfinite(o_once).all() and torch.equal(l_once, l_loop)
    assert (o_once - o_loop).abs().max().item() < 1e-5 and o_once[:2].abs().max().item() == 0.0
    assert bool(torch.isinf(l_once[:2]).all())
    # rows a program: at most 16K partial elements (the tile lives in registers)
    at_once = FwdConfig(method="partials", merge_rows=32, merge_at_once=True)
    assert [merge_rows(at_once, w_, d_) for w_, d_ in ((13, 64), (9, 128), (4, 128), (4, 64), (200, 128))] == \
        [16, 8, 32, 32, 1]
    assert merge_rows(replace(at_once, merge_at_once=False), 13, 64) == 32
    # the op end to end
    docs, b, hq, hkv = [70, 0, 61], 16, 4, 2
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=22)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    cfg = KernelConfig(FwdConfig(method="partials", merge_at_once=True, merge_rows=8, **SMALL),
                       BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_t, l_t = tb.block_attn(*leaves, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=cfg)
    o_n, l_n = naive.block_attn(*ref_leaves, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5)
    assert (o_t - o_n).abs().max().item() < 1e-4 and (l_t - l_n).abs().max().item() < 1e-4
    g = torch.randn(o_n.shape, generator=gen)
    (o_t * g).sum().backward()
    (o_n * g).sum().backward()
    for name, a, r in zip("qkv", leaves, ref_leaves):
        assert (a.grad - r.grad).abs().max().item() < 1e-4, name


def test_register_cap_is_checked_and_reaches_only_a_gpu_launch():
    """``fwd.maxnreg``: 32-255 or 0, refused otherwise with the rule; the interpreter (CPU) gets no
    launch option for it (it has no registers), a CUDA launch gets ``maxnreg``; on CPU a capped
    config computes what the uncapped one does."""
    from moba_cp.ops.moba.triton_common import reg_cap

    for bad in (16, 300, -8):
        with pytest.raises(ValueError, match=rf"FwdConfig.maxnreg={bad}: a register cap per thread is 32-255"):
            FwdConfig(maxnreg=bad)
    assert reg_cap(168, torch.device("cuda")) == {"maxnreg": 168}
    assert reg_cap(0, torch.device("cuda")) == {} and reg_cap(168, torch.device("cpu")) == {}
    docs, b, hq, hkv, d = [70, 61], 16, 4, 2, 32
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=23)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    cfg = KernelConfig(FwdConfig(method="partials", **SMALL), BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16))
    free = tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=cfg)
    cap = tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                        config=cfg.replace(fwd={"maxnreg": 168}))
    assert torch.equal(free[0], cap[0]) and torch.equal(free[1], cap[1])


def test_dq_slots_half_precision_and_the_shape_rule():
    """``bwd.dq_slots`` at fp16 (slots rounded to q's dtype, summed in fp32): dq within the fp16
    naive op's error, dk/dv bit for bit the atomics path's (the option changes only dQ); into a
    given fp32 accumulator (the CP form's ``dq_acc``) it adds; a block of several key sub-tiles
    is refused with the values and the fix, by the kernel call and by the recipe check."""
    docs, b, hq, hkv, d = [70, 0, 61], 16, 4, 2, 32
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=14)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    base = KernelConfig(FwdConfig(method="partials", **SMALL), BwdConfig(bnb=16, bm=16, fuse_dq=True))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))

    def grads(dtype, cfg):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        fn = naive.block_attn if cfg is None else functools.partial(tb.block_attn, config=cfg)
        o, _ = fn(*xs, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5)
        (o * do.to(dtype)).sum().backward()
        return [x.grad for x in xs]

    ref = grads(torch.float64, None)
    nai = grads(torch.float16, None)
    atom = grads(torch.float16, base)
    slots = grads(torch.float16, base.replace(bwd={"dq_slots": True}))
    _check("dq fp16, dq slots", slots[0], nai[0], ref[0], floor=1e-3)
    assert torch.equal(slots[1], atom[1]) and torch.equal(slots[2], atom[2])

    blocks, qpos, bases, _ = doc_tables(q.shape[0], cu, b, DEV)
    gi = build_gather_index(idx, bases, blocks.n, hkv, SMALL["chunk"])
    o, lse = sparse_attn_fwd(q, k, v, qpos, blocks, gi, idx.shape[-1], d ** -0.5, b, base.fwd)
    args = (do, q, k, v, o, lse, qpos, blocks, gi, idx.shape[-1], d ** -0.5, b)
    plain = sparse_attn_bwd(*args, base.bwd)[0]
    acc = torch.full_like(q, 0.5)
    added = sparse_attn_bwd(*args, BwdConfig(bnb=16, bm=16, dq_slots=True), dq_acc=acc)[0]
    assert added is acc and torch.allclose(added - 0.5, plain, atol=1e-5)
    with pytest.raises(ValueError, match=r"dq_slots=True needs each block in one key sub-tile.*block_size=16 with "
                                         r"bnb=8 .* 2 sub-tiles\. Fix: bwd.dq_slots=false"):
        sparse_attn_bwd(*args, BwdConfig(bnb=8, bm=16, dq_slots=True))
    with pytest.raises(ValueError, match="dq_slots=True .* replaces dq_rows"):
        BwdConfig(dq_slots=True, dq_rows=True, gather_rows=True)


@pytest.mark.parametrize("bound,programs", [(None, None), (1, None), (None, 1)],
                         ids=["one-launch", "per-kv-head", "one-zeroing-program"])
def test_dq_slots_reads_only_written_slots(monkeypatch, bound, programs):
    """The dq slot buffer is allocated unfilled: the dK/dV kernel stores every selected slot and
    a pass zeroes the unselected ones (the index's tail). Handed a buffer of NaNs, the backward
    still equals the atomics path's (fp32, to rounding) with many unselected slots (early tokens
    of three documents and an empty one, top-4, a slot of -1 put in by hand), in one launch or one
    per KV head, and with the zeroing pass cut to one program, which then strides over a tail of
    several tiles. (The CP slot form, whose other sources are empty blocks, zero-fills instead.)"""
    from moba_cp.ops.moba import triton_attn_bwd

    if programs is not None:
        monkeypatch.setattr(triton_attn_bwd, "ZERO_SLOT_PROGRAMS", programs)

    docs, b, hq, hkv, d = [37, 0, 90, 5], 16, 6, 2, 16
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=21)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=4, cu_seqlens=cu).clone()
    idx[100, 3, 0] = -1  # an unselected slot in the middle of a row
    assert (idx < 0).float().mean() > 0.2  # many unselected slots
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    base = KernelConfig(FwdConfig(method="partials", **SMALL), BwdConfig(bnb=16, bm=16, fuse_dq=True))
    slots = base.replace(bwd={"dq_slots": True, **({"dq_chunk_bytes": bound} if bound else {})})
    nan_fills = []

    def nan_buffer(rows, dd, dtype, device):
        nan_fills.append(rows)
        return torch.full((rows, dd), float("nan"), dtype=dtype, device=device)

    grads = functools.partial(_triton_grads, q, k, v, do, idx, b, cu)

    atom = grads(base)
    monkeypatch.setattr(triton_attn_bwd, "unfilled_rows", nan_buffer)
    got = grads(slots)
    assert len(nan_fills) == (1 if bound is None else hkv)
    for name, a, g in zip(("dq", "dk", "dv"), atom, got):
        assert torch.isfinite(g).all(), name
        assert torch.allclose(a, g, rtol=1e-5, atol=1e-5), name
