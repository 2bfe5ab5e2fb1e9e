"""Per-layer GPT layer specs from the recipe's attention pattern (MoBA / full / hybrid / explicit).

A Megatron-Core ``GPTModel`` accepts, as its ``transformer_layer_spec``, a
``TransformerBlockSubmodules(layer_specs=[...], layer_norm=...)`` with one layer spec per layer.
:func:`gpt_block_spec` takes Megatron's own layer spec (the local torch one, or the Transformer
Engine one where TE is installed), copies it once per layer and puts
:class:`~moba_cp.megatron.core_attention.MoBACoreAttention` or
:class:`~moba_cp.megatron.core_attention.FullCoreAttention` in each layer's ``core_attention``
slot, with the MoBA parameters as the spec's ``params``. With ``fused_ops`` (the local spec),
the MLP's activation is :class:`~moba_cp.megatron.fused_layers.FusedSwiGLU` (and with
``fused_norm`` the norms :class:`~moba_cp.megatron.fused_layers.FusedRMSNorm`); everything else
(QKV/output projections, the MLP's linears) is Megatron's, unchanged.

Example:
    >>> kinds = layer_attention_kinds(cfg.model, cfg.attention)     # ['moba', ..., 'full']
    >>> block = gpt_block_spec(kinds, cfg.moba, cfg.attention, normalization="RMSNorm")
    >>> GPTModel(config, transformer_layer_spec=block, ...)
"""

from __future__ import annotations

import copy
import functools
from typing import Sequence

import torch

from megatron.core.models.gpt import gpt_layer_specs as gls
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from moba_cp.megatron.core_attention import FullCoreAttention, MoBACoreAttention, te_available
from moba_cp.megatron.fused_layers import FusedRMSNorm, FusedSwiGLU

__all__ = ["gpt_block_spec", "core_attention_spec", "resolve_transformer_impl", "TorchNorm", "TRANSFORMER_IMPLS"]

TRANSFORMER_IMPLS = ("auto", "local", "te")


def resolve_transformer_impl(impl: str = "auto") -> str:
    """``'local'`` or ``'te'``: ``'auto'`` takes TE where it is installed and a GPU is present."""
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl={impl!r}; choose one of {', '.join(TRANSFORMER_IMPLS)}.")
    if impl == "auto":
        return "te" if (torch.cuda.is_available() and te_available()) else "local"
    if impl == "te" and not te_available():
        raise RuntimeError(
            "transformer_impl='te' needs transformer-engine, which is not installed (or fails to load). "
            "Fix: pip install 'moba-cp[te]', or use transformer_impl='local'."
        )
    return impl


def core_attention_spec(kind: str, moba_cfg, attention_cfg) -> ModuleSpec:
    """The ``core_attention`` spec of one layer: ``kind`` is ``'moba'`` or ``'full'``."""
    full_backend = getattr(attention_cfg, "full_backend", "auto")
    if kind == "moba":
        return ModuleSpec(module=MoBACoreAttention, params={
            "moba_block_size": int(moba_cfg.block_size), "moba_topk": int(moba_cfg.topk),
            "moba_backend": moba_cfg.backend, "full_backend": full_backend,
            "moba_key_conv": int(getattr(moba_cfg, "key_conv", 0) or 0),
            "moba_kernel": str(getattr(moba_cfg, "kernel", "") or ""),
        })
    if kind == "full":
        return ModuleSpec(module=FullCoreAttention, params={"full_backend": full_backend})
    raise ValueError(f"layer attention kind {kind!r}; expected 'moba' or 'full'.")


class TorchNorm:
    """``torch.nn.RMSNorm`` / ``LayerNorm`` for the local spec, usable with sequence parallelism.

    Megatron's ``WrappedTorchNorm`` (the local norm without apex) refuses
    ``sequence_parallel``; but a norm is per token, so under SP it only needs its parameters
    tagged ``sequence_parallel=True``, which makes ``finalize_model_grads`` all-reduce their
    gradients over the TP group (what Megatron's fused norms do). Same constructor as
    ``WrappedTorchNorm``.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused_kwargs):
        dtype = getattr(config, "params_dtype", None) or torch.float32
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=dtype)
        else:
            raise ValueError(f"TorchNorm: normalization={config.normalization!r}; use RMSNorm or LayerNorm.")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("TorchNorm: layernorm_zero_centered_gamma is not supported by torch norms.")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        return norm


def _base_layer_spec(impl: str, normalization: str, qk_layernorm: bool):
    if impl == "te":
        return gls.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return gls.get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)


def _mlp_submodules(mlp_spec):
    """The ``MLPSubmodules`` of a layer spec's ``mlp``: a ``ModuleSpec``'s (megatron-core 0.16) or
    the ``submodules`` keyword of a ``functools.partial`` (0.19 builds the MLP that way)."""
    if isinstance(mlp_spec, ModuleSpec):
        return mlp_spec.submodules
    if isinstance(mlp_spec, functools.partial) and "submodules" in mlp_spec.keywords:
        return mlp_spec.keywords["submodules"]
    raise TypeError(f"gpt_block_spec: the layer spec's mlp is {mlp_spec!r}; expected a ModuleSpec or a "
                    f"functools.partial with submodules= (megatron-core 0.16 / 0.19).")


def _final_norm(impl: str, normalization: str, fused_norm: bool = False):
    if impl == "te":
        return gls.TENorm
    if fused_norm:
        return FusedRMSNorm
    if normalization == "RMSNorm" or gls.LNImpl is WrappedTorchNorm:
        return TorchNorm  # (apex's FusedLayerNorm is LayerNorm only)
    return gls.LNImpl


def gpt_block_spec(
    kinds: Sequence[str],
    moba_cfg,
    attention_cfg,
    *,
    normalization: str = "RMSNorm",
    transformer_impl: str = "auto",
    qk_layernorm: bool = False,
    fused_ops: bool = False,
    swiglu: bool = True,
    fused_norm: bool = False,
) -> TransformerBlockSubmodules:
    """One GPT block spec with a per-layer attention kind.

    Args:
        kinds: ``['moba' | 'full'] * num_layers``, e.g. from
            :func:`moba_cp.config.layer_attention_kinds` (``pattern`` moba / full / hybrid / explicit).
        moba_cfg: ``MoBAConfig`` (block_size, topk, backend) for the MoBA layers.
        attention_cfg: ``AttentionConfig`` (``full_backend``) for full-attention layers and for MoBA
            layers switched to full attention.
        normalization: ``'RMSNorm'`` or ``'LayerNorm'`` (must match the TransformerConfig).
        transformer_impl: ``'local'`` (pure torch Megatron modules), ``'te'`` (Transformer Engine
            linears/norms, needs TE) or ``'auto'`` (TE when installed and a GPU is present).
        qk_layernorm: norm queries and keys per head (Megatron's ``qk_layernorm``).
        fused_ops: the local spec's SwiGLU activation as moba_cp's Triton kernel (the config must then
            have ``use_te_activation_func`` for a SwiGLU MLP:
            :func:`~moba_cp.megatron.transformer_config.transformer_config_from_recipe` sets it).
        swiglu: the MLP is SwiGLU (the recipe's ``model.swiglu``), so the activation slot is filled.
        fused_norm: the layers' two norms and the final norm as moba_cp's Triton RMSNorm (RMSNorm
            only, which :class:`~moba_cp.megatron.fused_layers.FusedRMSNorm` checks; whether the
            recipe asks for it: :func:`~moba_cp.megatron.fused_layers.resolve_fused_norm`; the QK norms
            of ``qk_layernorm`` stay torch's).
    Returns:
        ``TransformerBlockSubmodules(layer_specs=[one per layer], layer_norm=final norm)``.
    """
    kinds = list(kinds)
    if not kinds:
        raise ValueError("gpt_block_spec: no layers (kinds is empty).")
    impl = resolve_transformer_impl(transformer_impl)
    base = _base_layer_spec(impl, normalization, qk_layernorm)
    if fused_ops and impl != "local":
        raise ValueError(f"gpt_block_spec: fused_ops is for the local layer spec, not {impl!r}.")
    if impl == "local":
        norm = FusedRMSNorm if fused_norm else TorchNorm  # TorchNorm: the same norm, and SP-capable
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(base.submodules, name, None) is WrappedTorchNorm:
                setattr(base.submodules, name, norm)
        if fused_ops and swiglu:
            _mlp_submodules(base.submodules.mlp).activation_func = FusedSwiGLU
    layer_specs = []
    for kind in kinds:
        spec = copy.deepcopy(base)
        spec.submodules.self_attention.submodules.core_attention = core_attention_spec(kind, moba_cfg, attention_cfg)
        layer_specs.append(spec)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=_final_norm(impl, normalization, fused_norm))
