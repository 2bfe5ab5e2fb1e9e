"""train.loss_normalization: the per-token and per-sample reductions on known values, the
per-sample one split over context-parallel ranks (gloo) equal to the unsplit batch in value and
gradient, and training with it under CP=2 equal to CP=1."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moba_cp.config import load_recipe
from moba_cp.train.loss import masked_loss_sums
from tests.distributed_harness import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def _batch():
    """3 samples x 8 tokens: a full-mask sample, a 2-token 'answer' sample, a sample with no loss tokens."""
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 8, generator=g) * 4
    mask = torch.zeros(3, 8)
    mask[0] = 1
    mask[1, 6:] = 1
    return loss, mask


def test_token_and_sample_reductions_on_known_values():
    loss, mask = _batch()
    s, n = masked_loss_sums(loss, mask, "token")
    assert int(n) == 10
    assert float(s) == pytest.approx(float(loss[0].sum() + loss[1, 6:].sum()))
    s, n = masked_loss_sums(loss, mask, "sample")
    assert int(n) == 2  # the sample without loss tokens is not counted
    want = (loss[0].mean() + loss[1, 6:].mean()) / 2
    assert float(s / n) == pytest.approx(float(want))
    # the two differ here: the answer sample's 2 tokens weigh 1/2 instead of 2/10
    assert abs(float(s / n) - float(masked_loss_sums(loss, mask, "token")[0]) / 10) > 1e-3
    with pytest.raises(ValueError, match="loss normalization 'samples': choose one of token, sample"):
        masked_loss_sums(loss, mask, "samples")
    with pytest.raises(ValueError, match=r"must both be \[B, S\]"):
        masked_loss_sums(loss, mask[:, :4], "sample")


def _split_worker(rank, world_size):
    """Each rank holds an interleaved, uneven share of every sample's tokens (as zigzag CP does)."""
    loss, mask = _batch()
    loss.requires_grad_(True)
    cols = [c for c in range(8) if (c * 3 + 1) % world_size == rank]  # uneven, non-contiguous
    part = loss[:, cols]
    s, n = masked_loss_sums(part, mask[:, cols], "sample", cp_group=dist.group.WORLD)
    total = torch.stack([s.detach(), n.float()])
    dist.all_reduce(total)
    # Megatron divides every rank's gradient by the all-reduced count; the sum over ranks is the batch's
    (s / total[1]).backward()
    grad = loss.grad.clone()
    dist.all_reduce(grad)
    return (total[0] / total[1]).item(), int(n), grad


@pytest.mark.parametrize("world", [2, 4])
def test_sample_reduction_split_over_cp_ranks_equals_the_unsplit_batch(world):
    loss, mask = _batch()
    ref_loss = loss.clone().requires_grad_(True)
    s, n = masked_loss_sums(ref_loss, mask, "sample")
    (s / n).backward()
    out = run_distributed(_split_worker, world_size=world)
    for value, _, grad in out:
        assert value == pytest.approx(float((s / n).detach()), rel=1e-6)
        torch.testing.assert_close(grad, ref_loss.grad, rtol=1e-6, atol=1e-7)
    assert [c for _, c, _ in out] == [2] + [0] * (world - 1)  # each sample counted once, on CP rank 0


_TRAIN = [
    "--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
    "--model.num_query_groups=2", "--model.seq_length=512", "--moba.block_size=32", "--moba.topk=3",
    "--train.lr=3e-3", "--train.min_lr=3e-4", "--train.warmup_steps=2", "--train.precision=fp32",
    "--train.steps=3", "--train.global_batch_size=2", "--logging.interval=1", "--logging.tensorboard=false",
    "--eval.interval=0", "--checkpoint.save=false", "--data.retrieval_fraction=0.5",
    "--data.retrieval_kinds=[passkey]", "--data.retrieval_loss_on=answer",
]


def _train_worker(rank, world_size, overrides):
    from moba_cp.train.loop import train

    return train(load_recipe(str(ROOT / "recipes/quickstart.yaml"), overrides)).losses


def test_training_with_sample_normalization_under_cp2_equals_cp1(tmp_path):
    """Half the samples are retrieval documents with the loss on their answer only: per-sample
    weighting changes the training loss (so the option reaches the loop), and CP=2 (each sample's
    count all-reduced over the two ranks) gives CP=1's losses."""
    common = _TRAIN + [f"--data.cache_dir={tmp_path}/cache"]
    token = run_distributed(_train_worker, world_size=1, timeout=400,
                            args=(common + ["--parallel.cp=1", f"--logging.dir={tmp_path}/token"],))[0]
    sample = ["--train.loss_normalization=sample"]
    cp1 = run_distributed(_train_worker, world_size=1, timeout=400,
                          args=(common + sample + ["--parallel.cp=1", f"--logging.dir={tmp_path}/cp1"],))[0]
    cp2 = run_distributed(_train_worker, world_size=2, timeout=400,
                          args=(common + sample + ["--parallel.cp=2", f"--logging.dir={tmp_path}/cp2"],))
    assert cp2[0] == cp2[1]
    assert cp2[0] == pytest.approx(cp1, rel=1e-4), (cp1, cp2[0])
    assert any(abs(a - b) > 1e-2 for a, b in zip(token, cp1)), (token, cp1)
