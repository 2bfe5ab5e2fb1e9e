"""``ops/launch_math``'s integer helpers give Triton's results (they replace triton.cdiv and
triton.next_power_of_2 in host code, where those are slower wrappers)."""

import pytest

triton = pytest.importorskip("triton")

from moba_cp.ops.launch_math import cdiv, next_power_of_2  # noqa: E402

VALUES = list(range(-5, 5000)) + [2**k + d for k in range(12, 64) for d in (-1, 0, 1)]


def test_next_power_of_2_is_tritons():
    assert [next_power_of_2(n) for n in VALUES] == [triton.next_power_of_2(n) for n in VALUES]
    assert next_power_of_2(1) == 1 and next_power_of_2(3) == 4 and next_power_of_2(1024) == 1024


def test_cdiv_is_tritons():
    pairs = [(x, y) for x in range(-40, 300) for y in (1, 2, 3, 7, 16, 64, 1000)] + [(2**40 + 1, 2**20)]
    assert [cdiv(x, y) for x, y in pairs] == [triton.cdiv(x, y) for x, y in pairs]
    assert cdiv(1025, 1024) == 2 and cdiv(1024, 1024) == 1 and cdiv(0, 64) == 0
