"""``moba-cp export needle-task``: the needle grid as an offline lm-evaluation-harness task.

Writes, into ``--out``::

    moba_needle.yaml     the task (generate_until, greedy, the longest answer's length in tokens)
    utils.py             its metric: the first len(answer) characters generated equal the answer
    needle.jsonl         one line per sample: context (prompt text), answer, kind, length, depth

The samples are ``moba_cp.data.retrieval_docs``'s, for the grid of ``moba-cp eval needle``
(``--lengths --depths --kinds --n-per-cell --seed``), built with the tokenizer of the exported
model, so the prompt of each line is exactly the sample's tokens before its answer. Then run the
harness's ``hf`` model on the exported directory (no network: the data is a local JSON file)::

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=DIR,trust_remote_code=True,dtype=float32,max_length=L \\
        --include_path TASK_DIR --tasks moba_needle --batch_size 1 --device cpu

``L`` (printed) is the longest prompt plus the generation: without it the harness cuts prompts
longer than the model's ``max_position_embeddings`` (the training length) minus the generation
from the left. A sample is correct iff greedy decoding reproduces the answer's text, which is what
``moba-cp eval needle --generate`` counts (for a byte-tokenizer model the two see the same tokens;
a BPE model's prompt is re-tokenized from its text by the harness).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moba_cp.data.retrieval_docs import check_needle_grid, make_needle_sample, sample_seed
from moba_cp.eval import eval_command
from moba_cp.hf.tokenizer_files import moba_tokenizer_of

__all__ = ["write_needle_task", "add_arguments", "run", "TASK_NAME"]

TASK_NAME = "moba_needle"

_UTILS = '''"""Metric of the moba_needle task (written by `moba-cp export needle-task`)."""


def process_results(doc, results):
    """Exact match: the first len(answer) characters of the greedy generation are the answer."""
    answer = doc["answer"]
    return {"exact_match": float(results[0][: len(answer)] == answer)}
'''


def write_needle_task(out: str | Path, tokenizer, lengths, depths, kinds, n_per_cell: int, seed: int,
                      task_name: str = TASK_NAME) -> dict:
    """Write the task files (see the module docstring).

    Returns:
        ``{"samples": n, "max_answer_tokens": m, "max_length": L}``: pass ``max_length=L`` (or more) in
        the harness's ``--model_args``, else it cuts the longest prompts from the left.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_needle_grid(tokenizer, lengths, depths, kinds, n_per_cell, seed)
    rows, longest = [], 1
    for kind in kinds:
        for length in lengths:
            for depth in depths:
                for j in range(n_per_cell):
                    s = make_needle_sample(tokenizer, length, depth, kind, sample_seed(seed, j))
                    longest = max(longest, len(s.answer))
                    rows.append({"context": tokenizer.decode(s.tokens[: s.answer_start]),
                                 "answer": tokenizer.decode(s.answer), "kind": kind, "length": length,
                                 "depth": depth, "sample": j})
    data = out / "needle.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "utils.py").write_text(_UTILS)
    (out / f"{task_name}.yaml").write_text("\n".join([
        f"task: {task_name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "test_split: test",
        "output_type: generate_until",
        'doc_to_text: "{{context}}"',
        'doc_to_target: "{{answer}}"',
        "target_delimiter: \"\"",
        "generation_kwargs:",
        "  until: []",
        "  do_sample: false",
        f"  max_gen_toks: {longest}",
        "process_results: !function utils.process_results",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ]))
    # the harness cuts prompts to max_length - max_gen_toks from the left: give it room for the
    # longest prompt plus the generation (the config's max_position_embeddings is the training length)
    return {"samples": len(rows), "max_answer_tokens": longest, "max_length": max(lengths) + longest}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="a directory written by `moba-cp export hf` (its tokenizer)")
    eval_command.add_needle_arguments(p)
    for action in p._actions:
        if action.dest == "out":  # the needle flags' --out names eval outputs; here it is the task folder
            action.help = "folder for the task files (moba_needle.yaml, utils.py, needle.jsonl); required"
    p.set_defaults(out=None)
    return p


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """``moba-cp export needle-task EXPORT_DIR --out TASK_DIR [grid flags]``."""
    if rest:
        print(f"moba-cp export needle-task: unexpected arguments {rest}", file=sys.stderr)
        return 2
    try:
        if not args.out:
            raise ValueError("--out TASK_DIR is required (the folder for the task files).")
        if args.haystack != "passkey":
            raise ValueError(f"--haystack {args.haystack}: the exported task has no training corpus to draw held-out "
                             f"haystacks from; it uses the passkey haystack (leave --haystack out).")
        tokenizer = moba_tokenizer_of(args.export_dir)
        lengths, depths, kinds = eval_command.needle_grid_of(args)
        info = write_needle_task(args.out, tokenizer, lengths, depths, kinds, args.n_per_cell, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"moba-cp export needle-task: {e}", file=sys.stderr)
        return 2
    print(f"needle-task: {info['samples']} samples in {args.out}/needle.jsonl; run with\n"
          f"  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args "
          f"pretrained={args.export_dir},trust_remote_code=True,dtype=float32,max_length={info['max_length']} "
          f"--include_path {args.out} --tasks {TASK_NAME} --batch_size 1")
    return 0
