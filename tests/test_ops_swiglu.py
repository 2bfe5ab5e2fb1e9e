"""The fused SwiGLU (Triton; under the interpreter on CPU) against its torch oracle and against
Megatron-Core's unfused math: outputs and gradients at ragged shapes, strided inputs, extreme values,
and the errors. bf16 only on a GPU (the interpreter's bf16 arithmetic is unreliable)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from moba_cp.ops.swiglu import swiglu, swiglu_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
# fp16: a couple of ulps (both sides round the same fp32 value once); fp32: exp/div differences only
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-4),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


def _rand(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 2).to(dtype).to(DEV)


def _fused_and_ref(x, dy):
    """(y, dx) of the fused op and of the oracle for the same x and upstream gradient."""
    xf = x.detach().clone().requires_grad_(True)
    y = swiglu(xf)
    (dx,) = torch.autograd.grad(y, xf, dy)
    xr = x.detach().clone().requires_grad_(True)
    yr = swiglu_reference(xr)
    (dxr,) = torch.autograd.grad(yr, xr, dy)
    return y, dx, yr, dxr


def _assert_matches(x, dy):
    y, dx, yr, dxr = _fused_and_ref(x, dy)
    f = x.shape[-1] // 2
    assert y.shape == (*x.shape[:-1], f) and y.dtype == x.dtype and y.is_contiguous()
    assert dx.shape == x.shape and dx.dtype == x.dtype
    torch.testing.assert_close(y, yr, **TOL[x.dtype])
    torch.testing.assert_close(dx, dxr, **TOL[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 48), (7, 2000), (129, 5632), (3, 5, 48), (2, 3, 2000)],
                         ids=["1x24", "7x1000", "129x2816", "3d-24", "3d-1000"])
def test_matches_reference(shape, dtype):
    x = _rand(*shape, dtype=dtype)
    dy = _rand(*shape[:-1], shape[-1] // 2, dtype=dtype, seed=1)
    _assert_matches(x, dy)


def test_equals_megatron_unfused_fp32():
    # Megatron-Core without TE: torch.chunk, F.silu, multiply (and autograd through them), in fp32.
    x = _rand(7, 2000)
    dy = _rand(7, 1000, seed=1)
    xf = x.clone().requires_grad_(True)
    y = swiglu(xf)
    (dx,) = torch.autograd.grad(y, xf, dy)
    xm = x.clone().requires_grad_(True)
    a, b = torch.chunk(xm, 2, -1)
    ym = F.silu(a) * b
    (dxm,) = torch.autograd.grad(ym, xm, dy)
    torch.testing.assert_close(y, ym, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dx, dxm, rtol=1e-5, atol=1e-6)  # 1 + a(1 - s) cancels near a = -1.28


@pytest.mark.parametrize("layout", ["row-strided", "transposed", "last-dim-strided"])
def test_strided_x(layout):
    s, b, f = 5, 3, 24
    if layout == "row-strided":  # last dim stride 1, rows 4F apart: a view, the kernel reads strides
        x = _rand(s, b, 4 * f)[..., : 2 * f]
    elif layout == "transposed":  # leading dims not mergeable: reshape copies
        x = _rand(b, s, 2 * f).transpose(0, 1)
    else:  # last dim not unit stride: made contiguous
        x = _rand(2 * f, b, s).permute(2, 1, 0)
    assert not x.is_contiguous()
    _assert_matches(x, _rand(s, b, f, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_upstream_gradient(dtype):
    s, b, f = 4, 3, 1000
    x = _rand(s, b, 2 * f, dtype=dtype)
    permuted = _rand(f, b, s, dtype=dtype, seed=1).permute(2, 1, 0)  # last-dim stride s
    sliced = _rand(s, b, 2 * f, dtype=dtype, seed=2)[..., f:]  # unit stride, rows 2F apart
    for dy in (permuted, sliced):
        assert not dy.is_contiguous()
        _assert_matches(x, dy)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter: exp(100) = inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_inputs_are_finite_and_exact(dtype):
    f = 24
    a = torch.tensor([100.0, -100.0, 0.0, -0.0, 30.0, -30.0, 1.0, -1.0] * 3)
    b = torch.linspace(-3, 3, f)
    x = torch.cat([a, b]).expand(4, 2 * f).clone().to(dtype).to(DEV)
    x[1, f:] = 100.0  # large linear half too
    x[2, :f] = 0.0
    dy = _rand(4, f, dtype=dtype, seed=3)
    y, dx, yr, dxr = _fused_and_ref(x, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y, yr, **TOL[dtype])
    torch.testing.assert_close(dx, dxr, **TOL[dtype])
    # silu(100) = 100, silu(-100) = 0, silu(0) = 0 exactly; d silu(0) / da = 1/2
    assert y[0, 0].item() == 100.0 * b[0].to(dtype).item()
    assert y[0, 1].item() == 0.0 and y[2].abs().max().item() == 0.0
    torch.testing.assert_close(dx[2, f:], torch.zeros(f, dtype=dtype, device=DEV))
    torch.testing.assert_close(dx[2, :f].float(), (dy[2].float() * x[2, f:].float() * 0.5), **TOL[dtype])


def test_saves_only_x():
    x = _rand(6, 48).requires_grad_(True)
    y = swiglu(x)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr() and saved[0].numel() == x.numel()
    ym = F.silu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1]  # for contrast: the unfused graph holds more
    held = [t for fn in (ym.grad_fn, ym.grad_fn.next_functions[0][0]) for t in (
        getattr(fn, "_saved_self", None), getattr(fn, "_saved_other", None)) if t is not None]
    assert len(held) == 3


def test_empty_rows():
    x = _rand(0, 48).requires_grad_(True)
    y = swiglu(x)
    y.backward(torch.ones_like(y))
    assert y.shape == (0, 24) and x.grad.shape == (0, 48) and x.grad.numel() == 0


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.zeros(3, 7), r"even last dim.*last dim 7"),
    (lambda: torch.zeros(3, 8, dtype=torch.float64), r"float32, float16 or bfloat16, got torch.float64"),
    (lambda: torch.zeros(3, 8, dtype=torch.int32), r"got torch.int32.*Fix"),
])
def test_errors(bad, match):
    x = bad().to(DEV)
    with pytest.raises(ValueError, match=match):
        swiglu(x)
    assert swiglu_reference(torch.zeros(3, 8)).shape == (3, 4)  # the oracle takes the same valid input


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 48), (7, 2000), (129, 5632), (3, 5, 48), (64, 2, 5632)])
def test_bf16_matches_reference_gpu(shape):
    x = _rand(*shape, dtype=torch.bfloat16)
    dy = _rand(*shape[:-1], shape[-1] // 2, dtype=torch.bfloat16, seed=1)
    _assert_matches(x, dy)
    xe = x.clone()
    xe[..., 0], xe[..., 1] = 100.0, -100.0
    y, dx, yr, dxr = _fused_and_ref(xe, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(y, yr, **TOL[torch.bfloat16])
    torch.testing.assert_close(dx, dxr, **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_offsets_past_int32_gpu():
    # rows * 2F > 2^31 elements: the last rows are only right with 64-bit offsets
    f = 2816
    rows = 2**31 // (2 * f) + 3
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    x = torch.zeros(rows, 2 * f, dtype=torch.bfloat16, device="cuda")
    x[-3:] = _rand(3, 2 * f, dtype=torch.bfloat16)
    x.requires_grad_(True)
    y = swiglu(x)
    dy = torch.zeros_like(y)
    dy[-3:] = _rand(3, f, dtype=torch.bfloat16, seed=1)
    (dx,) = torch.autograd.grad(y, x, dy)
    tail = x[-3:].detach()
    _, _, yr, dxr = _fused_and_ref(tail, dy[-3:])
    torch.testing.assert_close(y[-3:], yr, **TOL[torch.bfloat16])
    torch.testing.assert_close(dx[-3:], dxr, **TOL[torch.bfloat16])
    assert y[:-3].abs().max().item() == 0.0
