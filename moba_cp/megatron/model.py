"""Build a Megatron-Core ``GPTModel`` with MoBA / full / hybrid attention from a recipe.

The training loop's sequence (CPU or GPU; on CPU, ``init_parallel`` switches the compat on)::

    init_parallel(cfg.parallel, seed=cfg.train.seed)            # after dist.init_process_group
    gpt = build_gpt_model(cfg.model, cfg.moba, cfg.attention, cfg.parallel,
                          vocab_size=tokenizer.vocab_size, precision=cfg.train.precision,
                          recompute=cfg.train.recompute)
    ddp = wrap_ddp(gpt, cfg.parallel)                              # megatron/optimizer.py
    optimizer = build_optimizer(ddp, lr=..., ...)                  # get_megatron_optimizer, CPU-safe
    attach_training_hooks(ddp, optimizer)                          # megatron/training_hooks.py
    fwd_bwd = get_forward_backward_func()
    with compat_cpu.cuda_to_cpu():                                 # no-op on GPU
        ddp.zero_grad_buffer(); optimizer.zero_grad()
        losses = fwd_bwd(forward_step_func=..., data_iterator=..., model=[ddp], num_microbatches=n,
                         seq_length=S // cp, micro_batch_size=mbs, forward_only=False)
        ok, grad_norm, _ = optimizer.step()

Batches are sharded with :func:`moba_cp.megatron.cp_batch.shard_batch_for_cp`. Loss under CP
(Megatron DDP averages gradients over dp x cp): with a 2-tuple ``loss_func`` return this rank's
``local_loss_sum / micro_batch_token_count`` (the schedule multiplies it by ``cp``); with
``calculate_per_token_loss=True`` return the local sum and local count (``finalize_model_grads``
divides by the global count). Both are tested equal to CP=1 in ``tests/test_megatron_cp.py``.
The schedule scales the returned loss *in place*: report a ``.clone()`` of it, not a
``.detach()`` (which shares storage).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from moba_cp.config import layer_attention_kinds
from moba_cp.megatron.fused_layers import resolve_fused_norm, resolve_fused_ops
from moba_cp.megatron.specs import gpt_block_spec, resolve_transformer_impl
from moba_cp.megatron.transformer_config import transformer_config_from_recipe
from moba_cp.model_sizes import padded_vocab_size

__all__ = ["build_gpt_model"]


def build_gpt_model(
    model_cfg,
    moba_cfg,
    attention_cfg,
    parallel_cfg,
    *,
    vocab_size: int | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    precision: str = "fp32",
    recompute: str = "none",
    transformer_impl: str = "auto",
    make_vocab_size_divisible_by: int = 128,
    config: TransformerConfig | None = None,
) -> GPTModel:
    """A Megatron-Core ``GPTModel`` whose layers use MoBA or full attention per the recipe.

    Needs Megatron's parallel state (:func:`moba_cp.megatron.parallel_init.init_parallel`, which
    also switches on the CPU compat on a machine without a GPU).

    Args:
        model_cfg, moba_cfg, attention_cfg, parallel_cfg: the recipe's sub-configs.
        vocab_size: tokenizer vocabulary (overrides ``model_cfg.vocab_size``); padded to a multiple
            of ``make_vocab_size_divisible_by * tp`` (see :func:`padded_vocab_size`).
        pre_process, post_process: embedding / output layer present (pipeline stages; keep True).
        precision, recompute: see :func:`~moba_cp.megatron.transformer_config.transformer_config_from_recipe`.
        transformer_impl: ``'auto'`` / ``'local'`` / ``'te'`` (see :func:`moba_cp.megatron.specs.gpt_block_spec`).
        config: a ready ``TransformerConfig`` to use instead of deriving one.
    Returns:
        ``GPTModel`` (RoPE, untied or tied embeddings per ``model_cfg.share_embeddings``) on the
        current CUDA device, or on CPU. Its ``forward(input_ids [b, s_local], position_ids,
        attention_mask=None, labels=[b, s_local])`` returns the per-token loss ``[b, s_local]``.
    """
    vocab = vocab_size if vocab_size is not None else model_cfg.vocab_size
    if vocab is None:
        raise ValueError("build_gpt_model: vocab_size is None in the recipe and not given; pass vocab_size=.")
    if config is None:
        config = transformer_config_from_recipe(model_cfg, parallel_cfg, precision=precision, recompute=recompute,
                                                transformer_impl=transformer_impl)
    impl = resolve_transformer_impl(transformer_impl)
    fused = resolve_fused_ops(getattr(model_cfg, "fused_ops", "auto"), impl)
    swiglu = bool(getattr(model_cfg, "swiglu", True))
    if fused != bool(config.apply_rope_fusion) or (fused and swiglu) != bool(config.use_te_activation_func):
        # the spec's activation module and Megatron's switches must agree, or fc1's output goes
        # through the wrong function (a shape error at best)
        raise ValueError(
            f"build_gpt_model: model.fused_ops={getattr(model_cfg, 'fused_ops', 'auto')!r} resolves to "
            f"{'fused' if fused else 'unfused'} ops, but the given config has apply_rope_fusion="
            f"{config.apply_rope_fusion}, use_te_activation_func={config.use_te_activation_func}. Fix: build the "
            f"config with transformer_config_from_recipe from the same model config and transformer_impl.")
    kinds = layer_attention_kinds(model_cfg, attention_cfg)
    if len(kinds) != config.num_layers:
        raise ValueError(f"attention pattern gives {len(kinds)} layer kinds for {config.num_layers} layers.")
    fused_norm = resolve_fused_norm(getattr(model_cfg, "fused_norm", None), fused, config.normalization)
    block = gpt_block_spec(kinds, moba_cfg, attention_cfg, normalization=config.normalization,
                           transformer_impl=impl, fused_ops=fused, swiglu=swiglu, fused_norm=fused_norm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size(vocab, parallel_cfg.tp, make_vocab_size_divisible_by),
        max_sequence_length=model_cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model_cfg.share_embeddings,
        position_embedding_type="rope",
        rotary_base=model_cfg.rotary_base,
    )
    if config.bf16:
        # What Megatron-LM's Float16Module does: every parameter in bf16, the norms included (torch
        # norms are created in fp32, and fp32 weights on bf16 inputs miss the fused kernels).
        # RoPE's inv_freq is a plain attribute, not a buffer, so it stays fp32. The loss stays fp32
        # (Megatron's vocab-parallel cross entropy upcasts the logits).
        model.bfloat16()
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
