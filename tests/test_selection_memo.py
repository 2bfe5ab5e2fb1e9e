"""The MoBA selection kept from a checkpointed forward for its recomputation
(``moba_cp.megatron.selection_memo``): found only for the very inputs it was made from, used by
``MoBACoreAttention`` under selective recomputation, and exact (the same bits as selecting twice).
"""

from __future__ import annotations

import gc

import pytest
import torch

from moba_cp.megatron.selection_memo import SelectionMemo, reuse_enabled
from tests.distributed_harness import run_distributed


# ----------------------------------------------------------------------------- the memo alone

def test_memo_finds_the_same_tensors_through_detached_views():
    memo = SelectionMemo()
    q, k = torch.randn(8, 2, 4), torch.randn(8, 1, 4)
    sel = torch.tensor([1, 2, 3])
    memo.put(memo.key([q, k, None], extra=(16, 3)), sel)
    assert len(memo) == 1
    # what Megatron's recomputation passes: the saved tensors, detached (same storage, same version)
    got = memo.take(memo.key([q.detach(), k.detach(), None], extra=(16, 3)))
    assert got is sel and len(memo) == 0
    assert memo.take(memo.key([q, k, None], extra=(16, 3))) is None  # taken once


def test_memo_never_serves_other_data():
    memo = SelectionMemo()
    q, k = torch.randn(8, 2, 4), torch.randn(8, 1, 4)
    memo.put(memo.key([q, k], extra=(16, 3)), torch.zeros(1))
    assert memo.take(memo.key([q.clone(), k], extra=(16, 3))) is None  # equal values, other storage
    assert memo.take(memo.key([q[1:], k], extra=(16, 3))) is None  # another view of the storage
    assert memo.take(memo.key([q, k], extra=(16, 4))) is None  # other block arguments
    assert memo.take(memo.key([q, k, None], extra=(16, 3))) is None  # another input list
    k.add_(1.0)  # an in-place write bumps the version
    assert memo.take(memo.key([q, k], extra=(16, 3))) is None
    assert len(memo) == 1


def test_memo_drops_and_never_matches_entries_whose_inputs_died():
    memo = SelectionMemo()
    q, k = torch.randn(64, 2, 4), torch.randn(64, 1, 4)
    key = memo.key([q, k])
    memo.put(key, torch.zeros(1))
    del q
    gc.collect()
    assert memo.take(key) is None  # the weak reference expired: even the same key object misses
    q2, k2 = torch.randn(4), torch.randn(4)
    memo.put(memo.key([q2, k2]), torch.ones(1))
    assert len(memo) == 1  # the dead entry went at this put


def test_reuse_switch(monkeypatch):
    monkeypatch.delenv("MOBA_CP_REUSE_SELECTION", raising=False)
    assert reuse_enabled()
    monkeypatch.setenv("MOBA_CP_REUSE_SELECTION", "0")
    assert not reuse_enabled()
    monkeypatch.setenv("MOBA_CP_REUSE_SELECTION", "yes")
    with pytest.raises(ValueError, match="MOBA_CP_REUSE_SELECTION='yes': choose 1 .* or 0"):
        reuse_enabled()


def test_block_attn_takes_a_gather_index_built_before_and_refuses_a_wrong_one():
    pytest.importorskip("triton")
    from moba_cp.ops.moba import api

    torch.manual_seed(0)
    q, k, v = torch.randn(80, 4, 16), torch.randn(80, 2, 16), torch.randn(80, 2, 16)
    kw = dict(block_size=16, backend="triton")
    sel = api.select_blocks(q, k, topk=3, **kw)
    index = api.gather_index(q, k, sel, **kw)
    assert index.dtype == torch.int32 and index.numel() > 0
    o_built, lse_built = api.block_attn(q, k, v, sel, **kw)
    o_given, lse_given = api.block_attn(q, k, v, sel.to(torch.int8), index=index, **kw)
    assert torch.equal(o_built, o_given) and torch.equal(lse_built, lse_given)
    with pytest.raises(ValueError, match=r"block_attn: index is a torch.int32 \(3,\) tensor .* Fix: build it with gather_index"):
        api.block_attn(q, k, v, sel, index=index[:3], **kw)
    assert api.gather_index(q, k, sel, block_size=16, backend="naive") is None
    with pytest.raises(ValueError, match="an index was given, but backend='naive'"):
        api.block_attn(q, k, v, sel, block_size=16, backend="naive", index=index)


# ----------------------------------------------------------------------------- in MoBACoreAttention

def _counting(module):
    """Wrap ``select_blocks`` and ``moba_attn`` in ``core_attention``: counts of each call."""
    counts = {"select": 0, "moba_attn": 0}
    real_select, real_moba = module.select_blocks, module.moba_attn

    def select(*a, **kw):
        counts["select"] += 1
        return real_select(*a, **kw)

    def moba(*a, **kw):
        counts["moba_attn"] += 1
        return real_moba(*a, **kw)

    module.select_blocks, module.moba_attn = select, moba
    return counts, lambda: (setattr(module, "select_blocks", real_select), setattr(module, "moba_attn", real_moba))


def _w_training(rank, world_size, key_conv):
    """A selective-recomputation model's forward+backward with and without the reuse: the same
    loss and gradients bit for bit; with it, one selection per MoBA layer instead of two."""
    import os

    from moba_cp.config import MoBAConfig
    from moba_cp.megatron import core_attention
    from tests.megatron_util import attention_cfg, batch, build, loss_on_this_rank, tiny_model_cfg

    tokens = batch(2, 128)
    out = {}
    for reuse in ("1", "0"):
        os.environ["MOBA_CP_REUSE_SELECTION"] = reuse
        model, _ = build(tiny_model_cfg(seq_length=128, num_layers=3), MoBAConfig(
            block_size=16, topk=3, backend="naive", key_conv=key_conv), attention_cfg("hybrid"), recompute="selective")
        model.train()
        memos = [layer.self_attention.core_attention._selection_memo for layer in model.decoder.layers
                 if isinstance(layer.self_attention.core_attention, core_attention.MoBACoreAttention)]
        counts, restore = _counting(core_attention)
        try:
            loss = loss_on_this_rank(model, tokens)
            kept = [len(m) for m in memos]
            loss.backward()
        finally:
            restore()
        out[reuse] = dict(loss=loss.item(), grads={n: p.grad.clone() for n, p in model.named_parameters()},
                          counts=counts, kept=kept, left=[len(m) for m in memos], n_moba=len(memos))
    os.environ.pop("MOBA_CP_REUSE_SELECTION")
    # evaluation (eval mode, no autograd) keeps nothing
    model.eval()
    with torch.no_grad():
        loss_on_this_rank(model, tokens)
    out["eval_kept"] = [len(m) for m in memos]
    # inference mode in training mode: nothing kept (inference tensors have no version counter)
    model.train()
    with torch.inference_mode():
        loss_on_this_rank(model, tokens)
    out["inference_kept"] = [len(m) for m in memos]
    return out


@pytest.mark.parametrize("key_conv", [0, 3], ids=["plain", "key_conv"])
def test_recomputation_reuses_the_selection_exactly(key_conv):
    pytest.importorskip("megatron.core")
    out, = run_distributed(_w_training, 1, (key_conv,))
    on, off = out["1"], out["0"]
    n = on["n_moba"]
    assert n == 2  # hybrid: two MoBA layers, the last full
    # the checkpointed forward keeps one selection a MoBA layer; the recomputation takes it
    assert on["kept"] == [1] * n and on["left"] == [0] * n
    assert on["counts"] == {"select": n, "moba_attn": 0}
    # without the reuse both passes select (moba_attn), and nothing is kept
    assert off["kept"] == [0] * n and off["left"] == [0] * n
    assert off["counts"] == {"select": 0, "moba_attn": 2 * n}
    assert on["loss"] == off["loss"]
    for name, g in off["grads"].items():
        assert torch.equal(on["grads"][name], g), name
    assert out["eval_kept"] == [0] * n and out["inference_kept"] == [0] * n


def _w_module_thd(rank, world_size, backend, kernel):
    """The module between the two passes, on packed documents: the recomputation (grad on,
    detached inputs) finds the selection and gives the first pass's bits, and the gradients of
    selecting again; other documents, or a write to k, select again."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from moba_cp.config import ParallelConfig
    from moba_cp.megatron import core_attention
    from moba_cp.megatron.transformer_config import transformer_config_from_recipe
    from tests.megatron_util import attention_cfg, build, moba_cfg, tiny_model_cfg

    build(tiny_model_cfg(), moba_cfg(), attention_cfg("moba"))  # parallel state + compat
    cfg = transformer_config_from_recipe(tiny_model_cfg(), ParallelConfig(), recompute="selective")
    moba = core_attention.MoBACoreAttention(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.padding_causal,
                                            attention_type="self", moba_block_size=16, moba_topk=2,
                                            moba_backend=backend, moba_kernel=kernel)
    moba.train()
    torch.manual_seed(0)
    t, hq, hkv, d = 96, 4, 2, 16
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    cu = torch.tensor([0, 40, 41, 96], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=55, max_seqlen_kv=55)
    call = lambda q_, k_, v_, p=psp: moba(q_, k_, v_, None, attn_mask_type=AttnMaskType.padding_causal,  # noqa: E731
                                          packed_seq_params=p)
    counts, restore = _counting(core_attention)
    builds = []
    if backend == "triton":  # count the gather index builds (the reuse keeps this small one)
        from moba_cp.ops.moba import triton_backend as tb

        real_index = tb._index_impl
        tb._index_impl = lambda *a, **kw: builds.append(1) or real_index(*a, **kw)
    res = {}
    try:
        with torch.no_grad():
            first = call(q, k, v)
        res["kept"] = len(moba._selection_memo)
        selection, index = moba._selection_memo._entries[0][1]
        res["dtype"] = str(selection.dtype)
        res["index_kept"] = index is not None
        qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
        again = call(qd, kd, vd)
        go = torch.randn_like(again)
        again.backward(go)
        res["same_bits"] = torch.equal(first, again)
        res["after"] = (len(moba._selection_memo), dict(counts))
        res["index_builds"] = len(builds)
        # the reference: a layer that selects in both passes (no recomputation configured)
        plain = core_attention.MoBACoreAttention(
            config=transformer_config_from_recipe(tiny_model_cfg(), ParallelConfig()), layer_number=1,
            attn_mask_type=AttnMaskType.padding_causal, attention_type="self", moba_block_size=16, moba_topk=2,
            moba_backend=backend, moba_kernel=kernel)
        qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
        ref = plain(qr, kr, vr, None, attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=psp)
        ref.backward(go)
        res["ref_bits"] = torch.equal(ref, again) and all(
            torch.equal(a.grad, b.grad) for a, b in zip((qd, kd, vd), (qr, kr, vr)))
        counts["moba_attn"] -= 1  # the reference's call
        # other documents (another cu_seqlens tensor) or a written k: no match, selected again
        with torch.no_grad():
            call(q, k, v)
        cu2 = cu.clone()
        psp2 = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu2, cu_seqlens_kv=cu2, max_seqlen_q=55,
                               max_seqlen_kv=55)
        call(q.detach().requires_grad_(), k.detach(), v.detach(), psp2)
        k.add_(0.0)
        call(q.detach().requires_grad_(), k.detach(), v.detach())
        res["misses"] = (len(moba._selection_memo), dict(counts))
    finally:
        restore()
        if backend == "triton":
            tb._index_impl = real_index
    return res


@pytest.mark.parametrize("backend,kernel", [("naive", ""), ("triton", ""), ("triton", "bwd.keep_index=false"),
                                            ("triton", "fwd.method=one_pass")],
                         ids=["naive", "triton", "triton-keep_index-off", "triton-one_pass"])
def test_module_reuse_on_packed_documents(backend, kernel):
    pytest.importorskip("megatron.core")
    if backend == "triton":
        pytest.importorskip("triton")
    res, = run_distributed(_w_module_thd, 1, (backend, kernel))
    assert res["kept"] == 1 and res["dtype"] == "torch.int8"  # 6 blocks: one byte an id
    # the Triton backend keeps the (small) gather index too: the recomputation builds none
    assert res["index_kept"] == (backend == "triton")
    if backend == "triton":
        assert res["index_builds"] == 1
    assert res["same_bits"] and res["ref_bits"]
    assert res["after"] == (0, {"select": 1, "moba_attn": 0})
    # one more first pass (select 2), then two recomputations that find nothing (moba_attn x 2)
    assert res["misses"] == (1, {"select": 2, "moba_attn": 2})


def _module_gpu_run():
    """On a GPU: a 32K-token call (the 32K recipe's layer, eager) keeps its selection and the
    recomputation reuses it with the first pass's output and the gradients of selecting again;
    a short call (4 x 2K tokens, which replays CUDA graphs) keeps nothing. In this process: the
    module needs no process group at cp = 1, and on a GPU no CPU compat is switched on."""
    from megatron.core.transformer.enums import AttnMaskType

    from moba_cp.config import ParallelConfig
    from moba_cp.megatron import core_attention
    from moba_cp.megatron.transformer_config import transformer_config_from_recipe
    from tests.megatron_util import max_rel, tiny_model_cfg

    mcfg = tiny_model_cfg(hidden_size=1024, num_attention_heads=16, num_query_groups=4)
    mk = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", moba_block_size=512,
              moba_topk=3, moba_backend="triton")
    layer = core_attention.MoBACoreAttention(
        config=transformer_config_from_recipe(mcfg, ParallelConfig(), recompute="selective"), **mk).cuda().train()
    plain = core_attention.MoBACoreAttention(
        config=transformer_config_from_recipe(mcfg, ParallelConfig()), **mk).cuda().train()
    res = {}
    for s, b in ((32768, 1), (2048, 4)):
        g = torch.Generator(device="cuda").manual_seed(s)
        q, k, v = (torch.randn(s, b, h, 64, device="cuda", generator=g, dtype=torch.bfloat16)
                   for h in (16, 4, 4))
        counts, restore = _counting(core_attention)
        try:
            with torch.no_grad():
                first = layer(q, k, v, None)
            kept = len(layer._selection_memo)
            qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
            again = layer(qd, kd, vd, None)
            go = torch.randn_like(again)
            again.backward(go)
        finally:
            restore()
        qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
        ref = plain(qr, kr, vr, None)
        ref.backward(go)
        res[s] = dict(kept=kept, left=len(layer._selection_memo), counts=counts, o=max_rel(again, first),
                      o_ref=max_rel(again, ref),
                      grads=max(max_rel(a.grad, r.grad) for a, r in zip((qd, kd, vd), (qr, kr, vr))))
    return res


@pytest.mark.gpu
def test_gpu_module_reuses_the_selection_only_where_it_runs_eagerly():
    pytest.importorskip("megatron.core")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    res = _module_gpu_run()
    big, small = res[32768], res[2048]
    assert (big["kept"], big["left"], big["counts"]) == (1, 0, {"select": 1, "moba_attn": 0}), big
    assert (small["kept"], small["left"], small["counts"]) == (0, 0, {"select": 0, "moba_attn": 2}), small
    for r in (big, small):
        # the same kernels on the same selection: equal up to the order of dQ's atomic sums
        assert r["o"] == 0.0 and r["o_ref"] == 0.0, r
        assert r["grads"] < 1e-2, r
