"""Loss on answers far from their evidence (experiments/answer_loss.py): which tokens it averages,
and a one-point CPU sweep that trains, evaluates it and records it (with its per-sample values)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moba_cp.data.retrieval_docs import make_needle_sample
from moba_cp.data.tokenizers import ByteTokenizer
from moba_cp.experiments.answer_loss import answer_losses, summarise
from tests.distributed_harness import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_answer_losses_average_the_answer_tokens_only():
    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(0)
    hay = [torch.randint(32, 127, (1025,), generator=g) for _ in range(4)]
    seen = []

    def loss_fn(tokens, labels):  # loss = the label's token id: the mean over the answer is checkable
        seen.append(labels.clone())
        return labels.double()

    out = answer_losses(loss_fn, tok, hay, 1024, depths=[0, 50], kinds=["passkey", "single"])
    assert [(x["kind"], x["depth"]) for x in out] == [("passkey", 0), ("single", 50), ("passkey", 0), ("single", 50)]
    for i, (x, labels) in enumerate(zip(out, seen)):
        s = make_needle_sample(tok, 1025, x["depth"], x["kind"], seed=i,
                               filler_tokens=[int(t) for t in hay[i].tolist()])
        assert x["answer_tokens"] == len(s.answer) and x["loss"] == pytest.approx(sum(s.answer) / len(s.answer))
        assert labels.numel() == 1024
    assert out[0]["distance"] > out[1]["distance"] > 0  # depth 0: the needle is farthest from the answer
    res = summarise(out, {"seq_len": 1024})
    assert res["num_samples"] == 4 and res["per_sample"] == [x["loss"] for x in out] and res["se"] > 0


def test_sweep_with_answer_loss_records_it(tmp_path):
    cache = tmp_path / "cache"
    spec = dict(name="al", kind="hybrid", base="recipes/quickstart.yaml", out_dir=str(tmp_path / "out"), nproc=1,
                metric="answer_loss",
                eval_answer_loss={"seq_len": 512, "num_samples": 2, "depths": "0,50", "kinds": "passkey"},
                common=["--parallel.cp=1", "--model.num_layers=1", "--model.seq_length=512", "--moba.block_size=32",
                        "--train.steps=2", "--train.warmup_steps=1", "--train.global_batch_size=1",
                        "--logging.tensorboard=false", "--eval.interval=0", f"--data.cache_dir={cache}",
                        "--model.hidden_size=32", "--model.num_attention_heads=2", "--model.num_query_groups=2"],
                points=[{"name": "moba", "overrides": ["--attention.pattern=moba", "--moba.key_conv=3"]}])
    f = tmp_path / "al.yaml"
    f.write_text(yaml.safe_dump(spec))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    # `python -m moba_cp.cli sweep` in a process forked from the preloaded server (its point runs under torchrun)
    proc = run_cli(["sweep", str(f)], env=env, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    point = json.loads((tmp_path / "out" / "moba" / "sweep_point.json").read_text())
    assert point["answer_samples"] == 2 and len(point["answer_loss_per_seq"]) == 2 and point["answer_loss"] > 0
    assert point["data"]["corpus"].startswith("stdlib-") and point["data"]["epochs"] < 1
