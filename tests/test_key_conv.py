"""Key convolution (``moba.key_conv``): the op against a per-token loop, its context-parallel halo
exchange against the unsplit op (gloo, 2 and 4 ranks, outputs and gradients), a Megatron GPT
with key convolution under CP=2 against CP=1, and recipe validation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moba_cp.config import RecipeError, load_recipe
from moba_cp.ops.key_conv import key_conv
from tests.distributed_harness import run_distributed


def _loop_oracle(k, weight, halo=None, doc_starts=None):
    """``k [S, H, D]``: out[t] = k[t] + sum_j weight[..., j] * k[t - (W-1) + j], zeros before the
    sequence / document start (or the halo's keys before k[0])."""
    s, w = k.shape[0], weight.shape[-1]
    ext = torch.cat([halo if halo is not None else torch.zeros(w - 1, *k.shape[1:], dtype=k.dtype), k])
    out = k.clone()
    for t in range(s):
        start = max((d for d in (doc_starts or [0]) if d <= t), default=0)
        for j in range(w):
            src = t - (w - 1) + j
            if doc_starts is not None and src < start:
                continue
            out[t] += weight[..., j] * ext[src + w - 1]
    return out


def test_key_conv_matches_the_loop_and_is_identity_at_zero():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 11, 3, 4, generator=g, dtype=torch.float64)
    for w in (3, 5):
        weight = torch.randn(3, 4, w, generator=g, dtype=torch.float64)
        out = key_conv(k, weight)
        for b in range(2):
            torch.testing.assert_close(out[b], _loop_oracle(k[b], weight))
        halo = torch.randn(2, w - 1, 3, 4, generator=g, dtype=torch.float64)
        out = key_conv(k, weight, halo=halo)
        torch.testing.assert_close(out[1], _loop_oracle(k[1], weight, halo=halo[1]))
        assert torch.equal(key_conv(k, torch.zeros_like(weight)), k)  # zero init = plain MoBA keys
    # packed documents: the convolution restarts at every document, padding after the last reads nothing
    packed, weight = k[0], torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    out = key_conv(packed, weight, cu_seqlens=cu)
    torch.testing.assert_close(out, _loop_oracle(packed, weight, doc_starts=[0, 4, 5, 9]))
    # bf16 in, bf16 out (the sum runs in fp32)
    assert key_conv(k.to(torch.bfloat16), weight.to(torch.bfloat16)).dtype == torch.bfloat16


def test_key_conv_gradients():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(7, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    halo = torch.randn(2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: key_conv(a, b, halo=c), (k, weight, halo))
    cu = torch.tensor([0, 3, 7])
    assert torch.autograd.gradcheck(lambda a, b: key_conv(a, b, cu_seqlens=cu), (k, weight))


def test_key_conv_errors():
    k = torch.zeros(8, 2, 4)
    with pytest.raises(ValueError, match=r"weight is \(2, 4\); expected \[H, D, W\]"):
        key_conv(k, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="W >= 2"):
        key_conv(k, torch.zeros(2, 4, 1))
    with pytest.raises(ValueError, match=r"halo is \(3, 2, 4\); expected \(2, 2, 4\)"):
        key_conv(k, torch.zeros(2, 4, 3), halo=torch.zeros(3, 2, 4))


# ----------------------------------------------------------------------------- the CP halo

def _w_halo(rank, world_size, width, batched):
    from moba_cp.parallel.key_conv_halo import key_conv_cp
    from moba_cp.parallel.zigzag import zigzag_shard

    g = torch.Generator().manual_seed(3)
    shape = (2, 8 * world_size, 3, 4) if batched else (8 * world_size, 3, 4)
    k = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, width, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(*shape, generator=g, dtype=torch.float64)
    ref = key_conv(k, weight)
    ref.backward(up)
    seq = 1 if batched else 0
    k_loc = zigzag_shard(k.detach(), rank, world_size, seq_dim=seq).requires_grad_(True)
    w_loc = weight.detach().clone().requires_grad_(True)
    out = key_conv_cp(k_loc, w_loc, cp_group=dist.group.WORLD)
    out.backward(zigzag_shard(up, rank, world_size, seq_dim=seq))
    dw = w_loc.grad.clone()
    dist.all_reduce(dw)  # the weight is replicated: its gradient is the sum of the ranks' shares
    return (float((out - zigzag_shard(ref.detach(), rank, world_size, seq_dim=seq)).abs().max()),
            float((k_loc.grad - zigzag_shard(k.grad, rank, world_size, seq_dim=seq)).abs().max()),
            float((dw - weight.grad).abs().max()))


@pytest.mark.parametrize("world_size,width,batched", [(2, 3, False), (2, 5, True), (4, 5, False)])
def test_key_conv_cp_halo_equals_unsplit(world_size, width, batched):
    for rank, errs in enumerate(run_distributed(_w_halo, world_size, args=(width, batched))):
        assert max(errs) < 1e-12, (rank, errs)


def _w_halo_too_short(rank, world_size):
    from moba_cp.parallel.key_conv_halo import key_conv_cp

    try:
        key_conv_cp(torch.zeros(4, 1, 2), torch.zeros(1, 2, 5), cp_group=dist.group.WORLD)  # chunks of 2 < 4
    except ValueError as e:
        return str(e)
    return None


def test_key_conv_cp_refuses_chunks_shorter_than_the_halo():
    for msg in run_distributed(_w_halo_too_short, 2):
        assert msg and "chunks of 2" in msg and "at least 4" in msg


# ----------------------------------------------------------------------------- Megatron GPT, CP=2 vs CP=1

def _w_gpt(rank, world_size, tp, cp, ckpt_dir):
    import os

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from moba_cp.megatron import compat_cpu

    from moba_cp.config import MoBAConfig
    from tests.megatron_util import (attention_cfg, batch, build, loss_on_this_rank, max_rel, shard_for_tp,
                                     tiny_model_cfg, tp_layout, unshard_from_tp)

    s = 256
    mcfg, mb = tiny_model_cfg(seq_length=s), MoBAConfig(block_size=16, topk=3, backend="naive", key_conv=3)
    tokens = batch(2, s)
    ref, _ = build(mcfg, mb, attention_cfg("hybrid"))
    convs = [n for n, _ in ref.named_parameters() if "key_conv" in n]
    assert len(convs) == 1  # hybrid: the MoBA layer has one, the full layer none
    with torch.no_grad():  # not the zero init: the keys must really be convolved
        g = torch.Generator().manual_seed(5)
        for n, p in ref.named_parameters():
            if "key_conv" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    ref_loss = loss_on_this_rank(ref, tokens)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    state = {n: p.detach().clone() for n, p in ref.named_parameters()}
    model, _ = build(mcfg, mb, attention_cfg("hybrid"), tp=tp, cp=cp)
    layout = tp_layout(model)
    assert layout[convs[0]][0] == 0  # TP-sharded by KV head, like the key projection
    tp_rank, tp_group, cp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group(), \
        ps.get_context_parallel_group()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shard_for_tp(state[n], *layout[n], tp_rank, tp))
    loss = loss_on_this_rank(model, tokens)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp_group)
    errs = {}
    for n, p in model.named_parameters():
        gr = p.grad.clone()
        dist.all_reduce(gr, group=cp_group)
        errs[n] = max_rel(unshard_from_tp(gr, *layout[n], tp_group), ref_grads[n])
    sharded = model.sharded_state_dict()  # the checkpoint view: the key-conv weight is a TP shard
    key = next(k for k in sharded if "key_conv" in k)
    assert sharded[key].key.endswith("key_conv.weight.layer1")
    shard = (tuple(sharded[key].global_shape), tuple(sharded[key].global_offset))
    # checkpoint round trip (Megatron's distributed checkpointing) into a fresh model (zero key conv)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    with compat_cpu.cuda_to_cpu():
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    fresh, _ = build(mcfg, mb, attention_cfg("hybrid"), tp=tp, cp=cp)
    with compat_cpu.cuda_to_cpu(), torch.no_grad():
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir))
    trained = dict(model.named_parameters())
    restored = max(float((p - trained[n]).abs().max()) for n, p in fresh.named_parameters())
    plain, _ = build(mcfg, MoBAConfig(block_size=16, topk=3, backend="naive"), attention_cfg("hybrid"))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(state[n])
    plain_loss = loss_on_this_rank(plain, tokens).item()  # same weights without the convolution
    return ref_loss.item(), total.item(), errs, convs[0], plain_loss, shard, tp_rank, restored


@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 1)])
def test_gpt_with_key_conv_under_cp_or_tp_equals_unsplit(tp, cp, tmp_path):
    """Loss and every gradient against the unsplit model; the hybrid model's key convolution (in its
    MoBA layer only) survives a distributed-checkpoint round trip, TP-sharded by KV head."""
    results = run_distributed(_w_gpt, 2, args=(tp, cp, str(tmp_path / "ckpt")))
    for ref_loss, loss, errs, conv, plain_loss, shard, tp_rank, restored in results:
        assert abs(loss - ref_loss) <= 2e-6 * abs(ref_loss), (loss, ref_loss)
        worst = max(errs, key=errs.get)
        assert errs[worst] < 5e-5, (worst, errs[worst])
        assert errs[conv] < 5e-5 and len(errs) >= 11
        assert abs(plain_loss - ref_loss) > 1e-4  # the convolution changed the model
        assert shard == ((2, 16, 3), (tp_rank if tp == 2 else 0, 0, 0))  # own key per layer, no layer axis
        assert restored == 0.0


def test_recipe_validation_of_key_conv():
    assert load_recipe("recipes/quickstart.yaml", ["--moba.key_conv=5"]).moba.key_conv == 5
    with pytest.raises(RecipeError, match=r"moba.key_conv=4: choose one of 0, 3, 5"):
        load_recipe("recipes/quickstart.yaml", ["--moba.key_conv=4"])
    with pytest.raises(RecipeError, match="the attention pattern has none"):
        load_recipe("recipes/quickstart.yaml", ["--moba.key_conv=3", "--attention.pattern=full"])
    with pytest.raises(RecipeError, match="needs 4 keys before each zigzag chunk"):
        load_recipe("recipes/quickstart.yaml", ["--moba.key_conv=5", "--parallel.cp=2", "--model.seq_length=4",
                                                "--moba.block_size=1"])
