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
from tests.test_moba_triton import _inputs, check_bf16_fwd_bwd

tb = pytest.importorskip("moba_cp.ops.moba.triton_backend")

T = 8192  # the fp64 oracle is O(T^2) in memory: 16K ran out of an 80 GB H100


@pytest.mark.gpu
@pytest.mark.parametrize("block", [256, 512, 1024, 2048, 4096])
def test_gpu_bf16_granularity_shapes(block):
    topk = max(1, T // block // 4)  # 75% of the blocks left out, as in the granularity sweep
    q, k, v = _inputs(T, 6, 6, 64, torch.bfloat16, seed=block, device="cuda")
    idx = naive.select_blocks(q, k, block_size=block, topk=topk)
    check_bf16_fwd_bwd(q, k, v, idx, block_size=block, cu_seqlens=None, softmax_scale=0.125)
