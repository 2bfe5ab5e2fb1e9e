"""Every validation error of the public op is reached, and names the value and the rule."""

import pytest
import torch

from moba_cp import moba_attn, moba_attn_bshd
from moba_cp.ops.moba.api import choose_backend


def _qkv(T=32, hq=4, hkv=2, d=8, dtype=torch.float32):
    return torch.randn(T, hq, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype)


def call(q, k, v, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("topk", 2)
    kw.setdefault("backend", "naive")
    return moba_attn(q, k, v, **kw)


@pytest.mark.parametrize(
    "mutate,kw,exc,pattern",
    [
        (lambda q, k, v: (q[None], k, v), {}, ValueError, r"q has shape \(1, 32, 4, 8\).*expected 3 dims"),
        (lambda q, k, v: (q, k[:30], v[:30]), {}, ValueError, "q has 32 tokens but k/v have 30"),
        (lambda q, k, v: (q, k, v[:, :1]), {}, ValueError, r"k has shape .* but v has"),
        (lambda q, k, v: (q, k[..., :4], v[..., :4]), {}, ValueError, "head dim 8 differs"),
        (lambda q, k, v: (q[:, :3], k, v), {}, ValueError, "Hq=3 .* not divisible by Hkv=2"),
        (lambda q, k, v: (q.half(), k, v), {}, TypeError, "dtypes differ"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), {}, TypeError, "q.dtype is torch.int32"),
        (lambda q, k, v: (q, k.to("meta"), v.to("meta")), {}, ValueError, "different devices"),
        (lambda q, k, v: (q, k, v), {"block_size": 0}, ValueError, "block_size=0 is invalid"),
        (lambda q, k, v: (q, k, v), {"block_size": 8.0}, ValueError, "block_size=8.0 is invalid"),
        (lambda q, k, v: (q, k, v), {"topk": 0}, ValueError, "topk=0 is invalid"),
        (lambda q, k, v: (q, k, v), {"cu_seqlens": torch.tensor([0, 32])}, TypeError, "must be torch.int32"),
        (lambda q, k, v: (q, k, v), {"cu_seqlens": torch.tensor([1, 32], dtype=torch.int32)}, ValueError,
         r"cu_seqlens\[0\] = 1"),
        (lambda q, k, v: (q, k, v), {"cu_seqlens": torch.tensor([0, 20, 10, 32], dtype=torch.int32)}, ValueError,
         "decreases at index 2"),
        (lambda q, k, v: (q, k, v), {"cu_seqlens": torch.tensor([0, 30], dtype=torch.int32)}, ValueError,
         r"cu_seqlens\[-1\] = 30 but q holds T=32"),
        (lambda q, k, v: (q, k, v), {"cu_seqlens": torch.tensor([[0, 32]], dtype=torch.int32)}, ValueError,
         "expected 1-D"),
        (lambda q, k, v: (q, k, v), {"backend": "cuda-magic"}, ValueError, "backend='cuda-magic' is unknown"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, kw, exc, pattern):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc, match=pattern):
        call(q, k, v, **kw)


def test_topk_larger_than_blocks_is_valid():
    q, k, v = _qkv()
    assert call(q, k, v, topk=1000).shape == q.shape


def test_explicit_unavailable_backend_is_an_error_not_a_fallback():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="backend='flash' was requested but is unavailable"):
        call(q, k, v, backend="flash")


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA device"):
        choose_backend("triton", torch.device("cpu"))


def test_auto_picks_naive_on_cpu_and_says_so(caplog):
    import logging

    from moba_cp.ops.moba import api

    api._announced.clear()
    with caplog.at_level(logging.INFO, logger="moba_cp.ops.moba.api"):
        assert choose_backend("auto", torch.device("cpu")) == "naive"
    assert "chose 'naive'" in caplog.text


def test_bshd_wrapper_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="expected 4-D"):
        moba_attn_bshd(q, k, v, block_size=8, topk=2)
    with pytest.raises(ValueError, match="cu_seqlens is built from the batch"):
        moba_attn_bshd(q[None], k[None], v[None], block_size=8, topk=2, cu_seqlens=None)
