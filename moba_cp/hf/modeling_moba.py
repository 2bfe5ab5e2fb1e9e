"""``transformers`` model of a moba_cp GPT, with a MoBA KV-cache decode path.

Copied verbatim (with ``configuration_moba.py``) into every directory that ``moba-cp export hf``
writes and registered there through ``auto_map``, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads it. It needs torch, transformers and the ``moba_cp`` package's single-device ops
(``moba_cp.ops.moba``), never Megatron-Core.

The layers compute what the Megatron-Core GPT of ``moba_cp/megatron`` computes (same RoPE, norms,
MLP, softmax scale ``head_dim ** -0.5``), and attention is per layer (``config.attention_kinds``):

===========================  ======================================  ==========================
call                          MoBA layer                               full layer
===========================  ======================================  ==========================
no cache / prefill at 0       ``moba_attn`` (Triton on GPU), on CPU     causal SDPA
                              the gathered pure-torch op
continuing a cache            ``moba_decode_attn``: gate on running     ``causal_decode_attn``
                              centroids, attend own + top-k-1 blocks
===========================  ======================================  ==========================

so token-by-token generation gives the full forward's logits at every position
(``docs/design.md`` section 1; tested in ``tests/test_hf_model.py``).

The cache is any ``transformers`` ``Cache`` (``generate`` makes a ``DynamicCache``). The running
block centroids of each (cache, layer) live beside it, keyed by the cache object itself (weak
reference): a block's centroid is computed once, when its last key arrives. Batch rows must have
equal lengths (no padding mask) and beam search is not supported (the centroids do not follow a
beam reorder); both are refused with a message.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from moba_cp.ops.moba.api import choose_backend, moba_attn_bshd
from moba_cp.ops.moba.decode import BlockCentroids, causal_decode_attn, moba_decode_attn

from .configuration_moba import MoBAConfig

__all__ = ["MoBAForCausalLM", "MoBAModel", "MoBAPreTrainedModel", "MoBAConfig"]

# transformers renamed the cache argument/field from ``past_key_values`` to ``cache`` (5.2x).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

#: cache object -> {layer index: BlockCentroids}; entries die with their cache.
_CENTROIDS: "weakref.WeakKeyDictionary[Cache, dict[int, BlockCentroids]]" = weakref.WeakKeyDictionary()


def _centroids(cache: Cache, layer: int, block_size: int) -> BlockCentroids:
    per_layer = _CENTROIDS.setdefault(cache, {})
    if layer not in per_layer:
        per_layer[layer] = BlockCentroids(block_size)
    return per_layer[layer]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Megatron-Core's RoPE (non-interleaved, rotary_percent 1): ``cos``/``sin`` ``[s, head_dim]`` fp32.

    The frequencies are recomputed per call (``head_dim / 2`` numbers), not kept as a buffer:
    transformers builds models on the meta device and does not restore non-persistent buffers.
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
        emb = torch.outer(pos, inv_freq)
        emb = torch.cat((emb, emb), dim=-1)
        return emb.cos(), emb.sin()


def _apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``t [b, s, h, d]``; cos/sin ``[s, d]`` fp32, cast to t's dtype as Megatron does."""
    c, s = cos.to(t.dtype)[None, :, None, :], sin.to(t.dtype)[None, :, None, :]
    return t * c + _rotate_half(t) * s


def _norm(config: MoBAConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class MoBAAttention(nn.Module):
    """Grouped-query self-attention whose core is MoBA or full causal attention (see module docstring)."""

    def __init__(self, config: MoBAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.attention_kinds[layer_idx]
        self.hq, self.hkv, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.block_size, self.topk, self.backend = config.moba_block_size, config.moba_topk, config.moba_backend
        self.scale = self.d ** -0.5
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.hq * self.d, bias=False)
        self.k_proj = nn.Linear(h, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(h, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.hq * self.d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None,
                q_start: int) -> torch.Tensor:
        b, s, _ = x.shape
        q = _apply_rope(self.q_proj(x).view(b, s, self.hq, self.d), cos, sin)
        k = _apply_rope(self.k_proj(x).view(b, s, self.hkv, self.d), cos, sin)
        v = self.v_proj(x).view(b, s, self.hkv, self.d)
        if cache is not None:  # transformers caches are [b, h, s, d]
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k_all, v_all = k_all.transpose(1, 2)[:, : q_start + s], v_all.transpose(1, 2)[:, : q_start + s]
        else:
            k_all, v_all = k, v
        if q_start == 0:
            o = self._attend_whole(q, k_all, v_all)
        elif self.kind == "moba":
            cent = None if cache is None else _centroids(cache, self.layer_idx, self.block_size).update(
                k_all, unchanged_upto=q_start)  # the cache may have been cropped since the last step
            o = moba_decode_attn(q, k_all, v_all, q_start=q_start, block_size=self.block_size, topk=self.topk,
                                 centroids=cent, softmax_scale=self.scale)
        else:
            o = causal_decode_attn(q, k_all, v_all, q_start=q_start, softmax_scale=self.scale)
        return self.o_proj(o.reshape(b, s, self.hq * self.d))

    def _attend_whole(self, q, k, v):
        """Whole sequences from position 0: the training op."""
        if self.kind == "full":
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale,
                enable_gqa=self.hq != self.hkv).transpose(1, 2)
        if choose_backend(self.backend, q.device) == "triton":
            return moba_attn_bshd(q, k, v, block_size=self.block_size, topk=self.topk, softmax_scale=self.scale,
                                  backend="triton")
        # The pure-torch op without dense [T, T] masks (same contract as the naive oracle, to rounding):
        # long prompts fit on CPU.
        return moba_decode_attn(q, k, v, q_start=0, block_size=self.block_size, topk=self.topk,
                                softmax_scale=self.scale)


class MoBAMLP(nn.Module):
    """Megatron's MLP: SwiGLU (``silu(gate) * up``) or GeLU, no biases."""

    def __init__(self, config: MoBAConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gated = config.mlp_activation == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class MoBADecoderLayer(nn.Module):
    def __init__(self, config: MoBAConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = MoBAAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MoBAMLP(config)

    def forward(self, x, cos, sin, cache, q_start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, q_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoBAPreTrainedModel(PreTrainedModel):
    config_class = MoBAConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoBADecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def _cache_arg(kwargs: dict, cache: Cache | None) -> Cache | None:
    """The cache under either of transformers' names for it."""
    other = kwargs.pop("past_key_values", None)
    return cache if cache is not None else other


class MoBAModel(MoBAPreTrainedModel):
    """Embedding, decoder layers, final norm: hidden states ``[b, s, hidden]``."""

    def __init__(self, config: MoBAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoBADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rotary_base)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, cache=None, use_cache=None, **kwargs):
        cache = _cache_arg(kwargs, cache)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "MoBAModel: the attention mask has zeros (padded batch rows); MoBA blocks are cut from "
                "position 0 of each sequence, so padding is not supported. Fix: give every row the same "
                "length (or run rows one at a time).")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        q_start = cache.get_seq_length(0) if cache is not None else 0
        cos, sin = self.rotary(q_start, s, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, q_start)
        return self.norm(x), (cache if use_cache else None)


class MoBAForCausalLM(MoBAPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`MoBAModel`; ``generate`` decodes with a KV cache.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("exported/", trust_remote_code=True)
        >>> out = model.generate(ids, max_new_tokens=16, do_sample=False)
    """

    def __init__(self, config: MoBAConfig) -> None:
        super().__init__(config)
        self.model = MoBAModel(config)
        # Tied embeddings reuse the embedding matrix in forward (no lm_head parameter to tie).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int = 0, return_dict=None, **kwargs):
        """``input_ids [b, s]`` -> ``logits [b, s, vocab]`` (fp32). Positions continue the cache
        (``position_ids`` are not read: they are always ``cache length + 0 .. s-1``)."""
        cache = _cache_arg(kwargs, cache)
        h, cache = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              cache=cache, use_cache=use_cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate`` (greedy or sampled; beam search is refused)."""
        config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1) > 1:
            raise ValueError("MoBAForCausalLM: beam search is not supported (the running block centroids do not "
                             "follow a beam reorder). Use greedy (do_sample=False) or sampled generation.")
        return super().generate(*args, **kwargs)
