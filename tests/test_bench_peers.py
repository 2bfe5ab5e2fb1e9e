"""The benchmark peers (``benchmarks/peers.py``) compute MoBA attention on our block selection.

Checked against the naive oracle ``moba_cp.ops.moba.naive.block_attn`` fed the same indices, at
awkward shapes (T not a multiple of the block or of the flex tile, two documents, GQA):

- FlexAttention: the dense mask its ``mask_mod`` implies equals the naive op's selection mask;
  its ``BlockMask`` tiles cover every tile with an allowed key and its "full" tiles hold only
  allowed keys; eager forward (output, LSE) and compiled forward (``torch.compile``, which on
  CPU uses the block sparsity) match. Flex refuses backward on CPU ("does not support backward
  on CPU"; compiled CPU flex is inference-only); the gradient test bypasses that device check
  and runs flex's eager (math) backward, which checks the mask construction's gradients, not
  flex's GPU backward kernel.
- FLA NSA (``fla.ops.nsa.parallel``, fla-core 0.6.0): runs under the Triton interpreter with two
  shims (``peers.fla_interpreter_shims``: one autotune config, since the interpreter has no
  benchmarker; ``__index__`` of interpreter scalars under numpy 2), compared with group-shared
  indices, output and gradients.
  Skipped when fla-core (or its dependency einops) is not importable.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from moba_cp.ops.moba import naive

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import peers  # noqa: E402

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")

T, HQ, HKV, D, BLOCK, TOPK = 100, 4, 2, 16, 16, 3
CU = torch.tensor([0, 45, 100], dtype=torch.int32)  # two documents, neither a multiple of the block


def _inputs(t, hq, hkv, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, hq, d, generator=g, dtype=dtype), torch.randn(t, hkv, d, generator=g, dtype=dtype),
            torch.randn(t, hkv, d, generator=g, dtype=dtype))


def _naive_mask(idx, cu, block):
    t, hq, _ = idx.shape
    m = torch.zeros(hq, t, t, dtype=torch.bool)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        pos = torch.arange(e - s)
        m[:, s:e, s:e] = naive._allowed_mask(idx[s:e], pos, pos, block).permute(1, 0, 2)
    return m


@pytest.fixture(scope="module")
def case():
    q, k, v = _inputs(T, HQ, HKV, D)
    idx = naive.select_blocks(q, k, block_size=BLOCK, topk=TOPK, cu_seqlens=CU)
    return q, k, v, idx


def test_flex_mask_mod_equals_naive_selection(case):
    _, _, _, idx = case
    assert torch.equal(peers.flex_moba_dense_mask(idx, CU, BLOCK), _naive_mask(idx, CU, BLOCK))
    # One document, no cu_seqlens.
    q, k, _ = _inputs(70, HQ, HKV, D, seed=1)
    idx1 = naive.select_blocks(q, k, block_size=BLOCK, topk=TOPK)
    cu1 = torch.tensor([0, 70], dtype=torch.int32)
    assert torch.equal(peers.flex_moba_dense_mask(idx1, None, BLOCK), _naive_mask(idx1, cu1, BLOCK))


@pytest.mark.parametrize("tile", [8, 16, 32])
def test_flex_block_mask_tiles(case, tile):
    """Partial + full tiles cover every tile holding an allowed key; full tiles hold only allowed keys."""
    _, _, _, idx = case
    partial, full = peers.flex_moba_tiles(idx, CU, BLOCK, tile)
    n = -(-T // tile)
    assert partial.shape == full.shape == (HQ, n, n)
    assert not (partial & full).any()
    dense = torch.zeros(HQ, n * tile, n * tile, dtype=torch.bool)
    dense[:, :T, :T] = _naive_mask(idx, CU, BLOCK)
    needed = dense.view(HQ, n, tile, n, tile).any(4).any(2)
    assert not (needed & ~(partial | full)).any(), "a tile with allowed keys is missing from the BlockMask"
    rows_valid = dense.clone()
    rows_valid[:, T:, :] = True  # padded queries of the last tile do not matter
    all_allowed = rows_valid.view(HQ, n, tile, n, tile).all(4).all(2)
    assert not (full & ~all_allowed).any(), "a 'full' tile holds a masked key"
    if tile == 8:
        assert full.any()  # the full-tile path is exercised
    # No tile after the query tile (causal).
    assert not torch.triu(partial | full, diagonal=1).any()


def test_flex_forward_eager_matches_naive(case):
    q, k, v, idx = case
    scale = D ** -0.5
    bm = peers.flex_moba_block_mask(idx, CU, BLOCK, tile=16)
    o, lse = peers.flex_moba_attn(peers.to_bhsd(q), peers.to_bhsd(k), peers.to_bhsd(v), bm,
                                  softmax_scale=scale, compiled=False, return_lse=True)
    on, ln = naive.block_attn(q, k, v, idx, block_size=BLOCK, cu_seqlens=CU, softmax_scale=scale)
    torch.testing.assert_close(o[0].transpose(0, 1), on, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[0].transpose(0, 1), ln, atol=2e-5, rtol=2e-5)


def test_flex_forward_compiled_matches_naive(case):
    """Compiled flex on CPU (inductor's C++ flex template, which reads the BlockMask's tiles)."""
    q, k, v, idx = case
    scale = D ** -0.5
    bm = peers.flex_moba_block_mask(idx, CU, BLOCK, tile=16)
    try:
        o = peers.flex_moba_attn(peers.to_bhsd(q), peers.to_bhsd(k), peers.to_bhsd(v), bm,
                                 softmax_scale=scale, compiled=True)
    except Exception as e:  # no C++ compiler, or this torch cannot compile flex on CPU
        pytest.skip(f"compiled FlexAttention does not run on this CPU setup: {type(e).__name__}: {str(e)[:200]}")
    on, _ = naive.block_attn(q, k, v, idx, block_size=BLOCK, cu_seqlens=CU, softmax_scale=scale)
    torch.testing.assert_close(o[0].transpose(0, 1), on, atol=2e-5, rtol=2e-5)


def test_flex_gradients_match_naive(case, monkeypatch):
    q, k, v, idx = case
    scale = D ** -0.5
    # Flex refuses requires_grad inputs on CPU; its eager (math) path has a backward: use it.
    monkeypatch.setattr(flex_mod, "_validate_device", lambda *a, **kw: None)
    bm = peers.flex_moba_block_mask(idx, CU, BLOCK, tile=16)
    do = torch.randn(T, HQ, D, generator=torch.Generator().manual_seed(7))
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    of = peers.flex_moba_attn(peers.to_bhsd(qf), peers.to_bhsd(kf), peers.to_bhsd(vf), bm,
                              softmax_scale=scale, compiled=False)
    gf = torch.autograd.grad(of[0].transpose(0, 1), (qf, kf, vf), do)
    qn, kn, vn = (x.clone().requires_grad_() for x in (q, k, v))
    on, _ = naive.block_attn(qn, kn, vn, idx, block_size=BLOCK, cu_seqlens=CU, softmax_scale=scale)
    gn = torch.autograd.grad(on, (qn, kn, vn), do)
    for name, a, b in zip(("dq", "dk", "dv"), gf, gn):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------
# FLA NSA
# ------------------------------------------------------------------------------------------

def test_fla_group_indices():
    idx = torch.tensor([[[0, 1, -1], [2, 3, -1], [4, -1, -1], [5, 6, 7]]], dtype=torch.int32).expand(6, 4, 3)
    bi = peers.fla_group_indices(idx.contiguous(), hkv=2, batch=2)
    assert bi.shape == (2, 3, 2, 4)
    assert bi[0, 0, 0].tolist() == [0, 1, -1, -1] and bi[0, 0, 1].tolist() == [4, -1, -1, -1]
    back = peers.fla_shared_to_heads(bi, hq=4)
    assert back.shape == (6, 4, 4) and back[0, 1].tolist() == [0, 1, -1, -1]
    assert peers.fla_shape_reason(16, 16, 128, 128) is not None  # MHA: group 1
    assert peers.fla_shape_reason(32, 8, 128, 512) is not None  # group 4
    assert peers.fla_shape_reason(16, 1, 128, 128) is None
    assert peers.fla_shape_reason(16, 1, 128, 96) is not None  # block not a power of 2


@pytest.fixture
def fla_interpreted(monkeypatch):
    reason = peers.fla_unavailable_reason()
    if reason is not None:
        pytest.skip(f"skipped: {reason} (pip install .whl/fla_core-0.6.0-py3-none-any.whl einops)")
    if torch.cuda.is_available():
        yield
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    importlib.import_module("fla.ops.nsa.parallel")
    restore = peers.fla_interpreter_shims()
    yield
    restore()


@pytest.mark.parametrize("batch,s", [(1, 50), (2, 40)])
def test_fla_nsa_matches_naive_shared_indices(fla_interpreted, batch, s):
    importlib.import_module("fla.ops.nsa.parallel")
    hq, hkv, d, block, topk = 16, 1, 16, 16, 3  # FLA needs Hq/Hkv a power of 2 >= 16
    t = batch * s
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.to(dev) for x in _inputs(t, hq, hkv, d, seed=3))
    cu = torch.arange(0, t + 1, s, dtype=torch.int32, device=dev)
    idx = naive.select_blocks(q, k, block_size=block, topk=topk, cu_seqlens=cu)
    bi = peers.fla_group_indices(idx, hkv, batch)
    assert bi.shape[-1] == 4  # W = 3 padded to a power of 2
    shared = peers.fla_shared_to_heads(bi, hq)
    scale = d ** -0.5
    do = torch.randn(t, hq, d, generator=torch.Generator().manual_seed(5)).to(dev)

    qf, kf, vf = (x.clone().reshape(batch, s, *x.shape[1:]).requires_grad_() for x in (q, k, v))
    of = peers.fla_nsa_attn(qf, kf, vf, bi, block_size=block, softmax_scale=scale)
    gf = torch.autograd.grad(of, (qf, kf, vf), do.reshape(batch, s, hq, d))
    qn, kn, vn = (x.clone().requires_grad_() for x in (q, k, v))
    on, _ = naive.block_attn(qn, kn, vn, shared, block_size=block, cu_seqlens=cu, softmax_scale=scale)
    gn = torch.autograd.grad(on, (qn, kn, vn), do)
    torch.testing.assert_close(of.reshape(t, hq, d), on, atol=1e-4, rtol=1e-4)
    for name, a, b in zip(("dq", "dk", "dv"), gf, gn):
        torch.testing.assert_close(a.reshape(b.shape), b, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
