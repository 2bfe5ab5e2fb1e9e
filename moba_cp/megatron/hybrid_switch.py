"""The two-stage hybrid schedule: switch a model's MoBA layers to full attention in place.

The MoBA paper trains most tokens with MoBA and the last ~10% with full attention. A
:class:`~moba_cp.megatron.core_attention.MoBACoreAttention` holds no weights of its own (the
projections around it are Megatron's), so switching is a flag flip: no rebuild, no reload, the
optimizer state and DDP buffers are untouched, and switching back restores MoBA exactly.

Example (in the training loop)::

    if cfg.attention.switch_to_full_at is not None and step == int(cfg.attention.switch_to_full_at * steps):
        n = set_attention_mode(model, "full")     # model may be DDP-wrapped or a list of chunks
"""

from __future__ import annotations

from typing import Iterable

import torch

from moba_cp.megatron.core_attention import MODES, MoBACoreAttention, _CoreAttentionBase

__all__ = ["set_attention_mode", "attention_modes", "switch_step"]


def _modules(model) -> Iterable[torch.nn.Module]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        yield from chunk.modules()


def set_attention_mode(model, mode: str) -> int:
    """Put every MoBA layer of ``model`` in ``mode`` (``'full'`` or ``'moba'``); returns how many.

    Layers built as full attention stay full either way. ``model`` is a ``GPTModel``, a
    DDP-wrapped one, or a list of model chunks.
    """
    if mode not in MODES:
        raise ValueError(f"set_attention_mode: mode {mode!r}; choose one of {', '.join(MODES)}.")
    n = 0
    for m in _modules(model):
        if isinstance(m, MoBACoreAttention):
            m.set_mode(mode)
            n += 1
    return n


def attention_modes(model) -> list[str]:
    """The running attention of each layer, in layer order: ``'moba'`` or ``'full'``."""
    found = [(m.layer_number, m.attention_mode) for m in _modules(model) if isinstance(m, _CoreAttentionBase)]
    return [mode for _, mode in sorted(found)]


def switch_step(total_steps: int, switch_to_full_at: float | None) -> int | None:
    """The first step (0-based) that runs full attention, for ``AttentionConfig.switch_to_full_at``."""
    if switch_to_full_at is None:
        return None
    return int(round(switch_to_full_at * total_steps))
