"""The fused CP helpers (Triton; under the interpreter on CPU) against their torch references:
the LSE merge and the selection bookkeeping (which blocks are used, id renaming)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moba_cp.ops.lse_merge import merge_into  # noqa: E402
from moba_cp.ops.moba.block_ids import remap_ids, selected_mask  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter


def _partials(shape, d, gen):
    o, o_new = torch.randn(*shape, d, generator=gen), torch.randn(*shape, d, generator=gen)
    lse, lse_new = torch.randn(*shape, generator=gen) * 3, torch.randn(*shape, generator=gen) * 3
    lse.view(-1)[0] = float("-inf")  # only the new partial has keys
    lse_new.view(-1)[1] = float("-inf")  # only the old one
    lse.view(-1)[2] = lse_new.view(-1)[2] = float("-inf")  # neither: o = 0, lse = -inf
    return o.to(DEV), lse.to(DEV), o_new.to(DEV), lse_new.to(DEV)


@pytest.mark.parametrize("d", [16, 24])  # 24: a head dim that is not a power of two
def test_fused_merge_equals_torch_merge(d):
    gen = torch.Generator().manual_seed(0)
    o, lse, o_new, lse_new = _partials((29, 3), d, gen)
    ref_o, ref_l = merge_into(o, lse, o_new, lse_new, use_triton=False)
    got_o, got_l = merge_into(o, lse, o_new, lse_new, use_triton=True)
    assert got_o.dtype == torch.float32 and got_o.shape == ref_o.shape
    assert torch.equal(torch.isinf(got_l), torch.isinf(ref_l)) and bool(torch.isinf(got_l.view(-1)[2]))
    fin = torch.isfinite(ref_l)
    assert (got_l[fin] - ref_l[fin]).abs().max().item() < 1e-6
    assert (got_o - ref_o).abs().max().item() < 1e-6
    assert got_o.view(-1, d)[2].abs().max().item() == 0.0
    # Half inputs, output written in bf16 directly: within one bf16 rounding of the fp32 merge.
    hb_o, hb_l = merge_into(o.bfloat16(), lse, o_new.bfloat16(), lse_new, out_dtype=torch.bfloat16, use_triton=True)
    ref32, _ = merge_into(o.bfloat16(), lse, o_new.bfloat16(), lse_new, use_triton=False)
    assert hb_o.dtype == torch.bfloat16
    assert ((hb_o.float() - ref32).abs() <= 2**-7 * ref32.abs() + 1e-6).all()


def test_selected_mask_and_remap_equal_torch():
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(-1, 40, (33, 4, 5), generator=gen, dtype=torch.int32)
    idx[:, :, -1] = -1
    idx = idx.to(DEV)
    want = selected_mask(idx, 45, use_triton=False)
    got = selected_mask(idx, 45, use_triton=True)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert not bool(want[40:].any()) and int(want.sum()) == int(idx[idx >= 0].unique().numel())
    table = torch.randperm(45, generator=gen).to(torch.int32).to(DEV)
    ref = remap_ids(idx, table, use_triton=False)
    out = remap_ids(idx, table, use_triton=True)
    assert out.dtype == torch.int32 and out.shape == idx.shape and torch.equal(out, ref)
    assert torch.equal(out == -1, idx == -1)
