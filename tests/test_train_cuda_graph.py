"""``train.cuda_graph=full_iteration`` on a GPU: the replayed steps train the same model as the
eager ones (same losses and gradient norms, step after step, so every replay's gradients reached
the optimizer), for MoBA and full attention, with a validation in between and the hybrid switch
(which must capture anew). The recipe rules it checks first are tested on CPU in test_config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ONE_GPU = [
    "--parallel.cp=1", "--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
    "--model.num_query_groups=2", "--model.seq_length=1024", "--moba.block_size=128", "--moba.topk=3",
    "--train.steps=8", "--train.warmup_steps=2", "--train.global_batch_size=4", "--train.micro_batch_size=2",
    "--train.precision=fp32", "--train.lr=3e-3", "--train.min_lr=3e-4", "--logging.interval=1",
    "--logging.tensorboard=false", "--checkpoint.save=false",
]


def _train(tmp_path: Path, name: str, extra: list[str]) -> tuple[list[dict], str]:
    run = tmp_path / name
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "moba_cp.train", "recipes/tiny.yaml", *ONE_GPU, *extra,
                           f"--logging.dir={run}", f"--data.cache_dir={tmp_path / 'data'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], out


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [
    [],
    ["--attention.pattern=full"],
    ["--attention.switch_to_full_at=0.5", "--eval.interval=3", "--eval.iters=1"],
    ["--attention.pattern=hybrid", "--attention.full_last_n=1", "--moba.key_conv=3",
     "--train.loss_normalization=sample", "--data.retrieval_fraction=0.5", "--data.retrieval_loss_on=answer"],
], ids=["moba", "full", "hybrid-switch-and-validation", "layer-hybrid-key-conv-sample-loss-answer-masks"])
def test_gpu_replayed_steps_train_as_the_eager_ones(tmp_path, extra):
    """The last case: per-sample loss over answer-only masks that change with every batch (so the
    replays must read each step's masks through the static copies), a key convolution, and MoBA
    and full-attention layers in one model."""
    eager, _ = _train(tmp_path, "eager", extra)
    graphed, out = _train(tmp_path, "graphed", [*extra, "--train.cuda_graph=full_iteration"])
    assert "step 2: forward and backward captured as one CUDA graph" in out
    if any("switch_to_full_at" in x for x in extra):
        # step 5 is the first in full attention (eager again), step 6 captures the new step
        assert "step 6: forward and backward captured as one CUDA graph" in out
    assert [r["step"] for r in graphed] == [r["step"] for r in eager] == list(range(1, 9))
    for e, g in zip(eager, graphed):
        # the same kernels in the same order; dQ's atomic adds may round in another order
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-4), (e, g)
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3), (e, g)
        assert g["grad_norm"] > 0
