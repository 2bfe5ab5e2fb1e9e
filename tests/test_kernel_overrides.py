"""``moba.kernel``: Triton tiling overrides from a recipe or the API, checked before work starts
and applied on top of each shape's default tiling."""

from __future__ import annotations

import os

import pytest
import torch

from moba_cp.config import AttentionConfig, MoBAConfig, RecipeError, load_recipe
from moba_cp.ops.moba import api
from moba_cp.ops.moba.triton_config import apply_overrides, choose_config, parse_overrides


def test_parse_overrides_reads_part_field_value_items():
    assert parse_overrides("bwd.dq_rows=true, bwd.sub_major=True,gate.bn=32, fwd.method=partials, bwd.fuse_dq=none") == (
        ("bwd", (("dq_rows", True), ("fuse_dq", None), ("sub_major", True))),
        ("fwd", (("method", "partials"),)),
        ("gate", (("bn", 32),)),
    )
    assert parse_overrides("") == () and parse_overrides(" , ") == ()
    base = choose_config(1024, 64, 4, 131072)
    new = apply_overrides(base, "bwd.dq_rows=true,bwd.sub_major=true")
    assert new.bwd.dq_rows and new.bwd.sub_major and new.fwd == base.fwd and new.gate == base.gate
    assert new.bwd.bnb == base.bwd.bnb and new.bwd.gather_rows  # the rest of the shape's default stays
    assert apply_overrides(base, "") is base


@pytest.mark.parametrize("text,match", [
    ("bwd.dq_rows", r"write part\.field=value"),
    ("dq_rows=true", r"write part\.field=value"),
    ("bw.bm=32", r"no part 'bw'; choose one of fwd, bwd, gate"),
    ("bwd.rows=true", r"bwd has no field 'rows'; its fields: bnb, bm, "),
    ("bwd.bm=true", r"bwd\.bm takes int, got True"),
    ("bwd.dq_rows=1", r"bwd\.dq_rows takes bool, got 1"),
    ("gate.bn=[1]", r"gate\.bn takes int"),
    ("bwd.bm=abc", r"'abc' is not a literal"),
])
def test_malformed_overrides_name_the_item_and_the_rule(text, match):
    with pytest.raises(ValueError, match=match):
        parse_overrides(text)


def test_an_override_the_shape_cannot_take_names_the_rule():
    # d=128 at block 128: the default does not copy rows in bucket order, which TMA row tiles read
    with pytest.raises(ValueError, match=r"kernel overrides 'bwd.tma=true' on the shape's default tiling: "
                                         r".*needs gather_rows=True"):
        apply_overrides(choose_config(128, 128, 4, 32768), "bwd.tma=true")
    # the default stores dQ in per-block slots (dq_slots), which dq_rows replaces: named, with the fix
    with pytest.raises(ValueError, match=r"kernel overrides 'bwd.gather_rows=true,bwd.dq_rows=true' on the shape's "
                                         r"default tiling: BwdConfig.dq_slots=True .* replaces dq_rows .* Fix: "
                                         r"bwd.dq_rows=false, or bwd.dq_slots=false"):
        apply_overrides(choose_config(128, 128, 4, 32768), "bwd.gather_rows=true,bwd.dq_rows=true")
    cfg = apply_overrides(choose_config(128, 128, 4, 32768), "bwd.gather_rows=true,bwd.dq_rows=true,bwd.dq_slots=false")
    assert cfg.bwd.dq_rows and not cfg.bwd.dq_slots
    # dQ rows in bucket order with the rows read through the index (no copy) are a valid tiling too
    cfg = apply_overrides(choose_config(128, 128, 4, 32768), "bwd.dq_rows=true,bwd.dq_slots=false")
    assert cfg.bwd.dq_rows and not cfg.bwd.gather_rows


def test_max_rows_default_and_override():
    # cut from 32K tokens (8192 rows, 16384 from 128K), uncut below or where a block holds at most
    # 32K rows (group x tokens); an override sets or clears it
    assert choose_config(128, 64, 4, 16384).bwd.max_rows == 0
    assert choose_config(512, 64, 1, 32768).bwd.max_rows == 0
    assert choose_config(512, 64, 2, 32768).bwd.max_rows == 8192
    assert choose_config(512, 64, 4, 32768).bwd.max_rows == 8192
    assert choose_config(128, 128, 4, 262144).bwd.max_rows == 16384
    assert choose_config(1024, 64, 4, 131072).bwd.max_rows == 16384
    assert apply_overrides(choose_config(128, 64, 4, 8192), "bwd.max_rows=4096").bwd.max_rows == 4096
    assert apply_overrides(choose_config(128, 64, 4, 131072), "bwd.max_rows=0").bwd.max_rows == 0
    with pytest.raises(ValueError, match=r"kernel overrides 'bwd.max_rows=-1' on the shape's default tiling: "
                                         r"BwdConfig.max_rows=-1 and max_rows_bytes=33554432 must be >= 0"):
        apply_overrides(choose_config(128, 64, 4, 131072), "bwd.max_rows=-1")


def test_the_op_refuses_overrides_it_cannot_use():
    q, k, v = torch.randn(64, 2, 16), torch.randn(64, 1, 16), torch.randn(64, 1, 16)
    with pytest.raises(ValueError, match=r"kernel='bwd.sub_major=true' sets the Triton kernels' tiling, but "
                                         r"backend='naive' runs the naive oracle on cpu"):
        api.moba_attn(q, k, v, block_size=16, topk=2, backend="naive", kernel="bwd.sub_major=true")
    with pytest.raises(ValueError, match="no part 'bw'"):
        api.moba_attn(q, k, v, block_size=16, topk=2, backend="naive", kernel="bw.bm=1")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton backend needs a GPU or TRITON_INTERPRET=1")
def test_the_op_applies_overrides_on_the_shape_default(monkeypatch):
    """The Triton backend gets the shape's default with the overrides applied, and computes the
    same attention (the grid order changes nothing but the schedule)."""
    from moba_cp.ops.moba import triton_backend

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(96, h, 16, generator=g).to(dev) for h in (4, 2, 2))
    seen = []
    real = triton_backend.moba_attn

    def spy(*a, config=None, **kw):
        seen.append(config)
        return real(*a, config=config, **kw)

    monkeypatch.setattr(triton_backend, "moba_attn", spy)
    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    qd = [x.clone().requires_grad_() for x in (q, k, v)]
    o_s = api.moba_attn(*qs, block_size=16, topk=3, backend="triton", kernel="bwd.sub_major=true,bwd.bnb=16")
    o_d = api.moba_attn(*qd, block_size=16, topk=3, backend="triton")
    base = choose_config(16, 16, 2, 96)
    assert seen == [base.replace(bwd={"sub_major": True, "bnb": 16}), None]
    torch.testing.assert_close(o_s, o_d)
    go = torch.randn_like(o_s)
    for a, b in zip(torch.autograd.grad(o_s, qs, go), torch.autograd.grad(o_d, qd, go)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _recipe(*overrides):
    return load_recipe("recipes/quickstart.yaml", ["--parallel.cp=1", *overrides])


def test_recipe_checks_moba_kernel_before_work_starts():
    assert _recipe("--moba.kernel=bwd.sub_major=true", "--moba.backend=triton").moba.kernel == "bwd.sub_major=true"
    cp2 = load_recipe("recipes/quickstart.yaml", ["--parallel.cp=2", "--moba.backend=triton", "--moba.kernel=bwd.bnb=16"])
    assert cp2.moba.kernel == "bwd.bnb=16"  # context parallelism takes overrides too
    cases = {
        ("--moba.kernel=bwd.rows=true", "--moba.backend=triton"): "moba.kernel: kernel override 'bwd.rows=true': bwd "
                                                                 "has no field 'rows'",
        ("--moba.kernel=bwd.sub_major=true", "--moba.backend=naive"): "moba.backend=naive runs the naive oracle, "
                                                                      "which has none. Fix: moba.kernel=''",
        ("--moba.kernel=bwd.sub_major=true", "--attention.pattern=full"): "the attention pattern has no MoBA layers",
    }
    for overrides, msg in cases.items():
        with pytest.raises(RecipeError, match="moba.kernel") as e:
            load_recipe("recipes/quickstart.yaml", ["--parallel.cp=1", *overrides])
        assert msg in str(e.value), (overrides, str(e.value))
    # auto resolves to the naive oracle on CPU: refused there, accepted for a CUDA run
    from moba_cp.config import validate

    cfg = load_recipe("recipes/1gpu-32k.yaml", ["--moba.kernel=bwd.dq_rows=true,bwd.sub_major=true"])
    validate(cfg, device="cuda")
    with pytest.raises(RecipeError, match="moba.backend=auto runs the naive oracle on CPU"):
        validate(cfg, device="cpu")


def test_recipe_overrides_are_checked_against_the_tma_default_too():
    """A CUDA run may land on a GPU with TMA, whose default adds dQ by TMA bulk reductions
    (tma_dq needs dq_rows): turning dq_rows off alone is refused before work starts, with the fix."""
    from moba_cp.config import validate

    with pytest.raises(RecipeError, match=r"tma_dq=True .* needs dq_rows=True\. Fix: set both off .*GPU with TMA"):
        load_recipe("recipes/1gpu-32k.yaml", ["--moba.kernel=bwd.dq_rows=false"])
    validate(load_recipe("recipes/1gpu-32k.yaml", ["--moba.kernel=bwd.dq_rows=false,bwd.tma_dq=false"]), device="cuda")


def test_recipe_checks_the_shape_rules_of_an_override():
    """``bwd.dq_slots`` needs each block in one key sub-tile of the backward: refused at block 512
    and head dim 64 before work starts (with the values and the fix); taken at block 64."""
    with pytest.raises(RecipeError, match=r"moba.kernel: BwdConfig.dq_slots=True needs each block in one key "
                                          r"sub-tile of the backward: block_size=512 with bnb=128 \(head dim 64\) is "
                                          r"4 sub-tiles\. Fix: bwd.dq_slots=false"):
        load_recipe("recipes/1gpu-32k.yaml", ["--moba.block_size=512", "--moba.kernel=bwd.dq_slots=true"])
    ok = load_recipe("recipes/1gpu-32k.yaml", ["--moba.block_size=64", "--moba.kernel=bwd.dq_slots=true"])
    assert ok.moba.kernel == "bwd.dq_slots=true"


def test_default_tiling_follows_the_measured_rows():
    """d=64 (the recipes' head dim): a block's key sub-tiles adjacent in the dK/dV grid everywhere;
    with TMA also dQ fused into the bucket-order copy by bulk reductions, computed transposed
    under GQA only.
    d=128 at blocks 256-4096 copies rows in bucket order too (session 16), with the same TMA rules;
    block 128 stores dQ in per-block slots instead (session 18). The gate
    runs its unmasked middle tiles apart, without the prefilter pass, and with blocks <= 128 on
    centroids split once per call."""
    for tokens in (8192, 32768, 131072):
        plain, tma = choose_config(1024, 64, 4, tokens), choose_config(1024, 64, 4, tokens, True)
        assert plain.bwd.sub_major and not (plain.bwd.dq_rows or plain.bwd.tma_dq or plain.bwd.dq_trans)
        assert tma.bwd.sub_major and tma.bwd.dq_rows and tma.bwd.tma_dq and tma.bwd.dq_trans
        assert tma.fwd == plain.fwd and tma.gate == plain.gate
        mha = choose_config(1024, 64, 1, tokens, True)
        assert mha.bwd.dq_rows and mha.bwd.tma_dq and not mha.bwd.dq_trans
        # a GQA group may split over launches of at most 1 GiB of bucket-order rows (session 15)
        assert plain.bwd.split_group and tma.bwd.split_group and tma.bwd.dq_chunk_bytes == 1 << 30
        assert not plain.gate.presplit
    assert choose_config(128, 128, 4, 131072, True) == choose_config(128, 128, 4, 131072)
    assert not choose_config(128, 128, 4, 131072, True).bwd.gather_rows
    for block, tokens in ((512, 32768), (4096, 131072), (4096, 524288)):
        plain, tma = choose_config(block, 128, 4, tokens), choose_config(block, 128, 4, tokens, True)
        assert plain.bwd.gather_rows and plain.bwd.sub_major and not plain.bwd.dq_rows
        assert tma.bwd.dq_rows and tma.bwd.tma_dq and tma.bwd.dq_trans and tma.bwd.split_group
        assert not choose_config(block, 128, 1, tokens, True).bwd.dq_trans
    assert choose_config(512, 128, 4, 32768).fwd.method == "partials"
    gate = choose_config(128, 128, 1, 524288).gate
    assert gate.split_edges and not gate.prefilter
    # the int32-key loop (its 'below' steps since session 20) on 8 slots everywhere, on 8 warps
    # with thousands of centroids (session 16)
    assert gate.loop == "below" and gate.slots == 8 and gate.num_warps == 8
    assert choose_config(1024, 64, 4, 131072).gate.num_warps == 4
    # thousands of centroids per head: their hi + lo parts made once per call (session 15)
    assert gate.presplit and not choose_config(1024, 64, 4, 131072).gate.presplit
    assert not choose_config(128, 128, 4, 131072).bwd.split_group  # rows not copied: nothing to split
    # blocks <= 128 (session 17): the partials forward with the whole block in one sub-tile and half
    # partials; d=128 on 64-row tiles, 3 stages, chunks of 512 entries from 16K tokens, a 3-stage
    # backward, the gate on 8 warps; d=64 on 128-row tiles with the gate on 4 warps
    b128 = choose_config(128, 128, 1, 131072)
    assert (b128.fwd.method, b128.fwd.bn, b128.fwd.half_partials) == ("partials", 0, True)
    assert (b128.fwd.bm, b128.fwd.num_stages, b128.fwd.chunk, b128.bwd.num_stages) == (64, 3, 512, 3)
    assert choose_config(128, 128, 1, 16384).fwd.chunk == 256
    d64 = choose_config(128, 64, 4, 131072)
    assert (d64.fwd.bm, d64.fwd.half_partials, d64.gate.num_warps) == (128, True, 4)
    # blocks of 65-128 keys (session 18): each block's dQ of a row stored in its own slot (within
    # 256 MiB per launch at d=128, 1 GiB at d=64); d=64 on 128-key programs, 32-row steps, 4 warps, 3 stages, and up to 16K
    # tokens on 64-row steps, 8 warps, the rows copied in bucket order and the later rows unmasked
    assert b128.bwd.dq_slots and b128.bwd.dq_chunk_bytes == 1 << 28 and b128.bwd.bnb == 128
    assert choose_config(128, 64, 4, 131072).bwd.dq_chunk_bytes == 1 << 30
    assert (d64.bwd.dq_slots, d64.bwd.bnb, d64.bwd.bm, d64.bwd.num_warps, d64.bwd.num_stages) == (True, 128, 32, 4, 3)
    assert not d64.bwd.gather_rows and d64.bwd == choose_config(128, 64, 4, 0).bwd
    short = choose_config(128, 64, 4, 8192).bwd
    assert (short.dq_slots, short.bm, short.num_warps, short.gather_rows, short.split_mask) == (True, 64, 8, True, True)
    # blocks of 64 keys or fewer keep the atomics (not measured with slots)
    assert not choose_config(64, 64, 4, 131072).bwd.dq_slots and not choose_config(64, 128, 4, 131072).bwd.dq_slots
    # the merge on 32-row programs everywhere, its loop unrolled at d=64 blocks 256-1024 (session 17)
    assert b128.fwd.merge_rows == 32 and not b128.fwd.merge_unroll
    assert choose_config(1024, 64, 4, 131072).fwd.merge_unroll and choose_config(512, 64, 4, 32768).fwd.merge_unroll
    # K/V through tensor descriptors with bf16 partials and a 16-row merge: d=64 blocks 256-1024 over
    # 32K tokens (session 21) and over 16K (session 27: the 8K calls keep the previous forward), d=128
    # blocks 256-1024 and the partials forward of blocks >= 2048 up to 256K tokens (session 22);
    # d=128 blocks >= 2048 past 256K keep the one pass (no tile kernel)
    new_fwd = lambda f: (f.tma_kv, f.half_partials, f.merge_rows)  # noqa: E731
    assert new_fwd(choose_config(1024, 64, 4, 131072).fwd) == (True, True, 16)
    assert new_fwd(choose_config(512, 64, 4, 32768).fwd) == (True, True, 16)
    assert new_fwd(choose_config(512, 64, 6, 8192).fwd) == new_fwd(choose_config(512, 64, 4, 16384).fwd) == (
        False, False, 32)
    # the forward on 4 stages up to 32K tokens, 3 beyond; the backward on 4 at every length (session 36)
    assert [(c.fwd.num_stages, c.bwd.num_stages) for c in (choose_config(n_b, 64, 4, n) for n_b, n in
                                                           ((512, 8192), (512, 32768), (512, 65536), (1024, 131072)))
            ] == [(4, 4), (4, 4), (3, 4), (3, 4)]
    assert new_fwd(choose_config(512, 128, 4, 32768).fwd) == (True, True, 16)
    assert new_fwd(choose_config(4096, 128, 4, 131072).fwd) == (True, True, 16)
    one_pass = choose_config(4096, 128, 4, 524288).fwd
    assert one_pass.method == "one_pass" and not one_pass.tma_kv


def test_device_has_tma_only_on_a_cuda_gpu_of_compute_capability_9():
    from moba_cp.ops.moba.triton_config import device_has_tma

    assert not device_has_tma("cpu") and not device_has_tma(torch.device("cpu"))
    if torch.cuda.is_available():
        assert device_has_tma("cuda") == (torch.cuda.get_device_capability() >= (9, 0))


def test_the_layer_spec_carries_moba_kernel():
    from moba_cp.megatron.specs import core_attention_spec

    spec = core_attention_spec("moba", MoBAConfig(kernel="gate.split_edges=true"), AttentionConfig())
    assert spec.params["moba_kernel"] == "gate.split_edges=true"
    assert core_attention_spec("moba", MoBAConfig(), AttentionConfig()).params["moba_kernel"] == ""


def test_context_parallel_pieces_take_the_overrides(monkeypatch):
    """Under CP the ring's slot index tiles with the overrides, and the gate gets its part."""
    pytest.importorskip("moba_cp.ops.moba.triton_backend")
    from moba_cp.ops.moba import partial, triton_gate
    from moba_cp.ops.moba.triton_config import GateConfig
    from moba_cp.parallel import gate

    sel = torch.zeros(64, 2, 3, dtype=torch.int32)
    index = partial.partial_index(sel, 8, 1, 16, backend="triton", kernel="bwd.bnb=16,bwd.sub_major=true")
    cfg = index.tiling(16)
    assert cfg == choose_config(16, 16, 2, 64).replace(bwd={"bnb": 16, "sub_major": True})
    assert partial.partial_index(sel, 8, 1, 16, backend="triton").tiling(16) == choose_config(16, 16, 2, 64)

    seen = []
    monkeypatch.setattr(triton_gate, "gate_topk", lambda *a, **kw: seen.append(kw.get("cfg")) or torch.zeros(1))
    q, cent = torch.randn(64, 2, 16), torch.randn(4, 1, 16)
    pos = torch.arange(64)
    for want in (GateConfig(bm=16, split_edges=True), None):
        gate.select_global(q, pos, cent, block_size=16, topk=3, width=3, backend="triton", gate_cfg=want)
    assert seen == [GateConfig(bm=16, split_edges=True), None]
