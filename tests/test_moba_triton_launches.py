"""Triton MoBA backend: launch bounds (``max_rows``, head chunks, split GQA groups), the CP slot
form, the device tables and the gather index, errors and compilation (CPU: Triton interpreter).

Gradients are compared with the naive oracle or, for exact options, bit for bit with the
default path.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from moba_cp.ops.moba import naive
from moba_cp.ops.moba import partial as partial_mod

pytest.importorskip("triton")
tb = pytest.importorskip("moba_cp.ops.moba.triton_backend")
from moba_cp.ops.moba.triton_attn_fwd import partial_heads_per_launch  # noqa: E402
from moba_cp.ops.moba.triton_common import build_gather_index, doc_tables  # noqa: E402
from moba_cp.ops.moba.triton_config import BwdConfig, FwdConfig, KernelConfig, choose_config  # noqa: E402
from tests.moba_triton_helpers import (DEV, MAX_ROWS_PATHS, SMALL, _check, _cu, _inputs,  # noqa: E402
                                       _sink_selection, _triton_grads, check_attn_fwd_bwd)


# the launch bounds count the dQ slots or the row copy: the other paths (fp32 dq) run one launch
MAX_ROWS_CASES = [(p, n) for p in MAX_ROWS_PATHS for n in ("one", "per-kv-head", "split-group")
                  if n == "one" or MAX_ROWS_PATHS[p].dq_slots or MAX_ROWS_PATHS[p].gather_rows]


@pytest.mark.parametrize("path,launches", MAX_ROWS_CASES)
def test_max_rows_cuts_a_sink_block(path, launches):
    """``bwd.max_rows``: with every row selecting its document's block 0, that block's dK/dV program
    is cut into programs of at most 24 rows (over the launch's query heads) summed in fp32 scratch;
    fp32 gradients equal the uncut backward's to rounding on each dK/dV path, in one launch, one per
    KV head, or a GQA group split over launches (dK/dV summed across them)."""
    docs, b, hq, hkv, d = [75, 0, 58], 16, 6, 2, 16
    t = sum(docs)
    q, k, v, do, idx, cu = _sink_selection(docs, b, hq, hkv, d, 2, seed=31)
    base_bwd = MAX_ROWS_PATHS[path]
    more = {"one": {}, "per-kv-head": {"dq_chunk_bytes": 1},
            "split-group": {"dq_chunk_bytes": 2 * t * 2 * d * 4, "split_group": True}}[launches]
    if launches == "split-group" and base_bwd.gather_rows:
        more["dq_chunk_bytes"] = 2 * t * 2 * (2 * d * 4 + 12 + 4 * d)  # two query heads' row copy
    base = KernelConfig(FwdConfig(method="partials", **SMALL), replace(base_bwd, **more))
    from moba_cp.ops.moba.triton_attn_bwd import _head_chunks
    plan = _head_chunks(t, hkv, 3, 2, d, 4, True, base.bwd, 4)
    assert [hc for *_, hc, _ in plan] == {"one": [6], "per-kv-head": [3, 3], "split-group": [2, 1, 2, 1]}[launches]

    grads = functools.partial(_triton_grads, q, k, v, do, idx, b, cu)
    ref = grads(base)
    for name, a, g in zip(("dq", "dk", "dv"), ref, grads(base.replace(bwd={"max_rows": 24}))):
        assert torch.allclose(a, g, rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("path", ["dq-kernel", "gathered-sub-major-dq-rows"])
def test_max_rows_sums_a_cut_block_in_row_tiles(path, monkeypatch):
    """The cut blocks' fp32 sums are stored by programs of ``RB`` key rows, not one whole
    sub-tile (``SPLIT_SUM_ELEMS``; here 16 rows against 48-key blocks, so a slot takes three
    programs, and the documents' last blocks (27 and 10 keys) end inside a tile); GQA groups split
    over launches add to the earlier launch's sums. Gradients equal the uncut backward's."""
    from moba_cp.ops.moba import triton_attn_bwd

    monkeypatch.setattr(triton_attn_bwd, "SPLIT_SUM_ELEMS", 16 * 16)
    docs, b, hq, hkv, d = [75, 0, 58], 48, 6, 2, 16
    t = sum(docs)
    q, k, v, do, idx, cu = _sink_selection(docs, b, hq, hkv, d, 2, seed=37)
    more = {"dq_chunk_bytes": 2 * t * 2 * (2 * d * 4 + 12 + 4 * d), "split_group": True} \
        if MAX_ROWS_PATHS[path].gather_rows else {}
    base = KernelConfig(FwdConfig(method="partials", **SMALL), replace(MAX_ROWS_PATHS[path], **more))
    grads = functools.partial(_triton_grads, q, k, v, do, idx, b, cu)
    ref = grads(base)
    for name, a, g in zip(("dq", "dk", "dv"), ref, grads(base.replace(bwd={"max_rows": 24}))):
        assert torch.allclose(a, g, rtol=1e-5, atol=1e-5), name


def test_max_rows_plan_covers_every_row_and_caps_the_scratch():
    """The device-side plan of :class:`_BlockCuts`: each (KV head, block) program's rows ``[0, n)``
    over the launch's query heads are covered by tiles of ``max_rows`` in order, longest blocks
    first, each tile of a cut block owns a scratch slot (its block's first slot + its rank); when
    the cut blocks' tiles would pass the scratch's slots the later blocks keep one program, and the
    gradients are still right."""
    from moba_cp.ops.moba.triton_attn_bwd import _BlockCuts

    docs, b, hq, hkv, d = [75, 0, 58], 16, 6, 2, 16
    t = sum(docs)
    q, k, v, do, idx, cu = _sink_selection(docs, b, hq, hkv, d, 2, seed=41)
    blocks, _, bases, _ = doc_tables(t, cu, b, DEV)
    gi = build_gather_index(idx, bases, blocks.n, hkv, SMALL["chunk"])
    offs = gi.offs.tolist()
    order = gi.kv_order.tolist()
    g_sz = hq // hkv
    for slots_bytes, want_slots in ((1 << 20, None), (2 * 50 * b * d * 4, 50)):
        cfg = BwdConfig(bnb=16, bm=16, max_rows=10, max_rows_bytes=slots_bytes)
        cut = _BlockCuts(cfg, b, d, hkv * blocks.n, t * hq * 2, DEV)
        if want_slots:
            assert cut.slots == want_slots
        n_prog, (tile_pj, tile_c0, tend, slot0, _, _) = cut.plan(gi, 0, hkv, 0, hq, blocks.n, g_sz)
        rows = []  # each program's rows over its KV head's query heads, in the kernel's order
        for pj in range(hkv * blocks.n):
            hk, j = pj % hkv, pj // hkv
            blk = order[hk][j]
            rows.append(sum(offs[(hk * g_sz + i) * blocks.n + blk + 1] - offs[(hk * g_sz + i) * blocks.n + blk]
                            for i in range(g_sz)))
        tiles: dict[int, list[int]] = {}
        for pj, c0 in zip(tile_pj.tolist()[:n_prog], tile_c0.tolist()[:n_prog]):
            if pj >= 0:
                tiles.setdefault(pj, []).append(c0)
        assert sorted(tiles) == list(range(hkv * blocks.n))  # every program at least once
        asked, slot_of, refused = 0, {}, 0
        for pj, n in enumerate(rows):
            want = max(1, -(-n // 10))
            asked += want if want > 1 else 0  # a cut block asks a slot per tile
            granted = want if asked <= cut.slots else 1  # past the scratch: kept whole, and so all later
            assert tiles[pj] == [10 * i for i in range(granted)], (pj, n)
            if granted > 1:
                slot_of[pj] = asked - want
            refused += want > granted
        got_slots = {pj: s for s, pj in enumerate(cut.slot_pj.tolist()) if pj >= 0}
        assert got_slots == slot_of
        assert {pj: slot0[pj].item() for pj in slot_of} == slot_of
        ends = sorted((s, s + len(tiles[pj])) for pj, s in slot_of.items())  # the cut blocks' slots never overlap
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:])) and (not ends or ends[-1][1] <= cut.slots)
        assert len(slot_of) >= 2  # blocks cut (the two documents' sinks at least)
        assert bool(refused) == bool(want_slots)  # the small scratch leaves some long blocks whole
        cfg_full = KernelConfig(FwdConfig(method="partials", **SMALL), BwdConfig(bnb=16, bm=16, dq_slots=True))
        grads = functools.partial(_triton_grads, q, k, v, do, idx, b, cu)
        for name, a, g in zip(("dq", "dk", "dv"), grads(cfg_full), grads(cfg_full.replace(bwd={
                "max_rows": 10, "max_rows_bytes": slots_bytes}))):
            assert torch.allclose(a, g, rtol=1e-5, atol=1e-5), name


def test_backward_decodes_the_index_with_the_forward_config():
    """The saved index is cut in the forward config's chunks; the backward of the same call reads
    it with that config (a chunk other than the default's), and gradients stay right."""
    cfg = KernelConfig(FwdConfig(method="partials", bm=16, bn=16, chunk=48), BwdConfig(fuse_dq=False, dq_bm=16))
    assert cfg.fwd.chunk != choose_config(16, 16).fwd.chunk
    check_attn_fwd_bwd((120, 4, 1, 16, 32, 2, [5, 17, 98]), config=cfg)


def test_moba_attn_end_to_end_api():
    """Public API with backend='triton' equals the naive backend (selection included)."""
    from moba_cp import moba_attn

    q, k, v = _inputs(100, 2, 1, 16, torch.float32, seed=11)
    cu = _cu([60, 40])
    o_t, l_t = moba_attn(q, k, v, block_size=16, topk=2, cu_seqlens=cu, return_lse=True, backend="triton")
    o_n, l_n = moba_attn(q, k, v, block_size=16, topk=2, cu_seqlens=cu, return_lse=True, backend="naive")
    assert (o_t - o_n).abs().max().item() < 1e-4 and (l_t - l_n).abs().max().item() < 1e-4


def test_half_precision_interpreter_or_gpu():
    """fp16 through the same kernels: within the half-precision naive op's own error."""
    t, hq, hkv, d, b = 96, 2, 1, 32, 16
    q, k, v = _inputs(t, hq, hkv, d, torch.float32, seed=5)
    idx = naive.select_blocks(q, k, block_size=b, topk=3)
    ref = naive.block_attn(q.double(), k.double(), v.double(), idx, block_size=b, softmax_scale=d ** -0.5)
    h = [x.half() for x in (q, k, v)]
    nai = naive.block_attn(*h, idx, block_size=b, softmax_scale=d ** -0.5)
    ker = tb.block_attn(*h, idx, block_size=b, softmax_scale=d ** -0.5)
    assert ker[0].dtype == torch.float16
    _check("o fp16", ker[0], nai[0], ref[0], floor=1e-3)
    _check("lse fp16", ker[1], nai[1], ref[1], floor=1e-4)


def test_half_partials_stay_within_the_half_precision_error():
    """``fwd.half_partials``: fp16 partial outputs (merged in fp32): o within the fp16 naive op's
    error, the LSE bit for bit the fp32-partials path's (it never passes through the partials),
    and gradients through the same backward."""
    docs, b, hq, hkv, d = [70, 0, 61], 16, 4, 2, 32
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=12)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=4, cu_seqlens=cu)
    cfg = choose_config(b, d, hq // hkv, sum(docs)).replace(fwd={"method": "partials", "bm": 16, "bn": 16,
                                                                 "chunk": 32, "half_partials": False})
    ref = naive.block_attn(q.double(), k.double(), v.double(), idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5)
    h = [x.half().requires_grad_() for x in (q, k, v)]
    nai = naive.block_attn(*h, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5)
    fp32_parts = tb.block_attn(*h, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=cfg)
    half = tb.block_attn(*h, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                         config=cfg.replace(fwd={"half_partials": True}))
    assert half[0].dtype == torch.float16 and torch.equal(half[1], fp32_parts[1])
    assert not torch.equal(half[0], fp32_parts[0])  # the partials did pass through fp16
    _check("o fp16, half partials", half[0], nai[0], ref[0], floor=1e-3)
    half[0].float().sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in h)


def test_partials_heads_per_launch_change_no_bit():
    """``fwd.partials_q_bound`` and ``partial_bytes`` only decide how many query heads a launch of
    the partials forward holds: one head a launch, two, and all four give o and lse bit for bit
    (documents, GQA, a short last block); the rule itself at the 128K training shape."""
    docs, b, hq, hkv, d = [70, 45], 16, 4, 2, 32
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=21)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    cfg = choose_config(b, d, hq // hkv, sum(docs)).replace(fwd={"method": "partials", "bm": 16, "bn": 16,
                                                                 "chunk": 32})
    per_head = sum(docs) * 4 * d * 4  # tq * w * d fp32 (w = topk + 1)
    outs = []
    for bytes_, heads in ((per_head, 1), (2 * per_head + 1, 2), (1 << 30, 4)):
        c = cfg.replace(fwd={"partial_bytes": bytes_, "partials_q_bound": False})
        assert partial_heads_per_launch(sum(docs), hq, 4, d, 4, q.numel() * 4, c.fwd) == heads
        outs.append(tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=c))
    for o, lse in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(lse, outs[0][1])
    nai = naive.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5)
    assert (outs[0][0] - nai[0]).abs().max().item() < 1e-4
    # 128K, 16 heads, top-12 (w = 13), d = 64, bf16 partials: q's size allows one head, 1 GiB four
    q_bytes = 131072 * 16 * 64 * 2
    assert partial_heads_per_launch(131072, 16, 13, 64, 2, q_bytes, FwdConfig(method="partials")) == 1
    assert partial_heads_per_launch(131072, 16, 13, 64, 2, q_bytes,
                                    FwdConfig(method="partials", partials_q_bound=False)) == 4


# ------------------------------------------------------------------------------- CP slot form
def test_partial_fwd_bwd_matches_naive():
    """Slot buffer with unordered slots, a slot in some queries' future, queries with no slot."""
    b, d, hq, hkv, tq, n_slots, w = 16, 16, 4, 2, 40, 5, 3
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(tq, hq, d, generator=gen).to(DEV)
    kb = torch.randn(n_slots * b, hkv, d, generator=gen).to(DEV)
    vb = torch.randn(n_slots * b, hkv, d, generator=gen).to(DEV)
    slot_pos = torch.tensor([64, 0, 160, 32, 96], dtype=torch.int64, device=DEV)
    q_pos = torch.randint(60, 180, (tq,), generator=gen).to(DEV)
    slot_idx = torch.stack([torch.randperm(n_slots, generator=gen)[:w] for _ in range(tq * hq)]).reshape(tq, hq, w)
    slot_idx[torch.rand(tq, hq, w, generator=gen) < 0.2] = -1
    slot_idx[:3] = -1  # queries with no slot at all
    slot_idx = slot_idx.to(torch.int32).to(DEV)
    kw = dict(block_size=b, softmax_scale=d ** -0.5)
    o_n, l_n = partial_mod.partial_attn_fwd(q, q_pos, kb, vb, slot_pos, slot_idx, backend="naive", **kw)
    o_t, l_t = partial_mod.partial_attn_fwd(q, q_pos, kb, vb, slot_pos, slot_idx, backend="triton", **kw)
    assert torch.equal(torch.isinf(l_t), torch.isinf(l_n)) and bool(torch.isinf(l_t[:3]).all())
    assert o_t[:3].abs().max().item() == 0.0
    fin = torch.isfinite(l_n)
    assert (l_t[fin] - l_n[fin]).abs().max().item() < 1e-4
    assert (o_t - o_n).abs().max().item() < 1e-4
    # Backward with "merged" o/lse from outside: perturb them so they differ from this partial's.
    do = torch.randn(tq, hq, d, generator=gen).to(DEV)
    o_m = o_n + 0.1 * torch.randn(tq, hq, d, generator=gen).to(DEV)
    l_m = torch.where(fin, l_n + 0.3, l_n)
    g_n = partial_mod.partial_attn_bwd(do, q, q_pos, kb, vb, slot_pos, slot_idx, o_m, l_m, backend="naive", **kw)
    g_t = partial_mod.partial_attn_bwd(do, q, q_pos, kb, vb, slot_pos, slot_idx, o_m, l_m, backend="triton", **kw)
    for name, a, r in zip(("dq", "dk_buf", "dv_buf"), g_t, g_n):
        assert a.dtype == torch.float32 and a.shape == r.shape
        err = ((a - r).norm() / r.norm()).item()
        assert err < 1e-5, f"{name}: {err:.2e}"


PARTIAL_BWD = {
    "dq-kernel": BwdConfig(bnb=16, bm=16, fuse_dq=False, dq_bm=16, dq_bn=16),
    # dQ tiles into the gathered rows' copy, then summed per token and added to dq_acc
    "dq-rows": BwdConfig(bnb=16, bm=16, gather_rows=True, dq_rows=True, sub_major=True),
}


@pytest.mark.parametrize("method,bwd", [("two_pass", "dq-kernel"), ("partials", "dq-kernel"), ("one_pass", "dq-kernel"),
                                        ("query_major", "dq-kernel"), ("partials", "dq-rows")])
def test_partial_sources_share_one_slot_namespace(method, bwd):
    """Two sources (slots [0, 3) and [3, 5)) of one selection, one shared index: each source's
    o/lse and dk/dv equal the naive op on that source alone, and dQ summed into one fp32
    buffer equals the sum of the naive dQs, for each forward method (and a backward that
    adds dQ per token from the gathered rows' copy)."""
    b, d, hq, hkv, tq, w = 16, 16, 4, 2, 36, 3
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(tq, hq, d, generator=gen).to(DEV)
    bufs = [(torch.randn(3 * b, hkv, d, generator=gen).to(DEV), torch.randn(3 * b, hkv, d, generator=gen).to(DEV)),
            (torch.randn(2 * b, hkv, d, generator=gen).to(DEV), torch.randn(2 * b, hkv, d, generator=gen).to(DEV))]
    pos = [torch.tensor([0, 96, 32], device=DEV), torch.tensor([64, 128], device=DEV)]
    offs = [0, 3]
    q_pos = torch.randint(40, 150, (tq,), generator=gen).to(DEV)
    sel = torch.stack([torch.randperm(5, generator=gen)[:w] for _ in range(tq * hq)]).reshape(tq, hq, w)
    sel[torch.rand(tq, hq, w, generator=gen) < 0.2] = -1
    sel = sel.to(torch.int32).to(DEV)
    do = torch.randn(tq, hq, d, generator=gen).to(DEV)
    kw = dict(block_size=b, softmax_scale=d ** -0.5)
    index = partial_mod.partial_index(sel, 5, hkv, d, backend="triton")
    index.config = KernelConfig(FwdConfig(method=method, bm=16, bn=16, chunk=32, qchunk=32), PARTIAL_BWD[bwd])
    dq_acc = torch.zeros(tq, hq, d, device=DEV)
    dq_ref = torch.zeros(tq, hq, d, device=DEV)
    for (kb, vb), sp, off in zip(bufs, pos, offs):
        own = torch.where((sel >= off) & (sel < off + sp.numel()), sel - off, -1)  # this source alone
        o_n, l_n = partial_mod.partial_attn_fwd(q, q_pos, kb, vb, sp, own, backend="naive", **kw)
        o_o, l_o = partial_mod.partial_attn_fwd(q, q_pos, kb, vb, sp, sel, backend="naive", slot_offset=off, **kw)
        assert torch.equal(o_o, o_n) and torch.equal(l_o, l_n)  # the naive offset path drops other slots
        o_t, l_t = partial_mod.partial_attn_fwd(q, q_pos, kb, vb, sp, sel, backend="triton", slot_offset=off,
                                                index=index, **kw)
        assert torch.equal(torch.isinf(l_t), torch.isinf(l_n))
        fin = torch.isfinite(l_n)
        assert fin.any() and (~fin).any()  # both kinds of rows occur
        assert (l_t[fin] - l_n[fin]).abs().max().item() < 1e-4
        assert (o_t - o_n).abs().max().item() < 1e-4
        o_m, l_m = o_n + 0.1, torch.where(fin, l_n + 0.2, l_n)  # "merged" values from outside
        dq_n, dk_n, dv_n = partial_mod.partial_attn_bwd(do, q, q_pos, kb, vb, sp, own, o_m, l_m, backend="naive", **kw)
        dq_ref += dq_n
        dq_t, dk_t, dv_t = partial_mod.partial_attn_bwd(do, q, q_pos, kb, vb, sp, sel, o_m, l_m, backend="triton",
                                                        slot_offset=off, index=index, dq_acc=dq_acc, **kw)
        assert dq_t is dq_acc
        for name, a, r in (("dk", dk_t, dk_n), ("dv", dv_t, dv_n)):
            assert a.shape == r.shape and ((a - r).norm() / r.norm()).item() < 1e-5, name
    assert ((dq_acc - dq_ref).norm() / dq_ref.norm()).item() < 1e-5


# ------------------------------------------------------------------------------- device tables, index
def _doc_tables_reference(total, docs, b):
    """The per-document cut of docs/design.md section 1, on the host (the old implementation)."""
    qpos, base, kstart, kpos, klen, g, s = [0] * total, [0] * total, [], [], [], 0, 0
    for n in docs:
        nb = -(-n // b)
        for i in range(n):
            qpos[s + i], base[s + i] = i, g
        for j in range(nb):
            kstart.append(s + j * b), kpos.append(j * b), klen.append(min(b, n - j * b))
        g, s = g + nb, s + n
    return qpos, base, kstart, kpos, klen


@pytest.mark.parametrize("docs,b", [([40, 0, 110], 16), ([1, 129], 32), ([63], 16), ([0, 5, 0, 0, 16, 17, 1], 16), ([64], 16)])
def test_device_doc_tables_match_host_reference(docs, b):
    from moba_cp.ops.moba.triton_common import doc_tables

    total = sum(docs)
    cu = _cu(docs) if len(docs) > 1 else None
    blocks, qpos, base, info = doc_tables(total, cu, b, DEV)
    r_qpos, r_base, r_ks, r_kp, r_kl = _doc_tables_reference(total, docs, b)
    assert qpos.tolist() == r_qpos and base.tolist() == r_base
    n = len(r_ks)
    assert blocks.n >= n and blocks.n == (-(-total // b) if cu is None else total // b + len(docs))
    assert blocks.kstart[:n].tolist() == r_ks and blocks.kpos[:n].tolist() == r_kp and blocks.klen[:n].tolist() == r_kl
    assert blocks.klen[n:].eq(0).all(), "padding blocks must be empty"
    for topk in (1, 2, 3, 8, 100):  # the width contract, with or without the lazy host sync
        assert info.width(topk) == min(topk, max([-(-d // b) for d in docs] + [1]))
    assert doc_tables(total, cu, b, DEV)[1] is qpos, "same cu_seqlens object: tables come from the cache"
    if cu is not None:
        cu2 = cu.clone()
        assert doc_tables(total, cu2, b, DEV)[1] is not qpos
        cu2.add_(0)  # an in-place op bumps the version: the cache must not answer
        assert doc_tables(total, cu2, b, DEV)[0].kstart[:n].tolist() == r_ks


def test_doc_table_cache_is_keyed_by_an_identity_no_other_tensor_gets():
    """id() is reused once a tensor is freed; the table cache's key never is, and its entries
    die with their tensors."""
    from moba_cp.ops.moba import triton_common as tc

    # Allocate until CPython hands a new tensor the id() of a freed one (usually within a few
    # tensors, but not always within a fixed few: a 50-tensor version of this loop once saw none).
    seen, ids, reused = set(), set(), 0
    for _ in range(5000):
        cu = torch.tensor([0, 8, 16], dtype=torch.int32)
        reused += id(cu) in ids
        ids.add(id(cu))
        ident = tc.tensor_identity(cu)
        assert ident not in seen and tc.tensor_identity(cu) == ident
        seen.add(ident)
        del cu  # the next tensor may well get the same id()
        if reused >= 3:
            break
    assert reused >= 3, "CPython reused no id() in 5000 tensors: the case this key guards against did not occur"
    # Entries die with their tensors: none of this loop's identities is still held. (Other tests'
    # live tensors may keep their own entries, so the table's size says nothing here.)
    assert not seen & set(tc._IDENTITIES.values()), "a freed tensor's identity is still in the cache"


def test_gather_index_is_the_inverse_of_the_selection():
    """Every selected (token, head, slot) sits once in its bucket, in token order; tiles cover
    each bucket in chunk steps; surplus tiles are marked -1."""
    from moba_cp.ops.moba.triton_common import build_gather_index, doc_tables

    docs, b, hq, hkv, topk, chunk = [70, 0, 90], 16, 4, 2, 3, 8
    t = sum(docs)
    q, k, _ = _inputs(t, hq, hkv, 16, torch.float32, seed=9)
    cu = _cu(docs)
    sel = naive.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    blocks, _, base, _ = doc_tables(t, cu, b, DEV)
    gi = build_gather_index(sel, base, blocks.n, hkv, chunk)
    w = sel.shape[-1]
    offs, ent = gi.offs.tolist(), gi.ent.tolist()
    seen = set()
    for bkt in range(hq * blocks.n):
        h, g = divmod(bkt, blocks.n)
        rows = ent[offs[bkt]:offs[bkt + 1]]
        assert rows == sorted(rows)
        for e in rows:
            tt, hh, ww = e // (hq * w), (e // w) % hq, e % w
            assert hh == h and sel[tt, hh, ww].item() + base[tt].item() == g
            seen.add(e)
    assert seen == {i for i, s in enumerate(sel.reshape(-1).tolist()) if s >= 0}
    tiles = [(tb_, ts) for tb_, ts in zip(gi.tile_b.tolist(), gi.tile_start.tolist()) if tb_ >= 0]
    want = [(bkt, st) for bkt in range(hq * blocks.n) for st in range(offs[bkt], offs[bkt + 1], chunk)]
    assert tiles == want and gi.tile_b[len(want):].eq(-1).all()
    assert gi.tend[-1].item() == len(want)
    g_sz = hq // hkv
    for hk in range(hkv):  # the backward's order: each KV head's blocks by decreasing entry count
        cnt = [sum(offs[(hk * g_sz + i) * blocks.n + g + 1] - offs[(hk * g_sz + i) * blocks.n + g] for i in range(g_sz))
               for g in range(blocks.n)]
        order = gi.kv_order[hk].tolist()
        assert sorted(order) == list(range(blocks.n)) and [cnt[g] for g in order] == sorted(cnt, reverse=True)


def test_gather_index_sorts_16_bit_keys_where_they_fit_and_builds_the_same_index(monkeypatch):
    """Buckets that fit int16 keys are sorted as int16 (two radix passes on a GPU instead of
    four); the index is the int32 keys' index, tensor for tensor; more buckets keep int32 keys."""
    from moba_cp.ops.moba import triton_common as tc

    docs, b, hq, hkv, topk, chunk = [70, 0, 90], 16, 4, 2, 3, 8
    t = sum(docs)
    q, k, _ = _inputs(t, hq, hkv, 16, torch.float32, seed=9)
    cu = _cu(docs)
    sel = naive.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    blocks, _, base, _ = tc.doc_tables(t, cu, b, DEV)
    key_dtypes, real_sort = [], torch.sort

    def sort(x, *a, **kw):
        key_dtypes.append(x.dtype)
        return real_sort(x, *a, **kw)

    monkeypatch.setattr(torch, "sort", sort)
    narrow = tc.build_gather_index(sel, base, blocks.n, hkv, chunk, narrow_keys=True)
    wide = tc.build_gather_index(sel, base, blocks.n, hkv, chunk, narrow_keys=False)
    assert key_dtypes == [torch.int16, torch.int32]
    for name, x in vars(wide).items():
        y = vars(narrow)[name]
        assert (torch.equal(y, x) if isinstance(x, torch.Tensor) else y == x), name
    # 2^15 - 1 buckets or more (the sentinel is the bucket count): int32 keys
    key_dtypes.clear()
    sel1 = torch.zeros(4, 1, 1, dtype=torch.int32)
    tc.build_gather_index(sel1, None, 2**15 - 1, 1, chunk, narrow_keys=True)
    tc.build_gather_index(sel1, None, 2**15 - 2, 1, chunk, narrow_keys=True)
    assert key_dtypes == [torch.int32, torch.int16]


def test_saved_index_equals_a_fresh_build():
    """The forward's saved gather index (used by the backward) is the index of the selection."""
    from moba_cp.ops.moba.triton_common import build_gather_index, doc_tables

    docs, b, hq, hkv = [50, 77], 16, 4, 2
    q, k, v = _inputs(sum(docs), hq, hkv, 16, torch.float32, seed=4)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    cfg = choose_config(b, 16, hq // hkv, sum(docs))
    _, _, flat = tb._attn_fwd_op(q, k, v, idx, cu, b, 0.25, cfg.encode())
    blocks, _, base, _ = doc_tables(q.shape[0], cu, b, DEV)
    fresh = torch.cat([x.reshape(-1) for x in vars(build_gather_index(idx, base, blocks.n, hkv, cfg.fwd.chunk)).values()
                       if isinstance(x, torch.Tensor)])
    assert torch.equal(flat, fresh)


@pytest.mark.parametrize("dq_path", ["fused", "dq-kernel", "dq-rows"])
def test_backward_in_kv_head_chunks(dq_path):
    """A half-precision dq with a tiny scratch limit runs one KV head per chunk: same dq, dk,
    dv as one chunk (to fp16 rounding: the fp32 atomics' order may differ), and within the naive
    op's error. ``dq-rows`` writes the half dq straight from its per-token sum."""
    t, hq, hkv, d, b = 90, 6, 3, 16, 16
    q, k, v = _inputs(t, hq, hkv, d, torch.float32, seed=8)
    idx = naive.select_blocks(q, k, block_size=b, topk=3)
    do = torch.randn(t, hq, d, generator=torch.Generator().manual_seed(1)).to(DEV)
    bwd = {"fused": {"fuse_dq": True}, "dq-kernel": {"fuse_dq": False},
           "dq-rows": {"fuse_dq": None, "gather_rows": True, "dq_rows": True}}[dq_path]
    cfg = choose_config(b, d, hq // hkv, t).replace(bwd={**bwd, "dq_bn": 16, "dq_bm": 16})

    def grads(fn, dtype, **kw):
        qq, kk, vv = (x.to(dtype).detach().requires_grad_() for x in (q, k, v))
        o, _ = fn(qq, kk, vv, idx, block_size=b, softmax_scale=d ** -0.5, **kw)
        (o * do.to(dtype)).sum().backward()
        return qq.grad, kk.grad, vv.grad

    one = grads(tb.block_attn, torch.float16, config=cfg)
    chunked = grads(tb.block_attn, torch.float16, config=cfg.replace(bwd={"dq_chunk_bytes": 1, "split_group": False}))
    # split_group: one query head per launch, dK/dV summed over the group's launches in fp32
    per_head = grads(tb.block_attn, torch.float16, config=cfg.replace(bwd={"dq_chunk_bytes": 1, "split_group": True}))
    for a, c, p in zip(one, chunked, per_head):
        assert a.dtype == torch.float16 and (a.float() - c.float()).abs().max().item() <= 1e-3 * a.float().abs().max().item()
        assert p.dtype == torch.float16 and (a.float() - p.float()).abs().max().item() <= 1e-3 * a.float().abs().max().item()
    ref, nai = grads(naive.block_attn, torch.float64), grads(naive.block_attn, torch.float16)
    for name, a, n, r in zip(("dq", "dk", "dv"), chunked, nai, ref):
        _check(name, a, n, r, floor=2e-3)
    for name, a, n, r in zip(("dq", "dk", "dv"), per_head, nai, ref):
        _check(name, a, n, r, floor=2e-3)


def test_split_group_keeps_fp32_dk_dv_sums_for_one_kv_head_only():
    """A split GQA group sums its launches' dK/dV in fp32: the backward allocates those sums for
    one KV head (``[Tk, 1, D]``, cast into dk/dv after the head's last launch), never for all KV
    heads at once (at 128K, 16/4 heads, d=64: 67 instead of 268 MiB of transient). Recorded from
    the allocations the backward makes; the gradients are checked by the tests above."""
    from torch.utils._python_dispatch import TorchDispatchMode

    t, hq, hkv, d, b = 90, 6, 3, 16, 16
    q, k, v = (x.to(torch.float16).requires_grad_() for x in _inputs(t, hq, hkv, d, torch.float32, seed=8))
    idx = naive.select_blocks(q.float(), k.float(), block_size=b, topk=3)
    cfg = choose_config(b, d, hq // hkv, t).replace(bwd={"gather_rows": True, "dq_rows": True, "fuse_dq": None,
                                                         "dq_chunk_bytes": 1, "split_group": True})
    o, _ = tb.block_attn(q, k, v, idx, block_size=b, softmax_scale=d ** -0.5, config=cfg)

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.empty.memory_format, torch.ops.aten.zeros.default) and \
                    isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                self.shapes.append(tuple(out.shape))
            return out

    with Allocations() as rec:
        o.float().sum().backward()
    assert (t, 1, d) in rec.shapes, rec.shapes  # the one head's sums
    assert (t, hkv, d) not in rec.shapes, rec.shapes
    assert q.grad is not None and k.grad.dtype == torch.float16 and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("dq_path", ["dq-kernel", "dq-rows"])
def test_split_group_with_uneven_head_chunks_and_documents(dq_path):
    """GQA group of 3 split 2 + 1 (``split_group``, a limit of two query heads' scratch), with
    documents and the unmasked split loop: fp32 gradients equal the unsplit backward's to fp32
    rounding (the dK/dV sums only regroup), and the naive op's to its error."""
    from moba_cp.ops.moba.triton_attn_bwd import _head_chunks

    docs, hq, hkv, d, b = [70, 0, 61], 6, 2, 16, 16
    t = sum(docs)
    q, k, v = _inputs(t, hq, hkv, d, torch.float32, seed=9)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    do = torch.randn(t, hq, d, generator=torch.Generator().manual_seed(3)).to(DEV)
    bwd = {"dq-kernel": {"fuse_dq": False, "gather_rows": True},
           "dq-rows": {"fuse_dq": None, "gather_rows": True, "dq_rows": True}}[dq_path]
    cfg = choose_config(b, d, hq // hkv, t).replace(bwd={**bwd, "dq_bn": 16, "dq_bm": 16, "split_mask": True})
    w = idx.shape[-1]
    # fp32 dq is written in place (no scratch): the bound is on the rows copied in bucket order
    per_qh = t * w * (2 * d * 4 + 12 + (4 * d if cfg.bwd.dq_rows else 0))
    split = cfg.replace(bwd={"split_group": True, "dq_chunk_bytes": 2 * per_qh})
    assert _head_chunks(t, hkv, 3, w, d, 4, True, split.bwd) == [
        (0, 1, 0, 2, False), (0, 1, 2, 1, True), (1, 1, 3, 2, False), (1, 1, 5, 1, True)]

    def grads(fn, dtype, **kw):
        qq, kk, vv = (x.to(dtype).detach().requires_grad_() for x in (q, k, v))
        o, _ = fn(qq, kk, vv, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, **kw)
        (o * do.to(dtype)).sum().backward()
        return qq.grad, kk.grad, vv.grad

    whole, parts = grads(tb.block_attn, torch.float32, config=cfg), grads(tb.block_attn, torch.float32, config=split)
    for name, a, p in zip(("dq", "dk", "dv"), whole, parts):
        assert torch.allclose(a, p, rtol=1e-5, atol=1e-5), name
    ref, nai = grads(naive.block_attn, torch.float64), grads(naive.block_attn, torch.float32)
    for name, a, n, r in zip(("dq", "dk", "dv"), parts, nai, ref):
        _check(name, a, n, r, floor=1e-5)


def test_head_chunks_plan_matches_the_scratch_bound():
    from moba_cp.ops.moba.triton_attn_bwd import _head_chunks

    base = BwdConfig(bnb=64, gather_rows=True, dq_rows=True)
    # 128K tokens, 16/4 heads, W=13, d=64, bf16: 3.6 GB of rows per KV head over a 2 GiB bound
    row = 2 * 64 * 2 + 12 + 4 * 64
    assert _head_chunks(131072, 4, 4, 13, 64, 2, False, base) == [(h, 1, 4 * h, 4, False) for h in range(4)]
    plan = _head_chunks(131072, 4, 4, 13, 64, 2, False, BwdConfig(**{**vars(base), "split_group": True}))
    assert plan == [(h, 1, 4 * h + i, 2, i > 0) for h in range(4) for i in (0, 2)]
    assert all(131072 * 13 * row * hc <= 2 << 30 for *_, hc, _ in plan)
    # small calls stay one launch, split_group or not
    small = BwdConfig(**{**vars(base), "split_group": True})
    assert _head_chunks(8192, 6, 1, 3, 64, 2, True, small) == [(0, 6, 0, 6, False)]
    # dq_slots (FlashMoBA 128K: 2 x 128K tokens, 16 heads, W=9, d=128, bf16 slots: 604 MB per
    # head): whole heads up to the bound, never a ceil-divided count that passes it (16 heads
    # over 5 launches would be 4 heads, 2.4 GB, each)
    slots = BwdConfig(bnb=128, dq_slots=True)
    per_head = 262144 * 9 * 128 * 2
    plan = _head_chunks(262144, 16, 1, 9, 128, 2, False, slots, 2)
    assert plan == [(h, min(3, 16 - h), h, min(3, 16 - h), False) for h in range(0, 16, 3)]
    assert all(per_head * nkv <= slots.dq_chunk_bytes for _, nkv, *_ in plan)
    # launches made even at the same count: a bound of 3 KV heads' rows over 4 KV heads runs 2 + 2
    # (32K, 16/4 heads, W=3: 206 MB a KV head), and a split group of 4 under 3 query heads' bound 2 + 2
    per_kv = 32768 * 3 * row * 4
    assert _head_chunks(32768, 4, 4, 3, 64, 2, False, BwdConfig(**{**vars(base), "dq_chunk_bytes": 3 * per_kv})) == [
        (0, 2, 0, 8, False), (2, 2, 8, 8, False)]
    split3 = BwdConfig(**{**vars(base), "split_group": True, "dq_chunk_bytes": 3 * per_kv // 4})
    assert _head_chunks(32768, 4, 4, 3, 64, 2, False, split3) == [(h, 1, 4 * h + i, 2, i > 0) for h in range(4)
                                                                   for i in (0, 2)]
    # a single KV head over the bound still runs (one head per launch)
    assert _head_chunks(262144, 2, 1, 9, 128, 2, False, BwdConfig(bnb=128, dq_slots=True, dq_chunk_bytes=1 << 20), 2) == [
        (0, 1, 0, 1, False), (1, 1, 1, 1, False)]


# ------------------------------------------------------------------------------- errors, compile
def test_clear_errors_for_unsupported_inputs():
    q, k, v = _inputs(64, 2, 1, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"block_size=24 is not a multiple of 16"):
        tb.moba_attn(q, k, v, block_size=24, topk=2, softmax_scale=0.25)
    q48, k48, v48 = _inputs(64, 2, 1, 48, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"head dim D=48 is not supported"):
        tb.moba_attn(q48, k48, v48, block_size=16, topk=2, softmax_scale=0.2)
    with pytest.raises(TypeError, match=r"float64 is not supported"):
        tb.select_blocks(q.double(), k.double(), block_size=16, topk=2)


def test_backward_keeps_no_copy_of_the_selection_when_the_index_is_saved():
    """The backward decodes the forward's saved gather index, so the [T, Hq, W] selection is
    saved as a zero-stride stand-in (memory when core attention is not recomputed); the
    gradients are the oracle test's above."""
    t, hq, hkv, d, b, topk = 150, 4, 2, 32, 16, 3
    q, k, v = (x.requires_grad_() for x in _inputs(t, hq, hkv, d, torch.float32, seed=5))
    idx = naive.select_blocks(q, k, block_size=b, topk=topk)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        o, _ = tb.block_attn(q, k, v, idx, block_size=b, softmax_scale=d ** -0.5)
    stand_in = [x for x in saved if x.shape == idx.shape]
    assert len(stand_in) == 1 and stand_in[0].stride() == (0, 0, 0), [(x.shape, x.stride()) for x in saved]
    assert not any(x.data_ptr() == idx.data_ptr() for x in saved)
    o.sum().backward()  # and the backward runs from what was saved
    assert torch.isfinite(q.grad).all() and k.grad.abs().sum() > 0


@pytest.mark.parametrize("path", ["eager", "custom-op"])
def test_keep_index_off_saves_the_compact_selection_and_rebuilds_the_index(path):
    """``bwd.keep_index=False``: the backward keeps the selection in int8 (the call has at most
    ceil(T / B) <= 128 blocks) and no gather index, builds the index again, and gets the same
    gradients as the saved index (bitwise where atomics run in order: the CPU interpreter)."""
    docs, b, hq, hkv, d = [50, 0, 77], 16, 4, 2, 16
    q, k, v = _inputs(sum(docs), hq, hkv, d, torch.float32, seed=6)
    cu = _cu(docs)
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    do = torch.randn(sum(docs), hq, d, generator=torch.Generator().manual_seed(2)).to(DEV)
    cfg = choose_config(b, d, hq // hkv, sum(docs))

    def run(config):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        saved = []

        def pack(x):
            saved.append(x)
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            if path == "eager":
                o, _ = tb.block_attn(qq, kk, vv, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=config)
            else:
                o, _, _ = tb._attn_fwd_op(qq, kk, vv, idx, cu, b, d ** -0.5, config.encode())
        (o * do).sum().backward()
        return saved, o, (qq.grad, kk.grad, vv.grad)

    saved_keep, o_keep, g_keep = run(cfg)
    saved_drop, o_drop, g_drop = run(cfg.replace(bwd={"keep_index": False}))
    kept = [x for x in saved_drop if x.shape == idx.shape]
    assert len(kept) == 1 and kept[0].dtype == torch.int8 and torch.equal(kept[0].long(), idx.long())
    int32 = lambda xs: sum(x.numel() * 4 for x in xs if x.dtype == torch.int32 and x.stride() != (0,) * x.dim())  # noqa: E731
    assert int32(saved_keep) > idx.numel() * 4 and int32(saved_drop) <= 4 * (len(docs) + 1), (int32(saved_keep), int32(saved_drop))
    assert torch.equal(o_keep, o_drop)
    exact = DEV == "cpu"
    for name, a, c in zip(("dq", "dk", "dv"), g_keep, g_drop):
        assert torch.equal(a, c) if exact else torch.allclose(a, c, rtol=1e-5, atol=1e-6), name


def test_compact_selection_picks_the_smallest_type_from_a_static_bound():
    sel = lambda t: torch.full((t, 1, 1), -1, dtype=torch.int32)  # noqa: E731
    assert tb.compact_selection(sel(128 * 16), 16).dtype == torch.int8
    assert tb.compact_selection(sel(128 * 16 + 1), 16).dtype == torch.int16  # 129 blocks: id 128 needs int16
    assert tb.compact_selection(sel(32768 * 2), 2).dtype == torch.int16
    assert tb.compact_selection(sel(32768 * 2 + 1), 2).dtype == torch.int32
    ids = torch.tensor([[[127, -1]]], dtype=torch.int32)
    assert torch.equal(tb.compact_selection(ids.expand(128, 1, 2), 1).long(), ids.expand(128, 1, 2).long())


def test_custom_op_traces_under_torch_compile():
    """block_attn is a custom op with fake impl + autograd: a fullgraph compile traces it."""
    q, k, v = _inputs(48, 2, 1, 16, torch.float32, seed=2)
    idx = naive.select_blocks(q, k, block_size=16, topk=2)

    def f(q, k, v):
        o, lse = tb.block_attn(q, k, v, idx, block_size=16, softmax_scale=0.25)
        return (o * o).sum() + lse.sum()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    qe = [x.clone().requires_grad_() for x in (q, k, v)]
    cf(*qs).backward()
    f(*qe).backward()
    for a, b in zip(qs, qe):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    # the lse gradient (dLSE) flows too: compare with the naive op
    qn = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = naive.block_attn(*qn, idx, block_size=16, softmax_scale=0.25)
    ((o * o).sum() + lse.sum()).backward()
    for a, b in zip(qe, qn):
        assert torch.allclose(a.grad, b.grad, atol=1e-4)
