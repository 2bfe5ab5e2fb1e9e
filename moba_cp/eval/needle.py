"""Synthetic retrieval ("needle in a haystack") evaluation: greedy scoring and the (length x depth) grid.

The samples come from :mod:`moba_cp.data.retrieval_docs` (their layout and kinds are described
there).

Scoring is teacher-forced: the prediction for answer token ``i`` is ``argmax logits[answer_start + i - 1]``
given the true prefix, which equals greedy decoding as far as exact match is concerned (greedy
decoding is exact iff every teacher-forced argmax is right).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Callable, Sequence

import torch

from moba_cp.data.retrieval_docs import KINDS, NeedleSample, check_needle_grid, make_needle_sample, sample_seed

__all__ = ["HAYSTACKS", "score_needle", "run_needle_grid", "write_json", "cell_key", "check_needle_grid", "sample_seed",
           "parse_lengths", "parse_depths", "parse_kinds", "KINDS"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# Haystack text of needle samples: the passkey paper's repeated sentences, or held-out documents of the
# run's own corpus (the text a model trained with the retrieval mixture saw around its needles).
HAYSTACKS = ("passkey", "heldout")


# The grid as a user writes it (``moba-cp eval needle`` flags, a sweep's ``eval_needle``). Each
# parser raises ValueError naming the value and the rule; callers prefix the flag or key.
def parse_lengths(spec: str | Sequence[int]) -> list[int]:
    """``"4k,8k,32768,1m"`` -> ``[4096, 8192, 32768, 1048576]`` (k = 1024, m = 1024**2)."""
    if not isinstance(spec, str):
        return [int(x) for x in spec]
    out = []
    for part in spec.split(","):
        p = part.strip().lower()
        if not p:
            continue
        mult = 1024 if p.endswith("k") else 1024 ** 2 if p.endswith("m") else 1
        try:
            out.append(int(float(p.rstrip("km")) * mult))
        except ValueError:
            raise ValueError(f"{spec!r}: {part.strip()!r} is not a token count; expected comma-separated "
                             f"counts such as 4k,8k,32768.") from None
    if not out or min(out) < 1:
        raise ValueError(f"{spec!r}: expected positive token counts such as 4k,8k.")
    return out


def parse_depths(spec: str) -> list[float]:
    """``"0,10,...,100"`` -> ``[0, 10, 20, ..., 100]``; ``"0,25,50"`` -> as listed; percent values."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if "..." in parts:
        i = parts.index("...")
        if i < 2 or i != len(parts) - 2:
            raise ValueError(f"depths {spec!r}: write 'a,b,...,z' (step b - a).")
        a, b, z = float(parts[0]), float(parts[1]), float(parts[-1])
        step, out, x = b - a, [], a
        if step <= 0:
            raise ValueError(f"depths {spec!r}: the step must be positive.")
        while x <= z + 1e-9:
            out.append(round(x, 6))
            x += step
        return out
    vals = [float(p) for p in parts]
    if not vals or any(not 0 <= v <= 100 for v in vals):
        raise ValueError(f"depths {spec!r}: expected percents in [0, 100].")
    return vals


def parse_kinds(spec: str) -> list[str]:
    """``"passkey,single"`` -> ``["passkey", "single"]``, each one of :data:`KINDS`."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        what = f"unknown {bad}" if bad else "no kind given"
        raise ValueError(f"{spec!r}: {what}; choose from {', '.join(KINDS)}.")
    return kinds


@torch.no_grad()
def score_needle(logits_fn: LogitsFn, sample: NeedleSample, device: str | torch.device = "cpu") -> dict:
    """Teacher-forced greedy exact match of the answer.

    Args:
        logits_fn: ``tokens LongTensor[1, S] -> logits [1, S, V]`` (causal LM; any dtype). To save
            memory at long S it may return only the logits of the last ``K`` positions, ``[1, K, V]``,
            with ``K > len(sample.answer)`` (e.g. ``K = 64``).
        sample: a :class:`NeedleSample` (``S = sample.length``).

    Returns:
        ``{"correct": bool, "token_accuracy": float, "predicted": list[int]}``: ``correct`` iff every
        answer token is the argmax of the logits at the position before it.
    """
    x = torch.tensor(sample.tokens, dtype=torch.long, device=device).unsqueeze(0)
    logits = logits_fn(x)
    a, n = sample.answer_start, len(sample.answer)
    if logits.dim() != 3 or logits.shape[0] != 1 or not (n < logits.shape[1] <= sample.length):
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}; expected [1, {sample.length}, V] "
                         f"(or the last K > {n} positions, [1, K, V]).")
    offset = sample.length - logits.shape[1]  # position of logits[:, 0]
    pred = logits[0, a - 1 - offset:a - 1 - offset + n].argmax(dim=-1).tolist()
    hits = [int(p == t) for p, t in zip(pred, sample.answer)]
    return {"correct": all(hits), "token_accuracy": sum(hits) / n, "predicted": pred}


def cell_key(kind: str, length: int, depth: float) -> str:
    """The name of a grid cell in saved results (``"passkey|4096|50"``)."""
    return f"{kind}|{int(length)}|{float(depth):g}"


def run_needle_grid(logits_fn: LogitsFn, tokenizer, lengths: Sequence[int], depths: Sequence[float],
                    kinds: Sequence[str] = ("single",), n_per_cell: int = 1, seed: int = 0, *,
                    fillers: Sequence[Sequence[int]] | None = None, device: str | torch.device = "cpu",
                    progress: Callable[[str], None] | None = None, done: dict | None = None,
                    on_cell: Callable[[dict], None] | None = None,
                    scorer: Callable[[NeedleSample], dict] | None = None) -> dict:
    """Accuracy per (kind, length, depth) cell.

    Args:
        logits_fn: see :func:`score_needle`.
        lengths, depths: the grid (tokens; percent).
        kinds: subset of :data:`KINDS`.
        n_per_cell: samples per cell (sample ``j`` uses seed ``seed * 1_000_003 + j``).
        fillers: per-sample haystacks: sample ``j`` of every cell uses ``fillers[j % len(fillers)]``
            (e.g. held-out documents of the training corpus, so each sample has its own text and every
            cell the same texts); None: the passkey filler for every sample.
        progress: called with one line per finished cell (e.g. ``print``).
        done: cells finished earlier (``{cell_key: cell}``, e.g. from an interrupted run): taken
            as they are, not run again.
        on_cell: called with each newly finished cell (e.g. to save progress).
        scorer: ``sample -> {"correct", "token_accuracy", ...}`` instead of teacher-forced
            :func:`score_needle` (e.g. generation: ``moba_cp.hf.needle_generate``).

    Returns:
        ``{"lengths": [...], "depths": [...], "n_per_cell": n, "seed": s,
        "kinds": {kind: {"accuracy": [[acc per depth] per length], "token_accuracy": [[...]],
        "mean": float}}, "cells": [{"kind", "length", "depth", "accuracy", "token_accuracy", "n"}]}``.
        JSON-serialisable (see :func:`write_json`); the heatmap plot reads ``kinds[k]["accuracy"]``.
    """
    lengths, depths = [int(x) for x in lengths], [float(d) for d in depths]
    done = dict(done or {})
    res = {"lengths": lengths, "depths": depths, "n_per_cell": n_per_cell, "seed": seed, "kinds": {}, "cells": []}
    for kind in kinds:
        acc = [[0.0] * len(depths) for _ in lengths]
        tacc = [[0.0] * len(depths) for _ in lengths]
        for li, L in enumerate(lengths):
            for di, d in enumerate(depths):
                cell = done.get(cell_key(kind, L, d))
                if cell is None:
                    c = t = 0.0
                    for j in range(n_per_cell):
                        filler = fillers[j % len(fillers)] if fillers else None
                        s = make_needle_sample(tokenizer, L, d, kind, sample_seed(seed, j), filler_tokens=filler)
                        r = scorer(s) if scorer is not None else score_needle(logits_fn, s, device)
                        c += r["correct"]
                        t += r["token_accuracy"]
                    cell = {"kind": kind, "length": L, "depth": d, "accuracy": c / n_per_cell,
                            "token_accuracy": t / n_per_cell, "n": n_per_cell}
                    if on_cell:
                        on_cell(cell)
                    if progress:
                        progress(f"needle {kind} length={L} depth={d:g}: accuracy {cell['accuracy']:.2f}")
                acc[li][di], tacc[li][di] = cell["accuracy"], cell["token_accuracy"]
                res["cells"].append(cell)
        flat = [x for row in acc for x in row]
        res["kinds"][kind] = {"accuracy": acc, "token_accuracy": tacc, "mean": sum(flat) / len(flat)}
    return res


def write_json(obj, path: str) -> str:
    """Write ``obj`` as indented JSON (atomic rename), creating parent folders; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    os.replace(tmp, path)
    return path
