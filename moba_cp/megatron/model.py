"""Build a Megatron-Core ``GPTModel`` with MoBA / full / hybrid attention from a recipe.

The training loop's sequence (CPU or GPU; the CPU compat is automatic and a no-op on GPUs)::

    from moba_cp.megatron import model as mm, compat_cpu
    mm.init_parallel(cfg.parallel, seed=cfg.train.seed)       # after dist.init_process_group
    gpt = mm.build_gpt_model(cfg.model, cfg.moba, cfg.attention, cfg.parallel,
                             vocab_size=tokenizer.vocab_size, precision=cfg.train.precision,
                             recompute=cfg.train.recompute)
    ddp = mm.wrap_ddp(gpt, cfg.parallel)
    optimizer = mm.build_optimizer(ddp, lr=..., ...)           # get_megatron_optimizer, CPU-safe
    mm.attach_training_hooks(ddp, optimizer)                    # no_sync / finalize grads / loss scale
    fwd_bwd = get_forward_backward_func()
    with compat_cpu.cuda_to_cpu():                               # no-op on GPU
        ddp.zero_grad_buffer(); optimizer.zero_grad()
        losses = fwd_bwd(forward_step_func=..., data_iterator=..., model=[ddp], num_microbatches=n,
                         seq_length=S // cp, micro_batch_size=mbs, forward_only=False)
        ok, grad_norm, _ = optimizer.step()

Batches are sharded with :func:`shard_batch_for_cp` (Megatron's zigzag layout, one signature for
megatron-core 0.16 and 0.19). Loss under CP (Megatron DDP averages gradients over dp x cp): with
a 2-tuple ``loss_func`` return this rank's ``local_loss_sum / micro_batch_token_count`` (the
schedule multiplies it by ``cp``); with ``calculate_per_token_loss=True`` return the local sum
and local count (``finalize_model_grads`` divides by the global count). Both are tested equal to
CP=1 in ``tests/test_megatron_cp.py``. The schedule scales the returned loss *in place*: report
a ``.clone()`` of it, not a ``.detach()`` (which shares storage).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from moba_cp.config import layer_attention_kinds
from moba_cp.megatron import compat_cpu
from moba_cp.megatron.core_attention import MEGATRON_CP_COMM
from moba_cp.megatron.specs import gpt_block_spec

__all__ = [
    "transformer_config_from_recipe", "build_gpt_model", "init_parallel", "wrap_ddp", "build_optimizer",
    "padded_vocab_size", "default_ffn_hidden_size", "attach_training_hooks", "destroy_parallel",
    "shard_batch_for_cp",
]


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """MLP width when the recipe leaves it None: ``4h``, or for SwiGLU ``8h/3`` rounded up to 64.

    (SwiGLU has three matrices instead of two; 8/3 keeps the parameter count of a 4h GeLU MLP.)
    """
    if not swiglu:
        return 4 * hidden_size
    return int(math.ceil(8 * hidden_size / 3 / 64) * 64)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Vocabulary padded to a multiple of ``lcm(divisible_by, tp)`` (the embedding is split over TP).

    Megatron-LM pads to ``divisible_by * tp``, which makes the model (and its loss: padded logits
    enter the softmax) depend on the TP size. The least common multiple keeps every TP size that
    divides ``divisible_by`` on the same vocabulary, so runs and checkpoints agree across layouts.
    """
    unit = divisible_by * tp // math.gcd(divisible_by, tp)
    return int(math.ceil(vocab_size / unit) * unit)


def transformer_config_from_recipe(
    model_cfg,
    parallel_cfg,
    *,
    precision: str = "fp32",
    recompute: str = "none",
    **overrides,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for a recipe's ``ModelConfig`` and ``ParallelConfig``.

    Llama-style choices the recipe does not expose: no biases, no dropout (the MoBA and ring
    kernels have none), fp32 softmax, RoPE applied unfused. On a machine without a GPU,
    ``use_cpu_initialization=True`` and fp32 (``precision`` is ignored: CPU always runs fp32).

    Args:
        precision: ``'fp32'`` or ``'bf16'`` (bf16 params and compute, fp32 main grads in DDP).
        recompute: ``'none'``, ``'selective'`` (core attention recomputed in backward) or
            ``'full'`` (whole layers, uniform, one layer per checkpoint).
        overrides: any other ``TransformerConfig`` field, applied last.
    """
    on_gpu = torch.cuda.is_available()
    bf16 = precision == "bf16" and on_gpu
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}; choose 'fp32' or 'bf16'.")
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
        apply_rope_fusion=False,
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
        import megatron.core
        from packaging.version import Version

        if Version(megatron.core.__version__) < Version("0.19"):
            # 0.16.x indexes the per-layer list with the 1-based layer number (IndexError at the
            # last layer, off by one before). moba_cp's attentions ignore cp_comm_type; only the
            # TE full backend reads it.
            raise ValueError(
                f"cp_comm_type as a per-layer list is broken in megatron-core {megatron.core.__version__} "
                f"(fixed in 0.19). Fix: pass one string (e.g. 'p2p') or leave it None."
            )
    return TransformerConfig(**kw)


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

    Needs Megatron's parallel state (:func:`init_parallel`). On a machine without a GPU the CPU
    compat (:func:`moba_cp.megatron.compat_cpu.activate`) is switched on here.

    Args:
        model_cfg, moba_cfg, attention_cfg, parallel_cfg: the recipe's sub-configs.
        vocab_size: tokenizer vocabulary (overrides ``model_cfg.vocab_size``); padded to a multiple
            of ``make_vocab_size_divisible_by * tp`` (see :func:`padded_vocab_size`).
        pre_process, post_process: embedding / output layer present (pipeline stages; keep True).
        precision, recompute: see :func:`transformer_config_from_recipe`.
        transformer_impl: ``'auto'`` / ``'local'`` / ``'te'`` (see :func:`moba_cp.megatron.specs.gpt_block_spec`).
        config: a ready ``TransformerConfig`` to use instead of deriving one.
    Returns:
        ``GPTModel`` (RoPE, untied or tied embeddings per ``model_cfg.share_embeddings``) on the
        current CUDA device, or on CPU. Its ``forward(input_ids [b, s_local], position_ids,
        attention_mask=None, labels=[b, s_local])`` returns the per-token loss ``[b, s_local]``.
    """
    compat_cpu.activate()
    vocab = vocab_size if vocab_size is not None else model_cfg.vocab_size
    if vocab is None:
        raise ValueError("build_gpt_model: vocab_size is None in the recipe and not given; pass vocab_size=.")
    if config is None:
        config = transformer_config_from_recipe(model_cfg, parallel_cfg, precision=precision, recompute=recompute)
    kinds = layer_attention_kinds(model_cfg, attention_cfg)
    if len(kinds) != config.num_layers:
        raise ValueError(f"attention pattern gives {len(kinds)} layer kinds for {config.num_layers} layers.")
    block = gpt_block_spec(kinds, moba_cfg, attention_cfg, normalization=config.normalization,
                           transformer_impl=transformer_impl)
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


def init_parallel(parallel_cfg, *, seed: int) -> None:
    """Megatron parallel state (tp x cp x dp, no pipeline) and the model-parallel RNG seeds.

    ``torch.distributed`` must already be initialised (nccl on GPU, gloo on CPU); world size
    must be ``tp * cp * dp``. Call :func:`destroy_parallel` (or Megatron's
    ``parallel_state.destroy_model_parallel``) before re-initialising in the same process.
    """
    compat_cpu.activate()
    if torch.cuda.is_available():
        # torchrun's LOCAL_RANK names this process's GPU on its node; rank % count is only a guess.
        local = os.environ.get("LOCAL_RANK")
        torch.cuda.set_device(int(local) if local is not None else torch.distributed.get_rank() % torch.cuda.device_count())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=1,
        context_parallel_size=parallel_cfg.cp,
    )
    if parallel_cfg.dp is not None and parallel_state.get_data_parallel_world_size() != parallel_cfg.dp:
        raise ValueError(f"parallel.dp={parallel_cfg.dp} but world_size / (tp*cp) = "
                         f"{parallel_state.get_data_parallel_world_size()}.")
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Undo :func:`init_parallel` (for tests that build several layouts in one process)."""
    parallel_state.destroy_model_parallel()


def wrap_ddp(model: GPTModel, parallel_cfg, *, overlap_grad_reduce: bool = False, bucket_size: int | None = None):
    """Megatron ``DistributedDataParallel`` over dp x cp with fp32 main grads.

    Gradients are averaged over the data-parallel-with-CP group (dp x cp ranks), so the loss
    each rank differentiates must be its share of the global mean times ``cp`` (module docstring).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=bool(parallel_cfg.distributed_optimizer),
        bucket_size=bucket_size,
    )
    with compat_cpu.cuda_to_cpu():
        return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def build_optimizer(
    ddp_model,
    *,
    lr: float,
    min_lr: float | None = None,
    weight_decay: float = 0.1,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.95,
    clip_grad: float = 1.0,
    distributed_optimizer: bool = False,
):
    """``get_megatron_optimizer`` (AdamW, fp32 master weights when the model is bf16), CPU-safe.

    Call ``optimizer.step()`` inside :func:`moba_cp.megatron.compat_cpu.cuda_to_cpu` (a no-op on
    GPU): on CPU, Megatron's grad-norm and overflow bookkeeping allocate on ``'cuda'``.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = ddp_model.config
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr if min_lr is not None else lr, weight_decay=weight_decay,
        adam_beta1=adam_beta1, adam_beta2=adam_beta2, clip_grad=clip_grad, bf16=cfg.bf16, fp16=False,
        params_dtype=cfg.params_dtype, use_distributed_optimizer=distributed_optimizer,
    )
    with compat_cpu.cuda_to_cpu():
        return get_megatron_optimizer(opt_cfg, [ddp_model])


def attach_training_hooks(ddp_model, optimizer) -> None:
    """Wire Megatron's schedule to DDP and the optimizer, as Megatron-LM's ``pretrain`` does.

    Sets on the model's ``TransformerConfig``: ``no_sync_func`` (grad sync only after the last
    micro-batch), ``finalize_model_grads_func`` (DDP grad all-reduce over dp x cp, plus the TP
    layer-norm all-reduce under sequence parallelism) and ``grad_scale_func`` (loss scaling).
    After this, ``get_forward_backward_func()(...)`` leaves finished gradients for
    ``optimizer.step()``.
    """
    from megatron.core.distributed import finalize_model_grads

    cfg = ddp_model.config
    cfg.no_sync_func = ddp_model.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = optimizer.scale_loss


def shard_batch_for_cp(batch: dict, cp_group=None) -> dict:
    """This rank's zigzag CP shard of a batch of ``[b, S, ...]`` tensors (``attention_mask``: dim 2).

    The layout of ``megatron.core.utils.get_batch_on_this_cp_rank`` (chunks ``r`` and
    ``2cp-1-r``), which RoPE and the moba_cp attentions assume, but with one signature for every
    megatron-core version: 0.19 made ``get_batch_on_this_cp_rank(batch, is_hybrid_cp, ...)``
    take a required ``is_hybrid_cp``, so 0.16.1-style calls fail there. ``None`` values pass
    through; with cp == 1 the batch is returned unchanged.
    """
    from moba_cp.parallel.zigzag import zigzag_shard

    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group()
    cp = cp_group.size()
    if cp == 1:
        return batch
    r = cp_group.rank()
    return {k: (None if v is None else zigzag_shard(v, r, cp, seq_dim=2 if k == "attention_mask" else 1))
            for k, v in batch.items()}
