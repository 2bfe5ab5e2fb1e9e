"""Launch a Triton kernel that has already been compiled for these arguments without going through
Triton's per-call dispatch again.

Why: ``kernel[grid](*args)`` runs Triton's whole dispatch on every call (the current device and
stream, each argument's specialisation, a cache key that formats the options as a string, a check
of the kernel's globals, the launch metadata) before the C launcher; where a step is bound by the
host (8K training: the GPU idles between kernels) that time is the step's time.
``benchmarks/bench_launch.py`` measures each part.

How: :class:`FastKernel` wraps a ``@triton.jit`` function and is called the same way,
``fast[grid](*args, **kwargs)``. A call computes a key that holds *everything* Triton specialises
a compiled kernel on, and more: per positional argument, a tensor's dtype and whether its address
is 16-byte aligned; an int's 32/64-bit range, whether it is 1 and whether it is a multiple of 16;
a constexpr's value; and every keyword (the constexprs and launch options) by value, plus the
current device. The first call with a key goes through Triton (which compiles or finds the kernel,
checks it and launches it) and keeps the compiled kernel it returns; later calls with the same key
hand the same argument list to that compiled kernel's launcher directly (the call Triton's own
dispatch ends in, scratch allocation included). Two calls with one key get the same compiled
kernel from Triton too, so the launch is the same; a stricter key only costs a second entry.

Falls back to Triton's dispatch, always, under the Triton interpreter (``TRITON_INTERPRET=1``),
without a CUDA device,
when a launch hook is installed (profilers read the launch metadata), for a grid given as a
function, for any argument the key does not cover (e.g. tensor descriptors), and with
``MOBA_CP_FAST_LAUNCH=0``.
"""

from __future__ import annotations

import os

import torch
from triton import knobs

__all__ = ["FastKernel", "fast_launch_enabled", "reset_fast_launch"]

_I32 = (-(1 << 31), 1 << 31)
_I64_MAX = 1 << 63


_ENABLED: bool | None = None


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def fast_launch_enabled() -> bool:
    """False under the interpreter, without a CUDA device (a compile-only driver, e.g.
    ``benchmarks/kernel_resources.py`` on a CPU machine, returns kernels that cannot launch) or with
    ``MOBA_CP_FAST_LAUNCH=0``. Read once (an environment read costs about as much as the rest of a
    launch); a test or benchmark that changes any of them calls :func:`reset_fast_launch` after."""
    global _ENABLED
    if _ENABLED is None:
        value = os.environ.get("MOBA_CP_FAST_LAUNCH", "1")
        if value not in ("0", "1"):
            raise ValueError(f"MOBA_CP_FAST_LAUNCH={value!r}: use 1 (launch cached kernels directly, the "
                             f"default) or 0 (always Triton's dispatch).")
        _ENABLED = value == "1" and os.environ.get("TRITON_INTERPRET", "0") != "1" and _has_cuda()
    return _ENABLED


def reset_fast_launch() -> None:
    """Read ``MOBA_CP_FAST_LAUNCH`` and ``TRITON_INTERPRET`` again at the next launch."""
    global _ENABLED
    _ENABLED = None


def _device() -> int:
    """The current CUDA device, as Triton's dispatch reads it (``torch.cuda.current_device``
    without its lazy-init check: a cached entry exists only after a launch, so CUDA is up)."""
    return torch._C._cuda_getDevice()


def _stream(device: int) -> int:
    """The raw handle of the device's current stream (what Triton's dispatch launches on)."""
    return torch._C._cuda_getCurrentRawStream(device)


def _hooks_installed() -> bool:
    """Whether a launch hook would see a launch (triton 3.6 keeps each hook as a chain of
    callables, empty by default; an older or replaced hook is a plain callable or None)."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _tensor_key(a):
    return (a.dtype, not (a.data_ptr() & 15))


def _int_key(a):
    return ("i", _I32[0] <= a < _I32[1], a < _I64_MAX, a == 1, not (a & 15))


#: An argument's share of the key by its exact type (the common kinds: one dict lookup each in
#: :func:`_arg_key`, which matches subclasses against the same table).
_KEY_BY_TYPE = {
    torch.Tensor: _tensor_key,
    int: _int_key,
    bool: lambda a: ("b", a),
    float: lambda a: "f",
    type(None): lambda a: None,
}
_SCALARS = (bool, int, float, str, type(None))


def _arg_key(a):
    """A non-constexpr argument's share of the key: by its exact type, else by the first kind in
    :data:`_KEY_BY_TYPE` it is an instance of (a Parameter, an IntEnum; an exact ``bool`` never gets
    here); ``NotImplemented`` for a kind the key does not cover."""
    f = _KEY_BY_TYPE.get(type(a))
    if f is not None:
        return f(a)
    for typ, f in _KEY_BY_TYPE.items():
        if isinstance(a, typ):
            return f(a)
    return NotImplemented


class FastKernel:
    """``fast[grid](*args, **kwargs)`` launches like ``kernel[grid](...)`` (module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = getattr(kernel, "params", None)
        # Under the interpreter ``@triton.jit`` gives an InterpretedFunction: nothing to cache.
        self._constexpr = tuple(p.is_constexpr for p in params) if params is not None else None
        self._params = params
        self._cache: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _key(self, grid, args, kwargs):
        constexpr = self._constexpr
        if constexpr is None or type(grid) is not tuple or len(args) > len(constexpr):
            return None
        key = [_device(), len(args)]
        for a, c in zip(args, constexpr):
            if c:
                key.append(a)
                continue
            k = _arg_key(a)
            if k is NotImplemented:
                return None
            key.append(k)
        for v in kwargs.values():
            if type(v) not in _SCALARS:
                return None
        key += kwargs.items()
        return tuple(key)

    def _tail(self, n_args: int, kwargs: dict) -> tuple | None:
        """The values of the parameters after the positional ones, in signature order (keywords,
        else defaults), as Triton binds them; None if one is missing (Triton will raise)."""
        out = []
        for p in self._params[n_args:]:
            if p.name in kwargs:
                out.append(kwargs[p.name])
            elif p._param.default is not p._param.empty:
                out.append(p._param.default)
            else:
                return None
        return tuple(out)

    def _launch(self, grid, args, kwargs):
        if not fast_launch_enabled() or _hooks_installed():
            return self.kernel[grid](*args, **kwargs)
        key = self._key(grid, args, kwargs)
        if key is None:  # not covered: Triton's dispatch, every time
            return self.kernel[grid](*args, **kwargs)
        hit = self._cache.get(key)
        if hit is None:
            compiled = self.kernel[grid](*args, **kwargs)
            tail = self._tail(len(args), kwargs)
            if tail is not None and compiled is not None:
                if hasattr(compiled, "result"):  # an asynchronous compile's future
                    compiled = compiled.result()
                self._cache[key] = (compiled, tail)
            return compiled
        compiled, tail = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = _stream(key[0])
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *args, *tail)
        return compiled
