"""Helpers shared by the Megatron-Core tests (run inside ``run_distributed`` workers).

Everything Megatron happens in worker processes (run_distributed), so the CPU compat patches
(``moba_cp.megatron.compat_cpu``) never touch the pytest process itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moba_cp.config import AttentionConfig, ModelConfig, MoBAConfig, ParallelConfig

VOCAB = 256


def tiny_model_cfg(seq_length: int = 256, num_layers: int = 2, **kw) -> ModelConfig:
    base = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                seq_length=seq_length, vocab_size=VOCAB, share_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def attention_cfg(pattern: str, num_layers: int = 2) -> AttentionConfig:
    if pattern == "hybrid":
        return AttentionConfig(pattern="hybrid", full_last_n=1)
    if pattern == "explicit":
        return AttentionConfig(pattern="explicit", layers=(["full", "moba"] * num_layers)[:num_layers])
    return AttentionConfig(pattern=pattern)


def build(model_cfg, moba_cfg, attn_cfg, tp=1, cp=1, seed=1234, sequence_parallel=False,
          distributed_optimizer=False, **kw):
    """(Re)initialise Megatron parallel state for tp x cp and build a seeded GPTModel."""
    from megatron.core import parallel_state

    from moba_cp.megatron.model import build_gpt_model
    from moba_cp.megatron.parallel_init import init_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    pcfg = ParallelConfig(tp=tp, cp=cp, sequence_parallel=sequence_parallel,
                          distributed_optimizer=distributed_optimizer)
    init_parallel(pcfg, seed=seed)
    return build_gpt_model(model_cfg, moba_cfg, attn_cfg, pcfg, vocab_size=VOCAB, **kw), pcfg


def batch(b: int, s: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, s + 1), generator=g)


def cp_shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's zigzag shard of ``[b, S]`` token ids (Megatron's get_batch_on_this_cp_rank layout)."""
    from moba_cp.megatron.cp_batch import shard_batch_for_cp

    return shard_batch_for_cp({"t": x})["t"]


def loss_on_this_rank(model, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's share of the global mean next-token loss: local loss sum / global token count.

    ``tokens`` is the global ``[b, S+1]`` batch; inputs/labels are sharded for CP here.
    """
    inp, lab = tokens[:, :-1], tokens[:, 1:]
    n_global = lab.numel()
    inp, lab = cp_shard(inp), cp_shard(lab)
    per_token = model(inp, None, None, labels=lab)  # [b, s_local] fp32
    return per_token.sum() / n_global


def tp_layout(model):
    """``{name: (partition_dim or None, is_glu_fc1)}`` of a model's parameters."""
    glu = model.config.gated_linear_unit
    out = {}
    for name, p in model.named_parameters():
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        out[name] = (dim, glu and name.endswith("mlp.linear_fc1.weight"))
    return out


def shard_for_tp(full: torch.Tensor, dim, glu: bool, rank: int, tp: int) -> torch.Tensor:
    """The TP shard of a full (TP=1) parameter, as Megatron lays it out on rank ``rank``."""
    if dim is None or tp == 1:
        return full.clone()
    if glu:  # fc1 of SwiGLU is [gate; up]: each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim).clone()
    return full.chunk(tp, dim=dim)[rank].clone()


def unshard_from_tp(local: torch.Tensor, dim, glu: bool, group) -> torch.Tensor:
    """Inverse of :func:`shard_for_tp`: all-gather the TP shards and reassemble the full tensor."""
    tp = dist.get_world_size(group)
    if dim is None or tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if glu:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)], dim=dim)
    return torch.cat(parts, dim=dim)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max(|b|, tiny): one number per tensor for the assertion messages."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def moba_cfg(block_size: int = 16, topk: int = 3) -> MoBAConfig:
    return MoBAConfig(block_size=block_size, topk=topk, backend="naive")
