"""Long-context LM loss: trailing loss (the MoBA paper's "last 2K of 32K") and position-wise loss.

Model-agnostic: the model enters as a callable returning per-token losses for one sequence, so the
training loop can plug in a context-parallel model (shard, forward, all-gather the per-token losses)
without this module knowing about ranks.

Conventions: a sequence is ``tokens [S]`` with ``labels [S]`` (``labels[i]`` is the token after
``tokens[i]``, as in Megatron GPT items), and ``loss[i] = -log p(labels[i] | tokens[:i+1])``.
Position ``i`` of the position-wise curve is that index (so position 0 predicts the second token).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = ["trailing_and_positional_loss", "per_token_loss_from_logits", "as_tokens_labels"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_token_loss_from_logits(logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> LossFn:
    """Adapt ``logits_fn(tokens [1, S]) -> logits [1, S, V]`` into a per-token loss function.

    Returns:
        ``loss_fn(tokens [S], labels [S]) -> losses [S]`` (fp32 cross-entropy, natural log).
    """

    @torch.no_grad()
    def loss_fn(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits_fn(tokens.unsqueeze(0))[0].float()
        return F.cross_entropy(logits, labels.to(logits.device), reduction="none")

    return loss_fn


def as_tokens_labels(item) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence in any accepted form -> ``(tokens [S], labels [S], loss_mask [S])``.

    Accepted: a dict with ``tokens``, ``labels`` (and optionally ``loss_mask``), as the datasets of
    :mod:`moba_cp.data.datasets` give; or a 1-D sequence of ``S + 1`` token ids (then
    ``tokens = seq[:-1]``, ``labels = seq[1:]``, mask all ones).
    """
    if isinstance(item, dict):
        tokens = torch.as_tensor(item["tokens"]).long()
        labels = torch.as_tensor(item["labels"]).long()
        mask = item.get("loss_mask")
        mask = torch.ones(tokens.shape, dtype=torch.float32) if mask is None else torch.as_tensor(mask).float()
    else:
        seq = torch.as_tensor(item).long()
        if seq.dim() != 1 or seq.numel() < 2:
            raise ValueError(f"a raw sequence must be 1-D with >= 2 tokens, got shape {tuple(seq.shape)}.")
        tokens, labels = seq[:-1], seq[1:]
        mask = torch.ones(tokens.shape, dtype=torch.float32)
    if tokens.shape != labels.shape or tokens.dim() != 1:
        raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} must be equal 1-D shapes.")
    return tokens, labels, mask


def trailing_and_positional_loss(loss_fn: LossFn, sequences: Iterable, last_n: int, n_buckets: int = 16,
                                 max_sequences: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Trailing loss over the last ``last_n`` positions, and mean loss per position bucket.

    Args:
        loss_fn: ``(tokens LongTensor[S], labels LongTensor[S]) -> losses [S]`` (see module docstring;
            :func:`per_token_loss_from_logits` builds one from a logits function).
        sequences: iterable of sequences (see :func:`as_tokens_labels`), all of the same length ``S``.
        last_n: trailing window (e.g. 2048 of 32768); must be in ``[1, S]``.
        n_buckets: equal-width position buckets over ``[0, S)`` (edges rounded; at most ``S`` buckets).
        max_sequences: stop after this many sequences (None = all).

    Returns:
        A JSON-serialisable dict::

            {"seq_length": S, "num_sequences": n, "last_n": last_n,
             "trailing_loss": float,          # token-weighted mean of masked losses at positions >= S - last_n
             "trailing_tokens": int,
             "mean_loss": float,              # over all masked positions
             "per_sequence_trailing": [float, ...],
             "buckets": {"start": [...], "end": [...], "loss": [...], "tokens": [...]}}

        A bucket with no unmasked token has loss NaN (written as null by ``json`` only if converted;
        here it is ``None``).
    """
    if last_n < 1:
        raise ValueError(f"last_n={last_n} must be >= 1.")
    S = None
    sum_pos = cnt_pos = None
    per_seq = []
    n = 0
    for item in sequences:
        if max_sequences is not None and n >= max_sequences:
            break
        tokens, labels, mask = as_tokens_labels(item)
        if S is None:
            S = tokens.numel()
            if last_n > S:
                raise ValueError(f"last_n={last_n} exceeds the sequence length {S}.")
            if n_buckets < 1:
                raise ValueError(f"n_buckets={n_buckets} must be >= 1.")
            n_buckets = min(n_buckets, S)  # never more buckets than positions
            sum_pos = torch.zeros(S, dtype=torch.float64)
            cnt_pos = torch.zeros(S, dtype=torch.float64)
        elif tokens.numel() != S:
            raise ValueError(f"all sequences must have the same length: got {tokens.numel()} after {S}.")
        losses = loss_fn(tokens.to(device), labels.to(device)).detach().double().cpu().reshape(-1)
        if losses.numel() != S:
            raise ValueError(f"loss_fn returned {losses.numel()} losses for a sequence of {S} tokens.")
        m = mask.double()
        sum_pos += losses * m
        cnt_pos += m
        tm = m[S - last_n:]
        per_seq.append(float((losses[S - last_n:] * tm).sum() / tm.sum()) if tm.sum() > 0 else None)
        n += 1
    if n == 0:
        raise ValueError("no sequences to evaluate.")
    edges = [round(i * S / n_buckets) for i in range(n_buckets + 1)]
    b_loss, b_tok = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        c = float(cnt_pos[lo:hi].sum())
        b_tok.append(int(c))
        b_loss.append(float(sum_pos[lo:hi].sum()) / c if c > 0 else None)
    t_cnt = float(cnt_pos[S - last_n:].sum())
    total = float(cnt_pos.sum())
    return {
        "seq_length": S, "num_sequences": n, "last_n": last_n,
        "trailing_loss": float(sum_pos[S - last_n:].sum()) / t_cnt if t_cnt > 0 else math.nan,
        "trailing_tokens": int(t_cnt),
        "mean_loss": float(sum_pos.sum()) / total if total > 0 else math.nan,
        "per_sequence_trailing": per_seq,
        "buckets": {"start": edges[:-1], "end": edges[1:], "loss": b_loss, "tokens": b_tok},
    }
