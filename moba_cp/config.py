"""The recipe schema: one tree of dataclasses, loaded from YAML, with dotted CLI overrides.

Precedence: CLI ``--a.b=value`` > YAML > defaults. Unknown keys and wrong types are errors
naming the key path; cross-field rules are checked by :func:`validate` before any process
group exists. Every field documents itself through ``metadata["help"]`` (see :func:`field_help`),
and each component receives only its own sub-config (``cfg.moba``, ``cfg.train``, ...).

Example:
    >>> cfg = load_recipe("recipes/quickstart.yaml", ["--moba.topk=4"])
    >>> print(dump(cfg))
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from moba_cp.ops.key_conv import KEY_CONV_WIDTHS
from moba_cp.ops.moba.kernel_limits import LIMITS
from moba_cp.ops.moba.triton_config import apply_overrides as apply_kernel_overrides
from moba_cp.ops.moba.triton_config import choose_config, parse_overrides
from moba_cp.parallel.head_parallel import comm_problem

__all__ = [
    "ModelConfig", "MoBAConfig", "AttentionConfig", "ParallelConfig", "TrainConfig", "DataConfig",
    "EvalConfig", "LoggingConfig", "CheckpointConfig", "RecipeConfig", "RecipeError",
    "load_recipe", "from_dict", "apply_overrides", "validate", "kernel_limit_errors", "dump", "to_dict", "field_help",
    "layer_attention_kinds", "parse_profile_steps",
]


class RecipeError(ValueError):
    """A recipe is malformed: the message names the key path, the rule and the fix."""


def _option(default=dataclasses.MISSING, help: str = "", default_factory=dataclasses.MISSING):  # noqa: A002
    """A recipe option: a dataclass field with its default and its help text (kept in the field's
    metadata, read back by :func:`field_help`)."""
    kw = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, **kw)
    return field(default=default, **kw)


@dataclass
class ModelConfig:
    """Shape of the GPT model (Megatron-Core ``TransformerConfig`` fields)."""

    num_layers: int = _option(4, "Transformer layers.")
    hidden_size: int = _option(128, "Model width (residual stream size).")
    num_attention_heads: int = _option(4, "Query heads.")
    num_query_groups: int = _option(2, "Key/value heads (GQA groups); must divide num_attention_heads.")
    ffn_hidden_size: Optional[int] = _option(None, "MLP inner size; None = 4 * hidden_size (SwiGLU: 8/3 rounded).")
    seq_length: int = _option(1024, "Training sequence length in tokens (the global, unsharded length).")
    vocab_size: Optional[int] = _option(None, "Vocabulary size; None = taken from the tokenizer.")
    rotary_base: int = _option(10000, "RoPE base (raise it for long contexts, e.g. 500000).")
    normalization: Literal["RMSNorm", "LayerNorm"] = _option("RMSNorm", "Norm layer kind.")
    swiglu: bool = _option(True, "Gated SiLU MLP (Llama-style) instead of GeLU.")
    init_method_std: float = _option(0.02, "Std of the normal weight init.")
    share_embeddings: bool = _option(True, "Tie input embedding and output projection.")
    fused_ops: Literal["auto", "triton", "torch"] = _option(
        "auto", "RoPE and SwiGLU outside attention: 'triton' (one fused kernel each way, "
        "moba_cp/megatron/fused_layers.py), 'torch' (Megatron's unfused torch operations), 'auto' (triton on a "
        "GPU with the local layer spec, torch on CPU). Numerics only: the weights mean the same either way.")
    fused_norm: Optional[bool] = _option(
        None, "RMSNorm through moba_cp's Triton kernel too (one kernel each way). null (default): wherever "
        "model.fused_ops resolves to triton and normalization is RMSNorm, torch's RMSNorm elsewhere; true: "
        "required (an error where it cannot run); false: torch's RMSNorm. On an H100 it saved ~10 ms of GPU "
        "time a step at 32K and 128K and trained the 32K model 6% faster with MoBA (1% with full attention; "
        "benchmarks/NOTES_moba_kernels.md, session 30). Numerics only, like fused_ops.")


@dataclass
class MoBAConfig:
    """Mixture of Block Attention parameters (docs/design.md section 1)."""

    block_size: int = _option(128, "Tokens per MoBA block B.")
    topk: int = _option(4, "Blocks per query, counting its own block (topk >= blocks = full attention).")
    backend: Literal["auto", "naive", "triton"] = _option(
        "auto", "Kernel backend; 'auto' picks Triton on GPU and the naive oracle on CPU.")
    key_conv: int = _option(
        0, "Key convolution width (FlashMoBA's routing fix): 0 = off, 3 or 5 = a learned causal depthwise "
        "convolution over each MoBA layer's keys, used by the gate and the attention (docs/design.md).")
    kernel: str = _option(
        "", "Triton tiling overrides on top of each shape's default, comma-separated part.field=value, e.g. "
        "'bwd.dq_rows=true,gate.split_edges=true' (fields: moba_cp/ops/moba/triton_config.py). For "
        "measuring kernel options in training; the Triton backend only. '' = the defaults.")


@dataclass
class AttentionConfig:
    """Which layers use MoBA and which full attention."""

    pattern: Literal["moba", "full", "hybrid", "explicit"] = _option(
        "moba", "'moba': all layers MoBA; 'full': all full; 'hybrid': the last full_last_n layers full; "
        "'explicit': per-layer list in `layers`.")
    full_last_n: int = _option(0, "With pattern=hybrid: how many final layers use full attention.")
    layers: Optional[list[str]] = _option(None, "With pattern=explicit: one of 'moba'/'full' per layer.")
    full_backend: Literal["auto", "torch", "te"] = _option(
        "auto", "Full-attention layers: 'torch' (SDPA / ring attention), 'te' (Transformer Engine, must "
        "be installed), 'auto' (torch).")
    switch_to_full_at: Optional[float] = _option(
        None, "Two-stage schedule: after this fraction of training steps (e.g. 0.9) every MoBA layer "
        "switches to full attention in place. None = never.")


@dataclass
class ParallelConfig:
    """Parallel layout: world size = tp * cp * dp (pipeline parallelism is not supported yet)."""

    tp: int = _option(1, "Tensor-parallel size.")
    cp: int = _option(1, "Context-parallel size (sequence split in 2*cp zigzag chunks).")
    dp: Optional[int] = _option(None, "Data-parallel size; None = world_size / (tp * cp).")
    distributed_optimizer: bool = _option(False, "Shard optimizer state over data-parallel ranks.")
    sequence_parallel: bool = _option(False, "Megatron sequence parallelism for norms/dropout (needs tp > 1).")
    cp_comm: Literal["ring", "a2a", "a2a+ring"] = _option(
        "ring", "How CP ranks exchange attention inputs: 'ring' (K/V blocks ring-style; per-rank traffic about "
        "the whole K/V whatever cp is), 'a2a' (head-parallel all-to-all, traffic falls as 1/cp; needs query "
        "and KV heads per tp rank divisible by cp, or cp a multiple of the KV heads), 'a2a+ring' (all-to-all "
        "inside groups of a2a_size ranks of one node, ring across groups: multi-node). `moba-cp train "
        "--dry-run` prints the bytes of each.")
    a2a_size: Optional[int] = _option(
        None, "With cp_comm=a2a+ring: consecutive CP ranks per all-to-all group (one node's GPUs); must "
        "divide cp and be <= gpus_per_node.")
    gpus_per_node: int = _option(8, "GPUs per node (an a2a+ring all-to-all group must fit in one node).")


@dataclass
class TrainConfig:
    """Optimisation and schedule."""

    steps: int = _option(100, "Optimizer steps to train.")
    micro_batch_size: int = _option(1, "Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int = _option(1, "Sequences per optimizer step (multiple of micro_batch_size * dp).")
    lr: float = _option(3e-4, "Peak learning rate.")
    min_lr: float = _option(3e-5, "Final learning rate after decay.")
    warmup_steps: int = _option(10, "Linear warm-up steps.")
    lr_decay_style: Literal["cosine", "linear", "constant"] = _option("cosine", "Decay after warm-up.")
    weight_decay: float = _option(0.1, "AdamW weight decay.")
    adam_beta1: float = _option(0.9, "AdamW beta1.")
    adam_beta2: float = _option(0.95, "AdamW beta2.")
    clip_grad: float = _option(1.0, "Global gradient-norm clip (0 = off).")
    seed: int = _option(1234, "Random seed (model init, data order).")
    precision: Literal["fp32", "bf16"] = _option("bf16", "Training precision on GPU (CPU always runs fp32).")
    recompute: Literal["none", "selective", "full"] = _option(
        "none", "Activation recomputation: 'selective' (core attention), 'full' (whole layers).")
    loss_normalization: Literal["token", "sample"] = _option(
        "token", "Training loss over the global batch: the mean over loss tokens ('token', Megatron's), or "
        "the mean over samples of each sample's token mean ('sample': a retrieval document with its loss on "
        "a few answer tokens weighs as much as a text sample). Validation loss is always per token.")
    prefetch: bool = _option(
        True, "Read, stack and shard each step's micro-batches on the host during the step before (after its "
        "kernels are queued), pinned on a GPU; false: at the step's start (the same samples either way).")
    cuda_graph: Literal["none", "auto", "full_iteration"] = _option(
        "none", "'full_iteration': after one eager warm-up step, capture the step's forward and backward (every "
        "micro-batch, the gradient reduction) as one CUDA graph and replay it every step, so the host no longer "
        "enqueues each kernel: the bound of short-sequence steps of small models. One GPU, no recomputation "
        "(refused otherwise); the optimizer update and validation stay eager; the graph is captured again after "
        "the hybrid schedule's switch to full attention. 'auto': full_iteration where it can run (one process on "
        "a GPU, no recomputation), else none. 'none': every kernel enqueued by Python.")


@dataclass
class DataConfig:
    """Training data."""

    source: Literal["builtin", "indexed", "mock"] = _option(
        "builtin", "'builtin': the embedded corpus (built locally, no network); 'indexed': Megatron "
        ".bin/.idx prefixes in `paths`; 'mock': random tokens.")
    paths: Optional[list[str]] = _option(None, "Indexed dataset prefixes, optionally weighted: ['0.7', 'a', '0.3', 'b'].")
    tokenizer: str = _option("byte", "'byte' (built-in byte-level) or a path to a HuggingFace tokenizers JSON.")
    cache_dir: str = _option("data_cache", "Where built datasets and index caches are written.")
    split: str = _option("98,2,0", "Train/valid/test split weights of each dataset.")
    retrieval_fraction: float = _option(0.0, "Fraction of training samples replaced by synthetic retrieval documents.")
    retrieval_kinds: list[str] = _option(
        default_factory=lambda: ["passkey", "single", "multikey", "multivalue"],
        help="Retrieval document kinds mixed in (subset of passkey, single, multikey, multivalue).")
    retrieval_loss_on: Literal["all", "answer"] = _option(
        "all", "Loss on retrieval samples: every token ('all') or only the answer tokens ('answer').")
    builtin_budget_bytes: int = _option(4_000_000, "Size of the embedded corpus (source=builtin with builtin_corpus="
                                   "stdlib), in bytes of text.")
    builtin_corpus: Literal["stdlib", "large"] = _option(
        "stdlib", "With source=builtin: 'stdlib' (default; the standard library within builtin_budget_bytes, quick "
        "to build) or 'large' (the standard library plus every installed package's .py/.txt/.md/.rst files, "
        "deduplicated, with a held-out split by document hash used for validation and evaluation; ~100+ MB, "
        "for experiments that must not repeat data).")
    builtin_heldout_fraction: float = _option(
        0.05, "With builtin_corpus=large: share of documents held out (chosen by the hash of their text).")


@dataclass
class EvalConfig:
    """Validation during training (long-context evaluation after training: ``moba-cp eval``)."""

    interval: int = _option(0, "Validation loss every N steps (0 = off).")
    iters: int = _option(2, "Validation batches per evaluation.")


@dataclass
class LoggingConfig:
    """Console, JSONL and TensorBoard logging."""

    dir: str = _option("runs/default", "Run directory: metrics.jsonl, TensorBoard events, resolved recipe.")
    interval: int = _option(1, "Log every N steps.")
    tensorboard: bool = _option(True, "Write TensorBoard events.")
    profile: Optional[list[int]] = _option(
        None, "Profile steps [A, B] (1-based, inclusive) with torch.profiler: RUN_DIR/profile/ gets a trace and "
              "a table of kernels by device time per rank. None = off.")


@dataclass
class CheckpointConfig:
    """Distributed checkpointing."""

    save: bool = _option(True, "Write checkpoints at all (false for benchmarks and smoke runs).")
    dir: Optional[str] = _option(None, "Checkpoint directory; None = <logging.dir>/checkpoints.")
    interval: int = _option(0, "Save every N steps (0 = only at the end).")
    resume: bool = _option(True, "Resume from the latest complete checkpoint in `dir` when present.")
    keep_last: int = _option(2, "Complete checkpoints kept (older ones deleted after a successful save).")


@dataclass
class RecipeConfig:
    """A whole recipe."""

    name: str = _option("unnamed", "Recipe name (for logs).")
    model: ModelConfig = _option(default_factory=ModelConfig, help="Model shape.")
    moba: MoBAConfig = _option(default_factory=MoBAConfig, help="MoBA block size, top-k and backend.")
    attention: AttentionConfig = _option(default_factory=AttentionConfig, help="MoBA / full / hybrid layer pattern.")
    parallel: ParallelConfig = _option(default_factory=ParallelConfig, help="tp, cp, dp.")
    train: TrainConfig = _option(default_factory=TrainConfig, help="Optimisation and schedule.")
    data: DataConfig = _option(default_factory=DataConfig, help="Training data.")
    eval: EvalConfig = _option(default_factory=EvalConfig, help="Evaluation.")
    logging: LoggingConfig = _option(default_factory=LoggingConfig, help="Logging.")
    checkpoint: CheckpointConfig = _option(default_factory=CheckpointConfig, help="Checkpoints.")


# ----------------------------------------------------------------------------- loading

def field_help(cls) -> dict[str, str]:
    """``{field_name: help}`` of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, path: str):
    """Check ``value`` against type hint ``tp`` (converting nested dicts); raise naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, path)
            except RecipeError as e:  # try the next member
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {type(value).__name__} {value!r}.")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}.")
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true/false, got {type(value).__name__} {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {type(value).__name__} {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponent-only numbers such as 3e-4 as strings; accept them.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {type(value).__name__} {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {type(value).__name__} {value!r}.")
        return value
    raise RecipeError(f"{path}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from a (YAML) mapping; unknown keys and wrong types raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or "recipe"
        raise RecipeError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(names))}."
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def _parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise RecipeError(f"override {arg!r}: expected --section.key=value (e.g. --moba.topk=8).")
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
        else:
            if i + 1 >= len(overrides):
                raise RecipeError(f"override {arg!r} has no value; write --{body}=VALUE.")
            key, text = body, overrides[i + 1]
            i += 1
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise RecipeError(f"override --{key}: value {text!r} is not valid YAML ({e}).") from None
        parsed.append((key, value))
        i += 1
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys (``--moba.topk=8``) into a nested mapping; values parse as YAML scalars."""
    for key, value in _parse_overrides(overrides):
        node, parts = data, key.split(".")
        cls = RecipeConfig
        for depth, part in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
            if cls is not None and part not in names:
                prefix = ".".join(parts[:depth]) or "recipe"
                raise RecipeError(
                    f"override --{key}: {prefix} has no key {part!r}; valid keys: {', '.join(sorted(names))}."
                )
            hint = typing.get_type_hints(cls)[part] if cls else None
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if not dataclasses.is_dataclass(hint):
                    raise RecipeError(f"override --{key}: {'.'.join(parts[:depth + 1])} is not a section.")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise RecipeError(f"override --{key}: {'.'.join(parts[:depth + 1])} is not a mapping in the YAML.")
                cls = hint
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a YAML recipe (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {str(p)!r} does not exist. Fix: pass a path such as recipes/quickstart.yaml.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {str(p)!r}: the top level must be a mapping, got {type(data).__name__}.")
    data = apply_overrides(data, list(overrides or []))
    cfg = from_dict(RecipeConfig, data)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- rules

def layer_attention_kinds(model: ModelConfig, attention: AttentionConfig) -> list[str]:
    """``['moba' | 'full'] * num_layers`` for the recipe's attention pattern."""
    n = model.num_layers
    if attention.pattern == "moba":
        return ["moba"] * n
    if attention.pattern == "full":
        return ["full"] * n
    if attention.pattern == "hybrid":
        return ["moba"] * (n - attention.full_last_n) + ["full"] * attention.full_last_n
    return list(attention.layers or [])


def kernel_limit_errors(cfg: RecipeConfig, device: str | None = None) -> list[str]:
    """What the recipe's MoBA backend would reject at the first step, as messages (empty = fine).

    ``moba.backend=triton`` is checked always; ``auto`` against the Triton limits when the run is
    on CUDA (``device="cuda"``), where it picks Triton, and not at all on CPU (the naive oracle
    takes any shape). Recipes without MoBA layers are never checked.
    """
    m, mb = cfg.model, cfg.moba
    backend = "triton" if mb.backend == "auto" and device == "cuda" else mb.backend
    lim = LIMITS.get(backend)
    if lim is None or "moba" not in layer_attention_kinds(m, cfg.attention):
        return []
    why = f"moba.backend={mb.backend}" + (" (Triton on CUDA)" if mb.backend == "auto" else "")
    errs = []
    head_dim = m.hidden_size // m.num_attention_heads
    if lim.head_dims is not None and head_dim not in lim.head_dims:
        ok = [d * m.num_attention_heads for d in lim.head_dims]
        errs.append(f"head dim model.hidden_size / model.num_attention_heads = {m.hidden_size}/"
                    f"{m.num_attention_heads} = {head_dim}: {why} takes head dims {list(lim.head_dims)}. Fix: "
                    f"model.hidden_size in {ok} for {m.num_attention_heads} heads, or moba.backend=naive.")
    if mb.block_size % lim.block_multiple:
        lo = max(lim.block_multiple, mb.block_size // lim.block_multiple * lim.block_multiple)
        errs.append(f"moba.block_size={mb.block_size}: {why} needs a multiple of {lim.block_multiple}. Fix: "
                    f"moba.block_size={lo} or {lo + lim.block_multiple} (keep model.seq_length a multiple "
                    f"of 2 * parallel.cp * block_size), or moba.backend=naive.")
    width = min(mb.topk, max(1, m.seq_length // mb.block_size))
    if lim.max_gate_width is not None and width > lim.max_gate_width:
        errs.append(f"min(moba.topk={mb.topk}, blocks per sequence={m.seq_length // mb.block_size}) = {width}: "
                    f"{why} selects at most {lim.max_gate_width} blocks per query. Fix: "
                    f"moba.topk<={lim.max_gate_width}, or a larger moba.block_size.")
    dtype = "bfloat16" if cfg.train.precision == "bf16" and device != "cpu" else "float32"
    if dtype not in lim.dtypes:
        errs.append(f"train.precision={cfg.train.precision} ({dtype}): {why} takes {', '.join(lim.dtypes)}.")
    return errs


def cuda_graph_applies(cfg: RecipeConfig, world_size: int, device: str) -> bool:
    """Whether a run of ``world_size`` processes on ``device`` ('cuda' or 'cpu') replays its training
    step from a CUDA graph: ``train.cuda_graph=full_iteration`` (validated to run there), or ``auto``
    wherever full_iteration would be accepted (the same rules, :func:`_full_iteration_breaks`)."""
    if cfg.train.cuda_graph == "full_iteration":
        return True
    return cfg.train.cuda_graph == "auto" and not _full_iteration_breaks(cfg, world_size, device)


def _cuda_graph_errors(cfg: RecipeConfig, world_size: int | None, device: str | None) -> list[str]:
    """train.cuda_graph=full_iteration where a captured step cannot run (``auto`` never errs)."""
    return _full_iteration_breaks(cfg, world_size, device) if cfg.train.cuda_graph == "full_iteration" else []


def _full_iteration_breaks(cfg: RecipeConfig, world_size: int | None, device: str | None) -> list[str]:
    """Why a step of this run could not be captured, as errors naming the fix (empty: it can). A GPU
    (``device`` None: unknown, not checked); one process, since context parallelism sizes its block
    exchange on the host (a graph would replay the first step's sizes) and multi-GPU replays are not
    validated; no recomputation (it saves and restores the CUDA RNG state, which a capture forbids)."""
    t, p = cfg.train, cfg.parallel
    fix = "Fix: train.cuda_graph=none"
    errs = []
    if device is not None and device != "cuda":
        errs.append(f"train.cuda_graph=full_iteration needs a CUDA GPU; this run is on {device}. {fix}.")
    procs = world_size if world_size is not None else p.tp * p.cp * (p.dp or 1)
    if procs != 1:
        dp = p.dp if p.dp is not None else "world / (tp * cp)"
        errs.append(f"train.cuda_graph=full_iteration runs on one process (tp=cp=dp=1); this run has {procs} "
                    f"(parallel.tp={p.tp}, parallel.cp={p.cp}, parallel.dp={dp}): the context-parallel exchange "
                    f"sizes its transfers on the host, which a replayed graph would freeze at the first step's, and "
                    f"replays across GPUs are not validated. {fix}, or train on one GPU (parallel.tp=1, "
                    f"parallel.cp=1, one process).")
    if t.recompute != "none":
        errs.append(f"train.cuda_graph=full_iteration with train.recompute={t.recompute}: recomputation saves and "
                    f"restores the CUDA RNG state, which a graph capture forbids. {fix}, or train.recompute=none.")
    return errs


def _fused_ops_device_errors(m: ModelConfig, device: str | None) -> list[str]:
    """The fused layer ops' rules that depend on where the run executes (``device``; None: unknown,
    nothing checked): ``fused_ops=triton`` needs a GPU or Triton's interpreter, and
    ``fused_norm=true`` needs the fused ops, which ``auto`` gives only on a GPU. (Transformer
    Engine's spec, which also leaves them unfused, is refused when the model is built.)"""
    if device != "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        return []
    if m.fused_ops == "triton":
        return ["model.fused_ops=triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels in Triton's "
                "interpreter on CPU, for tests). Fix: model.fused_ops=auto or torch."]
    if m.fused_norm is True and m.fused_ops == "auto":
        return ["model.fused_norm=true on CPU: model.fused_ops=auto runs torch's RoPE and SwiGLU there, and the "
                "fused norm comes with the fused ops. Fix: model.fused_norm=null (the default: fused where it can "
                "run) or false, or model.fused_ops=triton with TRITON_INTERPRET=1 (the interpreter, for tests)."]
    return []


def _kernel_override_errors(cfg: RecipeConfig, has_moba: bool, device: str | None) -> list[str]:
    """moba.kernel: well formed, meant for the Triton kernels, and valid on the recipe's shapes
    (the overrides meet the default tiling of each size of MoBA call the run makes)."""
    m, mb, text = cfg.model, cfg.moba, cfg.moba.kernel
    if not text:
        return []
    try:
        parse_overrides(text)
    except ValueError as e:
        return [f"moba.kernel: {e}"]
    if not has_moba:
        return [f"moba.kernel={text!r} tiles the MoBA kernels, but the attention pattern has no MoBA layers. "
                f"Fix: moba.kernel=''."]
    if mb.backend == "naive" or (mb.backend == "auto" and device == "cpu"):
        return [f"moba.kernel={text!r} sets the Triton kernels' tiling, but moba.backend={mb.backend} runs the "
                f"naive oracle{' on CPU' if mb.backend == 'auto' else ''}, which has none. Fix: moba.kernel='', or "
                f"moba.backend=triton (a CUDA GPU, or TRITON_INTERPRET=1 on CPU)."]
    head_dim = m.hidden_size // max(m.num_attention_heads, 1)
    group = m.num_attention_heads // max(m.num_query_groups, 1)
    # the tokens of the calls the run makes: a whole sequence (cp=1; micro-batch rows fold into
    # heads), a CP shard (the ring), or a micro-batch of whole sequences (the all-to-all)
    cp = max(cfg.parallel.cp, 1)
    # and the defaults of a GPU with TMA and of one without (the recipe does not say which it gets)
    tmas = (False,) if device == "cpu" else (False, True)
    for tokens in sorted({m.seq_length, m.seq_length // cp, m.seq_length * cfg.train.micro_batch_size}):
        for tma in tmas:
            try:
                tiled = apply_kernel_overrides(choose_config(mb.block_size, head_dim, group, tokens, tma), text)
                tiled.bwd.check_block(mb.block_size, head_dim)
            except ValueError as e:
                return [f"moba.kernel: {e}" + (" (the default tiling on a GPU with TMA)" if tma else "")]
    return []


def parse_profile_steps(spec: Optional[list[int]]) -> tuple[int, int] | None:
    """``logging.profile``: ``[A, B]`` (or ``[A]``) -> ``(A, B)``, 1-based and inclusive; None / ``[]`` -> None.

    Raises ValueError naming the rule when the list is not a range of positive step numbers.
    """
    if not spec:
        return None
    if len(spec) > 2 or spec[0] < 1 or spec[-1] < spec[0]:
        raise ValueError(f"logging.profile={list(spec)}: expected [A, B] with 1 <= A <= B (the first and last "
                         f"step to profile, 1-based), e.g. [5, 7], or one step [A].")
    return spec[0], spec[-1]


def validate(cfg: RecipeConfig, world_size: int | None = None, device: str | None = None) -> None:
    """Cross-field rules, checked before any process group exists. Raises :class:`RecipeError`.

    ``world_size``: the planned number of processes (checked against tp x cp x dp); ``device``:
    ``"cuda"`` or ``"cpu"`` where the run will execute (selects the kernel limits of
    ``moba.backend=auto``; None = unknown, only an explicit backend's limits are checked).
    """
    m, a, p, t, mb = cfg.model, cfg.attention, cfg.parallel, cfg.train, cfg.moba
    errs: list[str] = []

    def positive(path, value):
        if value < 1:
            errs.append(f"{path}={value} must be >= 1.")

    for path, value in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                        ("model.num_attention_heads", m.num_attention_heads),
                        ("model.num_query_groups", m.num_query_groups), ("model.seq_length", m.seq_length),
                        ("moba.block_size", mb.block_size), ("moba.topk", mb.topk), ("parallel.tp", p.tp),
                        ("parallel.cp", p.cp), ("train.steps", t.steps),
                        ("train.micro_batch_size", t.micro_batch_size),
                        ("train.global_batch_size", t.global_batch_size)]:
        positive(path, value)
    if errs:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(errs))

    if m.hidden_size % m.num_attention_heads:
        errs.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                    f"{m.num_attention_heads} (head dim must be whole).")
    if m.num_attention_heads % m.num_query_groups:
        errs.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                    f"model.num_query_groups={m.num_query_groups} (GQA).")
    if m.num_attention_heads % p.tp:
        errs.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}.")
    if m.num_query_groups % p.tp:
        errs.append(f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp} "
                    f"(each tensor-parallel rank needs whole KV heads).")
    if p.sequence_parallel and p.tp == 1:
        errs.append("parallel.sequence_parallel=true needs parallel.tp > 1.")
    if m.fused_norm is True and m.normalization != "RMSNorm":
        errs.append(f"model.fused_norm=true with model.normalization={m.normalization!r}: the fused norm is RMSNorm "
                    f"only. Fix: model.fused_norm=null (the default: fused where it can run) or false.")
    if m.fused_norm is True and m.fused_ops == "torch":
        errs.append("model.fused_norm=true with model.fused_ops=torch: the fused norm is one of the fused layer "
                    "ops. Fix: model.fused_ops=auto (or triton), or model.fused_norm=null (the default) or false.")
    errs += _fused_ops_device_errors(m, device)
    errs += _cp_comm_errors(m, p, a)
    kinds_ok = True
    if a.pattern == "hybrid" and not (0 <= a.full_last_n <= m.num_layers):
        errs.append(f"attention.full_last_n={a.full_last_n} must be within [0, model.num_layers={m.num_layers}].")
        kinds_ok = False
    if a.pattern == "explicit":
        if a.layers is None or len(a.layers) != m.num_layers:
            errs.append(f"attention.pattern=explicit needs attention.layers with model.num_layers={m.num_layers} "
                        f"entries, got {None if a.layers is None else len(a.layers)}.")
            kinds_ok = False
        elif any(x not in ("moba", "full") for x in a.layers):
            errs.append(f"attention.layers entries must be 'moba' or 'full', got {a.layers}.")
            kinds_ok = False
    elif a.layers is not None:
        errs.append(f"attention.layers is set but attention.pattern={a.pattern!r}; use pattern=explicit.")
    if a.switch_to_full_at is not None and not (0.0 <= a.switch_to_full_at <= 1.0):
        errs.append(f"attention.switch_to_full_at={a.switch_to_full_at} must be a fraction in [0, 1].")
    has_moba = kinds_ok and "moba" in layer_attention_kinds(m, a)
    errs += _key_conv_errors(mb, m, p, has_moba, kinds_ok)
    errs += _kernel_override_errors(cfg, has_moba, device)
    if has_moba or p.cp > 1:
        unit = 2 * p.cp * mb.block_size if has_moba and p.cp > 1 else (2 * p.cp if p.cp > 1 else 1)
        if m.seq_length % unit:
            rule = ("2 * parallel.cp * moba.block_size" if has_moba and p.cp > 1 else "2 * parallel.cp")
            errs.append(f"model.seq_length={m.seq_length} is not divisible by {rule} = {unit} (each of the "
                        f"2*cp zigzag chunks must hold whole MoBA blocks). Fix: use a seq_length that is a "
                        f"multiple of {unit}.")
    if t.global_batch_size % t.micro_batch_size:
        errs.append(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                    f"train.micro_batch_size={t.micro_batch_size}.")
    errs += _cuda_graph_errors(cfg, world_size, device)
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        errs.append(f"train.warmup_steps={t.warmup_steps} must be within [0, train.steps={t.steps}].")
    try:
        prof = parse_profile_steps(cfg.logging.profile)
    except ValueError as e:
        errs.append(str(e))
    else:
        if prof is not None and prof[1] > t.steps:
            errs.append(f"logging.profile={list(cfg.logging.profile)} ends after train.steps={t.steps}. Fix: profile "
                        f"steps within 1..{t.steps}.")
    if t.min_lr > t.lr:
        errs.append(f"train.min_lr={t.min_lr} exceeds train.lr={t.lr}.")
    if not (0.0 <= cfg.data.retrieval_fraction <= 1.0):
        errs.append(f"data.retrieval_fraction={cfg.data.retrieval_fraction} must be in [0, 1].")
    bad_kinds = [k for k in cfg.data.retrieval_kinds if k not in ("passkey", "single", "multikey", "multivalue")]
    if bad_kinds or not cfg.data.retrieval_kinds:
        errs.append(f"data.retrieval_kinds={cfg.data.retrieval_kinds}: choose a non-empty subset of passkey, "
                    f"single, multikey, multivalue.")
    if not (0.0 < cfg.data.builtin_heldout_fraction < 1.0):
        errs.append(f"data.builtin_heldout_fraction={cfg.data.builtin_heldout_fraction} must be in (0, 1).")
    if cfg.data.source == "indexed" and not cfg.data.paths:
        errs.append("data.source=indexed needs data.paths (Megatron .bin/.idx prefixes).")
    dp = p.dp
    if world_size is not None:
        if world_size % (p.tp * p.cp):
            errs.append(f"world size {world_size} is not divisible by parallel.tp * parallel.cp = {p.tp * p.cp}. "
                        f"Fix: {_world_size_fix(world_size, p.tp, p.cp)}.")
        elif dp is not None and dp * p.tp * p.cp != world_size:
            errs.append(f"parallel.tp*cp*dp = {p.tp}*{p.cp}*{dp} = {p.tp * p.cp * dp} but the world size is "
                        f"{world_size}. Fix: set parallel.dp={world_size // (p.tp * p.cp)} or leave it null.")
        else:
            dp = world_size // (p.tp * p.cp)
    if dp is not None and dp >= 1 and t.global_batch_size % (t.micro_batch_size * dp):
        errs.append(f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size*dp = "
                    f"{t.micro_batch_size}*{dp}.")
    if kinds_ok and not errs:
        errs += kernel_limit_errors(cfg, device)
    if errs:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(errs))


def _key_conv_errors(mb: MoBAConfig, m: ModelConfig, p: ParallelConfig, has_moba: bool, kinds_ok: bool) -> list[str]:
    """moba.key_conv: an allowed width, MoBA layers to apply to, zigzag chunks long enough for its halo."""
    w = mb.key_conv
    if w == 0:
        return []
    if w not in KEY_CONV_WIDTHS:
        return [f"moba.key_conv={w}: choose one of {', '.join(map(str, KEY_CONV_WIDTHS))} (0 = no key convolution)."]
    if kinds_ok and not has_moba:
        return [f"moba.key_conv={w} convolves the keys of MoBA layers, but the attention pattern has none (all "
                f"layers full attention). Fix: moba.key_conv=0, or a pattern with MoBA layers."]
    chunk = m.seq_length // (2 * p.cp)
    if p.cp > 1 and chunk < w - 1:
        return [f"moba.key_conv={w} needs {w - 1} keys before each zigzag chunk, but chunks hold "
                f"model.seq_length / (2 * parallel.cp) = {chunk} tokens. Fix: a longer seq_length or a smaller cp."]
    return []


def _cp_comm_errors(m: ModelConfig, p: ParallelConfig, a: AttentionConfig) -> list[str]:
    """parallel.cp_comm / a2a_size against cp, the heads per tensor-parallel rank and the node size."""
    if p.a2a_size is not None and p.cp_comm != "a2a+ring":
        return [f"parallel.a2a_size={p.a2a_size} is set but parallel.cp_comm={p.cp_comm!r}; it is only used with "
                f"cp_comm=a2a+ring. Fix: remove a2a_size or set cp_comm=a2a+ring."]
    if p.cp_comm == "ring":
        return []
    errs = []
    if p.cp_comm == "a2a+ring" and p.a2a_size is None:
        return [f"parallel.cp_comm=a2a+ring needs parallel.a2a_size (CP ranks per all-to-all group, one node's "
                f"GPUs, e.g. {min(p.cp, p.gpus_per_node)})."]
    if p.cp_comm == "a2a+ring" and p.a2a_size > p.gpus_per_node:
        errs.append(f"parallel.a2a_size={p.a2a_size} exceeds parallel.gpus_per_node={p.gpus_per_node}; an "
                    f"all-to-all group must stay inside one node. Fix: a2a_size <= {p.gpus_per_node}.")
    if m.num_attention_heads % p.tp == 0 and m.num_query_groups % p.tp == 0:
        problem = comm_problem(p.cp_comm, p.a2a_size, p.cp, m.num_attention_heads // p.tp,
                               m.num_query_groups // p.tp)
        if problem:
            errs.append(f"parallel.cp_comm={p.cp_comm!r} with parallel.cp={p.cp}, tp={p.tp}: {problem}.")
    if a.full_backend == "te":
        errs.append(f"parallel.cp_comm={p.cp_comm!r} is moba_cp's own CP; attention.full_backend=te runs Transformer "
                    f"Engine's CP for full layers, which needs Megatron's hierarchical CP groups. Fix: "
                    f"attention.full_backend=torch, or parallel.cp_comm=ring.")
    return errs


def _world_size_fix(world_size: int, tp: int, cp: int) -> str:
    """The process counts, or the ``parallel.cp`` values, that make a world of tp x cp x dp."""
    per = [n * tp * cp for n in (1, 2, 4)]
    cps = [c for c in range(1, world_size + 1) if world_size % (tp * c) == 0]
    fix = f"launch a multiple of {tp * cp} processes (--nproc_per_node / NGPU = {', '.join(map(str, per))}, ...)"
    if cps:
        fix += f", or set --parallel.cp to one of {cps} for {world_size} processes"
    return fix


def dump(cfg) -> str:
    """The resolved config as YAML (printed at start, saved beside checkpoints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
