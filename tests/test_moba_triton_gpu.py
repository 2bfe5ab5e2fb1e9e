"""Triton MoBA backend on a GPU (marked ``gpu``; skipped without one): bf16 at real sizes against
the naive oracle, exact options bit for bit at the training tilings, and the graphed training
call (its replay logic also runs on CPU, emulated).
"""

from __future__ import annotations

import functools

import pytest
import torch

from moba_cp.ops.moba import naive

pytest.importorskip("triton")
tb = pytest.importorskip("moba_cp.ops.moba.triton_backend")
from moba_cp.ops.moba.triton_config import FwdConfig, choose_config, device_has_tma  # noqa: E402
from tests.moba_triton_helpers import (DEV, PATH_CONFIGS, _assert_same_selection, _cu, _inputs,  # noqa: E402
                                       _poison_cuda_allocator, check_bf16_fwd_bwd, gpu_sink_inputs)


# ------------------------------------------------------------------------------- GPU, bf16
@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv,b,topk", [(128, 16, 4, 128, 8), (64, 8, 8, 64, 4), (128, 8, 2, 512, 3)])
def test_gpu_bf16_real_sizes(d, hq, hkv, b, topk):
    t_docs = [3000, 1096]  # two documents, the first not a multiple of B
    t = sum(t_docs)
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(t, hq, hkv, d, torch.bfloat16, seed=d + topk, device="cuda")
    idx_n = naive.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    idx_t = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    _assert_same_selection(idx_t, idx_n, q, k, b, cu, rtol=1e-4, max_frac=0.002)
    check_bf16_fwd_bwd(q, k, v, idx_n, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", [{"sub_major": True}, {"dq_rows": True, "fuse_dq": None},
                                 {"dq_rows": True, "fuse_dq": None, "sub_major": True, "dq_trans": True},
                                 {"dq_rows": True, "fuse_dq": None, "sub_major": True, "tma_dq": True},
                                 {"dq_rows": True, "fuse_dq": None, "tma_dq": True, "tma": True},
                                 {"dq_rows": True, "fuse_dq": None, "sub_major": True, "tma_dq": True,
                                  "split_group": True, "dq_chunk_bytes": 1}])
@pytest.mark.parametrize("d,b", [(64, 512), (64, 1024), (128, 512)])
def test_gpu_bf16_backward_variants(d, b, bwd):
    """The backward options under measurement (grid order, dQ summed from the gathered rows'
    copy, by atomics or TMA bulk reductions) at bf16 on the GPU: two documents, GQA 4."""
    t_docs = [3000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 8, 2, d, torch.bfloat16, seed=d + b, device="cuda")
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    base = choose_config(b, d, 4, sum(t_docs))
    cfg = base.replace(bwd={"gather_rows": True, **bwd})
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("d,b", [(64, 512), (64, 1024), (128, 512)])
def test_gpu_bf16_half_partials(d, b):
    """``fwd.half_partials`` at bf16 on the GPU (two documents, GQA 4): within twice the naive
    bf16 op's error, like every path."""
    t_docs = [3000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 8, 2, d, torch.bfloat16, seed=d + b + 1, device="cuda")
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    cfg = choose_config(b, d, 4, sum(t_docs)).replace(
        fwd={"method": "partials", "bm": 128, "bn": 64, "chunk": 128, "half_partials": True})
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,bwd", [(64, 1024, {}), (64, 1024, {"dv_bm": 64}), (64, 512, {"dv_bm": 64, "dv_warps": 8}),
                                     (128, 512, {}), (64, 128, {"dv_bm": 64})])
def test_gpu_bf16_split_dv(d, b, bwd):
    """``bwd.split_dv`` on the GPU at the shape's default backward otherwise (row copy, fused dQ by
    TMA reductions or slots, GQA groups split over launches): two documents, GQA 4, within twice
    the naive bf16 op's error like every path."""
    t_docs = [3000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 8, 2, d, torch.bfloat16, seed=d + b + 9, device="cuda")
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    cfg = choose_config(b, d, 4, sum(t_docs), device_has_tma("cuda")).replace(bwd={"split_dv": True, **bwd})
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,fwd", [(64, 512, {"bm": 128, "num_warps": 4}), (64, 1024, {"bm": 64}),
                                     (128, 128, {"bm": 64, "num_warps": 8}), (128, 512, {"bm": 128, "num_warps": 8})])
def test_gpu_bf16_query_major(d, b, fwd):
    """``fwd.method='query_major'`` at bf16 on the GPU (two documents, one not a multiple of the
    block, so row tiles straddle them; GQA 4): within twice the naive bf16 op's error, like every
    path; its backward builds the gather index from the selection."""
    t_docs = [3000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 8, 2, d, torch.bfloat16, seed=d + b + 5, device="cuda")
    idx = naive.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    cfg = choose_config(b, d, 4, sum(t_docs)).replace(
        fwd={"method": "query_major", "bn": 64, "chunk": 128, "tma_kv": False, "half_partials": False, **fwd})
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("d,b,bm,warps", [(128, 128, 64, 4), (128, 128, 128, 8), (64, 128, 128, 4), (64, 64, 64, 4)])
def test_gpu_bf16_partials_whole_block(d, b, bm, warps, half):
    """The partials forward with the whole block in one key sub-tile (K/V loaded once per
    program) at bf16 on the GPU: two documents, GQA 4, fp32 or half partials."""
    t_docs = [3000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 8, 2, d, torch.bfloat16, seed=d + b + bm, device="cuda")
    idx = naive.select_blocks(q, k, block_size=b, topk=8, cu_seqlens=cu)
    cfg = choose_config(b, d, 4, sum(t_docs)).replace(
        fwd={"method": "partials", "bm": bm, "bn": 0, "chunk": 2 * bm, "num_warps": warps, "half_partials": half})
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,fwd", [(64, 1024, {"bm": 64}), (64, 128, {"bm": 64}), (64, 1024, {}), (128, 128, {})])
def test_gpu_bf16_register_cap_changes_nothing_but_registers(d, b, fwd):
    """``fwd.maxnreg`` caps the partials tile kernel's registers (more programs per SM, spills
    where the tile needs more): the same products and reductions, so o within one bf16 rounding
    and lse within fp32 roundings of the uncapped kernel's (the assembler may contract differently
    under a cap); and the forward and backward stay within the bf16 bound."""
    t_docs = [3000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 16, 4, d, torch.bfloat16, seed=d + b + 5, device="cuda")
    idx = naive.select_blocks(q, k, block_size=b, topk=8, cu_seqlens=cu)
    cfg = choose_config(b, d, 4, sum(t_docs)).replace(fwd={"method": "partials", **fwd})
    capped = cfg.replace(fwd={"maxnreg": 168})
    free = tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=cfg)
    cap = tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=capped)
    torch.testing.assert_close(cap[0], free[0], rtol=2 ** -8, atol=0)
    torch.testing.assert_close(cap[1], free[1], rtol=1e-6, atol=1e-6)
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=capped))


def test_tma_kv_needs_the_partials_kernel_and_aligned_strides():
    """``fwd.tma_kv``: refused with the rule and the fix for a method without the tile kernel and,
    before any launch, for K whose head stride breaks TMA's 16-byte alignment; K and V as strided
    slices of one fused tensor (Megatron's QKV projection) need no copy and give the plain loads'
    output."""
    with pytest.raises(ValueError, match=r"FwdConfig.tma_kv=True is an option of the partials tile kernel.*"
                                         r"Fix: method='partials' or tma_kv=False"):
        FwdConfig(method="two_pass", tma_kv=True)
    torch.manual_seed(3)
    t, b, d = 96, 32, 16
    q = torch.randn(t, 2, d)
    fused = torch.randn(t, 2, 3, d)  # per KV head: [k | v | unused], as a fused projection lays them out
    k, v = fused[:, :, 0], fused[:, :, 1]
    assert k.stride() == (96, 48, 1) and v.stride() == (96, 48, 1)
    idx = naive.select_blocks(q, k, block_size=b, topk=2)
    cfg = PATH_CONFIGS["partials-tma-kv"]
    got = tb.block_attn(q, k, v, idx, block_size=b, softmax_scale=0.25, config=cfg)
    plain = tb.block_attn(q, k.contiguous(), v.contiguous(), idx, block_size=b, softmax_scale=0.25,
                          config=cfg.replace(fwd={"tma_kv": False}))
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], plain[1], rtol=0, atol=0)
    # one KV head whose (unused) head stride a view set to 1: accepted, same output
    k1 = torch.randn(t, d).as_strided((t, 1, d), (d, 1, 1))
    v1 = torch.randn(t, 1, d)
    idx1 = naive.select_blocks(q, k1.contiguous(), block_size=b, topk=2)
    got = tb.block_attn(q, k1, v1, idx1, block_size=b, softmax_scale=0.25, config=cfg)
    plain = tb.block_attn(q, k1.contiguous(), v1, idx1, block_size=b, softmax_scale=0.25,
                          config=cfg.replace(fwd={"tma_kv": False}))
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)
    odd = torch.randn(t, 2 * d + 1)[:, : 2 * d].reshape(t, 2, d)  # rows 33 floats apart: not 16-byte aligned
    with pytest.raises(ValueError, match=r"tma_kv=True reads k through a tensor descriptor.*strides \(33, 16, 1\).*"
                                         r"Fix: tma_kv=False, or pass k.contiguous\(\)"):
        tb.block_attn(q, odd, v, idx, block_size=b, softmax_scale=0.25, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,fwd", [(64, 1024, {}), (64, 1024, {"bm": 64, "chunk": 128}),
                                     (64, 512, {"num_warps": 8}), (128, 512, {}), (64, 320, {"bn": 128, "num_warps": 8}),
                                     (128, 4096, {})])
def test_gpu_bf16_tma_kv_equals_plain_loads(d, b, fwd):
    """``fwd.tma_kv`` on the GPU (TMA on Hopper): the same products on the same tiles as the plain
    loads, so o within one bf16 rounding and lse within fp32 roundings of the plain kernel's (the
    compiler may schedule and contract the two differently); forward and backward within the bf16
    bound. Two documents (one not a multiple of the block), GQA 4; the descriptors read K and V as
    strided slices of one fused tensor (heads 2 D apart, as in a fused projection)."""
    t_docs = [3000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 16, 4, d, torch.bfloat16, seed=d + b + 11, device="cuda")
    idx = naive.select_blocks(q, k, block_size=b, topk=4, cu_seqlens=cu)
    cfg = choose_config(b, d, 4, sum(t_docs)).replace(fwd={"method": "partials", "tma_kv": False, **fwd})
    with_tma = cfg.replace(fwd={"tma_kv": True})
    plain = tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=cfg)
    kv = torch.stack([k, v], dim=2)
    ks, vs = kv[:, :, 0], kv[:, :, 1]
    got = tb.block_attn(q, ks, vs, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=with_tma)
    torch.testing.assert_close(got[0], plain[0], rtol=2 ** -8, atol=0)
    torch.testing.assert_close(got[1], plain[1], rtol=1e-6, atol=1e-6)
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=with_tma))


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,bwd", [(128, 128, {}), (128, 128, {"split_mask": True}), (64, 64, {}),
                                     (64, 128, {"bnb": 128}),
                                     (64, 128, {"bnb": 128, "bm": 32, "num_warps": 4, "gather_rows": False,
                                                "split_mask": False})])
def test_gpu_bf16_dq_slots(d, b, bwd):
    """``bwd.dq_slots`` at bf16 on the GPU (slots in bf16, summed in fp32): two documents, GQA 4,
    within twice the naive bf16 op's error like every path."""
    t_docs = [3000, 2 * b + 100]
    cu = _cu(t_docs, "cuda")
    q, k, v = _inputs(sum(t_docs), 8, 2, d, torch.bfloat16, seed=d + b + 7, device="cuda")
    idx = naive.select_blocks(q, k, block_size=b, topk=8, cu_seqlens=cu)
    cfg = choose_config(b, d, 4, sum(t_docs)).replace(bwd={"dq_slots": True, **bwd})
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=cfg))


MAX_ROWS_GPU = [(128, 128, {}), (64, 128, {}), (64, 1024, {}), (64, 128, {"max_rows_bytes": 1 << 18})]


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,bwd", MAX_ROWS_GPU)
def test_gpu_bf16_max_rows_with_a_sink(d, b, bwd):
    """``bwd.max_rows`` at bf16 on the GPU, on the shape's default otherwise, where every row
    selects its document's block 0 (so that block's programs are cut, and with a small scratch some
    long blocks are left whole): two documents, GQA 4, within twice the naive bf16 op's error."""
    q, k, v, idx, cu = gpu_sink_inputs(d, b, seed=d + b + 13)
    cfg = choose_config(b, d, 4, q.shape[0], True).replace(bwd={"max_rows": 256, **bwd})
    check_bf16_fwd_bwd(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                       fn=functools.partial(tb.block_attn, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("d,b", [(128, 128), (64, 1024)])
def test_gpu_cut_backward_is_deterministic(d, b):
    """``bwd.max_rows`` on the GPU: the cut blocks' tiles store their partials in slots of their
    own and a kernel adds them in tile order, so dK and dV are bitwise the same in every run
    (session 25: the earlier atomic sums gave a wrong dv in a few key rows in about one run in
    three of the sink test at d=128 block 128, not reproduced alone). Ten runs of the sink
    selection with 256-row tiles and a scratch that leaves some blocks whole, the allocator
    poisoned before each; dQ too where it is stored in slots (d=128, block 128), not added."""
    q, k, v, idx, cu = gpu_sink_inputs(d, b, seed=d + b + 17)
    cfg = choose_config(b, d, 4, q.shape[0], True).replace(bwd={"max_rows": 256, "max_rows_bytes": 64 * b * d * 8})
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to("cuda", torch.bfloat16)
    runs = []
    for _ in range(10):
        _poison_cuda_allocator()
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        o, _ = tb.block_attn(qq, kk, vv, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5, config=cfg)
        (o * do).sum().backward()
        runs.append((qq.grad, kk.grad, vv.grad))
    for name, i in (("dk", 1), ("dv", 2)) + ((("dq", 0),) if cfg.bwd.dq_slots else ()):
        assert all(torch.isfinite(r[i]).all() for r in runs), name
        assert all(torch.equal(runs[0][i], r[i]) for r in runs[1:]), f"{name} differs between runs"


#: The training shapes' tilings (head dim, block, query heads, KV heads) of the GPU tests of exact options.
TRAINING_TILINGS = [(64, 1024, 16, 4), (64, 512, 6, 6), (128, 512, 32, 8)]


#: Document lengths of the GPU tests of exact options (16,384 tokens).
GPU_DOCS = [5000, 11384]


def _gpu_exact_option(d, b, hq, hkv, option: str, seed: int, more: dict | None = None, dk_rounding: bool = False):
    """The backward with ``bwd.<option>`` on and off at the default config of a two-document bf16
    call (16,384 tokens, top-3; ``more``: other BwdConfig fields for both runs): dK and dV are
    accumulated in each program's registers in row order, so an exact option leaves them bit for
    bit; dQ is summed by TMA reductions in whatever order the programs finish, so it is compared
    within one bf16 ulp of its largest element. ``dk_rounding``: dK may differ by the rounding of
    its scaled partials (``acc_red`` at d=128, see BwdConfig): within one bf16 ulp of its largest
    element, at most one element in 1,000, and no further from a run without the split than the
    off run is, give or take that ulp. Returns the config of the off run."""
    docs = GPU_DOCS
    t = sum(docs)
    q, k, v = _inputs(t, hq, hkv, d, torch.bfloat16, seed=d + b + seed, device="cuda")
    do = torch.randn(t, hq, d, generator=torch.Generator().manual_seed(5 + seed)).to("cuda", torch.bfloat16)
    cu = _cu(docs, device="cuda")
    idx = tb.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    base = choose_config(b, d, hq // hkv, t, True)
    if more:
        base = base.replace(bwd=more)

    def grads(value, **bwd):
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        o, _ = tb.block_attn(qq, kk, vv, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                             config=base.replace(bwd={option: value, **bwd}))
        (o * do).sum().backward()
        return qq.grad, kk.grad, vv.grad

    on, off = grads(True), grads(False)
    # a third run, the option off and no launch split (the sums in each program's registers), to
    # say which of the two is further off (an fp64 oracle at this size needs ~31 GiB more than an
    # H100 had free); run only when asked
    unsplit = functools.cache(lambda: grads(False, dq_chunk_bytes=1 << 40))
    exact = [("dv", 2)]
    if dk_rounding:
        ulp = off[1].float().abs().max().item() * 2 ** -7
        diff = (on[1].float() - off[1].float()).abs()
        far_on, far_off = ((x[1].float() - unsplit()[1].float()).abs().max().item() for x in (on, off))
        assert diff.max().item() <= ulp and int((diff > 0).sum()) <= diff.numel() // 1000, (
            f"dk with {option}: max |on - off| {diff.max().item():.3e} (one bf16 ulp of the largest: {ulp:.3e}) "
            f"at {int((diff > 0).sum())} of {diff.numel()} elements")
        assert far_on <= far_off + ulp, f"dk with {option} lies {far_on:.3e} from an unsplit run, off {far_off:.3e}"
    else:
        exact.insert(0, ("dk", 1))
    for name, i in exact:
        a, b_ = on[i], off[i]
        if not torch.equal(a, b_):
            ref = unsplit()[i].float()
            diff = (a.float() - b_.float()).abs()
            where = diff.nonzero()[:4].tolist()
            pytest.fail(f"{name} with {option} on differs from off at {int((diff > 0).sum())} of {diff.numel()} "
                        f"elements, max |on - off| {diff.max().item():.3e} (largest |{name}| "
                        f"{b_.float().abs().max().item():.3e}), first at (key, head, dim) {where}; max "
                        f"|x - unsplit run|: on {(a.float() - ref).abs().max().item():.3e}, off "
                        f"{(b_.float() - ref).abs().max().item():.3e}")
    tol = off[0].float().abs().max().item() * 2 ** -7
    assert (on[0].float() - off[0].float()).abs().max().item() <= tol
    return base


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,hq,hkv", TRAINING_TILINGS)
def test_gpu_skipping_unseen_rows_keeps_dk_dv_bits(d, b, hq, hkv):
    """``bwd.skip_unseen`` on the GPU at the training shapes' tilings: the rows it skips add
    zeros (see ``_gpu_exact_option``)."""
    base = _gpu_exact_option(d, b, hq, hkv, "skip_unseen", seed=0)
    assert base.bwd.split_mask  # (the skip needs the mask split)


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,hq,hkv", [t for t in TRAINING_TILINGS if t[2] > t[3]])
def test_gpu_reduced_kv_sums_keep_dk_dv_bits(d, b, hq, hkv):
    """``bwd.acc_red`` on the GPU at the GQA training tilings, the group split into one query head
    a launch (``dq_chunk_bytes=1``, as at 128K): at d=64 the later launches' reductions leave dK and
    dV bit for bit (random inputs hold no subnormal sums for the reductions to flush); at d=128 dV
    stays bit for bit and dK moves by the rounding of its scaled partials, which the path without
    the option contracts into an FFMA there (on an H100: at most 4.8e-7 in fp32, 698 bf16 elements
    of 16.8M; ``benchmarks/diag_acc_red.py``)."""
    base = _gpu_exact_option(d, b, hq, hkv, "acc_red", seed=2, more={"dq_chunk_bytes": 1}, dk_rounding=d >= 128)
    assert base.bwd.split_group


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,hq,hkv", TRAINING_TILINGS)
def test_gpu_dq_rows_zeroed_ahead_keep_dk_dv_bits(d, b, hq, hkv, monkeypatch):
    """``bwd.zero_ahead`` on the GPU at the training tilings with the dQ row copy (TMA there), one
    query head a launch (``dq_chunk_bytes=1``, as at 128K): the copies the dK/dV launches zero are
    allocated NaN-filled, so a missed element makes dq NaN; dK/dV bit for bit, dQ within one bf16
    ulp (see ``_gpu_exact_option``)."""
    from moba_cp.ops.moba import triton_attn_bwd

    def poisoned(rows, dd, dtype, device):
        return torch.full((rows, dd), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_attn_bwd, "unfilled_rows", poisoned)
    base = _gpu_exact_option(d, b, hq, hkv, "zero_ahead", seed=4, more={"dq_chunk_bytes": 1})
    assert base.bwd.dq_rows


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,hq,hkv", TRAINING_TILINGS)
def test_gpu_dq_rows_read_through_the_index_keep_dk_dv_bits(d, b, hq, hkv):
    """``bwd.dq_rows`` with q and dO read through the index (``gather_rows`` off: no row copy)
    against the default row copy, at the training tilings with one query head a launch: the same
    values reach the same products, so dK/dV bit for bit and dQ within one bf16 ulp (see
    ``_gpu_exact_option``)."""
    base = _gpu_exact_option(d, b, hq, hkv, "gather_rows", seed=6, more={"dq_chunk_bytes": 1})
    assert base.bwd.dq_rows and base.bwd.gather_rows and not base.bwd.tma


@pytest.mark.gpu
@pytest.mark.parametrize("d,b,hq,hkv", TRAINING_TILINGS + [(128, 128, 16, 16)])
def test_gpu_forward_launch_options_keep_o(d, b, hq, hkv):
    """The forward's ``partials_q_bound=False`` (more query heads a launch) and ``merge_at_once``
    (the merge's one load, a tree sum over slots) at bf16 on the GPU, with the default tiles of
    the training shapes and FlashMoBA's block: the former gives o and lse bit for bit, the latter
    lse bit for bit and o within one bf16 ulp of its largest element."""
    docs = GPU_DOCS
    t = sum(docs)
    q, k, v = _inputs(t, hq, hkv, d, torch.bfloat16, seed=d + b + 7, device="cuda")
    cu = _cu(docs, device="cuda")
    idx = tb.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    base = choose_config(b, d, hq // hkv, t, True)
    if base.fwd.method != "partials":
        pytest.skip(f"the default forward here is {base.fwd.method!r}")
    # partial_bytes of one head's partials: several launches, so the bound decides something
    one = t * 4 * d * (2 if base.fwd.half_partials else 4)
    runs = {name: tb.block_attn(q, k, v, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                                config=base.replace(fwd=fwd))
            for name, fwd in (("one head", {"partial_bytes": one}),
                              ("all heads", {"partial_bytes": 1 << 40, "partials_q_bound": False}),
                              ("at once", {"merge_at_once": True}))}
    ref_o, ref_l = runs["one head"]
    assert torch.equal(runs["all heads"][0], ref_o) and torch.equal(runs["all heads"][1], ref_l)
    o, lse = runs["at once"]
    assert torch.equal(lse, ref_l)
    assert (o.float() - ref_o.float()).abs().max().item() <= ref_o.float().abs().max().item() * 2 ** -7


@pytest.mark.gpu
@pytest.mark.parametrize("gate", [{"split_edges": True, "prefilter": True, "loop": "while"},
                                  {"split_edges": False, "prefilter": False, "loop": "while"},
                                  {"split_edges": True, "prefilter": False, "loop": "while", "slots": 16},
                                  {"split_edges": False, "prefilter": True, "loop": "while"},
                                  {"presplit": True}, {"loop": "counted"}, {"loop": "keys", "slots": 16},
                                  {"loop": "keys", "slots": 8, "num_warps": 8}, {"loop": "counted", "slots": 16},
                                  {"loop": "below"}, {"loop": "below", "num_warps": 8}])
@pytest.mark.parametrize("d,b,topk", [(128, 128, 8), (64, 512, 3)])
def test_gpu_bf16_gate_variants(d, b, topk, gate):
    """The gate's loop options at bf16 (hi/lo centroid products) on the GPU, two documents."""
    t_docs = [9000, 3288]
    cu = _cu(t_docs, "cuda")
    q, k, _ = _inputs(sum(t_docs), 8, 2, d, torch.bfloat16, seed=d + topk, device="cuda")
    cfg = choose_config(b, d, 4, sum(t_docs)).replace(gate=gate)
    idx_n = naive.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu)
    idx_t = tb.select_blocks(q, k, block_size=b, topk=topk, cu_seqlens=cu, config=cfg)
    _assert_same_selection(idx_t, idx_n, q, k, b, cu, rtol=1e-4, max_frac=0.002)


@pytest.mark.gpu
def test_gpu_no_host_sync_on_the_common_path():
    """After the first call (which checks cu_seqlens' values once), fwd+bwd of moba_attn
    enqueues without a single host sync: tables and index are sized by static bounds."""
    from moba_cp import moba_attn

    t_docs = [2048, 2048]
    cu = _cu(t_docs, "cuda")
    q, k, v = (x.requires_grad_() for x in _inputs(sum(t_docs), 8, 2, 64, torch.bfloat16, seed=1, device="cuda"))
    kw = dict(block_size=128, topk=4, cu_seqlens=cu, backend="triton")
    moba_attn(q, k, v, **kw).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = moba_attn(q, k, v, **kw)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graphs_only_for_short_cuda_calls_with_lasting_offsets(monkeypatch):
    """The graphed path's rules (its replay itself is the GPU test below): CUDA only, not while
    torch.compile traces, at most GRAPH_MAX_TOKEN_HEADS rows x heads, and offsets that live as
    long as a graph (None, or ``batch_cu_seqlens``'s), never a per-batch tensor."""
    from moba_cp.ops.moba import api, cuda_graphs

    assert not cuda_graphs.graphs_enabled(torch.zeros(64, 2, 16), None)  # CPU tensor
    cpu = torch.device("cpu")
    lasting = api.batch_cu_seqlens(2, 32, cpu)
    assert cuda_graphs._STATIC_OFFSETS.get(id(lasting)) is lasting
    fresh = torch.tensor([0, 32, 64], dtype=torch.int32)
    assert cuda_graphs._STATIC_OFFSETS.get(id(fresh)) is not fresh
    monkeypatch.delenv("MOBA_CP_CUDA_GRAPHS", raising=False)
    assert cuda_graphs.graph_mode() == "shared"  # the default since session 27 (its 8K training peak)
    for value, mode in (("0", "off"), ("1", "call"), ("index", "index"), ("shared", "shared")):
        monkeypatch.setenv("MOBA_CP_CUDA_GRAPHS", value)
        assert cuda_graphs.graph_mode() == mode
    monkeypatch.setenv("MOBA_CP_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="MOBA_CP_CUDA_GRAPHS='yes': choose 0 .* 1 .* index .* or shared"):
        cuda_graphs.graph_mode()


def test_no_call_is_graphed_inside_calls_eager(monkeypatch):
    """``calls_eager`` (the warm-up and capture of a whole training step): a call that would take
    the graphed path runs eagerly inside the block, nested blocks too, and graphed again after."""
    import types

    from moba_cp.ops.moba import cuda_graphs

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("MOBA_CP_CUDA_GRAPHS", raising=False)
    q = types.SimpleNamespace(is_cuda=True, shape=(64, 2, 16))  # a short call on a GPU
    assert cuda_graphs.graphs_enabled(q, None)
    with cuda_graphs.calls_eager():
        assert not cuda_graphs.graphs_enabled(q, None)
        with cuda_graphs.calls_eager():
            assert not cuda_graphs.graphs_enabled(q, None)
        assert not cuda_graphs.graphs_enabled(q, None)
    assert cuda_graphs.graphs_enabled(q, None)
    with pytest.raises(KeyError), cuda_graphs.calls_eager():
        raise KeyError("a failed step")
    assert cuda_graphs.graphs_enabled(q, None)  # the block closed on the error


def test_graphed_call_saves_lse_selection_and_index_as_one_buffer():
    """The whole-call graph's saved state (lse, the selection, the gather index) packs into one
    int32 buffer and unpacks to views equal to the parts, lse bit for bit (incl. -inf and NaN)."""
    t, hq, w = 37, 3, 4
    lse = torch.randn(t, hq)
    lse[0, 0], lse[1, 1] = float("-inf"), float("nan")
    idx = torch.randint(-1, 9, (t, hq, w), dtype=torch.int32)
    index = torch.randint(0, 1000, (123,), dtype=torch.int32)
    saved = tb._pack_saved(lse, idx, index)
    assert saved.dtype == torch.int32 and saved.numel() == lse.numel() + idx.numel() + index.numel()
    got = tb._unpack_saved(saved, t, hq, w)
    assert torch.equal(got[0].view(torch.int32), lse.view(torch.int32)) and got[0].shape == (t, hq)
    assert torch.equal(got[1], idx) and torch.equal(got[2], index)
    assert all(x.data_ptr() >= saved.data_ptr() and x.is_contiguous() for x in got)  # views, no copies
    empty = tb._unpack_saved(tb._pack_saved(lse, idx, index[:0]), t, hq, w)[2]  # the one-pass path's index
    assert empty.numel() == 0


class _ReplayOnCPU:
    """A stand-in for ``cuda_graphs._Captured`` with a graph's memory semantics on any device:
    static contiguous input buffers, and static outputs that every "replay" (``fn`` run again on
    the static inputs) overwrites in place, so code that keeps a static output instead of its
    clone, or reads a stale input buffer, gives wrong numbers here as on a GPU."""

    replays = 0

    def __init__(self, fn, inputs, keep, bound=(), pool_of=None):
        self.fn, self.keep, self.bound, self.pool_of = fn, keep, tuple(bound), pool_of
        self.inputs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in inputs]
        for s, x in zip(self.inputs, inputs):
            s.copy_(x)
        self.outputs = fn(*self.inputs, *self.bound)

    def __call__(self, inputs):
        for s, x in zip(self.inputs, inputs):
            s.copy_(x)
        for o, n in zip(self.outputs, self.fn(*self.inputs, *self.bound)):
            o.copy_(n)
        _ReplayOnCPU.replays += 1
        return tuple(o.clone() for o in self.outputs)


def _graphed_and_eager_call(toggle, q, k, v, do, dl, moba_kw, tol, call, kept):
    """One call of the graph tests: ``moba_attn`` with graphs on and off (``toggle(graphed)``)
    on copies of ``q, k, v``, loss ``o . do`` (skipped when ``do`` is None) plus ``lse . dl``
    (when ``dl`` is given); o, lse, dq, dk, dv must agree to ``tol(name)``, and the previous
    call's graphed o and lse (``kept``) must not have changed. Returns this call's ``kept``."""
    res = {}
    for graphed in (True, False):
        toggle(graphed)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o, lse = tb.moba_attn(*xs, **moba_kw)
        loss = 0 if do is None else (o.float() * do.float()).sum()
        if dl is not None:
            loss = loss + (lse * dl).sum()
        loss.backward()
        res[graphed] = [o.detach(), lse.detach()] + [x.grad for x in xs]
    for name, a, e in zip(("o", "lse", "dq", "dk", "dv"), res[True], res[False]):
        torch.testing.assert_close(a, e, **tol(name), msg=lambda m: f"call {call} {name}: {m}")
    if kept is not None:
        assert torch.equal(kept[0], kept[1]), "a later replay overwrote an earlier call's output"
        assert torch.equal(kept[2], kept[3]), "a later replay overwrote an earlier call's lse"
    return res[True][0], res[True][0].clone(), res[True][1], res[True][1].clone()


# the training call (batched offsets, whole-call graphs, and the backward reading the forward
# graph's buffers) and the index-only mode on one sequence
@pytest.mark.parametrize("batched,mode", [(True, "1"), (True, "shared"), (False, "index")])
def test_graphed_call_logic_equals_eager_with_replays_emulated(batched, mode, monkeypatch):
    """The graphed MoBA call's host logic on CPU (the GPU test below runs the real graphs): with
    ``_Captured`` replaced by :class:`_ReplayOnCPU`, a shape's first call runs eagerly, the second
    captures, later ones replay, on fresh inputs every call; o, lse, dq, dk, dv equal the eager
    path's; an earlier call's o and lse survive later replays; a call that uses lse (dLSE) takes
    the eager backward; a forward without a gradient for o (only lse used) gets a zero dO."""
    from moba_cp.ops.moba import api, cuda_graphs

    monkeypatch.setattr(cuda_graphs, "_Captured", _ReplayOnCPU)
    b, s, hq, hkv, d, blk, topk = (2, 40, 4, 2, 16, 16, 2) if batched else (1, 75, 4, 2, 32, 16, 3)
    cu = api.batch_cu_seqlens(b, s, DEV) if batched else None
    for calls in (tb._FWD_GRAPHS, tb._BWD_GRAPHS, tb._INDEX_GRAPHS):
        calls.clear()
    _ReplayOnCPU.replays = 0
    monkeypatch.setenv("MOBA_CP_CUDA_GRAPHS", mode)

    def toggle(graphed):
        monkeypatch.setattr(tb, "graphs_enabled", lambda q, cu: graphed)

    kept = None
    for call in range(5):
        q, k, v = _inputs(b * s, hq, hkv, d, torch.float32, seed=60 + call)
        do = torch.randn_like(q) if call != 4 else None
        dl = torch.randn(b * s, hq) if call >= 3 else None
        kept = _graphed_and_eager_call(toggle, q, k, v, do, dl, dict(block_size=blk, topk=topk, cu_seqlens=cu,
                                                                     softmax_scale=d ** -0.5),
                                       lambda name: dict(atol=1e-5, rtol=1e-5), call, kept)
    graphs = {"1": (1, 1, 0), "shared": (1, 1, 0), "index": (0, 0, 1)}[mode]
    assert (len(tb._FWD_GRAPHS._graphs), len(tb._BWD_GRAPHS._graphs), len(tb._INDEX_GRAPHS._graphs)) == graphs
    # the second call captures and replays, later ones replay: forwards in calls 1-4, whole-call
    # backwards in calls 1-2 (calls 3-4 use lse: eager backward); the index mode's backward is eager.
    # shared: the backward graph needs the forward's, captured in call 1: its own capture is call 2
    assert _ReplayOnCPU.replays == {"1": 4 + 2, "shared": 4 + 1, "index": 4}[mode]


def test_shared_graph_mode_backward_reads_the_forward_graphs_buffers(monkeypatch):
    """``MOBA_CP_CUDA_GRAPHS=shared``: the backward's graph copies only do, reads q, k, v, o and
    the saved state in the forward graph's buffers and is captured into its memory pool. Right
    when the forward replayed last for the same call (recomputation's order) and when other calls
    replayed it since (their backwards put their tensors back first): gradients equal the eager
    path's in both orders (replays emulated)."""
    from moba_cp.ops.moba import api, cuda_graphs

    monkeypatch.setattr(cuda_graphs, "_Captured", _ReplayOnCPU)
    b, s, hq, hkv, d, blk, topk = 2, 40, 4, 2, 16, 16, 2
    cu = api.batch_cu_seqlens(b, s, DEV)
    for calls in (tb._FWD_GRAPHS, tb._BWD_GRAPHS, tb._INDEX_GRAPHS):
        calls.clear()
    monkeypatch.setenv("MOBA_CP_CUDA_GRAPHS", "shared")

    def run(seed, graphed):
        monkeypatch.setattr(tb, "graphs_enabled", lambda q, cu: graphed)
        q, k, v = _inputs(b * s, hq, hkv, d, torch.float32, seed=seed)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o, _ = tb.moba_attn(*xs, block_size=blk, topk=topk, cu_seqlens=cu, softmax_scale=d ** -0.5)
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 100))
        return xs, o, do

    def check(xs, o, do, seed):
        (o * do).sum().backward()
        ref_xs, ref_o, ref_do = run(seed, False)
        (ref_o * ref_do).sum().backward()
        for name, a, e in zip(("dq", "dk", "dv"), (x.grad for x in xs), (x.grad for x in ref_xs)):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed} {name}: {m}")

    for seed in (80, 81, 82):  # forward then its backward: eager, then both graphs captured
        check(*run(seed, True), seed)
    fwd = next(iter(tb._FWD_GRAPHS._graphs.values()))
    bwd = next(iter(tb._BWD_GRAPHS._graphs.values()))
    assert len(bwd.inputs) == 1 and all(x is y for x, y in zip(bwd.bound, (*fwd.inputs, *fwd.outputs)))
    assert bwd.pool_of is fwd and fwd.pool_of is None  # one memory pool for the two graphs
    first, second = run(83, True), run(84, True)  # two forwards, then their backwards in reverse
    check(*second, 84)
    check(*first, 83)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["1", "index", "shared"])
@pytest.mark.parametrize("batched", [False, True])
def test_gpu_cuda_graph_path_equals_eager(batched, mode, monkeypatch):
    """Short calls replay CUDA graphs (a shape's first call eager, the second captures, later
    ones replay), on fresh inputs every call: o, lse, dq, dk, dv as the eager kernels give them
    (to bf16 rounding: some kernels accumulate with fp32 atomics), outputs of an earlier call untouched by
    later replays, and a call whose lse is used (dLSE) falls back to the eager backward."""
    from moba_cp.ops.moba import api

    b, s, hq, hkv, d, blk, topk = (3, 2048, 4, 2, 64, 256, 3) if batched else (1, 4096, 4, 2, 128, 256, 3)
    cu = api.batch_cu_seqlens(b, s, torch.device("cuda")) if batched else None
    tb._FWD_GRAPHS.clear()
    tb._BWD_GRAPHS.clear()
    tb._INDEX_GRAPHS.clear()
    def toggle(graphed):
        monkeypatch.setenv("MOBA_CP_CUDA_GRAPHS", mode if graphed else "0")

    def tol(name):  # the forward may accumulate with fp32 atomics too: one bf16 ulp apart at most
        return dict(atol=1e-4, rtol=1e-4) if name == "lse" else dict(atol=2e-2, rtol=2e-2)

    kept = None
    for call in range(4):
        q, k, v = _inputs(b * s, hq, hkv, d, torch.bfloat16, seed=10 + call, device="cuda")
        do = torch.randn_like(q)
        dl = torch.randn(b * s, hq, device="cuda") if call == 3 else None
        kept = _graphed_and_eager_call(toggle, q, k, v, do, dl, dict(block_size=blk, topk=topk, cu_seqlens=cu,
                                                                     softmax_scale=d ** -0.5), tol, call, kept)
    graphs = {"1": (1, 1, 0), "index": (0, 0, 1), "shared": (1, 1, 0)}[mode]
    assert (len(tb._FWD_GRAPHS._graphs), len(tb._BWD_GRAPHS._graphs), len(tb._INDEX_GRAPHS._graphs)) == graphs
