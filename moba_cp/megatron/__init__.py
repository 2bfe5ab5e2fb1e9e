"""Megatron-Core glue: MoBA / full core attention, per-layer specs, GPT model builder, CPU compat.

Submodules import megatron-core; import them explicitly (``from moba_cp.megatron import model``),
so that ``import moba_cp`` alone never needs it.
"""
