"""The key convolution of a MoBA layer as a Megatron module (the recipe's ``moba.key_conv``).

:class:`MoBACoreAttention` owns one :class:`KeyConv` when ``moba.key_conv > 0`` and runs it on the
keys it receives, before the gate and the attention (so both see the convolved keys, and the
convolution learns through the attention: top-k selection itself passes no gradient). The keys
arrive after RoPE (Megatron applies it before core attention), per tensor-parallel rank its own
KV heads, per context-parallel rank its zigzag shard.

Parameter: ``weight [kv_heads_per_tp, head_dim, W]``, zero at init (the layer starts as plain
MoBA), TP-sharded on dim 0 like the key projection's heads (Megatron's
``tensor_model_parallel`` attributes, and a TP-sharded tensor in distributed checkpoints),
replicated over CP and DP (its gradient is reduced with the others by Megatron's DDP).

Checkpoints: Megatron stacks a parameter of every layer into one tensor with a layer axis, which
needs the parameter in every layer; a hybrid model has key convolutions in its MoBA layers only,
so each layer's weight is saved under its own key (``...key_conv.weight.layer<N>``, N the global
1-based layer number) without the layer axis.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from moba_cp.ops.key_conv import KEY_CONV_WIDTHS, key_conv
from moba_cp.parallel.key_conv_halo import key_conv_cp

__all__ = ["KeyConv"]


class KeyConv(MegatronModule):
    """Learned causal depthwise convolution over one layer's keys (see the module docstring).

    Args:
        config: the layer's ``TransformerConfig`` (``num_query_groups``, ``kv_channels``, dtype).
        width: ``W`` in :data:`moba_cp.ops.key_conv.KEY_CONV_WIDTHS` minus 0.
        tp_group: the tensor-parallel group (None = Megatron's parallel state).
        layer_number: the layer's global 1-based number (names its checkpoint tensor).
    """

    def __init__(self, config, width: int, tp_group=None, layer_number: int = 1):
        super().__init__(config=config)
        if width not in KEY_CONV_WIDTHS or width == 0:
            allowed = ", ".join(str(x) for x in KEY_CONV_WIDTHS if x)
            raise ValueError(f"KeyConv: width={width}; moba.key_conv takes {allowed} (or 0 for no key convolution).")
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, check_initialized=False)
        tp = self.tp_group.size() if self.tp_group is not None else 1
        groups = config.num_query_groups or config.num_attention_heads
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        self.width, self.layer_number = width, int(layer_number)
        self.weight = torch.nn.Parameter(torch.zeros(groups // tp, head_dim, width, device=device,
                                                     dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, key: torch.Tensor, *, cp_group=None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``key`` as core attention receives it: ``[s, b, h, d]`` (the zigzag shard under CP), or
        ``[t, h, d]`` / ``[t, 1, h, d]`` packed with ``cu_seqlens``. Returns the same layout."""
        if cu_seqlens is not None:
            squeeze = key.dim() == 4
            k = key.squeeze(1) if squeeze else key
            out = key_conv(k, self.weight, cu_seqlens=cu_seqlens)
            return out.unsqueeze(1) if squeeze else out
        rows = key.transpose(0, 1)  # [b, s, h, d]: every row its own sequence
        if cp_group is not None and cp_group.size() > 1:
            out = key_conv_cp(rows, self.weight, cp_group=cp_group)
        else:
            out = key_conv(rows, self.weight)
        return out.transpose(0, 1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The weight as a TP-sharded tensor (dim 0: KV heads) under a key of its own layer.

        ``sharded_offsets`` (the block's layer axis) are not applied: see the module docstring."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, (),
                                                  tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        out[f"{prefix}weight"].key = f"{prefix}weight.layer{self.layer_number}"
        return out

    def extra_repr(self) -> str:
        return f"width={self.width}, weight={tuple(self.weight.shape)}, layer={self.layer_number}"
