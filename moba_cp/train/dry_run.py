"""``moba-cp train RECIPE --dry-run``: plan a run without GPUs.

Makes every check of a real launch for the planned world size on GPUs (recipe, kernel limits of
the MoBA backend, data paths and tokenizer, the run directory) and prints the parallel layout, a per-GPU
memory estimate, FLOPs per step, and the K/V traffic per MoBA layer that context parallelism
implies. The estimates are arithmetic from the recipe (stated assumptions below), not
measurements; they tell whether a recipe is in the right range before anyone books GPUs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moba_cp.config import RecipeConfig, RecipeError, cuda_graph_applies, layer_attention_kinds
from moba_cp.model_sizes import default_ffn_hidden_size
from moba_cp.ops.moba.kernel_limits import LIMITS
from moba_cp.megatron.selection_memo import INDEX_MAX_BYTES
from moba_cp.ops.moba.triton_config import compact_selection_dtype, parse_overrides as parse_kernel_overrides
from moba_cp.parallel.traffic import DEFAULT_INTER_GBPS, DEFAULT_INTRA_GBPS, candidate_comms, comm_traffic
from moba_cp.train.flops import attended_keys, flops_per_step
from moba_cp.train.preflight import preflight
from moba_cp.train.run_dir import describe
from moba_cp.train.user_errors import user_errors

__all__ = ["dry_run", "MemoryEstimate", "estimate_memory", "kv_traffic_per_layer", "param_count", "comm_plan",
           "parse_link_gbps", "selection_union"]

GIB = 2**30


def _bytes_str(x: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= size:
            return f"{x / size:,.1f} {unit}"
    return f"{x:,.0f} B"


def _flop_str(x: float) -> str:
    """FLOPs in the largest decimal unit that keeps the number >= 1."""
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= size:
            return f"{x / size:,.2f} {unit}"
    return f"{x:,.0f} FLOP"


def param_count(cfg: RecipeConfig, vocab_size: int) -> int:
    """Parameters of the GPT (embedding counted once if tied)."""
    m = cfg.model
    h = m.hidden_size
    d = h // m.num_attention_heads
    kv = m.num_query_groups * d
    ffn = m.ffn_hidden_size or default_ffn_hidden_size(h, m.swiglu)
    per_layer = h * (h + 2 * kv) + h * h + (3 if m.swiglu else 2) * h * ffn + 2 * h
    emb = vocab_size * h * (1 if m.share_embeddings else 2)
    return m.num_layers * per_layer + emb + h


@dataclass
class MemoryEstimate:
    """Per-GPU bytes, split by what holds them."""

    weights_and_grads: float
    optimizer: float
    activations: float
    logits: float
    moba_extra: float

    @property
    def total(self) -> float:
        return self.weights_and_grads + self.optimizer + self.activations + self.logits + self.moba_extra


def estimate_memory(cfg: RecipeConfig, vocab_size: int, dp: int) -> MemoryEstimate:
    """Per-GPU memory estimate.

    Assumptions: bf16 weights (fp32 on CPU), fp32 main grads, fp32 master weights + Adam moments
    (sharded over dp with the distributed optimizer); activations of ``micro_batch_size``
    local tokens per layer: ~``2 * (10h + 4kv + 4 ffn)`` bytes per token without recomputation
    (norm inputs and outputs, Q/K/V before and after RoPE, attention out, MLP inputs and
    SwiGLU intermediates; the constant was calibrated on two measured runs on 2 x H200 with the
    unfused layer ops: 2gpu-128k at micro-batch 1 peaked at 69.7 GiB (estimate 71.1), 2gpu-1m at
    55.6 GiB (estimate 52.6); with the fused SwiGLU of ``model.fused_ops`` ``2 ffn``, since it keeps
    fc1's output alone: counted by ``benchmarks/saved_activations.py`` (11.0 KB a token less per
    layer at FFN 2752), and on one H100 the 32K recipe's training peak fell by 8.4 GiB, from 37.3 to
    28.9, where this estimate gives 37.4 and 29.3),
    ``2h`` per token with full recomputation (divided
    by tp under sequence parallelism) plus one layer's working set; fp32 logits of the local tokens for the loss; MoBA's per-layer
    indices (int32, ``topk`` per query head; 1-2 bytes with ``bwd.keep_index=false``: every MoBA layer's without
    recomputation, one layer's with it, plus under selective recomputation on one device every layer's selection in
    1-2 bytes an id and its index if at most ``INDEX_MAX_BYTES``, kept from its forward for its recomputation,
    ``moba_cp.megatron.selection_memo``) and the largest
    received K/V buffer (all remote past blocks, the worst case).
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    bpe = 2 if t.precision == "bf16" else 4
    n = param_count(cfg, vocab_size) / p.tp
    weights = n * bpe + n * 4  # params + fp32 main grads
    opt = n * 12 / (dp if p.distributed_optimizer else 1)
    h = m.hidden_size
    d = h // m.num_attention_heads
    kv = m.num_query_groups * d
    ffn = m.ffn_hidden_size or default_ffn_hidden_size(h, m.swiglu)
    tokens = t.micro_batch_size * m.seq_length / p.cp
    # Counted per layer by benchmarks/saved_activations.py on an H100 (session 29): the fused SwiGLU
    # (model.fused_ops, on a GPU unless 'torch') keeps fc1's output alone (2 ffn a token) where
    # Megatron's unfused one keeps 4 ffn (fc1's output and SiLU's input and output), so 2 ffn fewer
    # than the constant calibrated on unfused runs; the 32K recipe's peak fell by 8.4 GiB (this: 8.1)
    ffn_kept = 2 if (m.swiglu and m.fused_ops != "torch") else 4
    per_token_layer = 2 * (10 * h + 4 * kv + ffn_kept * ffn) / p.tp
    sp = p.tp if p.sequence_parallel else 1  # sequence parallelism splits the layer inputs over TP too
    if t.recompute == "full":
        act = tokens * (m.num_layers * 2 * h / sp + per_token_layer)
    elif t.recompute == "selective":
        act = tokens * m.num_layers * per_token_layer
    else:
        act = tokens * m.num_layers * (per_token_layer + 4 * m.num_attention_heads / p.tp)  # + LSE
    logits = tokens * vocab_size / p.tp * 4 * 2  # fp32 logits and their gradient
    n_moba = layer_attention_kinds(m, cfg.attention).count("moba")
    ids = tokens * m.num_attention_heads / p.tp * cfg.moba.topk  # selected block ids of one layer
    if t.recompute == "none":
        idx = ids * _saved_id_bytes(cfg) * n_moba
    else:  # one layer at a time holds its index, from its recomputed forward to its backward
        idx = ids * _saved_id_bytes(cfg) * min(1, n_moba)
        if t.recompute == "selective" and p.cp == 1:  # + what every layer keeps for its recomputation:
            kept = ids * compact_selection_dtype(m.seq_length, cfg.moba.block_size).itemsize  # its selection
            kept += ids * 4 if ids * 4 <= INDEX_MAX_BYTES else 0  # and a small gather index
            idx += kept * n_moba
    recv = (m.seq_length - m.seq_length / p.cp) * 2 * kv / p.tp * bpe if p.cp > 1 else 0.0
    return MemoryEstimate(weights, opt, act, logits, idx + recv)


def keeps_gather_index(cfg: RecipeConfig) -> bool:
    """The recipe's ``bwd.keep_index`` (``moba.kernel`` overrides; True unless set off): whether
    its single-device MoBA layers save the gather index for the backward. The CP slot form
    always does."""
    return dict(dict(parse_kernel_overrides(cfg.moba.kernel or "")).get("bwd", ())).get("keep_index", True)


def _saved_id_bytes(cfg: RecipeConfig) -> int:
    """Bytes per selected block that a MoBA layer keeps for its backward: the gather index
    (int32), or with ``moba.kernel: bwd.keep_index=false`` on one device the compacted selection
    (:func:`compact_selection_dtype`). A call holds one sequence (micro-batch rows fold into
    heads), so the bound is per sequence."""
    if keeps_gather_index(cfg) or cfg.parallel.cp > 1:
        return 4
    return compact_selection_dtype(cfg.model.seq_length, cfg.moba.block_size).itemsize


def kv_traffic_per_layer(cfg: RecipeConfig) -> dict:
    """Forward K/V bytes one rank receives per layer per sequence under CP.

    - ``full_ring``: ring attention moves every remote K/V chunk: ``(cp-1)/cp`` of the sequence.
    - ``moba_worst``: MoBA when some local query selects every remote *past* block (what random
      inputs approach): never more than the full ring.
    - ``moba_shared``: MoBA when a rank's queries agree on their ``topk-1`` past blocks per KV
      head (trained models concentrate on few blocks; the real figure lies in between).
    """
    m, p, mb = cfg.model, cfg.parallel, cfg.moba
    bpe = 2 if cfg.train.precision == "bf16" else 4
    d = m.hidden_size // m.num_attention_heads
    kv_row = 2 * m.num_query_groups * d * bpe / p.tp  # K and V of one token on this TP rank
    if p.cp == 1:
        return {"full_ring": 0.0, "moba_worst": 0.0, "moba_shared": 0.0}
    s = m.seq_length
    full = (s - s / p.cp) * kv_row
    # Zigzag: rank 0 holds the last chunk, whose past is every other chunk, so in the worst case
    # (some query selects every past block) MoBA moves as much as the full ring, never more.
    worst = full
    shared = min((mb.topk - 1) * mb.block_size * kv_row, full)
    return {"full_ring": full, "moba_worst": worst, "moba_shared": shared}


def parse_link_gbps(text: str | None) -> tuple[float, float]:
    """``--link-gbps``: one number for every link, or ``INTRA,INTER`` (NVLink, InfiniBand) in Gb/s."""
    if not text:
        return DEFAULT_INTRA_GBPS, DEFAULT_INTER_GBPS
    parts = [p for p in str(text).split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise RecipeError(f"--link-gbps {text!r}: expected a number or INTRA,INTER in Gb/s (e.g. 3600,400)") from None
    if len(vals) not in (1, 2) or min(vals) <= 0:
        raise RecipeError(f"--link-gbps {text!r}: expected one or two positive numbers (Gb/s), e.g. 400 or 3600,400")
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


def selection_union(path: str | None, cp: int) -> tuple[float, str]:
    """The remote-block union to assume at ``cp``: the largest per-rank causal-past fraction of any
    layer in an ``analyze selection`` JSON, else 1.0 (what trained models showed)."""
    if not path:
        return 1.0, "assumed 100% (trained models select every remote past block; measure yours with " \
                    "`moba-cp analyze selection`)"
    try:
        data = json.loads(Path(path).read_text())
        rows = [layer["cp"][str(cp)]["union_causal_fraction_max"] for layer in data["layers"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"--selection {path}: not an `analyze selection` JSON with cp={cp} ({e}). Fix: run "
                          f"moba-cp analyze selection RUN_DIR --seq-len S --cp {cp}") from None
    return max(rows), f"measured in {path} (busiest rank of the largest layer)"


def comm_plan(cfg: RecipeConfig, *, union: float = 1.0, intra_gbps: float = DEFAULT_INTRA_GBPS,
              inter_gbps: float = DEFAULT_INTER_GBPS) -> list:
    """``CommTraffic`` of every valid comm type for the recipe, cheapest (fwd+bwd time) first."""
    m, p = cfg.model, cfg.parallel
    hq, hkv = m.num_attention_heads // p.tp, m.num_query_groups // p.tp
    per_node = max(1, p.gpus_per_node // p.tp)  # Megatron puts CP ranks next to each other after TP
    kw = dict(seq_len=m.seq_length, cp=p.cp, hq=hq, hkv=hkv, head_dim=m.hidden_size // m.num_attention_heads,
              elem_bytes=2 if cfg.train.precision == "bf16" else 4, union=union, cp_ranks_per_node=per_node)
    plans = [comm_traffic(c, a2a_size=a, **kw) for c, a in candidate_comms(p.cp, hq, hkv, per_node)]
    return sorted(plans, key=lambda t: t.seconds(intra_gbps, inter_gbps))


def _print_comm_plan(cfg: RecipeConfig, link_gbps: str | None, selection: str | None) -> None:
    intra, inter = parse_link_gbps(link_gbps)
    union, source = selection_union(selection, cfg.parallel.cp)
    plans = comm_plan(cfg, union=union, intra_gbps=intra, inter_gbps=inter)
    print(f"  CP comm     per attention layer per rank per sequence, fwd + bwd bytes and time at {intra:g} Gb/s "
          f"inside a node / {inter:g} Gb/s between nodes; remote-block union {union:.0%}, {source}:")
    for t in sorted(plans, key=lambda t: t.name):
        print(f"                {t.name:<24} fwd {_bytes_str(t.fwd):>10}  bwd {_bytes_str(t.bwd):>10}  (inter-node "
              f"{_bytes_str(t.inter_fwd + t.inter_bwd)})  {t.seconds(intra, inter) * 1e3:8.2f} ms")
    best = plans[0]
    p = cfg.parallel
    chosen = f"{p.cp_comm}" + (f"(a2a_size={p.a2a_size})" if p.cp_comm == "a2a+ring" else "")
    print(f"              would pick {best.name} (fastest transfer); the recipe uses parallel.cp_comm={chosen}")


def _kernel_line(cfg: RecipeConfig) -> str:
    """Which MoBA kernels a GPU run uses and the limits they were checked against."""
    if "moba" not in layer_attention_kinds(cfg.model, cfg.attention):
        return "no MoBA layers"
    backend = "triton" if cfg.moba.backend == "auto" else cfg.moba.backend
    lim = LIMITS.get(backend)
    head = f"moba.backend={cfg.moba.backend}" + (" -> Triton on GPU (naive oracle on CPU)" if cfg.moba.backend == "auto" else "")
    if lim is None:
        return f"{head}: no recipe-level limits known"
    return (f"{head}: within its limits (head dim {cfg.model.hidden_size // cfg.model.num_attention_heads} "
            f"in {list(lim.head_dims or [])}, block {cfg.moba.block_size} a multiple of {lim.block_multiple}"
            + (f", gate width <= {lim.max_gate_width}" if lim.max_gate_width else "") + ")")


def dry_run(cfg: RecipeConfig, world_size: int | None = None, *, link_gbps: str | None = None,
            selection: str | None = None) -> int:
    """Validate and print the plan for ``world_size`` GPUs (default ``tp*cp*(dp or 1)``)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    ws = world_size or p.tp * p.cp * (p.dp or 1)
    try:  # the checks a real launch makes, for GPUs (auto -> the Triton kernels' limits)
        _, state = preflight(cfg, ws, "cuda")
    except user_errors() as e:
        print(f"moba-cp train --dry-run: {e}")
        return 2
    dp = ws // (p.tp * p.cp)
    vocab = m.vocab_size or 256 + 128  # the byte tokenizer's padded vocabulary when unset
    kinds = layer_attention_kinds(m, cfg.attention)
    flops = flops_per_step(cfg, vocab)
    mem = estimate_memory(cfg, vocab, dp)
    traffic = kv_traffic_per_layer(cfg)
    dense_keys = attended_keys(m.seq_length)
    moba_keys = attended_keys(m.seq_length, cfg.moba.block_size, cfg.moba.topk)
    nodes = max(1, ws // 8)
    print(f"recipe {cfg.name!r}: dry run for {ws} GPU(s) ({nodes} node(s) of 8 if multi-node)")
    print(f"  layout      tp={p.tp} x cp={p.cp} x dp={dp}; distributed optimizer "
          f"{'on' if p.distributed_optimizer else 'off'}; pipeline parallelism: not supported yet")
    print(f"  model       {param_count(cfg, vocab) / 1e6:,.1f} M params, {m.num_layers} layers "
          f"({kinds.count('moba')} MoBA, {kinds.count('full')} full), hidden {m.hidden_size}, "
          f"{m.num_attention_heads} heads / {m.num_query_groups} KV groups")
    print(f"  sequence    {m.seq_length:,} tokens, {m.seq_length // p.cp:,} per CP rank; MoBA block "
          f"{cfg.moba.block_size}, top-k {cfg.moba.topk} -> attends {moba_keys / dense_keys:.1%} of causal keys")
    print(f"  batch       global {t.global_batch_size} x micro {t.micro_batch_size}; "
          f"{t.global_batch_size * m.seq_length:,} tokens/step; {t.steps} steps")
    print(f"  FLOPs/step  {_flop_str(flops)} (MoBA attention counted as attended keys only); {_flop_str(flops / ws)} per GPU")
    print(f"  memory/GPU  ~{_bytes_str(mem.total)} = weights+grads {_bytes_str(mem.weights_and_grads)} + "
          f"optimizer {_bytes_str(mem.optimizer)} + activations {_bytes_str(mem.activations)} "
          f"(recompute={t.recompute}, fused_ops={m.fused_ops}) + logits {_bytes_str(mem.logits)} + "
          f"MoBA idx/KV {_bytes_str(mem.moba_extra)}")
    if p.cp > 1:
        print(f"  KV traffic  per MoBA layer per rank per sequence (forward): full-KV ring {_bytes_str(traffic['full_ring'])}; "
              f"MoBA worst case {_bytes_str(traffic['moba_worst'])}, concentrated selection {_bytes_str(traffic['moba_shared'])} "
              f"(backward sends the same amount of dK/dV back)")
        try:
            _print_comm_plan(cfg, link_gbps, selection)
        except RecipeError as e:
            print(f"moba-cp train --dry-run: {e}")
            return 2
    else:
        print("  KV traffic  none (cp=1)")
    print(f"  kernels     {_kernel_line(cfg)}")
    graphed = cuda_graph_applies(cfg, ws, "cuda")
    print(f"  step        {'replayed from a CUDA graph after one eager step' if graphed else 'eager'} "
          f"(train.cuda_graph={t.cuda_graph}" + ("; the graph's pool keeps the step's activations reserved "
                                                  "between steps" if graphed else "") + ")")
    print(f"  run dir     {'complete: nothing to train' if state.complete else describe(state, cfg)}")
    print("dry run OK: the recipe is valid for this world size")
    return 0
