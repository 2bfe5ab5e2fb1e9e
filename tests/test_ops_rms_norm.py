"""The Triton RMSNorm (under the interpreter on CPU) against its torch oracle: output, dx and dw
at awkward shapes, strides and dtypes, and the errors for inputs it refuses."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moba_cp.ops.rms_norm import rms_norm, rms_norm_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
EPS = 1e-5
#: (y and dx tolerance, dw relative tolerance) per dtype: fp32 reassociation, or a few ulps
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(shape, x_dtype, w_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 2 + 0.5).to(x_dtype).to(DEV)
    w = (1 + 0.5 * torch.randn(n, generator=gen)).to(w_dtype).to(DEV)
    dy = torch.randn(*shape, generator=gen).to(x_dtype).to(DEV)
    return x, w, dy


def _grads(fn, x, w, dy):
    """Output and (dx, dw) of ``fn`` through autograd, for leaf copies of ``x`` and ``w``."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, EPS)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _close(got, want, tol, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got.float() - want.float()).abs()
    bound = tol * (1 + want.float().abs())
    worst = (err - bound).max().item()
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g}, worst excess {worst:.3g}"


def _check_against_oracle(x, w, dy):
    """y and dx against the oracle run in fp32 on the same (rounded) inputs; dw in fp32 with a
    bound that grows with the number of rows summed."""
    y, dx, dw = _grads(rms_norm, x, w, dy)
    ry, rdx, rdw = _grads(rms_norm_reference, x.float(), w.float(), dy.float())
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    tol = TOL[x.dtype]
    _close(y, ry, tol, "y")
    _close(dx, rdx, tol, "dx")
    n = x.shape[-1]
    xf = x.float().reshape(-1, n)
    absum = (dy.float().reshape(-1, n) * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).abs().sum(0)
    rows = xf.shape[0]
    # fp32 sums reassociated over `rows` terms, then one rounding to the weight's dtype
    dw_tol = 4 * rows * 2.0**-24 + (0.0 if w.dtype == torch.float32 else TOL[w.dtype])
    err = (dw.float() - rdw).abs()
    assert bool((err <= dw_tol * absum + 1e-6).all()), f"dw: max error {err.max().item():.3g}"
    return y, dx, dw


@pytest.mark.parametrize("n", [24, 384, 1000])
@pytest.mark.parametrize("rows", [1, 7, 129])
def test_fp32_matches_oracle(n, rows):
    _check_against_oracle(*_inputs((rows, n), torch.float32, torch.float32, seed=rows * n))


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16])
def test_fp16_three_dims_matches_oracle(w_dtype):
    x, w, dy = _inputs((43, 3, 384), torch.float16, w_dtype, seed=1)  # [s, b, N], 129 rows
    y, _, _ = _check_against_oracle(x, w, dy)
    # The contract is the oracle itself: its fp16 output is within one fp16 rounding of ours.
    _close(y, rms_norm_reference(x, w, EPS), TOL[torch.float16], "y vs fp16 oracle")


def test_edge_sizes_one_and_largest():
    _check_against_oracle(*_inputs((5, 1), torch.float32, torch.float32, seed=2))
    _check_against_oracle(*_inputs((2, 65536), torch.float32, torch.float32, seed=3))


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(37, 2000, generator=gen).to(DEV)
    w = (1 + torch.randn(1000, generator=gen)).to(DEV)
    dy = torch.randn(37, 1000, generator=gen).to(DEV)
    # last-dim stride 2 (copied), then row stride 2000 (read in place); `unused` gets no grad
    for view, unused in ((lambda t: t[:, ::2], (slice(None), slice(1, None, 2))),
                         (lambda t: t[:, 500:1500], (slice(None), slice(0, 500)))):
        got = _grads(lambda a, b, e: rms_norm(view(a), b, e), wide, w, dy)
        want = _grads(lambda a, b, e: rms_norm_reference(view(a), b, e), wide, w, dy)
        for g, r, what in zip(got, want, ("y", "dwide", "dw")):
            _close(g, r, 1e-5, what)
        assert float(got[1][unused].abs().max()) == 0.0 and float(got[1].abs().max()) > 0.1
    # [b, s, N] seen as [s, b, N]: leading dims that do not flatten to a view
    base = torch.randn(4, 9, 24, generator=gen).to(DEV)
    wt, dyt = w[:24].contiguous(), torch.randn(9, 4, 24, generator=gen).to(DEV)
    got = _grads(lambda a, b, e: rms_norm(a.transpose(0, 1), b, e), base, wt, dyt)
    want = _grads(lambda a, b, e: rms_norm_reference(a.transpose(0, 1), b, e), base, wt, dyt)
    assert got[0].shape == (9, 4, 24)
    for g, r, what in zip(got, want, ("y", "dbase", "dw")):
        _close(g, r, 1e-5, what)


def test_only_the_grads_asked_for():
    x, w, dy = _inputs((7, 384), torch.float32, torch.float32, seed=5)
    _, rdx, rdw = _grads(rms_norm_reference, x, w, dy)
    xg = x.clone().requires_grad_(True)
    rms_norm(xg, w, EPS).backward(dy)  # weight frozen: no dw buffer
    _close(xg.grad, rdx, 1e-5, "dx only")
    wg = w.clone().requires_grad_(True)
    rms_norm(x, wg, EPS).backward(dy)  # x frozen: no dx written
    _close(wg.grad, rdw, 1e-5, "dw only")


def test_empty_rows():
    x = torch.empty(0, 3, 24, device=DEV, requires_grad=True)
    w = torch.ones(24, device=DEV, requires_grad=True)
    y = rms_norm(x, w, EPS)
    assert y.shape == (0, 3, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 3, 24) and torch.equal(w.grad, torch.zeros(24, device=DEV))


@pytest.mark.parametrize("x, w, words", [
    (torch.randn(3, 24), torch.ones(25), ["[24]", "(25,)", "Fix"]),
    (torch.randn(3, 24), torch.ones(1, 24), ["[24]", "(1, 24)", "Fix"]),
    (torch.randn(3, 24), torch.ones(24, device="meta"), ["meta", "same device", "Fix"]),
    (torch.randn(3, 24).double(), torch.ones(24), ["torch.float64", "bfloat16", "Fix"]),
    (torch.ones(3, 24, dtype=torch.int32), torch.ones(24), ["torch.int32", "Fix"]),
    (torch.randn(1, 65537), torch.ones(65537), ["65537", "65536", "Fix"]),
])
def test_refused_inputs_say_why(x, w, words):
    with pytest.raises(ValueError) as err:
        rms_norm(x, w, EPS)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_bf16_matches_oracle(w_dtype):
    x, w, dy = _inputs((32768 // 8, 384), torch.bfloat16, w_dtype, seed=6)
    _check_against_oracle(x, w, dy)
    x3, w3, dy3 = _inputs((129, 7, 1000), torch.bfloat16, w_dtype, seed=7)
    _check_against_oracle(x3, w3, dy3)


@pytest.mark.gpu
def test_bf16_large_n():
    _check_against_oracle(*_inputs((3, 65536), torch.bfloat16, torch.float32, seed=8))
    _check_against_oracle(*_inputs((300, 5000), torch.bfloat16, torch.float32, seed=9))
