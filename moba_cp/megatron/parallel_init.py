"""Megatron-Core's parallel state and RNG seeds for a recipe; the CPU compat's one switch-on."""

from __future__ import annotations

import os

import torch
from megatron.core import parallel_state, tensor_parallel

from moba_cp.megatron import compat_cpu

__all__ = ["init_parallel", "destroy_parallel"]


def init_parallel(parallel_cfg, *, seed: int) -> None:
    """Megatron parallel state (tp x cp x dp, no pipeline) and the model-parallel RNG seeds.

    ``torch.distributed`` must already be initialised (nccl on GPU, gloo on CPU); world size
    must be ``tp * cp * dp``. Call :func:`destroy_parallel` (or Megatron's
    ``parallel_state.destroy_model_parallel``) before re-initialising in the same process.

    On a machine without a GPU this is where Megatron-Core's CPU compat is switched on
    (:func:`moba_cp.megatron.compat_cpu.activate`): the one place, since every use of
    Megatron-Core starts here (``docs/design.md`` section 4).
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
