"""Rotary position embedding: one fused Triton kernel each way (``triton_rope``) and its torch oracle."""

from moba_cp.ops.rope.naive import rope_reference
from moba_cp.ops.rope.triton_rope import apply_rope, rope_tables

__all__ = ["apply_rope", "rope_reference", "rope_tables"]
