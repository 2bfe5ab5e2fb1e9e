"""Paired-seed statistics on synthetic sweeps with known differences, the sweep's `reference` key,
and the report files collect_results writes."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from moba_cp.experiments.paired import main as paired_main
from moba_cp.experiments.paired import paired_differences, paired_table
from moba_cp.experiments.sweep import SweepError, collect_results, load_sweep

SEED_NOISE = {"1": 0.0, "2": 0.12, "3": -0.08}  # shared by every method of a seed (same init, same data)


def _row(group, method, seed, value, **labels):
    return {"name": f"{group}-seed{seed}", "group": group, "labels": dict(labels, method=method, seed=seed),
            "valid_loss": value}


def test_known_differences_are_recovered_despite_large_seed_noise():
    rows = []
    for seed, noise in SEED_NOISE.items():
        full = 2.0 + noise
        rows.append(_row("full", "full", seed, full))
        rows.append(_row("moba", "moba", seed, full - 0.05 + {"1": 0.01, "2": -0.01, "3": 0.0}[seed]))
        rows.append(_row("hybrid", "hybrid", seed, full + {"1": 0.03, "2": 0.02, "3": -0.01}[seed]))
    stats = {s["group"]: s for s in paired_differences(rows, "valid_loss", "full")}
    assert set(stats) == {"moba", "hybrid"}
    m = stats["moba"]
    assert m["n"] == 3 and m["mean"] == pytest.approx(-0.05) and m["std"] == pytest.approx(0.01)
    assert m["se"] == pytest.approx(0.01 / math.sqrt(3)) and m["t"] == pytest.approx(-0.05 / (0.01 / math.sqrt(3)))
    assert m["agree"] == 3 and m["diffs"] == pytest.approx([-0.04, -0.06, -0.05])
    assert m["point_std"] > 0.09  # unpaired, the seed noise swamps the 0.05 difference; paired it does not
    h = stats["hybrid"]
    assert h["mean"] == pytest.approx(0.04 / 3) and h["agree"] == 2  # one seed of three has the other sign
    assert h["std"] == pytest.approx(math.sqrt(((0.03 - 0.04 / 3) ** 2 + (0.02 - 0.04 / 3) ** 2
                                                + (-0.01 - 0.04 / 3) ** 2) / 2))
    table = paired_table(list(stats.values()), "valid_loss", "full")
    assert "| moba | full | 3 |" in table and "-0.0500 +- 0.0100" in table and "3/3 below" in table
    assert "2/3 above" in table


def test_pairs_within_context_and_by_group_name_with_eval_noise():
    # a grid: method x size; each size's MoBA is paired with the same size's full attention
    rows = [_row(f"{m}-{sz}", m, sd, base + (0.1 if m == "moba" else 0.0) + SEED_NOISE[sd], size=sz)
            for sz, base in (("s1", 3.0), ("s2", 2.5)) for m in ("moba", "full") for sd in ("1", "2")]
    stats = {s["group"]: s for s in paired_differences(rows, "valid_loss", "full")}
    assert stats["moba-s1"]["reference"] == "full-s1" and stats["moba-s2"]["reference"] == "full-s2"
    assert stats["moba-s1"]["mean"] == pytest.approx(0.1) and stats["moba-s1"]["context"] == {"size": "s1"}
    # a points list without labels: the method is the point's group name; per-sequence values give the eval SE
    per_ref = [2.0, 2.5, 1.5, 3.0]
    rows = []
    for sd in ("1", "2"):
        rows.append({"name": f"full-seed{sd}", "group": "full", "labels": {"seed": sd}, "trailing_loss": 2.25,
                     "trailing_loss_per_seq": per_ref})
        per = [x + 0.1 + (0.02 if i % 2 else -0.02) for i, x in enumerate(per_ref)]
        rows.append({"name": f"moba-seed{sd}", "group": "moba", "labels": {"seed": sd}, "trailing_loss": 2.35,
                     "trailing_loss_per_seq": per})
    (s,) = paired_differences(rows, "trailing_loss", "full")
    assert s["group"] == "moba" and s["mean"] == pytest.approx(0.1) and s["std"] == pytest.approx(0)
    assert s["eval_se"] == pytest.approx(math.sqrt(4 * 0.02 ** 2 / 3) / 2)  # std of +-0.02 diffs / sqrt(4)
    # a seed without its reference run is left out of the pairs
    rows.append({"name": "moba-seed3", "group": "moba", "labels": {"seed": "3"}, "trailing_loss": 9.0})
    assert paired_differences(rows, "trailing_loss", "full")[0]["n"] == 2


def test_sweep_reference_key_and_report_files(tmp_path):
    f = tmp_path / "s.yaml"
    spec = dict(name="p", kind="hybrid", base="recipes/quickstart.yaml", metric="valid_loss", seeds=[1, 2],
                reference="full", points=[{"name": "moba", "overrides": ["--attention.pattern=moba"]},
                                          {"name": "full", "overrides": ["--attention.pattern=full"]}])
    f.write_text(yaml.safe_dump(spec))
    assert load_sweep(f).reference == "full"
    # the reference runs first within each seed, so a sweep stopped early has whole pairs
    assert [p.name for p in load_sweep(f).points] == ["full-seed1", "moba-seed1", "full-seed2", "moba-seed2"]
    f.write_text(yaml.safe_dump(dict(spec, reference="dense")))
    with pytest.raises(SweepError, match=r"reference='dense' is not a method of this sweep; choose one of \['full', 'moba'\]"):
        load_sweep(f)
    f.write_text(yaml.safe_dump(dict(spec, eval_loss={"seq_len": 1024, "last": 2048})))
    with pytest.raises(SweepError, match="last <= seq_len"):
        load_sweep(f)
    out = tmp_path / "out"
    for sd, (m, fu) in {"1": (1.9, 2.0), "2": (2.05, 2.1)}.items():
        for g, v in (("moba", m), ("full", fu)):
            (out / f"{g}-seed{sd}").mkdir(parents=True)
            (out / f"{g}-seed{sd}" / "sweep_point.json").write_text(json.dumps(
                {"name": f"{g}-seed{sd}", "group": g, "labels": {"seed": sd}, "valid_loss": v}))
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec))
    assert len(collect_results(out)) == 4
    report = json.loads((out / "paired.json").read_text())
    assert report["reference"] == "full" and report["points"][0]["mean"] == pytest.approx(-0.075)
    assert "2/2 below" in (out / "paired.md").read_text()
    assert paired_main([str(out)]) == 0


def test_retrieval_sweep_chart(tmp_path):
    from moba_cp.experiments.sweep_plots import plot_sweep

    rows = [{"name": f"{m}-seed{sd}", "group": m, "labels": {"method": m, "seed": sd},
             "needle": {"passkey": acc, "single": acc / 2}, "needle_accuracy": 0.75 * acc}
            for m, acc in (("full", 0.9), ("moba", 0.6), ("moba-kconv3", 0.8)) for sd in ("1", "2")]
    path = plot_sweep("retrieval", rows, "needle_accuracy", str(tmp_path / "r.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_scheduler_runs_a_paired_sweep_seed_by_seed(tmp_path):
    """Largest points first, but within each seed of a sweep with a reference: a deadline that cuts
    the run leaves whole (point, reference) pairs, not every full-attention run and no MoBA one."""
    from moba_cp.experiments.scheduler import run_sweeps_parallel

    f = tmp_path / "s.yaml"
    spec = dict(name="p", kind="hybrid", base="recipes/quickstart.yaml", metric="loss", seeds=[1, 2],
                reference="full", out_dir=str(tmp_path / "out"),
                points=[{"name": "moba", "overrides": ["--attention.pattern=moba"]},
                        {"name": "full", "overrides": ["--attention.pattern=full"]}])
    f.write_text(yaml.safe_dump(spec))
    lines = []
    run_sweeps_parallel([load_sweep(f)], ["0"], dry_run=True, print_fn=lines.append)
    order = [ln.split("logging.dir=")[1].split("/")[-1] for ln in lines if "moba_cp.train" in ln]
    assert order == ["full-seed1", "moba-seed1", "full-seed2", "moba-seed2"]
    # without a reference: largest first across seeds (full attention costs more)
    f.write_text(yaml.safe_dump({k: v for k, v in spec.items() if k != "reference"}))
    lines.clear()
    run_sweeps_parallel([load_sweep(f)], ["0"], dry_run=True, print_fn=lines.append)
    order = [ln.split("logging.dir=")[1].split("/")[-1] for ln in lines if "moba_cp.train" in ln]
    assert order[:2] == ["full-seed1", "full-seed2"]


def test_deadline_prediction_uses_the_same_points_other_seeds(tmp_path):
    """A full-attention point is predicted from its own finished seeds, not from the median over
    MoBA points (whose fixed costs make their seconds per FLOP ~3x larger): the measured 32K case
    (full 126 s for 18.9 PFLOP, MoBA 94 s for 4.3 PFLOP) predicted full at 7 min instead of 2.1."""
    from moba_cp.experiments.scheduler import _Job, predict_seconds

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(dict(name="p", kind="scaling", base="recipes/quickstart.yaml", metric="loss",
                                     seeds=[1, 2], reference="full", out_dir=str(tmp_path / "out"),
                                     points=[{"name": "moba", "overrides": ["--attention.pattern=moba"]},
                                             {"name": "full", "overrides": ["--attention.pattern=full"]}])))
    spec = load_sweep(f)
    pt = {p.name: p for p in spec.points}
    full2, moba2 = _Job(spec, pt["full-seed2"], 18.9e15), _Job(spec, pt["moba-seed2"], 4.3e15)
    assert predict_seconds(full2, {}) is None
    rates = {("p", "full"): [126 / 18.9e15], ("p", "moba"): [94 / 4.3e15]}
    assert abs(predict_seconds(full2, rates) - 126) < 1e-6 and abs(predict_seconds(moba2, rates) - 94) < 1e-6
    # a group with no finished seed yet falls back to the median over all finished points
    only_moba = {("p", "moba"): [94 / 4.3e15]}
    assert abs(predict_seconds(full2, only_moba) - 18.9e15 * 94 / 4.3e15) < 1e-3
