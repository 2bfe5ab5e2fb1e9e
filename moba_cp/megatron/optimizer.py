"""Megatron DDP and optimizer for a built ``GPTModel`` (CPU-safe through the compat module)."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from moba_cp.megatron import compat_cpu

__all__ = ["wrap_ddp", "build_optimizer"]


def wrap_ddp(model: GPTModel, parallel_cfg, *, overlap_grad_reduce: bool = False, bucket_size: int | None = None):
    """Megatron ``DistributedDataParallel`` over dp x cp with fp32 main grads.

    Gradients are averaged over the data-parallel-with-CP group (dp x cp ranks), so the loss
    each rank differentiates must be its share of the global mean times ``cp`` (see
    :mod:`moba_cp.megatron.model`).
    """
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
    cfg = ddp_model.config
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr if min_lr is not None else lr, weight_decay=weight_decay,
        adam_beta1=adam_beta1, adam_beta2=adam_beta2, clip_grad=clip_grad, bf16=cfg.bf16, fp16=False,
        params_dtype=cfg.params_dtype, use_distributed_optimizer=distributed_optimizer,
    )
    with compat_cpu.cuda_to_cpu():
        return get_megatron_optimizer(opt_cfg, [ddp_model])
