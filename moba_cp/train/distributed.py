"""Process groups for training: torchrun environment (or a single local process), Megatron state."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moba_cp.config import ParallelConfig
from moba_cp.megatron.parallel_init import init_parallel

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "world_size_from_env"]


@dataclass
class DistEnv:
    """Where this process sits: global rank, device and its tp/cp/dp coordinates."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    cp: int
    dp: int
    tp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """WORLD_SIZE set by torchrun, or 1 for a plain ``python -m moba_cp.train``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int) -> DistEnv:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's parallel state.

    Works under torchrun (single or multi node) and as a plain single process. On a machine
    without a GPU, :func:`~moba_cp.megatron.parallel_init.init_parallel` switches on moba_cp's
    Megatron CPU compat.
    """
    if "RANK" not in os.environ:  # plain `python -m moba_cp.train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)  # before NCCL init; init_parallel keeps the same device
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Several ranks share a few CPU cores: more threads per rank only thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    init_parallel(parallel, seed=seed)
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, device=device,
        tp=parallel.tp, cp=parallel.cp, dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def shutdown_distributed() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
