"""Recipe fields parallel.cp_comm / a2a_size: validation before any process group, the dry run's
bytes per comm type, and the multi-node recipes' choice of the hierarchical form."""

import json

import pytest

from moba_cp.config import RecipeError, load_recipe
from moba_cp.parallel.traffic import comm_traffic
from moba_cp.train.dry_run import comm_plan, dry_run, parse_link_gbps


@pytest.mark.parametrize("overrides,match", [
    (["--parallel.cp=4", "--parallel.cp_comm=a2a", "--model.num_attention_heads=6", "--model.num_query_groups=3",
      "--model.hidden_size=192"], "splits the 6 query heads (per tensor-parallel rank) over 4 ranks"),
    (["--parallel.cp=4", "--parallel.cp_comm=a2a+ring", "--parallel.a2a_size=3"], "a2a_size=3 does not divide"),
    (["--parallel.cp=16", "--parallel.cp_comm=a2a+ring", "--parallel.a2a_size=16", "--model.num_attention_heads=16",
      "--model.seq_length=4096"], "exceeds parallel.gpus_per_node=8"),
    (["--parallel.cp=4", "--parallel.cp_comm=a2a+ring"], "needs parallel.a2a_size"),
    (["--parallel.cp=2", "--parallel.a2a_size=2"], "only used with cp_comm=a2a+ring"),
    (["--parallel.cp=2", "--parallel.cp_comm=a2a", "--attention.full_backend=te"], "attention.full_backend=torch"),
    (["--parallel.cp_comm=alltoall"], "parallel.cp_comm: 'alltoall' is not allowed"),
])
def test_bad_cp_comm_recipes_fail_before_process_groups(overrides, match):
    with pytest.raises(RecipeError, match=match.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load_recipe("recipes/tiny.yaml", overrides)


def test_good_cp_comm_recipes_load():
    cfg = load_recipe("recipes/tiny.yaml", ["--parallel.cp=4", "--parallel.cp_comm=a2a+ring", "--parallel.a2a_size=2"])
    assert (cfg.parallel.cp_comm, cfg.parallel.a2a_size) == ("a2a+ring", 2)
    # 4 query / 2 KV heads over cp=4: KV heads replicated, allowed
    assert load_recipe("recipes/tiny.yaml", ["--parallel.cp=4", "--parallel.cp_comm=a2a"]).parallel.cp_comm == "a2a"


@pytest.mark.parametrize("recipe", ["recipes/64gpu-4m.yaml", "recipes/128gpu-10m.yaml"])
def test_multinode_recipes_pick_the_hierarchical_form(recipe, capsys):
    cfg = load_recipe(recipe)
    assert cfg.parallel.cp_comm == "a2a+ring" and cfg.parallel.a2a_size * cfg.parallel.tp <= cfg.parallel.gpus_per_node
    best = comm_plan(cfg)[0]
    assert (best.comm, best.a2a_size) == ("a2a+ring", cfg.parallel.a2a_size)
    ring = [t for t in comm_plan(cfg) if t.comm == "ring"][0]
    assert best.inter_fwd + best.inter_bwd < ring.inter_fwd + ring.inter_bwd  # less over InfiniBand
    assert dry_run(cfg) == 0
    out = capsys.readouterr().out
    assert "would pick a2a+ring(a2a_size=2)" in out and "ring " in out and "inter-node" in out


def test_dry_run_bytes_per_comm_type_and_link_speed(tmp_path, capsys):
    cfg = load_recipe("recipes/tiny.yaml", ["--parallel.cp=4", "--model.seq_length=4096"])
    assert dry_run(cfg, link_gbps="100") == 0
    out = capsys.readouterr().out
    for name in ("ring", "a2a ", "a2a+ring(a2a_size=2)"):
        assert name in out, out
    assert "at 100 Gb/s inside a node / 100 Gb/s between nodes" in out and "union 100%" in out
    assert parse_link_gbps("3600,400") == (3600.0, 400.0)
    with pytest.raises(RecipeError, match="--link-gbps"):
        parse_link_gbps("fast")
    # a measured selection lowers the ring's bytes (and only the ring's)
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps({"layers": [{"cp": {"4": {"union_causal_fraction_max": 0.25}}},
                                          {"cp": {"4": {"union_causal_fraction_max": 0.5}}}]}))
    assert dry_run(cfg, selection=str(sel)) == 0
    assert "union 50%" in capsys.readouterr().out
    half, full = comm_plan(cfg, union=0.5), comm_plan(cfg)
    get = lambda plans, c: [t for t in plans if t.comm == c][0]  # noqa: E731
    assert get(half, "ring").fwd == pytest.approx(get(full, "ring").fwd / 2)
    assert get(half, "a2a").fwd == get(full, "a2a").fwd
    assert dry_run(cfg, selection=str(tmp_path / "missing.json")) == 2


def test_traffic_formulas_match_what_the_ops_record():
    # the numbers test_cp_comm_types checks against the ops' CPStats, here from the formulas
    s_loc, cp, d, elem = 32, 4, 16, 8
    kw = dict(seq_len=s_loc * cp, cp=cp, head_dim=d, elem_bytes=elem)
    ring = comm_traffic("ring", hq=4, hkv=2, **kw)
    assert ring.fwd == (cp - 1) * 2 * s_loc * 2 * d * elem  # CPStats.full_ring_kv_bytes
    a2a = comm_traffic("a2a", hq=4, hkv=2, **kw)  # 1 query head and 1 (replicated) KV head per rank
    assert a2a.fwd == (cp - 1) * s_loc * d * elem * (1 + 2 * 1 + 1)  # q, k, v out, o back
    assert a2a.fwd <= ring.fwd  # equal here (4 heads at cp=4); a2a wins as cp grows:
    # per-rank a2a bytes fall with cp (as 1/cp while cp <= KV heads), the ring's stay ~ the whole K/V;
    # with 32 query and 8 KV heads the all-to-all moves less than the ring from cp > 5 (issue 16)
    big = dict(seq_len=1 << 20, hq=32, hkv=8, head_dim=128, elem_bytes=2)
    a4, a8, a16 = (comm_traffic("a2a", cp=c, **big).fwd for c in (4, 8, 16))
    r4, r8, r16 = (comm_traffic("ring", cp=c, **big).fwd for c in (4, 8, 16))
    assert a8 == pytest.approx(a4 * (7 / 8) / (3 / 4) / 2) and a16 < a8 and r16 > r8 > r4
    assert a4 > r4 and a8 < r8 and a16 < r16
