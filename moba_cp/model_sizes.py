"""Size arithmetic of a recipe's GPT: the MLP width and the padded vocabulary.

Plain integer arithmetic with no dependency, so the Megatron model build, the FLOP accounting
(:mod:`moba_cp.train.flops`), ``--dry-run`` and sweep cost estimates all use the same numbers
without importing Megatron-Core.
"""

from __future__ import annotations

import math

__all__ = ["default_ffn_hidden_size", "padded_vocab_size"]


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """MLP width when the recipe leaves it None: ``4h``, or for SwiGLU ``8h/3`` rounded up to 64.

    (SwiGLU has three matrices instead of two; 8/3 keeps the parameter count of a 4h GeLU MLP.)
    """
    if not swiglu:
        return 4 * hidden_size
    return int(math.ceil(8 * hidden_size / 3 / 64) * 64)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Vocabulary padded to a multiple of ``lcm(divisible_by, tp)`` (the embedding is split over TP).

    Megatron-LM pads to ``divisible_by * tp``, which makes the model (and its loss: padded logits
    enter the softmax) depend on the TP size. The least common multiple keeps every TP size that
    divides ``divisible_by`` on the same vocabulary, so runs and checkpoints agree across layouts.
    """
    unit = divisible_by * tp // math.gcd(divisible_by, tp)
    return int(math.ceil(vocab_size / unit) * unit)
