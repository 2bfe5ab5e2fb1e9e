"""The fused RoPE kernel (Triton; the interpreter on CPU) against its torch oracle and Megatron's own
unfused RoPE: outputs and gradients at awkward shapes, strided inputs, the table cache, bad input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd  # noqa: E402

from moba_cp.ops.rope import apply_rope, rope_reference, rope_tables  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter


def _freqs(s: int, r: int, *, general: bool = False, base: float = 10000.0, start: int = 0) -> torch.Tensor:
    """Megatron's angle table ``[S, 1, 1, R]`` (``cat(f, f)``), or with ``general`` two different
    halves, which makes the backward's transpose (``s2`` on ``g1``, ``s1`` on ``g2``) matter."""
    inv = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    f = torch.outer(torch.arange(start, start + s, dtype=torch.float32), inv)
    second = f * 1.37 + 0.5 if general else f
    return torch.cat((f, second), dim=-1)[:, None, None, :].to(DEV)


def _check_fwd_bwd(t: torch.Tensor, freqs: torch.Tensor, atol: float, rtol: float) -> None:
    a = t.detach().clone().requires_grad_(True)
    b = t.detach().clone().requires_grad_(True)
    cos, sin = rope_tables(freqs)
    y = apply_rope(a, cos, sin)
    y_ref = rope_reference(b, freqs)
    assert y.shape == t.shape and y.dtype == t.dtype and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV, t.dtype)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("s,b,h,d,r", [(1, 1, 1, 2, 2), (37, 2, 3, 24, 24), (129, 1, 5, 64, 64),
                                       (33, 3, 2, 40, 16)])  # r < d: channels past R pass through
@pytest.mark.parametrize("general", [False, True])
def test_rope_equals_oracle_fp32(s, b, h, d, r, general):
    t = torch.randn(s, b, h, d, generator=torch.Generator().manual_seed(0)).to(DEV)
    _check_fwd_bwd(t, _freqs(s, r, general=general, base=500000.0), atol=1e-5, rtol=1e-5)


def test_rope_fp16_and_strided_query_view():
    # Megatron's query is a view of the fused QKV projection: [S, B, Hkv, (G + 2) * D] split on the last dim
    s, b, hkv, g, d = 45, 2, 2, 3, 32
    mixed = torch.randn(s, b, hkv, (g + 2) * d, generator=torch.Generator().manual_seed(2)).to(DEV, torch.float16)
    q = mixed[..., : g * d].view(s, b, hkv, g, d).reshape(s, b, hkv * g, d)  # a copy only if needed
    k = mixed[..., g * d:(g + 1) * d]  # strided view: stride(2) != d
    assert not k.is_contiguous()
    f = _freqs(s, d, start=1000)
    for t in (q, k):
        _check_fwd_bwd(t, f, atol=2e-3, rtol=2e-3)


def test_rope_matches_megatron_unfused_fp32():
    s, b, h, d = 50, 2, 4, 32
    t = torch.randn(s, b, h, d, generator=torch.Generator().manual_seed(3)).to(DEV)
    f = _freqs(s, d, base=500000.0, start=70000)  # large angles, as at long context
    a = t.clone().requires_grad_(True)
    m = t.clone().requires_grad_(True)
    y = apply_rope(a, *rope_tables(f))
    y_m = _apply_rotary_pos_emb_bshd(m, f)
    torch.testing.assert_close(y, y_m, atol=1e-5, rtol=1e-5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    y.backward(g)
    y_m.backward(g)
    torch.testing.assert_close(a.grad, m.grad, atol=1e-5, rtol=1e-5)


def test_rope_non_contiguous_upstream_gradient():
    s, b, h, d = 19, 2, 3, 16
    t = torch.randn(s, b, h, d, generator=torch.Generator().manual_seed(5)).to(DEV).requires_grad_(True)
    f = _freqs(s, d, general=True)
    y = apply_rope(t, *rope_tables(f))
    g_wide = torch.randn(s, b, h, 2 * d, generator=torch.Generator().manual_seed(6)).to(DEV)
    (y * g_wide[..., ::2]).sum().backward()  # autograd hands the kernel a stride-2 gradient
    r = t.detach().clone().requires_grad_(True)
    (rope_reference(r, f) * g_wide[..., ::2]).sum().backward()
    torch.testing.assert_close(t.grad, r.grad, atol=1e-5, rtol=1e-5)


def test_rope_tables_are_cached_per_tensor_and_version():
    f = _freqs(8, 8)
    c1, s1 = rope_tables(f)
    assert rope_tables(f)[0] is c1  # the same tensor: made once
    f2 = f.clone()
    c2, _ = rope_tables(f2)
    assert c2 is not c1 and torch.equal(c2, c1)  # another tensor: its own tables
    f2.mul_(2.0)  # rewritten in place: the version moves, the tables are made again
    c3, _ = rope_tables(f2)
    assert not torch.equal(c3, c1)
    torch.testing.assert_close(c3, torch.cos(f2.reshape(8, 8)))


def test_rope_under_inference_mode():
    # inference tensors have no version counter: their tables are made per call, never cached
    with torch.inference_mode():
        s, d = 6, 8
        t = torch.randn(s, 1, 2, d).to(DEV)
        f = _freqs(s, d, general=True)
        y = apply_rope(t, *rope_tables(f))
        f.mul_(0.5)  # rewritten in place, untracked
        y2 = apply_rope(t, *rope_tables(f))
    torch.testing.assert_close(y, rope_reference(t, f * 2.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, rope_reference(t, f), atol=1e-5, rtol=1e-5)


def test_rope_refuses_bad_input():
    t = torch.randn(4, 1, 2, 8).to(DEV)
    cos, sin = rope_tables(_freqs(4, 8))
    with pytest.raises(ValueError, match=r"\[S, B, H, D\]"):
        apply_rope(t[0], cos, sin)
    with pytest.raises(ValueError, match="S = 5"):
        apply_rope(torch.randn(5, 1, 2, 8).to(DEV), cos, sin)
    with pytest.raises(ValueError, match="at most the head dim"):
        apply_rope(torch.randn(4, 1, 2, 4).to(DEV), cos, sin)
    with pytest.raises(ValueError, match="fp32"):
        apply_rope(t, cos.double(), sin.double())
    with pytest.raises(ValueError, match=r"\[S, 1, 1, R\]"):
        rope_tables(torch.zeros(4, 2, 1, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("s,h,d", [(4096, 16, 64), (1000, 6, 64), (333, 8, 128)])
def test_gpu_rope_bf16_close_to_megatron(s, h, d):
    t = torch.randn(s, 1, h, d, device="cuda", dtype=torch.bfloat16)
    f = _freqs(s, d, base=500000.0)
    a = t.clone().requires_grad_(True)
    m = t.clone().requires_grad_(True)
    r = t.clone().requires_grad_(True)
    y, y_m, y_r = apply_rope(a, *rope_tables(f)), _apply_rotary_pos_emb_bshd(m, f), rope_reference(r, f)
    # the same fp32 math rounded once; the GPU kernel contracts products into FMAs, so a value next
    # to a rounding boundary may land one bf16 step away (seen on an H100)
    torch.testing.assert_close(y, y_r, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(y, y_m, atol=2e-2, rtol=2e-2)  # Megatron rounds every product to bf16
    g = torch.randn_like(y)
    for out in (y, y_m, y_r):
        out.backward(g)
    torch.testing.assert_close(a.grad, r.grad, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(a.grad, m.grad, atol=3e-2, rtol=3e-2)
