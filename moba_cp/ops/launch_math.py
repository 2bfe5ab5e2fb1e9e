"""Integer helpers for the host code that sizes kernel launches.

Why not ``triton.cdiv`` / ``triton.next_power_of_2``: in triton 3.6 both are ``constexpr_function``
objects (usable inside kernels), and a call from Python goes through that wrapper's argument
unwrapping: ~1.5-2 us each on our hosts, against ~0.1 us for the arithmetic. A fused op's launch
code calls them two to four times, and host-bound steps (8K training) pay it on every launch.
Same results as Triton's for every int (tested against them).
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for ``y > 0`` (Triton's formula, ``(x + y - 1) // y``)."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 that is ``>= n`` for ``1 <= n <= 2**64``; ``0`` for ``n <= 0``, as
    Triton's bit-smearing version gives."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
