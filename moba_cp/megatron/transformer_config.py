"""A recipe's model and parallel settings as a Megatron-Core ``TransformerConfig``."""

from __future__ import annotations

import megatron.core
import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from packaging.version import Version

from moba_cp.megatron.core_attention import MEGATRON_CP_COMM
from moba_cp.megatron.fused_layers import install_fused_rope, resolve_fused_ops
from moba_cp.megatron.specs import resolve_transformer_impl
from moba_cp.model_sizes import default_ffn_hidden_size

__all__ = ["transformer_config_from_recipe"]


def transformer_config_from_recipe(
    model_cfg,
    parallel_cfg,
    *,
    precision: str = "fp32",
    recompute: str = "none",
    transformer_impl: str = "auto",
    **overrides,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for a recipe's ``ModelConfig`` and ``ParallelConfig``.

    Llama-style choices the recipe does not expose: no biases, no dropout (the MoBA and ring
    kernels have none), fp32 softmax. ``model_cfg.fused_ops`` (resolved with ``transformer_impl``,
    :func:`~moba_cp.megatron.fused_layers.resolve_fused_ops`) sets Megatron's fused-RoPE and
    activation-module switches for moba_cp's Triton RoPE and SwiGLU. On a machine without a GPU,
    ``use_cpu_initialization=True`` and fp32 (``precision`` is ignored: CPU always runs fp32).

    Args:
        precision: ``'fp32'`` or ``'bf16'`` (bf16 params and compute, fp32 main grads in DDP).
        recompute: ``'none'``, ``'selective'`` (core attention recomputed in backward) or
            ``'full'`` (whole layers, uniform, one layer per checkpoint).
        transformer_impl: the layer spec the model will use (``'auto'``, ``'local'``, ``'te'``;
            :func:`~moba_cp.megatron.specs.resolve_transformer_impl`); the fused ops are the local spec's.
        overrides: any other ``TransformerConfig`` field, applied last.
    """
    on_gpu = torch.cuda.is_available()
    bf16 = precision == "bf16" and on_gpu
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}; choose 'fp32' or 'bf16'.")
    fused = resolve_fused_ops(getattr(model_cfg, "fused_ops", "auto"), resolve_transformer_impl(transformer_impl))
    if fused:
        install_fused_rope()  # before TransformerConfig: it checks the slot when apply_rope_fusion is set
    ffn = model_cfg.ffn_hidden_size or default_ffn_hidden_size(model_cfg.hidden_size, model_cfg.swiglu)
    kw = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=ffn,
        normalization=model_cfg.normalization,
        gated_linear_unit=model_cfg.swiglu,
        activation_func=F.silu if model_cfg.swiglu else F.gelu,
        init_method_std=model_cfg.init_method_std,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_rope_fusion=fused,
        # the MLP's activation as a module from the spec (FusedSwiGLU on fc1's whole output)
        use_te_activation_func=fused and model_cfg.swiglu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,  # needs apex/TE fused kernels
        tensor_model_parallel_size=parallel_cfg.tp,
        context_parallel_size=parallel_cfg.cp,
        # moba_cp's attention reads the CP comm type from here (Megatron passes it to core attention)
        cp_comm_type=MEGATRON_CP_COMM[parallel_cfg.cp_comm],
        hierarchical_context_parallel_sizes=(
            [parallel_cfg.a2a_size, parallel_cfg.cp // parallel_cfg.a2a_size]
            if parallel_cfg.cp_comm == "a2a+ring" else None),
        pipeline_model_parallel_size=1,
        sequence_parallel=bool(parallel_cfg.sequence_parallel and parallel_cfg.tp > 1),
        use_cpu_initialization=not on_gpu,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    if recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute != "none":
        raise ValueError(f"recompute={recompute!r}; choose 'none', 'selective' or 'full'.")
    kw.update(overrides)
    if isinstance(kw.get("cp_comm_type"), list):
        if Version(megatron.core.__version__) < Version("0.19"):
            # 0.16.x indexes the per-layer list with the 1-based layer number (IndexError at the
            # last layer, off by one before). moba_cp's attentions ignore cp_comm_type; only the
            # TE full backend reads it.
            raise ValueError(
                f"cp_comm_type as a per-layer list is broken in megatron-core {megatron.core.__version__} "
                f"(fixed in 0.19). Fix: pass one string (e.g. 'p2p') or leave it None."
            )
    return TransformerConfig(**kw)
