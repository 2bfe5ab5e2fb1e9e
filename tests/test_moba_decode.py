"""The MoBA decode op (queries continuing a cached sequence) equals the whole-sequence op at every
position: token by token, in prefill chunks that cross block boundaries, with running centroids,
for GQA, in fp64 (to rounding) and fp32; full-attention layers likewise."""

import os

import pytest
import torch
import torch.nn.functional as F

from moba_cp import moba_attn
from moba_cp.ops.moba import naive
from moba_cp.ops.moba.decode import BlockCentroids, causal_decode_attn, moba_decode_attn


def _qkv(b, t, hq, hkv, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, t, h, d, generator=g, dtype=dtype)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def _full_moba(q, k, v, block_size, topk):
    return torch.stack([moba_attn(q[i], k[i], v[i], block_size=block_size, topk=topk, backend="naive",
                                  return_lse=True)[0] for i in range(q.shape[0])])


@pytest.mark.parametrize("block_size,topk", [(8, 3), (8, 1), (5, 2), (8, 100)])
def test_token_by_token_equals_full_forward(block_size, topk):
    q, k, v = _qkv(2, 37, 4, 2, 16)
    ref = _full_moba(q, k, v, block_size, topk)
    cent = BlockCentroids(block_size)
    outs = []
    for t in range(q.shape[1]):  # the cache holds positions 0..t after appending token t
        c = cent.update(k[:, : t + 1])
        assert c.shape == (2, (t + 1) // block_size, 2, 16)
        outs.append(moba_decode_attn(q[:, t: t + 1], k[:, : t + 1], v[:, : t + 1], q_start=t,
                                     block_size=block_size, topk=topk, centroids=c))
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunks", [[11, 1, 9, 16], [1, 36], [37]])
def test_prefill_chunks_equal_full_forward_and_return_lse(chunks):
    q, k, v = _qkv(1, 37, 6, 3, 8, seed=1)
    ref_o, ref_lse = moba_attn(q[0], k[0], v[0], block_size=4, topk=3, backend="naive", return_lse=True)
    start, os_, lses = 0, [], []
    for n in chunks:
        o, lse = moba_decode_attn(q[:, start:start + n], k[:, :start + n], v[:, :start + n], q_start=start,
                                  block_size=4, topk=3, return_lse=True)
        os_.append(o)
        lses.append(lse)
        start += n
    torch.testing.assert_close(torch.cat(os_, 1)[0], ref_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(lses, 1)[0], ref_lse, rtol=1e-10, atol=1e-10)


def test_fp32_decode_matches_the_fp64_oracle_as_closely_as_the_fp32_forward():
    q, k, v = _qkv(1, 40, 4, 1, 32, seed=2)
    ref = _full_moba(q, k, v, 8, 3)
    # select in fp64 once so a near-tie cannot pick different blocks at fp32
    qf, kf, vf = q.float(), k.float(), v.float()
    full32 = _full_moba(qf, kf, vf, 8, 3)
    dec = torch.cat([moba_decode_attn(qf[:, t:t + 1], kf[:, :t + 1], vf[:, :t + 1], q_start=t, block_size=8, topk=3)
                     for t in range(40)], 1)
    err_full = (full32.double() - ref).abs().max()
    err_dec = (dec.double() - ref).abs().max()
    assert err_dec <= 4 * err_full + 1e-6, (err_dec, err_full)


def test_centroids_are_the_oracles_and_follow_a_cropped_cache():
    _, k, _ = _qkv(2, 30, 2, 2, 4, seed=3)
    cent = BlockCentroids(4)
    cent.update(k[:, :9])
    c = cent.update(k[:, :30])
    for i in range(2):
        torch.testing.assert_close(c[i], naive.block_centroids(k[i], 4), rtol=0, atol=0)
    c = cent.update(k[:, :13])  # cropped (e.g. assisted decoding rolled back)
    assert c.shape[1] == 3
    torch.testing.assert_close(c[0], naive.block_centroids(k[0, :13], 4), rtol=0, atol=0)


def test_a_cache_cropped_and_refilled_gets_fresh_centroids():
    """Rolled back from 12 keys to 7, then other keys at 7..11: blocks 1 and 2 are recomputed."""
    _, k, _ = _qkv(1, 12, 2, 2, 4, seed=6)
    _, other, _ = _qkv(1, 12, 2, 2, 4, seed=7)
    cent = BlockCentroids(4)
    cent.update(k)
    refilled = torch.cat([k[:, :7], other[:, 7:]], dim=1)
    c = cent.update(refilled[:, :8], unchanged_upto=7)
    torch.testing.assert_close(c[0], naive.block_centroids(refilled[0, :8], 4), rtol=0, atol=0)
    c = cent.update(refilled, unchanged_upto=8)
    torch.testing.assert_close(c[0], naive.block_centroids(refilled[0], 4), rtol=0, atol=0)


def test_causal_decode_equals_causal_sdpa():
    q, k, v = _qkv(2, 21, 4, 2, 8, seed=4)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    outs = [causal_decode_attn(q[:, :7], k[:, :7], v[:, :7], q_start=0)]
    outs += [causal_decode_attn(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], q_start=t) for t in range(7, 21)]
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-10, atol=1e-10)


def test_bad_cache_shape_names_the_rule():
    q, k, v = _qkv(1, 10, 4, 2, 8)
    with pytest.raises(ValueError, match="the cache including the new tokens"):
        moba_decode_attn(q[:, 5:], k[:, :7], v[:, :7], q_start=5, block_size=4, topk=2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
def test_triton_prefill_then_naive_decode_equals_full_forward():
    """The Triton op (interpreter on CPU) for the prefill, the decode op after it: the full forward."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.float().to(dev) for t in _qkv(1, 96, 2, 1, 16, seed=5))
    ref = moba_attn(q[0].double(), k[0].double(), v[0].double(), block_size=16, topk=2, backend="naive")
    pre = moba_attn(q[0, :70], k[0, :70], v[0, :70], block_size=16, topk=2, backend="triton")
    cent = BlockCentroids(16)
    dec = [moba_decode_attn(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], q_start=t, block_size=16, topk=2,
                            centroids=cent.update(k[:, :t + 1]))[0] for t in range(70, 96)]
    out = torch.cat([pre, *dec])
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=1e-4, atol=1e-4)
