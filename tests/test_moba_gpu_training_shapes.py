"""GPU: the Triton kernels at the shapes the `small` experiments train with (d=64, 6 heads, 75%
sparsity, block 256 ... 4096), forward and backward against the naive oracle at bf16.

The granularity sweep crosses the forward's two code paths (two-pass below block 2048, one-pass
from 2048 up); the interpreter tests cover both at toy sizes, this covers them compiled, at
the real block sizes, with the causal own block and several full past blocks.
"""

from __future__ import annotations

import pytest
import torch

from moba_cp.ops.moba import naive
from tests.moba_triton_helpers import _inputs, check_bf16_fwd_bwd, tb

T = 8192  # the fp64 oracle is O(T^2) in memory: 16K ran out of an 80 GB H100


@pytest.mark.gpu
@pytest.mark.parametrize("block", [256, 512, 1024, 2048, 4096])
def test_gpu_bf16_granularity_shapes(block):
    topk = max(1, T // block // 4)  # 75% of the blocks left out, as in the granularity sweep
    q, k, v = _inputs(T, 6, 6, 64, torch.bfloat16, seed=block, device="cuda")
    idx = naive.select_blocks(q, k, block_size=block, topk=topk)
    check_bf16_fwd_bwd(q, k, v, idx, block_size=block, cu_seqlens=None, softmax_scale=0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [{"gather_rows": False}, {"gather_rows": True}, {"gather_rows": True, "tma": True}],
                         ids=["index-rows", "gathered-rows", "gathered-rows-tma"])
def test_gpu_bf16_training_shape_backward_variants(variant):
    """The recipes' head shape (d=64, 16/4 heads, block 512, top-k 3, two documents) through the
    shape's default tiling with the dK/dV mask split: rows looked up through the index, copied in
    bucket order (``gather_rows``, one KV head per chunk), and those copies read through tensor
    descriptors (``tma``), against the naive oracle at bf16."""
    from moba_cp.ops.moba.triton_config import choose_config

    docs = [2500, 1596]
    cu = torch.tensor([0, docs[0], sum(docs)], dtype=torch.int32, device="cuda")
    q, k, v = _inputs(sum(docs), 16, 4, 64, torch.bfloat16, seed=7, device="cuda")
    idx = naive.select_blocks(q, k, block_size=512, topk=3, cu_seqlens=cu)
    cfg = choose_config(512, 64, 4, sum(docs))
    assert cfg.bwd.split_mask
    cfg = cfg.replace(bwd={"tma": False, **variant, "dq_chunk_bytes": 1})

    def block_attn(*args, **kw):
        return tb.block_attn(*args, config=cfg, **kw)

    check_bf16_fwd_bwd(q, k, v, idx, block_size=512, cu_seqlens=cu, softmax_scale=0.125, fn=block_attn)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "kv-head-chunks"])
def test_gpu_bf16_training_shape_default_tiling(chunk_bytes):
    """The tiling a training call gets on this GPU (with TMA: dQ fused by bulk reductions into
    the bucket-order copy, computed transposed; the sub-tiles adjacent in the grid), whole and in
    chunks of one KV head, at the recipes' head shape against the naive oracle at bf16."""
    from moba_cp.ops.moba.triton_config import device_has_tma

    docs = [2500, 1596]
    cu = torch.tensor([0, docs[0], sum(docs)], dtype=torch.int32, device="cuda")
    q, k, v = _inputs(sum(docs), 16, 4, 64, torch.bfloat16, seed=11, device="cuda")
    idx = naive.select_blocks(q, k, block_size=512, topk=3, cu_seqlens=cu)
    cfg = tb.call_config(q, k, 512)
    assert cfg.bwd.sub_major and cfg.bwd.tma_dq == cfg.bwd.dq_rows == device_has_tma(q.device)
    if chunk_bytes:
        cfg = cfg.replace(bwd={"dq_chunk_bytes": chunk_bytes})

    def block_attn(*args, **kw):
        return tb.block_attn(*args, config=cfg, **kw)

    check_bf16_fwd_bwd(q, k, v, idx, block_size=512, cu_seqlens=cu, softmax_scale=0.125, fn=block_attn)
