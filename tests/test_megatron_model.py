"""Megatron-Core GPTModel with MoBA / full / hybrid attention on one process (CPU, gloo).

Each test runs its Megatron work in a worker process (``run_distributed(..., world_size=1)``),
so the CPU compat patches never leak into the pytest process.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.distributed_harness import run_distributed  # noqa: E402
from tests.megatron_util import (  # noqa: E402
    attention_cfg, batch, build, loss_on_this_rank, max_rel, moba_cfg, tiny_model_cfg,
)


# ----------------------------------------------------------------------------- layer kinds

def _w_patterns(rank, world_size):
    from moba_cp.megatron.core_attention import FullCoreAttention, MoBACoreAttention

    out = {}
    for pattern in ("moba", "full", "hybrid", "explicit"):
        cfg = tiny_model_cfg(num_layers=3)
        model, _ = build(cfg, moba_cfg(), attention_cfg(pattern, 3))
        out[pattern] = [type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers]
        for layer in model.decoder.layers:
            ca = layer.self_attention.core_attention
            if isinstance(ca, MoBACoreAttention):
                assert (ca.moba_block_size, ca.moba_topk) == (16, 3)
            else:
                assert isinstance(ca, FullCoreAttention)
    # an explicit full_backend='te' without Transformer Engine is a clear error, not a fallback
    from moba_cp.megatron.core_attention import te_available

    te_error = None
    if not te_available():
        from moba_cp.config import AttentionConfig

        try:
            build(tiny_model_cfg(), moba_cfg(), AttentionConfig(pattern="full", full_backend="te"))
        except Exception as e:  # noqa: BLE001 - Megatron re-raises with the module name appended
            te_error = str(e)
    return out, te_error


def test_patterns_put_the_right_attention_in_each_layer():
    (out, te_error), = run_distributed(_w_patterns, 1)
    assert out["moba"] == ["MoBACoreAttention"] * 3
    assert out["full"] == ["FullCoreAttention"] * 3
    assert out["hybrid"] == ["MoBACoreAttention", "MoBACoreAttention", "FullCoreAttention"]
    assert out["explicit"] == ["FullCoreAttention", "MoBACoreAttention", "FullCoreAttention"]
    if te_error is not None:
        assert "transformer-engine is not installed" in te_error and "full_backend=torch" in te_error


# ----------------------------------------------------------------------------- core attention contract

def _w_core_attention(rank, world_size):
    """The modules against moba_attn / a dense reference, in the layouts Megatron hands them."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from moba_cp.megatron import core_attention
    from moba_cp.megatron.core_attention import FullCoreAttention, MoBACoreAttention
    from moba_cp.megatron.transformer_config import transformer_config_from_recipe
    from moba_cp.config import ParallelConfig
    from moba_cp.ops.moba.api import moba_attn

    build(tiny_model_cfg(), moba_cfg(), attention_cfg("moba"))  # parallel state + compat
    cfg = transformer_config_from_recipe(tiny_model_cfg(), ParallelConfig())
    torch.manual_seed(0)
    s, b, hq, hkv, d = 96, 2, 4, 2, 16
    q, k, v = torch.randn(s, b, hq, d), torch.randn(s, b, hkv, d), torch.randn(s, b, hkv, d)
    scale = 0.3
    mk = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
              softmax_scale=scale)
    moba = MoBACoreAttention(**mk, moba_block_size=16, moba_topk=2, moba_backend="naive")
    full = FullCoreAttention(**mk)
    res = {}

    # [s, b, h, d] -> [s, b, h*d], each batch row on its own (outputs and gradients)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    seen = []
    real_moba_attn = core_attention.moba_attn

    def spy(q_, k_, v_, **kw):
        seen.append((q_.data_ptr(), k_.data_ptr(), v_.data_ptr()))
        return real_moba_attn(q_, k_, v_, **kw)

    core_attention.moba_attn = spy
    try:
        o = moba(qg, kg, vg, None, attn_mask_type=AttnMaskType.causal)
    finally:
        core_attention.moba_attn = real_moba_attn
    # batch rows folded into heads are views: the op reads q/k/v where Megatron left them
    res["moba_sbhd_no_copy"] = 0.0 if seen == [(qg.data_ptr(), kg.data_ptr(), vg.data_ptr())] else 1.0
    go = torch.randn_like(o)
    grads = torch.autograd.grad(o, (qg, kg, vg), go)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = torch.stack([moba_attn(qr[:, i], kr[:, i], vr[:, i], block_size=16, topk=2, softmax_scale=scale,
                                 backend="naive") for i in range(b)], dim=1).reshape(s, b, hq * d)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), go)
    res["moba_sbhd"] = max_rel(o, ref)
    for name, g, gr in zip(("dq", "dk", "dv"), grads, ref_grads):
        res[f"moba_sbhd_{name}"] = max_rel(g, gr)

    # full attention: dense causal reference with GQA expanded, scale honoured
    kk, vv = k.repeat_interleave(hq // hkv, dim=2), v.repeat_interleave(hq // hkv, dim=2)
    logits = torch.einsum("sbhd,tbhd->bhst", q, kk) * scale
    logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    dense = torch.einsum("bhst,tbhd->sbhd", logits.softmax(-1), vv).reshape(s, b, hq * d)
    res["full_sbhd"] = max_rel(full(q, k, v, None, attn_mask_type=AttnMaskType.causal), dense)
    # a MoBA layer switched to full attention is full attention
    moba.set_mode("full")
    res["moba_as_full"] = max_rel(moba(q, k, v, None, attn_mask_type=AttnMaskType.causal), dense)
    moba.set_mode("moba")

    # THD: packed documents [t, h, d] with cu_seqlens -> [t, h*d]
    cu = torch.tensor([0, 40, 41, 96], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=55, max_seqlen_kv=55)
    qt, kt, vt = q[:, 0], k[:, 0], v[:, 0]
    o = moba(qt, kt, vt, None, attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=psp)
    ref = moba_attn(qt, kt, vt, block_size=16, topk=2, cu_seqlens=cu, softmax_scale=scale, backend="naive")
    res["moba_thd"] = max_rel(o, ref.reshape(s, hq * d))
    o = full(qt, kt, vt, None, attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=psp)
    big = moba_attn(qt, kt, vt, block_size=16, topk=99, cu_seqlens=cu, softmax_scale=scale, backend="naive")
    res["full_thd"] = max_rel(o, big.reshape(s, hq * d))

    # what must be refused, with a message
    errors = {}
    for name, fn in {
        "padding mask": lambda: moba(q, k, v, None, attn_mask_type=AttnMaskType.padding),
        "bias": lambda: moba(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=torch.zeros(1)),
        "full->moba": lambda: full.set_mode("moba"),
        "dropout": lambda: MoBACoreAttention(**mk, attention_dropout=0.1, moba_block_size=16, moba_topk=2),
        "no moba params": lambda: MoBACoreAttention(**mk),
        # moba.kernel reaches the op, which refuses it on the naive backend (no tiling there)
        "kernel on naive": lambda: MoBACoreAttention(**mk, moba_block_size=16, moba_topk=2, moba_backend="naive",
                                                     moba_kernel="bwd.sub_major=true")(
            q, k, v, None, attn_mask_type=AttnMaskType.causal),
        "bad heads": lambda: moba(q[:, :, :3], k, v, None, attn_mask_type=AttnMaskType.causal),
        "bad heads thd": lambda: moba(qt, kt[:30], vt[:30], None, attn_mask_type=AttnMaskType.padding_causal,
                                      packed_seq_params=psp),
    }.items():
        try:
            fn()
            errors[name] = None
        except (ValueError, RuntimeError) as e:
            errors[name] = str(e)
    return res, errors


def test_core_attention_contract():
    (res, errors), = run_distributed(_w_core_attention, 1)
    for name, err in res.items():
        assert err < 1e-5, f"{name}: max rel err {err:.2e}"
    for name, msg in errors.items():
        assert msg, f"{name} was accepted; it must raise"
    # the op's own input rules (moba_cp.ops.moba.validate), in Megatron's layouts
    assert "MoBACoreAttention: Hq=3 query heads is not divisible by Hkv=2" in errors["bad heads"]
    assert "MoBACoreAttention: q has 96 tokens but k/v have 30" in errors["bad heads thd"]
    assert "MoBACoreAttention spec params: block_size=None is invalid" in errors["no moba params"]
    assert "kernel='bwd.sub_major=true' sets the Triton kernels' tiling" in errors["kernel on naive"]


def test_cuda_to_cpu_does_not_switch_the_compat_on():
    """The CPU compat is switched on only by init_parallel (docs/design.md section 4): the
    context manager refuses to run half-patched instead of activating it on the side. (The
    pytest process itself is never patched: Megatron runs in worker processes.)"""
    import torch

    from moba_cp.megatron import compat_cpu

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine cuda_to_cpu is a no-op")
    assert not compat_cpu.is_active()
    with pytest.raises(RuntimeError, match="Fix: initialise the parallel state first with "
                                           "moba_cp.megatron.parallel_init.init_parallel"):
        with compat_cpu.cuda_to_cpu():
            pass
    assert not compat_cpu.is_active()


# ----------------------------------------------------------------------------- topk >= n_blocks == full

def _w_topk_full(rank, world_size):
    s = 256
    tokens = batch(2, s)
    out = {}
    for pattern, topk in (("moba", s // 16), ("moba", 1000), ("full", 3)):
        model, _ = build(tiny_model_cfg(seq_length=s), moba_cfg(16, topk), attention_cfg(pattern))
        loss = loss_on_this_rank(model, tokens)
        loss.backward()
        out[(pattern, topk)] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def test_moba_with_topk_covering_all_blocks_equals_full_attention():
    out, = run_distributed(_w_topk_full, 1)
    loss_full, g_full = out[("full", 3)]
    for key in (("moba", 16), ("moba", 1000)):
        loss, g = out[key]
        assert abs(loss - loss_full) <= 1e-5 * abs(loss_full), (key, loss, loss_full)
        for name in g_full:
            assert max_rel(g[name], g_full[name]) < 1e-4, (key, name, max_rel(g[name], g_full[name]))


# ----------------------------------------------------------------------------- two-stage switch

def _w_switch(rank, world_size):
    from moba_cp.megatron import compat_cpu
    from moba_cp.megatron.optimizer import build_optimizer, wrap_ddp
    from moba_cp.megatron.hybrid_switch import attention_modes, set_attention_mode

    s = 256
    tokens = [batch(2, s, seed=i) for i in range(4)]
    cfg = tiny_model_cfg(seq_length=s)
    model, pcfg = build(cfg, moba_cfg(16, 2), attention_cfg("hybrid"))
    ddp = wrap_ddp(model, pcfg)
    opt = build_optimizer(ddp, lr=1e-2, weight_decay=0.0, clip_grad=1.0)
    log = {"modes": [attention_modes(ddp)]}

    def train_step(tok):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = loss_on_this_rank(ddp, tok)
        loss.backward()
        with compat_cpu.cuda_to_cpu():
            ddp.finish_grad_sync()
            ok, _, _ = opt.step()
        assert ok
        return loss.item()

    log["moba_losses"] = [train_step(tokens[0]), train_step(tokens[1])]
    with torch.no_grad():
        eval_moba = loss_on_this_rank(model, tokens[3]).item()
        log["n_switched"] = set_attention_mode(ddp, "full")
        log["modes"].append(attention_modes(ddp))
        eval_full = loss_on_this_rank(model, tokens[3]).item()
    # the same weights in a model built all-full: the switched model must match it exactly
    state = {k: v.clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    full_model, _ = build(cfg, moba_cfg(16, 2), attention_cfg("full"))
    full_model.load_state_dict(state, strict=False)
    with torch.no_grad():
        log["rebuilt_full"] = loss_on_this_rank(full_model, tokens[3]).item()
    log["eval"] = (eval_moba, eval_full)
    log["full_losses"] = [train_step(tokens[2])]  # training goes on with full attention
    with torch.no_grad():
        set_attention_mode(ddp, "moba")
        log["modes"].append(attention_modes(ddp))
        log["back_to_moba"] = loss_on_this_rank(model, tokens[3]).item()
    return log, state


def test_switch_moba_to_full_mid_run_and_back():
    (log, _), = run_distributed(_w_switch, 1)
    assert log["modes"] == [["moba", "full"], ["full", "full"], ["moba", "full"]]
    assert log["n_switched"] == 1
    eval_moba, eval_full = log["eval"]
    assert eval_moba != eval_full  # topk=2 of 16 blocks: MoBA really differs from full attention
    assert abs(eval_full - log["rebuilt_full"]) < 1e-6 * abs(eval_full)
    assert all(torch.isfinite(torch.tensor(log["moba_losses"] + log["full_losses"])))
    assert log["back_to_moba"] != eval_full  # switching back runs MoBA again (weights moved on)


# ----------------------------------------------------------------------------- activation recomputation

def _w_recompute(rank, world_size):
    """Selective (core attention) and full (whole layer) recomputation give the same gradients:
    recompute goes through Megatron's checkpoint, which saves/restores RNG states (CPU compat)."""
    s = 256
    tokens = batch(1, s)
    out = {}
    for recompute in ("none", "selective", "full"):
        model, _ = build(tiny_model_cfg(seq_length=s), moba_cfg(16, 3), attention_cfg("hybrid"), recompute=recompute)
        model.train()
        loss = loss_on_this_rank(model, tokens)
        loss.backward()
        out[recompute] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()},
                          model.config.recompute_granularity)
    return out


def test_activation_recomputation_matches():
    out, = run_distributed(_w_recompute, 1)
    loss0, g0, _ = out["none"]
    for mode in ("selective", "full"):
        loss, g, granularity = out[mode]
        assert granularity == mode
        assert abs(loss - loss0) <= 1e-6 * abs(loss0)
        for n in g0:
            assert max_rel(g[n], g0[n]) < 1e-5, (mode, n)


# ----------------------------------------------------------------------------- bf16 model

def _w_bf16(rank, world_size):
    """A bf16 model (config forced to bf16: on CPU the recipe's precision is ignored) has every
    parameter in bf16, norms included, and its loss is the fp32 model's within bf16 rounding."""
    from moba_cp.config import ParallelConfig
    from moba_cp.megatron.transformer_config import transformer_config_from_recipe

    s = 256
    tokens = batch(1, s)
    mcfg = tiny_model_cfg(seq_length=s)
    ref, _ = build(mcfg, moba_cfg(16, 3), attention_cfg("hybrid"))
    ref_loss = loss_on_this_rank(ref, tokens).item()
    cfg = transformer_config_from_recipe(mcfg, ParallelConfig(), bf16=True, params_dtype=torch.bfloat16,
                                         pipeline_dtype=torch.bfloat16)
    model, _ = build(mcfg, moba_cfg(16, 3), attention_cfg("hybrid"), config=cfg)
    with torch.no_grad():
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            p.copy_(q)
    loss = loss_on_this_rank(model, tokens)
    loss.backward()
    dtypes = {str(p.dtype) for p in model.parameters()}
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    return ref_loss, loss.item(), str(loss.dtype), dtypes, grads_finite


def test_bf16_model_all_params_bf16_and_loss_close():
    (ref_loss, loss, loss_dtype, dtypes, grads_finite), = run_distributed(_w_bf16, 1)
    assert dtypes == {"torch.bfloat16"}
    assert loss_dtype == "torch.float32"
    assert abs(loss - ref_loss) < 2e-2 * abs(ref_loss), (loss, ref_loss)
    assert grads_finite
