"""``transformers`` configuration of a moba_cp GPT (copied verbatim into every exported directory).

The fields describe the Megatron-Core GPT that ``moba-cp train`` builds (``moba_cp/megatron``):
pre-norm decoder layers (RMSNorm or LayerNorm), RoPE (Megatron's, non-interleaved), grouped-query
attention whose kind is per layer (``attention_kinds``: ``"moba"`` or ``"full"``), a SwiGLU or GeLU
MLP, no biases, optionally tied embeddings. MoBA layers use ``moba_block_size`` and
``moba_topk`` (the own block counted), as in training.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MoBAConfig(PretrainedConfig):
    """Hyper-parameters of an exported moba_cp model (see the module docstring)."""

    model_type = "moba_cp"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 384,
        hidden_size: int = 128,
        intermediate_size: int = 512,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        attention_kinds: list[str] | None = None,
        moba_block_size: int = 128,
        moba_topk: int = 4,
        moba_backend: str = "auto",
        rotary_base: float = 10000.0,
        normalization: str = "RMSNorm",
        norm_eps: float = 1e-5,
        mlp_activation: str = "swiglu",
        max_position_embeddings: int = 1024,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.attention_kinds = list(attention_kinds) if attention_kinds is not None else ["moba"] * num_hidden_layers
        self.moba_block_size = moba_block_size
        self.moba_topk = moba_topk
        self.moba_backend = moba_backend
        self.rotary_base = rotary_base
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.mlp_activation = mlp_activation
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        bad = [t for t in self.attention_kinds if t not in ("moba", "full")]
        if len(self.attention_kinds) != num_hidden_layers or bad:
            raise ValueError(
                f"MoBAConfig: attention_kinds={self.attention_kinds} must list 'moba' or 'full' once per layer "
                f"(num_hidden_layers={num_hidden_layers}).")
        if normalization not in ("RMSNorm", "LayerNorm") or mlp_activation not in ("swiglu", "gelu"):
            raise ValueError(f"MoBAConfig: normalization={normalization!r} (RMSNorm|LayerNorm), "
                             f"mlp_activation={mlp_activation!r} (swiglu|gelu).")
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
