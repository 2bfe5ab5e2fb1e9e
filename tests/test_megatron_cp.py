"""Megatron-Core GPTModel under context (and tensor) parallelism equals the unsplit model (CPU, gloo).

Every worker first computes the reference itself (tp=1, cp=1, whole sequence), then rebuilds the
model under the layout being tested with the *same* weights (TP shards cut from the reference
state), and compares the loss and every parameter gradient.

Loss convention under CP: each rank differentiates ``local_loss_sum / global_token_count``; the
gradients are then summed over the CP group (what Megatron DDP's average over dp x cp does to
``loss * cp``, exercised by ``test_ddp_optimizer_two_steps_cp2_equals_cp1``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from tests.distributed_harness import run_distributed  # noqa: E402
from tests.megatron_util import (  # noqa: E402
    attention_cfg, batch, build, loss_on_this_rank, max_rel, moba_cfg, shard_for_tp,
    tiny_model_cfg, tp_layout, unshard_from_tp,
)

S = 256          # global sequence; cp=4 -> 8 zigzag chunks of 32 tokens = 2 MoBA blocks of 16
BLOCK, TOPK = 16, 3



def _patterns():
    """MoBA-only, and hybrid (MoBA + full layers: ring_attn_cp for the full layer)."""
    return ["moba", "hybrid"]


def _w_equal(rank, world_size, tp, cp, cases, model_kw=None):
    """``cases``: ``[(pattern, sequence_parallel[, cp_comm, a2a_size]), ...]``, all run in this one set
    of processes (cp_comm defaults to the ring); ``model_kw``: more ``ModelConfig`` fields."""
    from megatron.core import parallel_state as ps

    from moba_cp.config import ParallelConfig
    from moba_cp.megatron.model import transformer_config_from_recipe

    tokens = batch(2, S)
    mcfg = tiny_model_cfg(seq_length=S, **(model_kw or {}))
    results = {}
    for pattern, sequence_parallel, *comm in cases:
        cp_comm, a2a_size = comm or ("ring", None)
        extra = {}
        if cp_comm != "ring":  # the recipe's parallel.cp_comm reaches core attention through the config
            pcfg = ParallelConfig(tp=tp, cp=cp, cp_comm=cp_comm, a2a_size=a2a_size)
            extra["config"] = transformer_config_from_recipe(mcfg, pcfg)
        acfg = attention_cfg(pattern)
        # reference: the unsplit model on the whole sequence
        ref, _ = build(mcfg, moba_cfg(BLOCK, TOPK), acfg)
        ref_loss = loss_on_this_rank(ref, tokens)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_state = {n: p.detach().clone() for n, p in ref.named_parameters()}

        model, _ = build(mcfg, moba_cfg(BLOCK, TOPK), acfg, tp=tp, cp=cp, sequence_parallel=sequence_parallel,
                         **extra)
        if cp_comm != "ring":
            seen = {m.cp_comm for m in model.modules() if hasattr(m, "cp_comm")}
            assert seen == {cp_comm}, seen
        tp_rank, tp_group, cp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group(), \
            ps.get_context_parallel_group()
        layout = tp_layout(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                dim, glu = layout[n]
                p.copy_(shard_for_tp(ref_state[n], dim, glu, tp_rank, tp))
        loss = loss_on_this_rank(model, tokens)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)  # the global mean = sum of the CP ranks' shares
        errs = {}
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=cp_group)
            if sequence_parallel and getattr(p, "sequence_parallel", False):
                dist.all_reduce(g, group=tp_group)  # norms see a TP slice of the tokens under SP
            dim, glu = layout[n]
            errs[n] = max_rel(unshard_from_tp(g, dim, glu, tp_group), ref_grads[n])
        name = f"{pattern}{'+sp' if sequence_parallel else ''}{'' if cp_comm == 'ring' else '+' + cp_comm}"
        results[name] = (ref_loss.item(), total.item(), errs)
    return results


def _check(results, loss_rtol=2e-6, grad_rtol=5e-5):
    for rank, per_pattern in enumerate(results):
        for pattern, (ref_loss, loss, errs) in per_pattern.items():
            assert abs(loss - ref_loss) <= loss_rtol * abs(ref_loss), (rank, pattern, loss, ref_loss)
            worst = max(errs, key=errs.get)
            assert errs[worst] < grad_rtol, f"rank {rank} {pattern}: grad of {worst} off by {errs[worst]:.2e}"
            assert len(errs) >= 10  # every parameter was compared (2 layers x 5 + embedding, norm, output)


@pytest.mark.parametrize("cp", [2, 4])
def test_gpt_cp_loss_and_grads_equal_cp1(cp):
    _check(run_distributed(_w_equal, cp, args=(1, cp, [(p, False) for p in _patterns()])))


def test_gpt_cp4_each_comm_type_equals_cp1():
    # 4 query / 2 KV heads at cp=4: 'a2a' gives each rank 1 query head and replicates each KV head
    # on 2 ranks; 'a2a+ring' all-to-alls in 2 groups of 2 and rings across them
    cases = [(p, False, comm, size) for comm, size in (("a2a", None), ("a2a+ring", 2)) for p in _patterns()]
    results = run_distributed(_w_equal, 4, args=(1, 4, cases))
    assert {"moba+a2a", "moba+a2a+ring"} <= set(results[0])
    _check(results)


def test_gpt_tp2_cp2_equals_tp1_cp1():
    # the last case adds Megatron sequence parallelism (norms and dropout on s/tp tokens)
    results = run_distributed(_w_equal, 4, args=(2, 2, [(p, False) for p in _patterns()] + [("moba", True)]))
    assert "moba+sp" in results[0]
    _check(results)


# ----------------------------------------------------------------------------- the training-loop path

def _w_train(rank, world_size, cp, variants):
    """Two optimizer steps through Megatron's own machinery: DDP, get_megatron_optimizer,
    get_forward_backward_func, finalize_model_grads (with the CPU compat), 2 micro-batches each,
    at CP=1 (the reference; dp=2 ranks on the same data) and at CP=``cp``.

    ``variants``: ``[(distributed_optimizer, per_token), ...]``. ``per_token`` is Megatron's
    ``calculate_per_token_loss`` convention (loss_func returns the local loss *sum* and token
    count; finalize_model_grads divides by the global count), else the default one (this rank's
    share of the micro-batch mean, scaled by cp in the schedule)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moba_cp.config import ParallelConfig
    from moba_cp.megatron import compat_cpu
    from moba_cp.megatron.optimizer import build_optimizer, wrap_ddp
    from moba_cp.megatron.training_hooks import attach_training_hooks
    from moba_cp.megatron.transformer_config import transformer_config_from_recipe
    from tests.megatron_util import cp_shard

    steps = [batch(2, S, seed=10 + i) for i in range(2)]
    mcfg = tiny_model_cfg(seq_length=S)
    n_tok = steps[0][:, 1:][:1].numel()  # tokens per micro-batch (global, unsharded)

    def run(cp_size, dist_opt, per_token):
        extra = {}
        if per_token:
            extra["config"] = transformer_config_from_recipe(mcfg, ParallelConfig(cp=cp_size),
                                                             calculate_per_token_loss=True)
        model, pcfg = build(mcfg, moba_cfg(BLOCK, TOPK), attention_cfg("hybrid"),
                            cp=cp_size, distributed_optimizer=dist_opt, **extra)
        ddp = wrap_ddp(model, pcfg)
        opt = build_optimizer(ddp, lr=3e-3, weight_decay=0.01, clip_grad=1.0, distributed_optimizer=dist_opt)
        attach_training_hooks(ddp, opt)
        fwd_bwd = get_forward_backward_func()

        def forward_step(data_iterator, m):
            tok = next(data_iterator)
            inp, lab = tok[:, :-1], tok[:, 1:]
            out = m(cp_shard(inp), None, None, labels=cp_shard(lab))

            def loss_func(per_token_loss):
                if per_token:
                    local_sum = per_token_loss.sum()
                    count = torch.tensor(per_token_loss.numel(), dtype=torch.int)
                    return local_sum, count, {"lm loss": local_sum.detach().clone() / n_tok}
                share = per_token_loss.sum() / n_tok  # this rank's share of the micro-batch mean
                # the schedule scales `share` in place (x cp / n_microbatches): report a copy
                return share, {"lm loss": share.detach().clone()}
            return out, loss_func

        losses, norms = [], []
        for tok in steps:
            ddp.zero_grad_buffer()
            opt.zero_grad()
            with compat_cpu.cuda_to_cpu():
                out = fwd_bwd(forward_step_func=forward_step, data_iterator=iter([tok[:1], tok[1:]]),
                              model=[ddp], num_microbatches=2, seq_length=S // cp_size, micro_batch_size=1,
                              forward_only=False)
                ok, grad_norm, _ = opt.step()
            assert ok
            share = torch.stack([o["lm loss"] for o in out]).sum() / 2  # mean over micro-batches
            dist.all_reduce(share, group=ps.get_context_parallel_group())
            losses.append(share.item())
            norms.append(float(grad_norm))
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        return losses, norms, params

    refs, out = {}, {}
    for dist_opt, per_token in variants:
        if per_token not in refs:
            refs[per_token] = run(1, False, per_token)
        ref = refs[per_token]
        got = run(cp, dist_opt, per_token)
        # Adam turns tiny gradient differences on near-zero gradients into visible update
        # differences, so parameters are compared in units of the learning rate (the grad norms
        # catch scale bugs: Adam itself is invariant to a wrong loss scale).
        errs = {n: float((got[2][n] - ref[2][n]).abs().max()) / 3e-3 for n in ref[2]}
        out[(dist_opt, per_token)] = (ref[:2], got[:2], errs)
    return out


def test_ddp_optimizer_two_steps_cp2_equals_cp1():
    variants = [(False, False), (True, False), (False, True)]
    results = run_distributed(_w_train, 2, args=(2, variants))
    for rank, per_variant in enumerate(results):
        assert set(per_variant) == set(variants)
        for (dist_opt, per_token), ((ref_losses, ref_norms), (losses, norms), errs) in per_variant.items():
            tag = f"rank {rank} distributed_optimizer={dist_opt} per_token_loss={per_token}"
            assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5), (tag, losses, ref_losses)
            assert torch.allclose(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4), (tag, norms, ref_norms)
            assert ref_losses[1] < ref_losses[0] + 1.0  # it trains (finite, no blow-up)
            worst = max(errs, key=errs.get)
            assert errs[worst] < 2e-2, f"{tag}: {worst} off by {errs[worst]:.2e} lr"
        # both loss conventions must give the same gradients (Adam would hide a scale error)
        n_default, n_per_token = per_variant[(False, False)][0][1][0], per_variant[(False, True)][0][1][0]
        assert abs(n_per_token - n_default) <= 1e-5 * n_default, (n_default, n_per_token)
