"""Loss on answers far from their evidence: the MoBA paper's hybrid measure, on held-out retrieval documents.

The paper scores layer-wise hybrids by the loss on answers after SFT, where the loss sits only on
answer tokens that depend on evidence far back in a long prompt. This evaluation builds such
documents from *held-out* text (:func:`moba_cp.data.datasets.heldout_sequences`, never trained on):
each sample is a retrieval document (:func:`moba_cp.data.retrieval_docs.make_needle_sample`) of
``seq_len`` tokens whose needle sits at a given depth (depth 0 = the needle at the start, the answer
``~seq_len`` tokens after it), and the score is the mean next-token loss over its answer tokens.
Samples cycle through the depths and kinds; sample ``i`` uses held-out sequence ``i`` as its
haystack and seed ``i``, so every model sees the very same documents (paired per sample).

    python -m torch.distributed.run --nproc_per_node 1 -m moba_cp.experiments.answer_loss RUN_DIR \\
        --seq-len 32768 --num-samples 32 --depths 0,25,50 --kinds passkey,single --out RUN_DIR/eval

Writes ``OUT/answer_loss.json``: ``answer_loss`` (mean over samples), ``per_sample`` (in sample
order), ``se`` (standard error over samples), ``num_samples``, ``answer_tokens``, and the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Sequence

import torch

from moba_cp.data.datasets import heldout_sequences
from moba_cp.data.retrieval_docs import KINDS, fixed_tokens, haystack_tokens, make_needle_sample
from moba_cp.eval.model_runner import load_eval_model, read_trained_recipe
from moba_cp.train.distributed import shutdown_distributed

__all__ = ["answer_losses", "main", "ANSWER_LOSS_FILE"]

ANSWER_LOSS_FILE = "answer_loss.json"


def answer_losses(loss_fn: Callable, tokenizer, haystacks: Sequence, seq_len: int, depths: Sequence[float],
                  kinds: Sequence[str]) -> list[dict]:
    """One retrieval document per haystack; the mean loss on its answer tokens.

    Args:
        loss_fn: ``(tokens [S], labels [S]) -> per-token losses [S]`` (e.g. ``EvalModel.loss_fn``).
        tokenizer: the model's tokenizer.
        haystacks: held-out token sequences (filler text; EOD tokens are dropped).
        seq_len: ``S``, tokens the model reads per document.
        depths: needle depths in percent, used in turn; kinds likewise.
    Returns:
        per sample ``{"kind", "depth", "distance", "answer_tokens", "loss"}``; ``distance`` is the number
        of tokens from the needle's start to the answer's.
    """
    out = []
    for i, hay in enumerate(haystacks):
        kind, depth = kinds[i % len(kinds)], float(depths[i % len(depths)])
        filler = haystack_tokens(tokenizer, torch.as_tensor(hay).tolist())
        s = make_needle_sample(tokenizer, seq_len + 1, depth, kind, seed=i, filler_tokens=filler)
        seq = torch.tensor(s.tokens, dtype=torch.long)
        losses = loss_fn(seq[:-1], seq[1:]).double().reshape(-1)
        ans = losses[s.answer_start - 1:]  # labels[j] = seq[j + 1]: the answer is labels[answer_start - 1:]
        out.append({"kind": kind, "depth": depth, "distance": int(s.answer_start - s.needle_pos),
                    "answer_tokens": int(ans.numel()), "loss": float(ans.mean())})
    return out


def summarise(samples: list[dict], settings: dict) -> dict:
    """The JSON written by :func:`main`: mean, per-sample values, standard error, settings."""
    vals = [x["loss"] for x in samples]
    mean = sum(vals) / len(vals)
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals)) if len(vals) > 1 else None
    return {"answer_loss": mean, "per_sample": vals, "se": se, "num_samples": len(vals),
            "answer_tokens": sum(x["answer_tokens"] for x in samples), "samples": samples, **settings}


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m moba_cp.experiments.answer_loss",
                                description="Loss on answers far from their evidence, on held-out retrieval documents.")
    p.add_argument("checkpoint", help="run directory (or one of its checkpoints)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--depths", default="0,25,50", help="needle depths in percent (0 = farthest from the answer)")
    p.add_argument("--kinds", default="passkey,single", help=f"among {', '.join(KINDS)}")
    p.add_argument("--out", default="eval")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not depths or any(not 0 <= d <= 100 for d in depths) or not kinds or set(kinds) - set(KINDS) \
            or args.num_samples < 2 or args.seq_len < 1:
        print(f"answer_loss: need depths in [0, 100], kinds among {KINDS}, --num-samples >= 2 and a positive "
              f"--seq-len; got {args.depths!r}, {args.kinds!r}, {args.num_samples}, {args.seq_len}.", file=sys.stderr)
        return 2
    _, trained, _ = read_trained_recipe(args.checkpoint)
    em = load_eval_model(args.checkpoint, args.seq_len)
    try:
        need = max(fixed_tokens(em.tokenizer, k) for k in kinds) + 64
        if need > args.seq_len:
            raise ValueError(f"--seq-len={args.seq_len} is too short for {kinds} documents (need > {need}).")
        hay = heldout_sequences(trained.data, seq_length=args.seq_len, num_sequences=args.num_samples,
                                tokenizer=em.tokenizer, builtin_budget_bytes=trained.data.builtin_budget_bytes)
        samples = answer_losses(em.loss_fn, em.tokenizer, hay, args.seq_len, depths, kinds)
        if em.env.is_main:
            res = summarise(samples, {"seq_len": args.seq_len, "depths": depths, "kinds": kinds,
                                      "checkpoint": str(em.checkpoint)})
            os.makedirs(args.out, exist_ok=True)
            tmp = os.path.join(args.out, ANSWER_LOSS_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(res, f, indent=1)
            os.replace(tmp, os.path.join(args.out, ANSWER_LOSS_FILE))
            print(f"answer loss ({len(samples)} held-out retrieval documents of {args.seq_len} tokens, depths "
                  f"{depths}): {res['answer_loss']:.4f}" + (f" +- {res['se']:.4f} (SE)" if res["se"] else ""))
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
