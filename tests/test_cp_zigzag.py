"""Zigzag layout: identical to Megatron's get_batch_on_this_cp_rank; unshard inverts shard."""

import pytest
import torch

from moba_cp.parallel.zigzag import chunk_owner, zigzag_positions, zigzag_shard, zigzag_unshard


class _FakeGroup:
    def __init__(self, rank, size):
        self._r, self._s = rank, size

    def rank(self):
        return self._r

    def size(self):
        return self._s


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_shard_equals_megatron(cp, monkeypatch):
    mutils = pytest.importorskip("megatron.core.utils")
    # get_batch_on_this_cp_rank asks torch.distributed whether it is initialised, then only
    # group.size()/group.rank(): a stand-in group is enough, no processes needed.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    s = 2 * cp * 5
    tokens = torch.arange(3 * s).reshape(3, s)  # [b, s] as Megatron's batches
    hidden = torch.randn(3, s, 4, 2)  # [b, s, h, d]
    mask = torch.rand(3, 1, s, s) > 0.5  # attention_mask: sequence dim 2
    for r in range(cp):
        ref = mutils.get_batch_on_this_cp_rank(
            {"tokens": tokens.clone(), "hidden": hidden.clone(), "attention_mask": mask.clone()},
            cp_group=_FakeGroup(r, cp),
        )
        assert torch.equal(zigzag_shard(tokens, r, cp, seq_dim=1), ref["tokens"])
        assert torch.equal(zigzag_shard(hidden, r, cp, seq_dim=1), ref["hidden"])
        assert torch.equal(zigzag_shard(mask, r, cp, seq_dim=2), ref["attention_mask"])
        # positions of the shard = the shard of the positions
        assert torch.equal(zigzag_positions(s // cp, r, cp), zigzag_shard(torch.arange(s), r, cp))


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_unshard_inverts_shard(cp):
    x = torch.randn(7, 2 * cp * 3, 5)
    shards = [zigzag_shard(x, r, cp, seq_dim=1) for r in range(cp)]
    assert torch.equal(zigzag_unshard(shards, seq_dim=1), x)
    # each global chunk has exactly one owner, and it is the rank that holds it
    for c in range(2 * cp):
        assert c in (chunk_owner(c, cp), 2 * cp - 1 - chunk_owner(c, cp))


def test_bad_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by 2\\*cp_size=4"):
        zigzag_shard(torch.zeros(10), 0, 2)
    with pytest.raises(ValueError, match="same shape"):
        zigzag_unshard([torch.zeros(4), torch.zeros(6)])
