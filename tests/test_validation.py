"""Every validation error of the public op is reached, and names the value and the rule."""

import gc
import logging
import re
import weakref

import pytest
import torch

from moba_cp import moba_attn, moba_attn_bshd
from moba_cp.config import RecipeError, load_recipe
from moba_cp.ops.moba import api, validate
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


def test_explicit_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="backend='triton' was requested but is unavailable"):
        call(q, k, v, backend="triton")


def test_no_flash_backend_is_offered():
    """There is no flash-attn MoBA backend: neither the op nor the recipe schema accepts one."""
    assert api.BACKENDS == ("naive", "triton")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend='flash' is unknown; choose one of 'naive', 'triton' or 'auto'"):
        call(q, k, v, backend="flash")
    with pytest.raises(RecipeError, match="moba.backend"):
        load_recipe("recipes/quickstart.yaml", ["--moba.backend=flash"])


def test_cu_seqlens_value_check_is_cached_per_tensor_object():
    """The host-side value check runs once per tensor and version, keyed by the tensor itself
    (not its id(), which a later tensor may reuse): the entry dies with the tensor."""
    q, k, v = _qkv()
    gc.collect()  # other tests' dead tensors leave the cache now, not in the middle of this test
    before = len(validate._VALIDATED)
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    call(q, k, v, cu_seqlens=cu)
    assert cu in validate._VALIDATED and len(validate._VALIDATED) == before + 1
    cu[1] = 40  # modified in place: the cached verdict no longer holds, the values are read again
    with pytest.raises(ValueError, match="decreases at index 2"):
        call(q, k, v, cu_seqlens=cu)
    alive = weakref.ref(cu)
    del cu
    gc.collect()
    assert alive() is None, "the cache keeps the tensor alive"
    assert len(validate._VALIDATED) <= before  # and its entry went with it


def test_batched_calls_share_one_offsets_tensor_so_the_host_reads_it_once():
    """The batched forms (``moba_attn_bshd``, Megatron's ``[s, b, h, d]`` with b > 1, CP on whole
    sequences) pack rows as documents. A fresh offsets tensor per call would be value-checked on
    the host (a device sync) in every layer; one cached tensor per shape is checked once."""
    cpu = torch.device("cpu")
    cu = api.batch_cu_seqlens(3, 16, cpu)
    assert cu is api.batch_cu_seqlens(3, 16, cpu) and cu.tolist() == [0, 16, 32, 48]
    q = torch.randn(3, 16, 4, 8)
    kv = torch.randn(3, 16, 2, 8)
    moba_attn_bshd(q, kv, kv, block_size=4, topk=2, backend="naive")
    assert validate._VALIDATED.get(cu) == (cu._version, 48)
    reads = []
    orig = torch.Tensor.tolist

    def counting_tolist(t):
        if t is cu:
            reads.append(1)
        return orig(t)

    torch.Tensor.tolist = counting_tolist
    try:
        for _ in range(3):  # what every later layer's call does before its kernels
            validate.check_cu_seqlens(api.batch_cu_seqlens(3, 16, cpu), 48, cpu)
    finally:
        torch.Tensor.tolist = orig
    assert reads == [], "the cached offsets were read on the host again"


@pytest.mark.parametrize("layouts,q_shape,kv_shape,pattern", [
    (("[s, b, H, D]",), (8, 2, 4, 16), (8, 2, 3, 16), "Hq=4 query heads is not divisible by Hkv=3"),
    (("[s, b, H, D]",), (8, 2, 4, 16), (8, 1, 2, 16), r"q has leading dims \(8, 2\) but k/v have \(8, 1\)"),
    (("[s, b, H, D]",), (8, 4, 16), (8, 2, 16), r"expected 4 dims \[s, b, H, D\]. Fix: pass"),
    (("[S, H, D]", "[b, S, H, D]"), (2, 8, 4, 16), (2, 8, 2, 8), "head dim 16 differs from k/v head dim 8"),
])
def test_qkv_rules_for_other_layouts(layouts, q_shape, kv_shape, pattern):
    """The same rules serve callers with other layouts (Megatron's [s, b, H, D], batched CP)."""
    q, k = torch.randn(q_shape), torch.randn(kv_shape)
    err = validate.qkv_error(q, k, k.clone(), op="caller", layouts=layouts)
    assert isinstance(err, ValueError) and re.search(pattern, str(err)), err
    assert str(err).startswith("caller: ")
    with pytest.raises(ValueError, match=pattern):
        validate.check_qkv(q, k, k.clone(), op="caller", layouts=layouts)
    q_ok = torch.randn(8, 2, 4, 16) if q.dim() == 3 else q  # every case's layouts take 4-D tensors
    k_ok = torch.randn(*q_ok.shape[:-2], 2, q_ok.shape[-1])
    assert validate.qkv_error(q_ok, k_ok, k_ok, layouts=layouts) is None


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA device"):
        choose_backend("triton", torch.device("cpu"))


def test_auto_picks_naive_on_cpu_and_says_so_once(caplog):
    api._announced.clear()
    with caplog.at_level(logging.INFO, logger="moba_cp.ops.moba.api"):
        assert choose_backend("auto", torch.device("cpu")) == "naive"
        assert choose_backend("auto", torch.device("cpu")) == "naive"
    assert caplog.text.count("chose 'naive'") == 1


def test_bshd_wrapper_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="expected 4-D"):
        moba_attn_bshd(q, k, v, block_size=8, topk=2)
    with pytest.raises(ValueError, match="cu_seqlens is built from the batch"):
        moba_attn_bshd(q[None], k[None], v[None], block_size=8, topk=2, cu_seqlens=None)


@pytest.mark.parametrize("make,pattern", [
    (lambda q, k, v: (q, k.double(), v), r"^moba_attn_cp: q, k, v dtypes differ"),
    (lambda q, k, v: (q[0], k, v), r"^moba_attn_cp: q, k, v have 3, 4, 4 dims"),
    (lambda q, k, v: (q[0, :, 0], k, v),
     r"^moba_attn_cp: q has shape \(8, 16\) \(2 dims\); expected 3 or 4 dims \[S_local, H, D\] or \[batch, S_local"),
    (lambda q, k, v: (q, k[:1], v[:1]), r"^moba_attn_cp: q has leading dims \(2, 8\) but k/v have \(1, 8\)"),
    (lambda q, k, v: (q, torch.randn(2, 8, 3, 16), torch.randn(2, 8, 3, 16)),
     r"^moba_attn_cp: Hq=4 query heads is not divisible by Hkv=3"),
    (lambda q, k, v: (q[:, :7], k[:, :7], v[:, :7]), r"^the local shard has S_local=7 tokens"),
])
def test_cp_shard_checks_are_the_ops_rules(make, pattern):
    """The CP ops check a rank's shard with the op's own rules (validate.qkv_error), worded the
    same, for one sequence [S_local, H, D] and a batch [batch, S_local, H, D]."""
    from moba_cp.parallel.exchange import shard_problem

    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    assert shard_problem(q, k, v, "moba_attn_cp") is None and shard_problem(q[0], k[0], v[0], "moba_attn_cp") is None
    msg = shard_problem(*make(q, k, v), "moba_attn_cp")
    assert msg is not None and re.search(pattern, msg), msg
