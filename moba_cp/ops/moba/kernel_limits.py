"""What each MoBA backend accepts, as plain data (no triton import), so recipe validation and
``--dry-run`` can reject what a kernel would reject before any process or GPU is touched.

The Triton kernels check their inputs against ``TRITON`` (``triton_common.check_triton_inputs``);
``moba_cp.config`` checks a recipe against the same values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelLimits:
    """Input limits of one backend.

    head_dims: the head dims the kernels compile for (tile shapes are powers of two).
    block_multiple: ``block_size`` must be a multiple of this (tensor-core tile granularity).
    max_gate_width: largest ``min(topk, blocks per document)`` the gate's top-k takes.
    dtypes: names of the floating dtypes accepted (``torch.<name>``).
    """

    backend: str
    head_dims: tuple[int, ...] | None
    block_multiple: int
    max_gate_width: int | None
    dtypes: tuple[str, ...]


NAIVE = KernelLimits("naive", None, 1, None, ("float16", "bfloat16", "float32", "float64"))
TRITON = KernelLimits("triton", (16, 32, 64, 128), 16, 128, ("float16", "bfloat16", "float32"))

LIMITS = {"naive": NAIVE, "triton": TRITON}
