"""MoBA single-device ops: naive oracle, Triton kernels, validated public API."""

from moba_cp.ops.moba.api import (  # noqa: F401
    block_attn,
    choose_backend,
    gather_index,
    moba_attn,
    moba_attn_bshd,
    select_blocks,
)
