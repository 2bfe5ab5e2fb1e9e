"""FLOPs accounting that counts MoBA's attention as the work it really does.

Used for the TFLOP/s in the training logs, ``--dry-run`` estimates and the scaling axis of
sweeps (PFLOP/s-days); plain arithmetic, no Megatron-Core import. Conventions (stated, so
figures are comparable):

- a multiply-add is 2 FLOPs; training = forward + backward = 3x the forward matmul FLOPs;
- attention per query and head: ``4 * d * n_keys`` forward (QK^T and PV over the keys it sees);
  full causal attention sees ``i + 1`` keys at position ``i``; MoBA sees its own block causally
  (``i % B + 1`` keys) plus ``min(topk - 1, i // B)`` whole past blocks (``B`` keys each);
- MoBA's gate: ``2 * d`` per query head and candidate past block, forward only (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

from moba_cp.config import RecipeConfig, layer_attention_kinds
from moba_cp.model_sizes import default_ffn_hidden_size, padded_vocab_size

__all__ = ["attended_keys", "gate_candidates", "ModelFlops", "model_flops_per_sequence", "flops_per_step"]


def attended_keys(seq_len: int, block_size: int | None = None, topk: int | None = None) -> int:
    """Sum over query positions ``0..S-1`` of the keys each attends (one head, one document).

    ``block_size=None`` (or topk covering every block) is full causal attention: ``S(S+1)/2``.
    """
    s = seq_len
    if block_size is None or topk is None:
        return s * (s + 1) // 2
    b = block_size
    n_full, rem = divmod(s, b)
    total = 0
    # Whole blocks j = 0..n_full-1: each position sees its causal prefix of the own block plus
    # min(topk-1, j) past blocks. Past-block count saturates at j = topk-1, so sum in closed form.
    own_full = b * (b + 1) // 2
    total += n_full * own_full
    sat = min(n_full, topk - 1)  # blocks j < sat see j past blocks; the rest see topk-1
    total += b * b * (sat * (sat - 1) // 2)
    total += b * b * (topk - 1) * (n_full - sat)
    if rem:
        j = n_full
        total += rem * (rem + 1) // 2 + rem * b * min(topk - 1, j)
    return total


def gate_candidates(seq_len: int, block_size: int) -> int:
    """Sum over query positions of the complete past blocks scored by the gate (``i // B``)."""
    n_full, rem = divmod(seq_len, block_size)
    return block_size * (n_full * (n_full - 1) // 2) + rem * n_full


@dataclass
class ModelFlops:
    """Training FLOPs of one sequence, split by where they go."""

    dense: float  # projections, MLP, logits (fwd + bwd)
    attention: float  # softmax attention over attended keys (fwd + bwd)
    gate: float  # MoBA gate (forward only)

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.gate


def model_flops_per_sequence(
    *, num_layers: int, hidden_size: int, num_attention_heads: int, num_query_groups: int,
    ffn_hidden_size: int, vocab_size: int, seq_length: int, swiglu: bool,
    layer_kinds: list[str], block_size: int, topk: int,
) -> ModelFlops:
    """Training FLOPs (forward + backward) of one ``seq_length`` sequence through the GPT.

    ``layer_kinds``: ``'moba'`` or ``'full'`` per layer. Returns a :class:`ModelFlops`.
    """
    h, s = hidden_size, seq_length
    d = h // num_attention_heads
    kv = num_query_groups * d
    per_token_layer = 2 * h * (h + 2 * kv) + 2 * h * h + (3 if swiglu else 2) * 2 * h * ffn_hidden_size
    dense_fwd = s * (num_layers * per_token_layer + 2 * h * vocab_size)
    attn_fwd = 0.0
    gate = 0.0
    for kind in layer_kinds:
        if kind == "moba":
            attn_fwd += 4 * d * num_attention_heads * attended_keys(s, block_size, topk)
            gate += 2 * d * num_attention_heads * gate_candidates(s, block_size)
        else:
            attn_fwd += 4 * d * num_attention_heads * attended_keys(s)
    return ModelFlops(dense=3.0 * dense_fwd, attention=3.0 * attn_fwd, gate=float(gate))


def flops_per_step(cfg: RecipeConfig, vocab_size: int) -> float:
    """Training FLOPs of one optimizer step of recipe ``cfg`` (``global_batch_size`` sequences).

    ``vocab_size`` is the tokenizer's; it is padded as the model pads it
    (:func:`moba_cp.model_sizes.padded_vocab_size`), and an unset MLP width takes the model's
    default (:func:`moba_cp.model_sizes.default_ffn_hidden_size`).
    """
    m = cfg.model
    f = model_flops_per_sequence(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.swiglu),
        vocab_size=padded_vocab_size(vocab_size, cfg.parallel.tp), seq_length=m.seq_length, swiglu=m.swiglu,
        layer_kinds=layer_attention_kinds(m, cfg.attention), block_size=cfg.moba.block_size, topk=cfg.moba.topk,
    )
    return f.total * cfg.train.global_batch_size
