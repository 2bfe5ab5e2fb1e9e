"""The multi-process harness itself: results come back per rank, a failing rank fails the test."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed_harness import WorkerError, run_distributed


def _sum_ranks(rank, world_size, offset):
    t = torch.tensor([rank + offset], dtype=torch.float32)
    dist.all_reduce(t)
    return t


def _rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    return rank


def test_results_come_back_per_rank():
    out = run_distributed(_sum_ranks, world_size=2, args=(1.0,))
    assert [t.item() for t in out] == [3.0, 3.0]


def test_a_raising_rank_fails_with_its_traceback():
    with pytest.raises(WorkerError, match="boom from rank 1"):
        run_distributed(_rank_one_raises, world_size=2)
