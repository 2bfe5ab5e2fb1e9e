"""``moba-cp export hf RUN_DIR --out DIR``: a trained checkpoint as a ``transformers`` model directory.

What it writes::

    DIR/config.json              MoBAConfig (model_type "moba_cp") with auto_map -> the two files below
    DIR/configuration_moba.py    the config class   (copied from moba_cp/hf/)
    DIR/modeling_moba.py         the model class    (copied from moba_cp/hf/); imports moba_cp's ops,
                                 never Megatron-Core
    DIR/model.safetensors        the weights, Llama-style names, vocabulary cut to the tokenizer's
    DIR/generation_config.json   eos = the tokenizer's end-of-document id
    DIR/tokenizer.json           a HuggingFace ``tokenizers`` JSON (for a byte-tokenizer model: an
                                 exact byte-level equivalent of moba_cp's ByteTokenizer)
    DIR/tokenizer_config.json, special_tokens_map.json   so AutoTokenizer loads it
    DIR/moba_cp_tokenizer.json   which moba_cp tokenizer the model was trained with ("byte" or the JSON)
    DIR/moba_cp_export.json      source checkpoint, step, recipe, and the logits check below

How: one process builds the recipe's Megatron GPT with tp = cp = 1 and loads the distributed
checkpoint into it (Megatron's dist-checkpointing reshards from whatever tp x cp it was trained
with), maps the weights to the exported names (the fused per-query-group ``linear_qkv`` split into
q/k/v, the fused SwiGLU ``linear_fc1`` into gate/up), writes the directory, then loads it back
with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and compares its logits
with the Megatron model's on a random sequence spanning several MoBA blocks: the export fails if
they differ beyond rounding (fp32) or the kernel's error (bf16).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from moba_cp.config import layer_attention_kinds
from moba_cp.eval.model_runner import load_eval_model, read_trained_recipe
from moba_cp.hf.tokenizer_files import write_tokenizer_files
from moba_cp.model_sizes import default_ffn_hidden_size
from moba_cp.train.distributed import shutdown_distributed, world_size_from_env
from moba_cp.train.user_errors import user_errors

__all__ = ["add_arguments", "run", "export_hf", "hf_model_from_checkpoint", "load_single_process", "hf_config_from_recipe", "hf_state_dict_from_megatron",
           "EXPORT_FILE", "ExportError"]

HERE = Path(__file__).resolve().parent
MODEL_FILES = ("configuration_moba.py", "modeling_moba.py")
EXPORT_FILE = "moba_cp_export.json"
#: largest |logit difference| accepted between the exported model and Megatron's, per dtype,
#: relative to the largest |logit| (fp32: rounding; bf16: the kernels' error).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
#: longest default logits check on CPU (--check-tokens overrides)
_CPU_CHECK_TOKENS = 4096


class ExportError(RuntimeError):
    """The checkpoint cannot be exported, or the exported model does not reproduce it."""


def hf_config_from_recipe(cfg, vocab_size: int, tokenizer) -> MoBAConfig:
    """The :class:`MoBAConfig` of a recipe's model (``vocab_size``: the tokenizer's, unpadded)."""
    from moba_cp.hf.configuration_moba import MoBAConfig  # optional dependency: transformers ('export' extra)

    m = cfg.model
    pad = getattr(tokenizer, "pad", None)
    return MoBAConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.swiglu),
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.hidden_size // m.num_attention_heads,
        attention_kinds=layer_attention_kinds(m, cfg.attention),
        moba_block_size=cfg.moba.block_size,
        moba_topk=cfg.moba.topk,
        moba_backend=cfg.moba.backend,
        rotary_base=float(m.rotary_base),
        normalization=m.normalization,
        norm_eps=1e-5,  # Megatron's layernorm_epsilon default (moba_cp does not change it)
        mlp_activation="swiglu" if m.swiglu else "gelu",
        max_position_embeddings=m.seq_length,
        initializer_range=m.init_method_std,
        tie_word_embeddings=m.share_embeddings,
        eos_token_id=tokenizer.eod,
        bos_token_id=getattr(tokenizer, "bos", None),
        pad_token_id=pad if pad is not None else tokenizer.eod,
        auto_map={"AutoConfig": "configuration_moba.MoBAConfig",
                  "AutoModelForCausalLM": "modeling_moba.MoBAForCausalLM"},
        architectures=["MoBAForCausalLM"],
    )


def hf_state_dict_from_megatron(sd: dict[str, torch.Tensor], config: MoBAConfig) -> dict[str, torch.Tensor]:
    """Megatron GPT (tp = 1, local or TE names) -> the exported model's names.

    ``linear_qkv`` rows are grouped per query group ``[q of the group's heads | k | v]`` (Megatron's
    layout); ``linear_fc1`` of a gated MLP is ``[gate; up]``. The vocabulary is cut to
    ``config.vocab_size`` (the rows Megatron adds for padding are never produced by the tokenizer).
    """
    hq, hkv, d, v = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size

    def get(name):
        for alias in (name, name.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                      name.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")):
            if alias in sd:
                return sd[alias]
        raise ExportError(f"the checkpoint has no {name!r} (found e.g. {sorted(sd)[:6]})")

    def norm(src, dst, out):
        out[f"{dst}.weight"] = get(f"{src}.weight")
        if config.normalization == "LayerNorm":
            out[f"{dst}.bias"] = get(f"{src}.bias")

    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight")[:v]}
    for i in range(config.num_hidden_layers):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        norm(f"{src}.input_layernorm", f"{dst}.input_layernorm", out)
        qkv = get(f"{src}.self_attention.linear_qkv.weight")
        qkv = qkv.view(hkv, (hq // hkv + 2) * d, qkv.shape[-1])
        q, k, val = torch.split(qkv, [hq // hkv * d, d, d], dim=1)
        out[f"{dst}.self_attn.q_proj.weight"] = q.reshape(hq * d, -1)
        out[f"{dst}.self_attn.k_proj.weight"] = k.reshape(hkv * d, -1)
        out[f"{dst}.self_attn.v_proj.weight"] = val.reshape(hkv * d, -1)
        out[f"{dst}.self_attn.o_proj.weight"] = get(f"{src}.self_attention.linear_proj.weight")
        norm(f"{src}.pre_mlp_layernorm", f"{dst}.post_attention_layernorm", out)
        fc1 = get(f"{src}.mlp.linear_fc1.weight")
        if config.mlp_activation == "swiglu":
            out[f"{dst}.mlp.gate_proj.weight"], out[f"{dst}.mlp.up_proj.weight"] = torch.chunk(fc1, 2, dim=0)
        else:
            out[f"{dst}.mlp.up_proj.weight"] = fc1
        out[f"{dst}.mlp.down_proj.weight"] = get(f"{src}.mlp.linear_fc2.weight")
    norm("decoder.final_layernorm", "model.norm", out)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = get("output_layer.weight")[:v]
    return {k: t.detach().contiguous().clone() for k, t in out.items()}


def load_single_process(checkpoint: str | Path, overrides: list[str] | None = None, seq_length: int | None = None):
    """The checkpoint's Megatron model in this process (tp = cp = 1; Megatron reshards the load)."""
    if world_size_from_env() != 1:
        raise ExportError(f"this runs in one process (tp = cp = 1, whatever the checkpoint was trained with); it "
                          f"was launched with WORLD_SIZE={world_size_from_env()}. Fix: run it without torchrun.")
    _, trained, _ = read_trained_recipe(checkpoint, overrides)
    single = ["--parallel.tp=1", "--parallel.cp=1", "--parallel.cp_comm=ring", "--parallel.a2a_size=null",
              "--parallel.sequence_parallel=false", "--parallel.distributed_optimizer=false"]
    return load_eval_model(checkpoint, seq_length or trained.model.seq_length, [*(overrides or []), *single])


def hf_model_from_checkpoint(checkpoint: str | Path, overrides: list[str] | None = None):
    """``(MoBAForCausalLM, moba_cp tokenizer, EvalModel)``: the exported model built in memory (no files)."""
    from moba_cp.hf.modeling_moba import MoBAForCausalLM  # optional dependency: transformers ('export' extra)

    em = load_single_process(checkpoint, overrides)
    config = hf_config_from_recipe(em.cfg, em.tokenizer.vocab_size, em.tokenizer)
    model = MoBAForCausalLM(config)
    model.load_state_dict(hf_state_dict_from_megatron(em.model.state_dict(), config))
    dtype = next(em.model.parameters()).dtype
    return model.to(em.env.device, dtype).eval(), em.tokenizer, em


def _export_dtype(name: str, trained: str) -> torch.dtype:
    choice = trained if name == "auto" else name
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


def _check_logits(em, out_dir: Path, dtype: torch.dtype, n_tokens: int, seed: int = 0) -> dict:
    """Logits of the exported model (loaded through transformers) vs the Megatron model's."""
    from transformers import AutoModelForCausalLM  # optional dependency: the 'export' extra

    vocab = em.tokenizer.vocab_size
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, min(vocab, 256), (1, n_tokens), generator=g)
    ref = em.logits_fn(tokens)[0].float()
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=True, dtype=dtype)
    model = model.to(em.env.device).eval()
    with torch.no_grad():
        got = model(tokens.to(em.env.device), use_cache=False).logits[0].float().cpu()
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    # the coarser of the two models' dtypes sets the tolerance (a bf16-trained Megatron model on GPU
    # against an fp32 export differs by bf16 rounding)
    coarse = torch.bfloat16 if torch.bfloat16 in (dtype, next(em.model.parameters()).dtype) else torch.float32
    return {"tokens": n_tokens, "max_abs_diff": diff, "max_abs_logit": scale, "dtype": str(dtype).split(".")[-1],
            "ok": diff <= TOLERANCE[coarse] * max(scale, 1.0)}


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: str = "auto", overrides: list[str] | None = None,
              check_tokens: int | None = None, log=print) -> dict:
    """Export ``checkpoint`` (run dir, checkpoints dir or ``iter_*``) to ``out``; returns the report.

    Raises:
        ExportError: the output exists and is not an earlier export, or the logits check fails.
    """
    from safetensors.torch import save_file  # optional dependency: the 'export' extra

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise ExportError(f"--out {str(out)!r} exists and is not an earlier moba-cp export; nothing was written. "
                          f"Fix: choose an empty or new folder.")
    ckpt, trained, meta = read_trained_recipe(checkpoint, overrides)
    em = load_single_process(checkpoint, overrides)
    tokenizer = em.tokenizer
    config = hf_config_from_recipe(em.cfg, tokenizer.vocab_size, tokenizer)
    tdtype = _export_dtype(dtype, trained.train.precision)
    config.dtype = str(tdtype).split(".")[-1]
    state = hf_state_dict_from_megatron(em.model.state_dict(), config)
    state = {k: t.to("cpu", tdtype) for k, t in state.items()}

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    for f in MODEL_FILES:
        shutil.copyfile(HERE / f, tmp / f)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tokenizer.eod, "pad_token_id": config.pad_token_id, "do_sample": False}, indent=1))
    write_tokenizer_files(tokenizer, tmp, trained.data.tokenizer)
    bs = config.moba_block_size
    n_check = check_tokens or min(trained.model.seq_length, 3 * bs + bs // 2 + 1,
                                  # the CPU forward (naive MoBA) is dense in T^2: keep it small there
                                  _CPU_CHECK_TOKENS if em.env.device.type == "cpu" else 1 << 30)
    check = _check_logits(em, tmp, tdtype, n_check)
    report = {"checkpoint": str(ckpt.resolve()), "step": meta.get("step"), "recipe": meta.get("config"),
              "dtype": str(tdtype).split(".")[-1], "logits_check": check}
    (tmp / EXPORT_FILE).write_text(json.dumps(report, indent=1))
    if not check["ok"]:
        raise ExportError(
            f"the exported model's logits differ from the Megatron model's by {check['max_abs_diff']:.3g} "
            f"(largest logit {check['max_abs_logit']:.3g}, {check['tokens']} tokens, {check['dtype']}); the export "
            f"is left in {tmp} for inspection and {out} is unchanged.")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"export: {ckpt} (step {meta.get('step')}) -> {out}: {config.num_hidden_layers} layers "
        f"{config.attention_kinds}, block {bs}, top-k {config.moba_topk}, {report['dtype']}; logits match "
        f"moba_cp's forward (max |diff| {check['max_abs_diff']:.2e} over {check['tokens']} tokens)")
    return report


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", metavar="RUN_DIR", help="run directory, checkpoints directory or one iter_* folder")
    p.add_argument("--out", required=True, help="output folder (created; an earlier export there is replaced)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weight dtype (default: the training precision)")
    p.add_argument("--check-tokens", type=int, default=None,
                   help="length of the logits check against Megatron (default 3.5 MoBA blocks, at most seq_length, "
                        f"and at most {_CPU_CHECK_TOKENS} on CPU)")
    return p


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """``moba-cp export hf``: returns the exit code (2 for a user error, printed on one line)."""

    try:
        export_hf(args.checkpoint, args.out, dtype=args.dtype, overrides=overrides, check_tokens=args.check_tokens)
    except (FileNotFoundError, ValueError, ExportError, *user_errors()) as e:
        print(f"moba-cp export hf: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0
