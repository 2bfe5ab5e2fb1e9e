"""Sweep runner end to end on a two-point toy sweep, resuming a half-finished sweep, the
power-law fit on synthetic data with known exponents, and the sweep charts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moba_cp.experiments.fit import fit_power_law, pflops_days
from moba_cp.experiments.sweep_plots import plot_granularity, plot_hybrid, plot_scaling
from moba_cp.experiments.sweep import SweepError, _with_extra, load_sweep
from tests.distributed_harness import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _png_ok(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def _toy_sweep(tmp_path):
    cache = tmp_path / "cache"
    text = f"""
name: toy
kind: scaling
base: recipes/quickstart.yaml
out_dir: {tmp_path}/sweep
nproc: 1
metric: loss
common: ["--parallel.cp=1", "--model.num_layers=1", "--model.seq_length=256", "--moba.block_size=32",
         "--train.steps=10", "--train.warmup_steps=1", "--train.global_batch_size=1", "--logging.tensorboard=false",
         "--eval.interval=0", "--data.cache_dir={cache}", "--logging.interval=1"]
grid:
  method:
    moba: ["--attention.pattern=moba"]
  size:
    a: ["--model.hidden_size=32", "--model.num_attention_heads=2", "--model.num_query_groups=2"]
    b: ["--model.hidden_size=64", "--model.num_attention_heads=4", "--model.num_query_groups=2"]
"""
    path = tmp_path / "toy.yaml"
    path.write_text(text)
    return path


ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def _cli_process(*args):
    """``python -m moba_cp.cli ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "moba_cp.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _cli(*args):
    """The same command in a process forked from the preloaded server (run_cli: ~10 s of imports less);
    the sweep's points are still real torchrun processes."""
    return run_cli(list(args), env=ENV, cwd=str(ROOT), timeout=600)


def test_two_point_sweep_runs_resumes_and_plots(tmp_path):
    sweep = _toy_sweep(tmp_path)
    proc = _cli_process("sweep", str(sweep))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 to run" in proc.stdout
    out = tmp_path / "sweep"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == ["moba-a", "moba-b"]
    a, b = sorted(rows, key=lambda r: r["name"])
    assert b["train_flops"] > a["train_flops"] > 0 and a["loss"] > 0 and a["labels"] == {"method": "moba", "size": "a"}

    # Half-finished: point b lost its marker (killed before it finished) -> only b runs again.
    (out / "moba-b" / "sweep_point.json").unlink()
    proc = _cli("sweep", str(sweep))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 already finished, 1 to run" in proc.stdout and "moba-b" in proc.stdout and "moba-a:" not in proc.stdout
    assert len((out / "results.jsonl").read_text().splitlines()) == 2

    proc = _cli("plot", "--sweep", str(out), "--out", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _png_ok(tmp_path / "plots" / "toy_scaling.png")


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: scaling\nbase: recipes/quickstart.yaml\ngrid: {m: {a: ['--moba.topk=zero']}}\n")
    with pytest.raises(SweepError, match="point 'a': .*moba.topk: expected an integer"):
        load_sweep(bad)
    bad.write_text("name: x\nkind: sideways\nbase: recipes/quickstart.yaml\n")
    with pytest.raises(SweepError, match="kind='sideways'"):
        load_sweep(bad)
    bad.write_text("name: x\nkind: hybrid\nbase: recipes/quickstart.yaml\nmetric: trailing_loss\npoints: [{name: a}]\n")
    with pytest.raises(SweepError, match="needs an eval_loss section"):
        load_sweep(bad)


def test_shipped_sweeps_validate():
    for path in sorted((ROOT / "recipes" / "experiments").glob("*.yaml")):
        import yaml

        if "kind" in yaml.safe_load(path.read_text()):
            spec = load_sweep(path)
            assert spec.points


def test_power_law_fit_recovers_known_exponents():
    xs = [1e-3 * 2**i for i in range(8)]
    fit = fit_power_law(xs, [2.625 * x**-0.063 for x in xs])
    assert fit.a == pytest.approx(2.625, rel=1e-9) and fit.b == pytest.approx(-0.063, rel=1e-9) and fit.r2 == pytest.approx(1)
    noisy = [1.546 * x**-0.108 * (1 + 0.002 * (-1) ** i) for i, x in enumerate(xs)]
    fit = fit_power_law(xs, noisy)
    assert fit.b == pytest.approx(-0.108, abs=0.003) and fit.r2 > 0.99
    assert fit.formula().startswith("1.5") and "C^-0.10" in fit.formula()
    with pytest.raises(ValueError):
        fit_power_law([1.0], [2.0])
    assert pflops_days(1e15 * 86400) == pytest.approx(1.0)


def test_sweep_charts_are_valid_images(tmp_path):
    def row(name, pattern, flops, loss, **kw):
        base = dict(name=name, labels={"method": pattern}, pattern=pattern, train_flops=flops, loss=loss,
                    full_layers=0, n_blocks=8, topk=2, trailing_loss=loss)
        return dict(base, **kw)

    scaling = [row(f"{m}{i}", m, 1e18 * 4**i, a * (1e18 * 4**i / 8.64e19) ** -0.06)
               for m, a in (("moba", 2.63), ("full", 2.62)) for i in range(4)]
    path, fits = plot_scaling(scaling, "loss", str(tmp_path / "s.png"))
    _png_ok(path)
    assert fits["moba"].b == pytest.approx(-0.06, rel=1e-6)
    gran = [row(f"g{n}", "moba", 1, 2.25 - 0.001 * n, n_blocks=8 * 2**n, topk=2 * 2**n) for n in range(5)]
    _png_ok(plot_granularity(gran + [row("full", "full", 1, 2.2416)], "loss", str(tmp_path / "g.png")))
    hyb = [row(f"h{n}", "hybrid", 1, 1.17 - 0.01 * n, full_layers=n) for n in (1, 3, 5)]
    _png_ok(plot_hybrid(hyb + [row("m", "moba", 1, 1.171), row("f", "full", 1, 1.086)], "trailing_loss",
                        str(tmp_path / "h.png")))


def test_seed_replicates_expand_and_average(tmp_path):
    """`seeds:` runs every point once per seed; charts and tables show the mean +- std per point."""
    from moba_cp.experiments.sweep_plots import aggregate_seeds, sweep_table

    f = tmp_path / "seeds.yaml"
    f.write_text(yaml_dump(dict(name="sd", kind="hybrid", base="recipes/quickstart.yaml", metric="loss", seeds=[1, 2],
                                eval_needle={"lengths": "1024", "kinds": "passkey", "only": ["full"]},
                                points=[{"name": "moba", "overrides": ["--attention.pattern=moba"]},
                                        {"name": "full", "overrides": ["--attention.pattern=full"]}])))
    spec = load_sweep(f)
    # seed-major: a sweep cut short by its deadline has finished whole seeds
    assert [p.name for p in spec.points] == ["moba-seed1", "full-seed1", "moba-seed2", "full-seed2"]
    assert spec.points[2].overrides[-1] == "--train.seed=2" and spec.points[2].labels == {"seed": "2"}
    assert {p.group for p in spec.points} == {"moba", "full"}  # eval_needle.only may name the group
    # Command-line overrides keep the replicate groups (charts average by group).
    extra = _with_extra(spec, ["--train.steps=10"])
    assert [(p.name, p.group) for p in extra.points] == [(p.name, p.group) for p in spec.points]
    assert all(p.overrides[-1] == "--train.steps=10" for p in extra.points)
    for bad in ([], [1, 1], ["a"], 3):
        f.write_text(yaml_dump(dict(name="sd", kind="hybrid", base="recipes/quickstart.yaml", seeds=bad,
                                    points=[{"name": "moba"}])))
        with pytest.raises(SweepError, match="seeds="):
            load_sweep(f)

    rows = [dict(name=f"{g}-seed{i}", group=g, labels={"method": pat, "seed": str(i)}, pattern=pat,
                 train_flops=1e15 * (2 if pat == "full" else 1), loss=v, full_layers=0, n_blocks=8, topk=2,
                 trailing_loss=v)
            for g, pat, vals in (("moba", "moba", (2.0, 2.2, 2.4)), ("full", "full", (1.9, 1.9, 1.9)))
            for i, v in enumerate(vals)]
    agg = {r["name"]: r for r in aggregate_seeds(rows, "loss")}
    assert agg["moba"]["loss"] == pytest.approx(2.2) and agg["moba"]["loss_std"] == pytest.approx(0.2)
    assert agg["moba"]["n"] == 3 and agg["full"]["loss_std"] == pytest.approx(0, abs=1e-12) and "seed" not in agg["moba"]["labels"]
    table = sweep_table(rows, "loss")
    assert "| moba | 1.00 | 2.2000 +- 0.2000 | 3 |" in table and "| full | 2.00 | 1.9000 +- 0.0000 | 3 |" in table
    hyb = rows + [dict(rows[0], name=f"h-seed{i}", group="h", pattern="hybrid", full_layers=1, trailing_loss=1.8 + i / 10)
                  for i in range(3)]
    _png_ok(plot_hybrid(hyb, "trailing_loss", str(tmp_path / "h.png")))
    _png_ok(plot_scaling(rows + [dict(r, name=r["name"] + "b", group=r["group"] + "b", train_flops=4e15, loss=r["loss"] - .3)
                                 for r in rows], "loss", str(tmp_path / "s.png"))[0])


def _toy_sweep_file(tmp_path, name, extra_common=(), steps=3, evals=False):
    cache = tmp_path / "cache"
    common = ["--parallel.cp=1", "--model.num_layers=1", f"--model.seq_length={512 if evals else 256}", "--moba.block_size=32",
              f"--train.steps={steps}", "--train.warmup_steps=1", "--train.global_batch_size=1",
              "--logging.tensorboard=false", "--eval.interval=0", f"--data.cache_dir={cache}", "--logging.interval=1",
              "--model.hidden_size=32", "--model.num_attention_heads=2", "--model.num_query_groups=2",
              *extra_common]
    spec = dict(name=name, kind="scaling", base="recipes/quickstart.yaml", out_dir=str(tmp_path / name),
                metric="loss", common=common, points=[{"name": "moba", "overrides": ["--attention.pattern=moba"]}])
    if evals:
        spec.update(kind="hybrid", metric="trailing_loss", eval_loss={"seq_len": 256, "last": 64, "num_seqs": 2},
                    eval_needle={"lengths": "384,512", "depths": "0,100", "kinds": "passkey", "n_per_cell": 1})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml_dump(spec))
    return path


def yaml_dump(obj):
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def test_parallel_scheduler_runs_two_sweeps_at_once(tmp_path):
    """Two sweeps' points on two 'GPU' slots (CPU here): both run concurrently and finish; a rerun skips them."""
    a, b = _toy_sweep_file(tmp_path, "ta"), _toy_sweep_file(tmp_path, "tb", evals=True)
    proc = _cli("sweep", str(a), str(b), "--gpus", "2", "--train.seed=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    starts = [line for line in proc.stdout.splitlines() if "] start " in line]
    assert len(starts) == 2 and {s.split(" on GPU ")[1][0] for s in starts} == {"0", "1"}
    # Both started before either finished: they ran at the same time.
    lines = proc.stdout.splitlines()
    first_done = next(i for i, line in enumerate(lines) if "] done " in line)
    assert all(lines.index(s) < first_done for s in starts)
    for name in ("ta", "tb"):
        rows = [json.loads(x) for x in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        assert [r["name"] for r in rows] == ["moba"] and rows[0]["loss"] > 0
        assert "--train.seed=3" in rows[0]["overrides"]  # command-line overrides reach every point
    tb = json.loads((tmp_path / "tb" / "results.jsonl").read_text())
    assert tb["trailing_loss"] > 0  # the sweep's eval_loss ran and its result was collected
    needle = json.loads((tmp_path / "tb" / "moba" / "eval" / "needle.json").read_text())
    assert needle["lengths"] == [384, 512] and 0 <= needle["kinds"]["passkey"]["mean"] <= 1
    proc = _cli("sweep", str(a), str(b), "--gpus", "0,1", "--train.seed=3")
    assert proc.returncode == 0 and "0 points on GPUs" in proc.stdout and "] start " not in proc.stdout
    # without the override the finished points are not what the sweep would train now: refused
    proc = _cli("sweep", str(a), str(b), "--gpus", "0,1")
    assert proc.returncode == 2 and "moba: trained with train.seed=3 (the sweep now gives 1234)" in proc.stderr, proc.stderr


def test_parallel_scheduler_deadline_stops_and_resumes(tmp_path):
    """At the deadline a running point gets SIGTERM, saves and stops; the next run resumes from that step."""
    a = _toy_sweep_file(tmp_path, "long", steps=100000, extra_common=["--checkpoint.interval=0"])
    # 30 s: the point must have trained a step before it is stopped, on 2 cores that also run the
    # suite's other worker (scripts/test.sh runs two)
    proc = _cli("sweep", str(a), "--gpus", "1", "--deadline-min", "0.5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deadline: stopping 1 running point" in proc.stdout and "stopped long/moba at the deadline" in proc.stdout
    run = tmp_path / "long" / "moba"
    saved = sorted((run / "checkpoints").glob("iter_*"))
    assert not (run / "sweep_point.json").exists() and len(saved) == 1
    step = int(saved[0].name.split("_")[1])
    assert step > 0
    # 45 s: enough for the resumed process to start and load the checkpoint on a busy 2-core machine
    # (18 s was not: the run was stopped before it had imported torch and Megatron-Core; 36 s was,
    # with the suite in one process).
    proc = _cli("sweep", str(a), "--gpus", "1", "--deadline-min", "0.75")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resumed from {saved[0]} (step {step})" in (run / "sweep.log").read_text()


def _cli_in_process(capsys, *args):
    """``moba-cp ARGS`` in this process: (exit code, stderr)."""
    from moba_cp.cli import main

    capsys.readouterr()
    try:
        code, extra = main(list(args)), ""
    except SystemExit as e:  # argparse errors (a code), or a message the interpreter would print, exit 1
        code, extra = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    return code, capsys.readouterr().err + extra


def test_sweep_cli_errors(tmp_path, capsys):
    a = _toy_sweep_file(tmp_path, "e")
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(_toy_sweep_file(tmp_path, "n", evals=True)).read_text().replace("384,512", "128,512"))
    with pytest.raises(SweepError, match="a 'passkey' sample needs more than .* every length must exceed"):
        load_sweep(bad)
    bad.write_text(Path(_toy_sweep_file(tmp_path, "k", evals=True)).read_text().replace("kinds: passkey", "kinds: haystack"))
    with pytest.raises(SweepError, match=r"eval_needle.kinds: 'haystack': unknown \['haystack'\]; choose from passkey"):
        load_sweep(bad)
    # the command's argument errors, in this process (each a subprocess cost ~6 s of imports)
    for args, message, want in [(["--gpus", "0,0"], "distinct device numbers", 2),
                                (["--deadline-min", "3"], "--deadline-min needs --gpus", 2),
                                (["stray.yaml"], "sweep file 'stray.yaml' does not exist", 2),
                                (["--stray"], "unexpected arguments ['--stray']", 1)]:
        code, err = _cli_in_process(capsys, "sweep", str(a), *args)
        assert code == want and message in err, (args, code, err)


def _finish_fake_point(spec, pt, overrides=(), corpus="large-abc", drop_key=None):
    """A finished point as a sweep leaves it (recipe.yaml, data.json, sweep_point.json), without training."""
    import yaml

    from moba_cp.config import dump, load_recipe

    run_dir = Path(spec.out_dir) / pt.name
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(dump(load_recipe(spec.base, [*pt.overrides, *overrides, f"--logging.dir={run_dir}"])))
    if drop_key:
        section, key = drop_key.split(".")
        del recipe[section][key]
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run_dir / "data.json").write_text(json.dumps({"corpus": corpus}))
    (run_dir / "sweep_point.json").write_text(json.dumps({"name": pt.name, "group": pt.group, "labels": pt.labels,
                                                          "loss": 2.0, "data": {"corpus": corpus}}))


def test_finished_points_must_match_the_sweep(tmp_path):
    """A sweep continued in another call, folder or commit counts a finished point only while it trained with
    the recipe the sweep gives it now (paths aside; an option added later counts as its default) and on the
    same corpus as the other finished points; otherwise it refuses, naming the point and the key."""
    from moba_cp.experiments.sweep import check_finished_points, collect_results, run_sweep

    spec = _with_extra(load_sweep(_toy_sweep(tmp_path)), [])
    a, b = spec.points
    _finish_fake_point(spec, a, drop_key="logging.profile")  # an older run: the option did not exist yet
    check_finished_points(spec)
    lines = []
    run_sweep(spec, dry_run=True, print_fn=lines.append)
    assert "1 already finished, 1 to run" in lines[0]

    # the same folder under another sweep setting: the extra override changes what b would train
    longer = _with_extra(load_sweep(_toy_sweep(tmp_path)), ["--train.steps=11"])
    with pytest.raises(SweepError, match=r"moba-a: trained with train.steps=10 \(the sweep now gives 11\)"):
        run_sweep(longer, dry_run=True, print_fn=lines.append)

    # a finished point trained with another option than its recipe now gives
    _finish_fake_point(spec, b, overrides=["--moba.topk=1"])
    with pytest.raises(SweepError, match=r"(?s)1 finished point\(s\).*moba-b: trained with moba.topk=1 .*Fix: move"):
        check_finished_points(spec)

    # matching recipes but another corpus: data would mix
    _finish_fake_point(spec, b, corpus="large-def")
    with pytest.raises(SweepError, match="different corpora: large-abc: moba-a; large-def: moba-b"):
        check_finished_points(spec)
    with pytest.raises(SweepError, match="different corpora"):
        collect_results(spec.out_dir)
    _finish_fake_point(spec, b)
    check_finished_points(spec)
    assert len(collect_results(spec.out_dir)) == 2

    # a finished marker without a recipe: what it trained with is unknown
    (Path(spec.out_dir) / b.name / "recipe.yaml").unlink()
    with pytest.raises(SweepError, match="moba-b: finished .* has no recipe.yaml"):
        check_finished_points(spec)


def test_points_per_gpu_slots_and_errors(tmp_path):
    """--points-per-gpu N: each GPU is N slots, filled across GPUs first; only for one-process sweeps."""
    from moba_cp.experiments.scheduler import gpu_slots, run_sweeps_parallel

    one = load_sweep(_toy_sweep_file(tmp_path, "one"))
    assert gpu_slots(["0", "1"], 2, [one]) == ["0", "1", "0", "1"]
    assert gpu_slots(["3"], 1, [one]) == ["3"]
    with pytest.raises(SweepError, match="--points-per-gpu=0: give 1"):
        gpu_slots(["0"], 0, [one])
    two = load_sweep(_toy_sweep_file(tmp_path, "two"))
    two.nproc = 2
    with pytest.raises(SweepError, match=r"'two' \(nproc=2\) run several processes per point"):
        gpu_slots(["0", "1"], 2, [one, two])
    lines = []
    run_sweeps_parallel([one], ["0"], dry_run=True, print_fn=lines.append, points_per_gpu=3)
    assert any("on GPUs 0 (3 at a time on each)" in ln for ln in lines)
    proc = _cli("sweep", str(_toy_sweep_file(tmp_path, "three")), "--points-per-gpu", "2")
    assert proc.returncode == 2 and "--points-per-gpu needs --gpus" in proc.stderr


def test_needle_haystack_reaches_the_eval_command(tmp_path):
    """eval_needle.haystack is checked when the sweep loads and handed to `moba-cp eval needle`."""
    from moba_cp.experiments.sweep import _point_commands

    path = _toy_sweep_file(tmp_path, "hs", evals=True)
    path.write_text(path.read_text().replace("n_per_cell: 1", "n_per_cell: 1\n  haystack: heldout"))
    spec = load_sweep(path)
    cmds = _point_commands(spec, spec.points[0], [sys.executable], tmp_path / "run")
    needle = next(c for c in cmds if "needle" in c)
    assert needle[needle.index("--haystack") + 1] == "heldout"
    path.write_text(path.read_text().replace("haystack: heldout", "haystack: essays"))
    with pytest.raises(SweepError, match="eval_needle.haystack='essays' must be one of passkey, heldout"):
        load_sweep(path)


def test_plot_another_kind_of_the_same_points(tmp_path, monkeypatch, capsys):
    """`moba-cp plot --sweep DIR --kind hybrid --metric answer_loss` on a retrieval sweep's points: the hybrid
    chart, with key-convolution points kept out of its MoBA reference; unknown kinds and absent metrics refuse."""
    from moba_cp.experiments import sweep_plots

    d = tmp_path / "rh"
    d.mkdir()
    (d / "sweep.yaml").write_text(yaml_dump(dict(name="rh", kind="retrieval", metric="needle_accuracy",
                                                 base="recipes/quickstart.yaml", points=[])))
    spec = [("full", "full", 6, 0, 0.10), ("moba", "moba", 0, 0, 1.30), ("moba-kconv3", "moba", 0, 3, 0.50),
            ("hybrid-1", "hybrid", 1, 0, 0.90), ("hybrid-3", "hybrid", 3, 0, 0.40)]
    for group, pattern, full_layers, key_conv, loss in spec:
        for seed in (1, 2):
            pd = d / f"{group}-seed{seed}"
            pd.mkdir()
            (pd / "sweep_point.json").write_text(json.dumps(dict(
                name=pd.name, group=group, labels={"method": group, "seed": str(seed)}, pattern=pattern,
                full_layers=full_layers, key_conv=key_conv, answer_loss=loss + seed / 100, needle_accuracy=1 - loss / 2,
                needle={"passkey": 1 - loss / 2}, train_flops=1e15, n_blocks=16, topk=3)))
    seen = []
    real = sweep_plots._reference
    monkeypatch.setattr(sweep_plots, "_reference", lambda ax, rows, metric, name, style: (
        seen.append((name, sorted(r["name"] for r in rows))), real(ax, rows, metric, name, style)))
    png, table = sweep_plots.plot_sweep_dir(d, tmp_path / "out", kind="hybrid", metric="answer_loss")
    assert png.endswith("rh_hybrid.png") and "| hybrid-3 |" in table
    _png_ok(png)
    assert dict(seen) == {"MoBA": ["moba"], "full attention": ["full"]}  # moba-kconv3 left out
    png, _ = sweep_plots.plot_sweep_dir(d, tmp_path / "out")  # the sweep's own chart
    assert png.endswith("rh_retrieval.png")
    with pytest.raises(SweepError, match="the kind must be one of"):
        sweep_plots.plot_sweep_dir(d, tmp_path / "out", kind="hybrids")
    with pytest.raises(SweepError, match="has 'trailing_loss'"):
        sweep_plots.plot_sweep_dir(d, tmp_path / "out", kind="hybrid", metric="trailing_loss")
    code, err = _cli_in_process(capsys, "plot", str(d), "--kind", "hybrid")
    assert code == 2 and "--kind and --metric choose a sweep chart; add --sweep" in err
    code, _ = _cli_in_process(capsys, "plot", "--sweep", str(d), "--kind", "hybrid", "--metric", "answer_loss",
                              "--out", str(tmp_path / "cli"))
    assert code == 0 and (tmp_path / "cli" / "rh_hybrid.png").is_file()
