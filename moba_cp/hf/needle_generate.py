"""``moba-cp eval needle --generate``: retrieval accuracy by decoding answers with the KV cache.

Teacher-forced scoring (``moba_cp.eval.needle.score_needle``) reads the argmax of one forward
pass at every answer position. Here the model *generates* the answer instead: the prompt (the
sample up to its answer) is prefilled once, then ``len(answer)`` tokens are decoded greedily
through ``model.generate`` with the MoBA KV cache (``moba_cp.ops.moba.decode``), and a sample is
correct iff the decoded string equals the answer's (exact match). Greedy decoding is exact iff
every teacher-forced argmax is right, so both give the same accuracy up to numerical ties; this
path is what a user of the exported model gets.

The model is the exported ``transformers`` model: built in memory from a run directory (one
process; any tp/cp the checkpoint was trained with), or loaded from a directory that
``moba-cp export hf`` wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from moba_cp.data.retrieval_docs import NeedleSample, check_needle_grid
from moba_cp.data.tokenizers import build_tokenizer
from moba_cp.eval import eval_command
from moba_cp.eval.model_runner import read_trained_recipe
from moba_cp.hf.export import EXPORT_FILE, ExportError, hf_model_from_checkpoint
from moba_cp.hf.tokenizer_files import moba_tokenizer_of
from moba_cp.train.distributed import shutdown_distributed
from moba_cp.train.user_errors import user_errors

__all__ = ["generate_scorer", "load_generation_model", "run", "is_export_dir"]


def is_export_dir(path: str | Path) -> bool:
    """A directory written by ``moba-cp export hf`` (a ``config.json`` of model_type ``moba_cp``)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "moba_cp"


def _describe(path: str | Path, overrides: list[str] | None):
    """``(moba_cp tokenizer, source)`` of an exported or a run directory, without loading the model."""
    if is_export_dir(path):
        report = Path(path) / EXPORT_FILE
        origin = json.loads(report.read_text()) if report.is_file() else {}
        return moba_tokenizer_of(path), {"export": str(Path(path).resolve()), "checkpoint": origin.get("checkpoint"),
                                         "step": origin.get("step"), "name": (origin.get("recipe") or {}).get("name")}
    ckpt, trained, meta = read_trained_recipe(path, overrides)
    return build_tokenizer(trained.data.tokenizer), {"checkpoint": str(ckpt.resolve()), "step": meta.get("step"),
                                                     "name": trained.name}


def load_generation_model(path: str | Path, overrides: list[str] | None = None):
    """The exported model (eval mode, on the GPU when there is one) from an exported or a run directory."""
    if is_export_dir(path):
        from transformers import AutoModelForCausalLM  # optional dependency: the 'export' extra

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).to(device).eval()
    return hf_model_from_checkpoint(path, overrides)[0]


def generate_scorer(model, tokenizer):
    """``sample -> {"correct", "token_accuracy", "predicted", "text"}`` by greedy KV-cache decoding."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(sample: NeedleSample) -> dict:
        n = len(sample.answer)
        prompt = torch.tensor([sample.tokens[: sample.answer_start]], dtype=torch.long, device=device)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             do_sample=False, num_beams=1, use_cache=True, pad_token_id=tokenizer.eod)
        pred = out[0, prompt.shape[1]:].tolist()
        text = tokenizer.decode(pred)
        hits = [int(p == t) for p, t in zip(pred, sample.answer)]
        return {"correct": text == tokenizer.decode(sample.answer), "token_accuracy": sum(hits) / n,
                "predicted": pred, "text": text}

    return score


def run(args, overrides: list[str]) -> int:
    """``moba-cp eval needle --generate CHECKPOINT|EXPORT_DIR ...``: one process; writes ``OUT/needle.json``."""

    try:
        if args.haystack != "passkey":
            raise ValueError(f"--haystack {args.haystack} is for teacher-forced scoring of a run directory "
                             f"(`moba-cp eval needle RUN --haystack {args.haystack}`, without --generate); decoding "
                             f"uses the passkey haystack.")
        tokenizer, source = _describe(args.checkpoint, overrides)
        lengths, depths, kinds = eval_command.needle_grid_of(args)
        check_needle_grid(tokenizer, lengths, depths, kinds, args.n_per_cell, args.seed)  # before the model loads
        model = load_generation_model(args.checkpoint, overrides)
    except (FileNotFoundError, ValueError, ExportError, *user_errors()) as e:
        print(f"moba-cp eval needle --generate: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()  # the model is in memory; generation needs no process group
    source = {**source, "scoring": "generate"}  # never resumes teacher-forced cells, nor the reverse
    label = args.label or f"{source.pop('name', None) or 'model'} (generate)"
    try:
        eval_command.run_needle_eval(args, None, tokenizer, label=label, source=source,
                                 scorer=generate_scorer(model, tokenizer))
    except KeyboardInterrupt:
        print(f"moba-cp eval needle: interrupted; finished cells are kept in {args.out}: rerun the same command "
              f"to resume.", file=sys.stderr)
        return 130
    return 0
