"""``model.fused_ops``: a GPT model with moba_cp's Triton RoPE and SwiGLU (the interpreter
on CPU), and with ``model.fused_norm`` its RMSNorm too, against the same model on Megatron's
unfused torch operations: the same parameters and state-dict keys, the same loss and gradients;
and the settings' rules (resolution, clear errors)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("triton")

from tests.distributed_harness import run_distributed  # noqa: E402
from tests.megatron_util import attention_cfg, batch, build, loss_on_this_rank, max_rel, moba_cfg, tiny_model_cfg  # noqa: E402
from tests.test_megatron_cp import _check, _w_equal  # noqa: E402


def _w_fused_equals_unfused(rank, world_size):
    from megatron.core.models.common.embeddings import rope_utils

    from moba_cp.megatron.fused_layers import FusedSwiGLU, megatron_fused_rope

    out = {}
    tokens = batch(2, 40)
    models = {}
    for name, ops, norm in (("torch", "torch", False), ("triton", "triton", False), ("triton+norm", "triton", True)):
        # hidden 48 as 3 heads of 16 (RoPE over 16 channels); FFN 72: SwiGLU's halves no power of two
        cfg = tiny_model_cfg(seq_length=40, hidden_size=48, num_attention_heads=3, num_query_groups=1,
                             ffn_hidden_size=72, fused_ops=ops, fused_norm=norm)
        models[name], _ = build(cfg, moba_cfg(), attention_cfg("full"))
    ref, fused, fused_norm = models["torch"], models["triton"], models["triton+norm"]
    out["keys_equal"] = (list(ref.state_dict().keys()) == list(fused.state_dict().keys())
                         == list(fused_norm.state_dict().keys()))
    fused.load_state_dict(ref.state_dict())  # a checkpoint of either loads into the other
    fused_norm.load_state_dict(ref.state_dict())
    with torch.no_grad():  # norm weights other than ones, so the norm's weight enters its gradients
        for m in (ref, fused, fused_norm):
            for n, p in m.named_parameters():
                if "layernorm" in n:
                    p.copy_(1 + 0.1 * torch.linspace(-1, 1, p.numel()).view_as(p))
    layer = fused.decoder.layers[0]
    out["types"] = (type(layer.input_layernorm).__name__, type(layer.pre_mlp_layernorm).__name__,
                    type(fused.decoder.final_layernorm).__name__, type(layer.mlp.activation_func).__name__,
                    type(ref.decoder.layers[0].input_layernorm).__name__)
    layer = fused_norm.decoder.layers[0]
    out["types_norm"] = (type(layer.input_layernorm).__name__, type(layer.pre_mlp_layernorm).__name__,
                         type(fused_norm.decoder.final_layernorm).__name__, type(layer.mlp.activation_func).__name__)
    out["switches"] = (fused.config.apply_rope_fusion, fused.config.use_te_activation_func,
                       ref.config.apply_rope_fusion, ref.config.use_te_activation_func)
    out["rope_slot_is_ours"] = rope_utils.fused_apply_rotary_pos_emb is megatron_fused_rope
    assert isinstance(layer.mlp.activation_func, FusedSwiGLU)
    # spy: every fused path actually ran (a silently unfused model would also match)
    calls = {"rope": 0}
    real = rope_utils.fused_apply_rotary_pos_emb

    def spy(*a, **k):
        calls["rope"] += 1
        return real(*a, **k)

    rope_utils.fused_apply_rotary_pos_emb = spy
    try:
        losses, grads = {}, {}
        for name, m in (("torch", ref), ("triton", fused), ("triton+norm", fused_norm)):
            m.zero_grad()
            loss = loss_on_this_rank(m, tokens)
            loss.backward()
            losses[name] = loss.item()
            grads[name] = {n: p.grad.clone() for n, p in m.named_parameters()}
    finally:
        rope_utils.fused_apply_rotary_pos_emb = real
    out["rope_calls"] = calls["rope"]  # q and k of each of the 2 layers, in each of the 2 fused models
    with torch.inference_mode():  # evaluation: inference tensors (no version counters) through every kernel
        per_tok = {name: m(tokens[:, :-1], None, None, labels=tokens[:, 1:]) for name, m in models.items()}
    out["inference_rel"] = max(max_rel(per_tok[k], per_tok["torch"]) for k in ("triton", "triton+norm"))
    out["loss"] = (losses["torch"], losses["triton"], losses["triton+norm"])
    out["grad_rel"] = {(k, n): max_rel(grads[k][n], grads["torch"][n]) for k in ("triton", "triton+norm")
                       for n in grads["torch"]}
    out["grad_norm"] = {n: float(g.norm()) for n, g in grads["torch"].items()}
    return out


def test_fused_ops_model_equals_unfused_model():
    out, = run_distributed(_w_fused_equals_unfused, 1)
    assert out["keys_equal"]
    # the norms stay torch's (the Triton RMSNorm measured slower on an H100)
    assert out["types"] == ("RMSNorm", "RMSNorm", "RMSNorm", "FusedSwiGLU", "RMSNorm")
    assert out["types_norm"] == ("FusedRMSNorm", "FusedRMSNorm", "FusedRMSNorm", "FusedSwiGLU")
    assert out["switches"] == (True, True, False, False)
    assert out["rope_slot_is_ours"]
    assert out["rope_calls"] == 8
    assert out["inference_rel"] < 1e-5
    a, b, c = out["loss"]
    assert abs(a - b) <= 1e-5 * abs(a) and abs(a - c) <= 1e-5 * abs(a), out["loss"]
    for (kind, name), rel in out["grad_rel"].items():
        assert out["grad_norm"][name] > 0, name  # every parameter gets a gradient to compare
        assert rel < 1e-4, (kind, name, rel)


def _w_mismatched_config(rank, world_size):
    from moba_cp.config import AttentionConfig, ParallelConfig
    from moba_cp.megatron.model import build_gpt_model
    from moba_cp.megatron.parallel_init import init_parallel
    from moba_cp.megatron.transformer_config import transformer_config_from_recipe

    init_parallel(ParallelConfig(), seed=1)
    unfused = transformer_config_from_recipe(tiny_model_cfg(fused_ops="torch"), ParallelConfig())
    try:
        build_gpt_model(tiny_model_cfg(fused_ops="triton"), moba_cfg(), AttentionConfig(pattern="full"),
                        ParallelConfig(), vocab_size=256, config=unfused)
    except ValueError as e:
        return str(e)
    return None


def test_a_config_that_disagrees_with_fused_ops_is_refused():
    msg, = run_distributed(_w_mismatched_config, 1)
    assert msg is not None and "fused_ops='triton'" in msg and "transformer_config_from_recipe" in msg


def test_resolve_fused_ops_rules(monkeypatch):
    from moba_cp.megatron.fused_layers import resolve_fused_ops

    assert resolve_fused_ops("torch", "local") is False
    assert resolve_fused_ops("auto", "local") is torch.cuda.is_available()
    assert resolve_fused_ops("auto", "te") is False  # TE's spec has its own fused layers
    with pytest.raises(ValueError, match="choose auto"):
        resolve_fused_ops("fast", "local")
    with pytest.raises(ValueError, match="Transformer Engine"):
        resolve_fused_ops("triton", "te")
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert resolve_fused_ops("triton", "local") is True  # the interpreter runs the kernels
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            resolve_fused_ops("triton", "local")


def test_fused_norm_rules():
    from moba_cp.config import RecipeError, load_recipe
    from moba_cp.megatron.fused_layers import resolve_fused_norm

    assert resolve_fused_norm(False, False, "LayerNorm") is False
    assert resolve_fused_norm(False, True, "RMSNorm") is False  # asked off: torch's even where fused ops run
    assert resolve_fused_norm(True, True, "RMSNorm") is True
    # None (the default) follows the other fused ops, RMSNorm only, and never raises
    assert resolve_fused_norm(None, True, "RMSNorm") is True
    assert resolve_fused_norm(None, False, "RMSNorm") is False
    assert resolve_fused_norm(None, True, "LayerNorm") is False
    with pytest.raises(ValueError, match="RMSNorm only"):
        resolve_fused_norm(True, True, "LayerNorm")
    with pytest.raises(ValueError, match="resolves to the unfused"):
        resolve_fused_norm(True, False, "RMSNorm")  # e.g. fused_ops=auto on CPU
    for overrides, rule in ((["--model.fused_norm=true", "--model.fused_ops=torch"], "fused_ops=torch"),
                            (["--model.fused_norm=true", "--model.normalization=LayerNorm"], "RMSNorm only")):
        with pytest.raises(RecipeError, match=rule):  # load_recipe validates: refused before any work
            load_recipe("recipes/tiny.yaml", overrides)
    # where the run executes decides the rest: on CPU (no interpreter) fused_ops=triton and
    # fused_norm=true with auto are refused before any process group, with the fix
    from moba_cp.config import validate
    cfg = load_recipe("recipes/tiny.yaml", ["--model.fused_norm=true"])
    validate(cfg, device="cuda")  # the GPU resolves auto to the fused ops
    validate(cfg)  # device unknown: nothing device-specific checked
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RecipeError, match="fused_norm=true on CPU"):
            validate(cfg, device="cpu")
        with pytest.raises(RecipeError, match="fused_ops=triton needs a CUDA GPU"):
            validate(load_recipe("recipes/tiny.yaml", ["--model.fused_ops=triton"]), device="cpu")
        mp.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernels: allowed, for tests
        validate(load_recipe("recipes/tiny.yaml", ["--model.fused_ops=triton", "--model.fused_norm=true"]), device="cpu")
    # the default is null, and it passes validation with either norm and any fused_ops
    assert load_recipe("recipes/tiny.yaml").model.fused_norm is None
    got = [load_recipe("recipes/tiny.yaml", o).model.fused_norm
           for o in (["--model.fused_ops=torch"], ["--model.normalization=LayerNorm"], ["--model.fused_norm=false"])]
    assert got == [None, None, False]


def test_fused_rope_refuses_interleaved():
    from moba_cp.megatron.fused_layers import megatron_fused_rope

    with pytest.raises(ValueError, match="interleaved"):
        megatron_fused_rope(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), interleaved=True)


def test_fused_ops_under_tp2_sp_and_cp2_equal_one_process():
    # tp 2 with sequence parallelism x cp 2, hybrid (MoBA + full layers): each rank's SwiGLU sees its
    # [gate_r; up_r] slice of fc1, its norms a TP slice of the tokens, its RoPE the CP rank's angles
    # with the fused norms: their weights' gradients are summed over the TP group under SP
    results = run_distributed(_w_equal, 4, args=(2, 2, [("hybrid", True)], {"fused_ops": "triton", "fused_norm": True}))
    _check(results)


def test_the_swiglu_slot_is_found_in_either_megatron_spec_form():
    import functools

    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from moba_cp.megatron.specs import _mlp_submodules

    sub = MLPSubmodules(linear_fc1=None, linear_fc2=None)
    assert _mlp_submodules(ModuleSpec(module=MLP, submodules=sub)) is sub  # megatron-core 0.16
    assert _mlp_submodules(functools.partial(MLP, submodules=sub)) is sub  # 0.19: partial(MLP.as_mlp_submodule, ...)
    with pytest.raises(TypeError, match="ModuleSpec or a functools.partial"):
        _mlp_submodules(MLP)
