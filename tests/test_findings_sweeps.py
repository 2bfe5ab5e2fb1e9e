"""The issue-17 sweeps (recipes/experiments/findings-*.yaml) in CPU smoke mode: every point validates
as the H200 would run it (Triton limits on CUDA, one process), the dry run prints its commands, and
each sweep has what its finding needs (paired seeds against a reference, data seen once, the
paper's settings). Nothing is trained here; scripts/gpu/run_findings.sh runs them on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from moba_cp.config import layer_attention_kinds, load_recipe, validate
from moba_cp.experiments.sweep import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = {  # sweep file -> (minimum seeds, methods it must hold)
    "findings-scaling-8k": (3, {"moba", "full"}),
    "findings-scaling-trailing-32k": (3, {"moba", "full"}),
    "findings-granularity-32k": (2, {"moba", "full"}),
    "findings-retrieval-hybrid-8k": (2, {"full", "moba", "moba-kconv3", "hybrid-1", "hybrid-3"}),
}
#: a point must draw well under the large corpus: ~120M training tokens on this CPU image, 302.6M on the
#: H200 (docs/results/findings_2026-12-03/retrieval_pilot/). The retrieval sweep runs only on the H200 and
#: needs 229M tokens per point (0.76 epochs there; each run records its epochs in data.json).
MAX_POINT_TOKENS = {"findings-retrieval-hybrid-8k": 240_000_000}
DEFAULT_MAX_POINT_TOKENS = 60_000_000


@pytest.mark.parametrize("name", sorted(FINDINGS))
def test_findings_sweep_validates_and_dry_runs(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep(ROOT / "recipes" / "experiments" / f"{name}.yaml")
    min_seeds, methods = FINDINGS[name]
    seeds = spec.source["seeds"]
    assert len(seeds) >= min_seeds and spec.reference == "full" and spec.nproc == 1
    assert {p.labels.get("method") or p.group for p in spec.points} == methods
    for pt in spec.points:
        cfg = load_recipe(spec.base, pt.overrides)
        validate(cfg, world_size=spec.nproc, device="cuda")  # what the GPU run refuses is refused here
        assert cfg.data.source == "builtin" and cfg.data.builtin_corpus == "large"  # data seen once
        assert cfg.train.precision == "bf16" and cfg.model.hidden_size // cfg.model.num_attention_heads == 64
        tokens = cfg.train.steps * cfg.train.global_batch_size * (cfg.model.seq_length + 1)
        assert tokens < MAX_POINT_TOKENS.get(name, DEFAULT_MAX_POINT_TOKENS), (pt.name, tokens)
        kinds = layer_attention_kinds(cfg.model, cfg.attention)
        if "moba" in kinds and name != "findings-granularity-32k":
            assert (cfg.moba.block_size, cfg.moba.topk) == (512, 3)  # the paper's setting
        if name == "findings-granularity-32k" and "moba" in kinds:  # 75% sparsity at every granularity
            assert cfg.moba.topk * cfg.moba.block_size * 4 == cfg.model.seq_length
        if name == "findings-retrieval-hybrid-8k":
            assert kinds.count("full") == {"moba": 0, "moba-kconv3": 0, "hybrid-1": 1, "hybrid-3": 3, "full": 6}[pt.group]
            assert cfg.moba.key_conv == (3 if pt.group == "moba-kconv3" else 0)
            assert cfg.data.retrieval_fraction > 0 and cfg.data.retrieval_loss_on == "answer"
            assert spec.eval_needle["haystack"] == "heldout"  # the text the models saw around their needles
    groups = {p.group for p in spec.points}
    assert len(spec.points) == len(groups) * len(seeds)  # every point once per seed: paired by seed
    lines = []
    run_sweep(spec, dry_run=True, print_fn=lines.append)
    assert sum("would run" in line and "moba_cp.train" in line for line in lines) == len(spec.points)
    if spec.eval_loss:
        assert sum(" eval loss " in line for line in lines) == len(spec.points)


def test_scaling_sweep_has_three_sizes_of_growing_compute(monkeypatch):
    from moba_cp.experiments.sweep import point_cost

    monkeypatch.chdir(ROOT)
    spec = load_sweep(ROOT / "recipes" / "experiments" / "findings-scaling-8k.yaml")
    cost = {}
    for pt in spec.points:
        cost.setdefault(pt.labels["method"], {})[pt.labels["size"]] = point_cost(spec, pt)
    for method in ("moba", "full"):
        c = cost[method]
        assert len(c) >= 3 and c["s1"] < c["s2"] < c["s3"]


def test_gpu_script_knows_every_finding():
    text = (ROOT / "scripts" / "gpu" / "run_findings.sh").read_text()
    for name in FINDINGS:
        assert f"SWEEP={name} " in text
