"""``benchmarks/bench_train.py``'s run plan: MoBA, its kernel variants and full attention
alternate per repeat; settings that differ only in ``moba.*`` share one full-attention run per
repeat (full attention reads none of them), and any other difference runs its own."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_train  # noqa: E402


def _fake_runs():
    calls = []

    def run(overrides, pattern, tag):
        calls.append((pattern, tuple(overrides), tag))
        tps = 100.0 * len(calls)  # every process its own figure, so a shared run shows
        return {"tokens_per_s": tps, "tflops": 1.0, "mem": 1.0, "steps": 2, "loss": 1.0,
                "warm_steps": [(tps, 1.0), (tps, 1.0)]}
    return calls, run


def test_settings_differing_only_in_moba_share_the_full_attention_run():
    calls, run = _fake_runs()
    full_runs = {}
    base = ["--model.seq_length=131072", "--train.global_batch_size=1"]
    kinds, big = bench_train.run_setting("r.yaml", base + ["--moba.block_size=1024"], 5, ["bwd.x=1"], 2, full_runs, run)
    assert [k[0] for k in kinds] == ["moba", "moba bwd.x=1", "full"]
    # alternating per repeat: moba, variant, full, moba, variant, full
    assert [c[0] for c in calls] == ["moba", "moba", "full"] * 2
    assert calls[1][1][-1] == "--moba.kernel=bwd.x=1"
    _, small = bench_train.run_setting("r.yaml", base + ["--moba.block_size=128"], 5, [], 2, full_runs, run)
    # the second setting ran MoBA twice and no full attention: its full column is the first's
    assert [c[0] for c in calls[6:]] == ["moba", "moba"]
    assert small["full"]["per_run"] == big["full"]["per_run"] == [300.0, 600.0]
    assert small["moba"]["per_run"] == [700.0, 800.0]
    # another sequence length (or step count) is another full-attention run
    _, other = bench_train.run_setting("r.yaml", ["--model.seq_length=32768", "--moba.block_size=128"], 5, [], 1,
                                       full_runs, run)
    assert [c[0] for c in calls[8:]] == ["moba", "full"] and other["full"]["per_run"] == [1000.0]
    bench_train.run_setting("r.yaml", base + ["--moba.block_size=128"], 6, [], 1, full_runs, run)
    assert [c[0] for c in calls[10:]] == ["moba", "full"]


def test_the_memory_columns_show_allocated_and_reserved_peaks_pooled_over_runs():
    """A row's memory cells are the largest allocated peak of a kind's runs, then its largest
    reserved peak (CUDA graphs' pools and the allocator's cache count only there); runs that did
    not report a reserved peak (CPU) show the allocated one alone."""
    runs = [{"tokens_per_s": 10.0, "tflops": 1.0, "mem": m, "reserved": r, "warm_steps": [(10.0, 1.0)]}
            for m, r in ((4.0, 4.4), (3.9, 4.6))]
    moba = bench_train.pool(runs)
    assert (moba["mem"], moba["reserved"]) == (4.0, 4.6)
    full = bench_train.pool([{"tokens_per_s": 10.0, "tflops": 1.0, "mem": 3.7, "reserved": None,
                              "warm_steps": [(10.0, 1.0)]}])
    assert full["reserved"] is None
    row = bench_train._row("8K", moba, full, "moba")
    assert row.split(" | ")[6:8] == ["4.0 / 4.6", "3.7"]


def test_an_env_variant_runs_moba_with_those_variables_and_no_kernel_override():
    """``--moba-env``: a variant ``env:NAME=VALUE,...`` runs MoBA with those environment variables
    set (passed to ``run`` as ``env``) and no ``moba.kernel`` override; the others get no ``env``."""
    calls = []

    def run(overrides, pattern, tag, env=None):
        calls.append((pattern, tuple(overrides), env))
        return {"tokens_per_s": 1.0, "tflops": 1.0, "mem": 1.0, "warm_steps": [(1.0, 1.0)]}

    kinds, _ = bench_train.run_setting("r.yaml", ["--a=1"], 5, ["bwd.x=1", "env:MOBA_CP_CUDA_GRAPHS=shared,X=1"], 1,
                                       {}, run)
    assert [k[0] for k in kinds] == ["moba", "moba bwd.x=1", "moba env:MOBA_CP_CUDA_GRAPHS=shared,X=1", "full"]
    assert calls == [("moba", ("--a=1",), None), ("moba", ("--a=1", "--moba.kernel=bwd.x=1"), None),
                     ("moba", ("--a=1",), {"MOBA_CP_CUDA_GRAPHS": "shared", "X": "1"}), ("full", ("--a=1",), None)]


def test_a_both_variant_runs_each_attention_with_its_overrides_and_shares_nothing_with_the_default():
    """``--both``: a variant ``both:OVERRIDES`` adds a MoBA and a full-attention run per repeat with
    those overrides, after the default pair; its full run is its own (the overrides are not moba.*),
    and the effect line divides each attention's variant by its default."""
    calls, run = _fake_runs()
    kinds, r = bench_train.run_setting("r.yaml", ["--a=1"], 5, ["both:--model.fused_ops=torch"], 2, {}, run)
    assert [k[0] for k in kinds] == ["moba", "full", "moba both:--model.fused_ops=torch",
                                     "full both:--model.fused_ops=torch"]
    assert [(c[0], c[1]) for c in calls[:4]] == [
        ("moba", ("--a=1",)), ("full", ("--a=1",)), ("moba", ("--a=1", "--model.fused_ops=torch")),
        ("full", ("--a=1", "--model.fused_ops=torch"))]
    assert len(calls) == 8  # two repeats, four processes each: nothing shared
    line = bench_train.both_effect("32K", "--model.fused_ops=torch", r)
    # fake figures: process i reports 100 * i tokens/s, pooled by median: MoBA default (100, 500) -> 300,
    # variant (300, 700) -> 500; full default (200, 600) -> 400, variant (400, 800) -> 600
    assert "MoBA 1.667x" in line and "full 1.500x" in line, line


def test_every_setting_is_a_valid_recipe_for_both_attentions():
    """Each setting's recipe and overrides (plus the flags every run adds) pass the recipe's
    checks for MoBA and full attention on a one-GPU CUDA run, so a typo in a setting fails here
    rather than on a lent GPU; the run's step count is a positive integer."""
    from moba_cp.config import load_recipe, validate

    root = os.path.join(os.path.dirname(__file__), "..")
    for name, (recipe, overrides, steps) in bench_train.SETTINGS.items():
        assert isinstance(steps, int) and steps > 2, name  # tokens/s is the median after two warm-up steps
        for pattern in ("moba", "full"):
            cfg = load_recipe(os.path.join(root, recipe), [*overrides, *bench_train.COMMON,
                                                             f"--train.steps={steps}", f"--attention.pattern={pattern}"])
            validate(cfg, world_size=1, device="cuda")
            assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0, name


def test_only_takes_whole_names_with_commas_prefixes_and_refuses_unknown_ones():
    """``--only``: a whole setting name (which holds commas) picks that setting alone, a prefix
    every setting it starts, ';' separates patterns, and a pattern matching nothing is refused
    with the list of settings (session 25: a comma-split name ran every 8K setting)."""
    s = bench_train.SETTINGS
    base = "8K block 512 top-3 (6 layers, hidden 384, 6 heads)"
    mb16 = base + ", micro-batch 16"
    assert list(bench_train.select_settings(s, mb16)) == [mb16]
    assert list(bench_train.select_settings(s, base)) == [base]
    prefixed = bench_train.select_settings(s, "8K")
    assert mb16 in prefixed and base in prefixed and not any(n.startswith("128K") for n in prefixed)
    both = bench_train.select_settings(s, f"128K block 1024; {mb16}")
    assert mb16 in both and base not in both and any(n.startswith("128K block 1024") for n in both)
    assert bench_train.select_settings(s, "") == dict(s)
    with pytest.raises(ValueError, match=r"--only '64K' names no setting.*Separate several with ';'"):
        bench_train.select_settings(s, "64K")


def test_the_pairs_interval_is_students_t_over_the_pair_ratios():
    """Session 26's three 32K pairs (2.45, 2.54, 2.48): mean 2.49, and a 95% interval that holds
    the 2.5x target (three pairs cannot tell 2.49 from 2.5); one pair has no interval."""
    import statistics

    mean, lo, hi = bench_train.pair_interval([2.45, 2.54, 2.48])
    half = 4.303 * statistics.stdev([2.45, 2.54, 2.48]) / 3 ** 0.5
    assert mean == pytest.approx(2.49) and (lo, hi) == pytest.approx((mean - half, mean + half))
    assert lo < 2.5 < hi and hi - lo == pytest.approx(0.227, abs=1e-3)
    assert bench_train.pair_interval([2.5]) is None
    runs = lambda xs: bench_train.pool([{"tokens_per_s": x, "tflops": 1.0, "mem": 1.0, "warm_steps": [(x, 1.0)]}  # noqa: E731
                                        for x in xs])
    row = bench_train._row("32K", runs([245.0, 254.0, 248.0]), runs([100.0, 100.0, 100.0]), "moba")
    assert row.split(" | ")[8:] == ["2.45, 2.54, 2.48", f"2.49 [{lo:.2f}, {hi:.2f}] |"]
    assert bench_train._row("x", runs([2.0]), runs([1.0]), "moba").endswith("| 2.00 | - |")


def test_the_runs_line_gives_each_process_its_median_and_its_steps_range():
    """The line under a setting that tells a between-process scatter from a within-run one."""
    def proc(*tps):
        return {"tokens_per_s": sorted(tps)[len(tps) // 2], "tflops": 1.0, "mem": 1.0,
                "warm_steps": [(t, 1.0) for t in tps]}
    r = {"moba": bench_train.pool([proc(1.0e6, 1.1e6, 0.9e6), proc(8.0e5, 8.2e5, 7.9e5)]),
         "full": bench_train.pool([proc(9.5e5, 9.6e5, 9.4e5)])}
    kinds = [("moba", "moba", [], None), ("full", "full", [], None)]
    line = bench_train.runs_line("8K", kinds, r)
    assert line == ("- 8K, each run's median tok/s [its warm steps' range]: "
                    "moba: 1M [900K-1.1M], 800K [790K-820K]; full: 950K [940K-960K]")


def test_variants_are_checked_before_any_run():
    """A ``moba.kernel`` variant that the training processes would refuse is reported up front,
    with the setting it fails on, for a GPU run (both TMA and non-TMA default tilings must take
    it); a valid one passes. Session 47's 128K A/B lost its variant run minutes into the call."""
    settings = bench_train.select_settings(bench_train.SETTINGS, "128K block 1024", None)
    ok = ["bwd.zero_ahead=true", "bwd.acc_red=false", "env:MOBA_CP_CUDA_GRAPHS=shared", "both:--model.fused_ops=torch",
          "bwd.gather_rows=false,bwd.dq_chunk_bytes=536870912,bwd.zero_ahead=true"]
    assert bench_train.variant_errors(settings, ok, [], "cuda") == []
    bad = "bwd.tma=true,bwd.gather_rows=false"
    errs = bench_train.variant_errors(settings, ok + [bad], ["--model.num_layers=12"], "cuda")
    assert len(errs) == 1 and bad in errs[0] and "128K block 1024 top-12" in errs[0] and "gather_rows" in errs[0]
