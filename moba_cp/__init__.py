"""moba_cp: context-parallel Mixture of Block Attention training on Megatron-Core."""

__version__ = "0.1.0"

from moba_cp.ops.moba.api import moba_attn, moba_attn_bshd, select_blocks, block_attn  # noqa: E402,F401
