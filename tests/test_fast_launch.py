"""``FastKernel``: the first call with a key goes through Triton's dispatch, later calls with the
same key hand the same argument list (positional, then the remaining parameters in signature
order from keywords or defaults) to the compiled kernel's launcher; anything the key does not
cover, a different key, the interpreter, a launch hook or ``MOBA_CP_FAST_LAUNCH=0`` goes through
Triton's dispatch. On CPU a recording stand-in plays the JIT function and its compiled kernel; on
a GPU the fused ops give bitwise the same results both ways, misaligned views included."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")

from triton import knobs  # noqa: E402

import moba_cp.ops.fast_launch as fl  # noqa: E402
from moba_cp.ops.fast_launch import FastKernel  # noqa: E402


class _Param:
    """What FastKernel reads of Triton's ``KernelParam``."""

    def __init__(self, p: inspect.Parameter):
        self._param = p
        self.name = p.name
        self.is_constexpr = "constexpr" in str(p.annotation)


def _sig(X, n, Y, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = 7):  # noqa: F821
    pass


class _Compiled:
    function, packed_metadata = "fn-handle", "packed"

    def __init__(self, log):
        self.log = log

    def run(self, *a):
        self.log.append(("run", a))


class _Jit:
    """Stands for a ``@triton.jit`` function: ``[grid](...)`` logs the dispatch, returns a compiled kernel."""

    def __init__(self):
        self.params = [_Param(p) for p in inspect.signature(_sig).parameters.values()]
        self.log = []

    def __getitem__(self, grid):
        def dispatch(*args, **kwargs):
            self.log.append(("dispatch", grid, args, kwargs))
            return _Compiled(self.log)
        return dispatch


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MOBA_CP_FAST_LAUNCH", raising=False)
    monkeypatch.setattr(fl, "_device", lambda: 0)
    monkeypatch.setattr(fl, "_stream", lambda device: 1234)
    monkeypatch.setattr(fl, "_has_cuda", lambda: True)
    fl.reset_fast_launch()
    jit = _Jit()
    yield FastKernel(jit), jit
    fl.reset_fast_launch()


def _t(n=64, offset=0):
    return torch.zeros(n + offset)[offset:]  # offset 1: the address is no longer 16-byte aligned


def test_second_call_runs_the_compiled_kernel_with_triton_argument_order(fast):
    k, jit = fast
    x, y = _t(), _t()
    k[(5, 2)](x, 48, y, BLOCK=32, num_warps=4)
    assert [e[0] for e in jit.log] == ["dispatch"]
    k[(5, 2)](x, 48, y, BLOCK=32, num_warps=4)
    assert jit.log[-1] == ("run", (5, 2, 1, 1234, "fn-handle", "packed", None, None, None, x, 48, y, 32, 7))
    # another tensor of the same kind and alignment, another int of the same class: same kernel
    x2 = _t()
    k[(9,)](x2, 80, y, BLOCK=32, num_warps=4)
    assert jit.log[-1] == ("run", (9, 1, 1, 1234, "fn-handle", "packed", None, None, None, x2, 80, y, 32, 7))
    # a keyword given for a defaulted constexpr goes in its signature slot
    k[(1,)](x, 48, y, BLOCK=32, FLAG=3)
    k[(1,)](x, 48, y, BLOCK=32, FLAG=3)
    assert jit.log[-1][1][-5:] == (x, 48, y, 32, 3)
    assert sum(e[0] == "dispatch" for e in jit.log) == 2


@pytest.mark.parametrize("change", [
    "misaligned", "dtype", "int_one", "int_not_16", "int64", "constexpr", "option", "device",
])
def test_anything_triton_specialises_on_goes_through_its_dispatch(fast, monkeypatch, change):
    k, jit = fast
    x, y = _t(), _t()
    k[(1,)](x, 48, y, BLOCK=32, num_warps=4)
    args, kw = [x, 48, y], dict(BLOCK=32, num_warps=4)
    if change == "misaligned":
        args[0] = _t(offset=1)
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "int_one":
        args[1] = 1
    elif change == "int_not_16":
        args[1] = 47
    elif change == "int64":
        args[1] = 1 << 33
    elif change == "constexpr":
        kw["BLOCK"] = 64
    elif change == "option":
        kw["num_warps"] = 8
    elif change == "device":
        monkeypatch.setattr(fl, "_device", lambda: 1)
    k[(1,)](*args, **kw)
    assert jit.log[-1][0] == "dispatch" and jit.log[-1][2] == tuple(args)
    k[(1,)](*args, **kw)  # and that key is cached in its turn
    assert jit.log[-1][0] == "run"


def test_subclasses_are_keyed_as_their_base_kind(fast):
    """A Parameter is keyed as a tensor and an IntEnum as an int: cached like them, and a
    misaligned Parameter still gets its own dispatch."""
    import enum

    class N(enum.IntEnum):
        ROWS = 48

    k, jit = fast
    w, y = torch.nn.Parameter(_t()), _t()
    for _ in range(2):
        k[(1,)](w, N.ROWS, y, BLOCK=32)
    assert [e[0] for e in jit.log] == ["dispatch", "run"]
    k[(1,)](torch.nn.Parameter(_t(offset=1)), N.ROWS, y, BLOCK=32)
    assert jit.log[-1][0] == "dispatch"


def test_what_the_key_does_not_cover_always_dispatches(fast, monkeypatch):
    k, jit = fast
    x, y = _t(), _t()
    for _ in range(2):
        k[(1,)](x, object(), y, BLOCK=32)  # an argument kind the key does not know
        k[lambda meta: (1,)](x, 48, y, BLOCK=32)  # a grid given as a function
        k[(1,)](x, 48, y=y, BLOCK=32)  # a tensor by keyword
    assert all(e[0] == "dispatch" for e in jit.log) and len(jit.log) == 6


@pytest.mark.parametrize("switch", ["env_off", "interpreter", "no_cuda", "enter_hook", "exit_hook", "hook_in_chain"])
def test_switches_send_every_call_through_triton(fast, monkeypatch, switch):
    k, jit = fast
    if switch == "env_off":
        monkeypatch.setenv("MOBA_CP_FAST_LAUNCH", "0")
    elif switch == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif switch == "no_cuda":  # e.g. kernel_resources.py's compile-only driver on a CPU machine
        monkeypatch.setattr(fl, "_has_cuda", lambda: False)
    elif switch == "hook_in_chain":  # triton 3.6: the hooks are chains, empty unless a profiler adds one
        chain = knobs.runtime.launch_enter_hook
        if not hasattr(chain, "calls"):
            pytest.skip("this triton keeps launch hooks as plain callables")
        monkeypatch.setattr(chain, "calls", [lambda *a: None])
    else:
        monkeypatch.setattr(knobs.runtime, f"launch_{switch}", lambda *a: None)
    fl.reset_fast_launch()
    x, y = _t(), _t()
    for _ in range(3):
        k[(1,)](x, 48, y, BLOCK=32)
    assert [e[0] for e in jit.log] == ["dispatch"] * 3


def test_bad_switch_value_names_the_choices(fast, monkeypatch):
    k, _ = fast
    monkeypatch.setenv("MOBA_CP_FAST_LAUNCH", "yes")
    fl.reset_fast_launch()
    with pytest.raises(ValueError, match=r"MOBA_CP_FAST_LAUNCH='yes'.*use 1 .* or 0"):
        k[(1,)](_t(), 48, _t(), BLOCK=32)


def test_the_kernels_params_are_read_as_triton_binds_them():
    """The stand-in's ``params`` mirror Triton's: a real JIT function's params have the same fields."""
    import triton
    import triton.language as tl

    @triton.jit
    def kern(X, n, Y, BLOCK: tl.constexpr, FLAG: tl.constexpr = 7):
        pass

    params = getattr(kern, "params", None)
    if params is None:  # the interpreter's function: FastKernel never caches there
        assert FastKernel(kern)._constexpr is None
        return
    assert [p.name for p in params] == ["X", "n", "Y", "BLOCK", "FLAG"]
    assert [p.is_constexpr for p in params] == [False, False, False, True, True]
    assert params[4]._param.default == 7 and params[3]._param.default is inspect.Parameter.empty


@pytest.mark.gpu
def test_fused_ops_fast_and_dispatched_agree_bitwise_gpu(monkeypatch):
    from moba_cp.ops.rms_norm import rms_norm
    from moba_cp.ops.rope.triton_rope import apply_rope, rope_tables
    from moba_cp.ops.swiglu import swiglu

    gen = torch.Generator(device="cuda").manual_seed(0)

    def run():
        out = []
        for off in (0, 1, 0):  # aligned, misaligned (a new key), aligned again (cached)
            base = torch.randn(37 * 3 * 64 + off, device="cuda", generator=gen, dtype=torch.bfloat16)
            t = base[off:].view(37, 1, 3, 64).requires_grad_(True)
            cos, sin = rope_tables(torch.randn(37, 1, 1, 64, device="cuda", generator=gen))
            y = apply_rope(t, cos, sin)
            xn = base[off:off + 37 * 64].view(37, 64).detach().requires_grad_(True)
            w = torch.randn(64, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_(True)
            yn = rms_norm(xn, w, 1e-5)
            ys = swiglu(xn)
            g = torch.autograd.grad((y.float().sum() + yn.float().square().sum() + ys.float().sum()), (t, xn, w))
            out += [y, yn, ys, *g]
        return out

    monkeypatch.setenv("MOBA_CP_FAST_LAUNCH", "0")
    fl.reset_fast_launch()
    gen.manual_seed(0)
    ref = run()
    monkeypatch.setenv("MOBA_CP_FAST_LAUNCH", "1")
    fl.reset_fast_launch()
    for _ in range(2):  # the first pass fills the cache, the second launches from it
        gen.manual_seed(0)
        got = run()
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
