"""Wire Megatron's forward-backward schedule to DDP and the optimizer."""

from __future__ import annotations

from megatron.core.distributed import finalize_model_grads

__all__ = ["attach_training_hooks"]


def attach_training_hooks(ddp_model, optimizer) -> None:
    """Wire Megatron's schedule to DDP and the optimizer, as Megatron-LM's ``pretrain`` does.

    Sets on the model's ``TransformerConfig``: ``no_sync_func`` (grad sync only after the last
    micro-batch), ``finalize_model_grads_func`` (DDP grad all-reduce over dp x cp, plus the TP
    layer-norm all-reduce under sequence parallelism) and ``grad_scale_func`` (loss scaling).
    After this, ``get_forward_backward_func()(...)`` leaves finished gradients for
    ``optimizer.step()``.
    """
    cfg = ddp_model.config
    cfg.no_sync_func = ddp_model.no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = optimizer.scale_loss
