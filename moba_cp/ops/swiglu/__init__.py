"""SwiGLU activation ``silu(a) * b`` of ``x = [a, b]``: one fused Triton kernel each way, and its
pure-torch oracle."""

from moba_cp.ops.swiglu.naive import swiglu_reference
from moba_cp.ops.swiglu.triton_swiglu import swiglu

__all__ = ["swiglu", "swiglu_reference"]
