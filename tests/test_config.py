"""Recipe loading: defaults, YAML, overrides (precedence), every kind of error, shipped recipes."""

import dataclasses
import glob

import pytest

from moba_cp import config as C
from moba_cp.cli import main as cli_main


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_every_field_of_every_section_is_documented():
    for cls in (C.ModelConfig, C.MoBAConfig, C.AttentionConfig, C.ParallelConfig, C.TrainConfig,
                C.DataConfig, C.EvalConfig, C.LoggingConfig, C.CheckpointConfig, C.RecipeConfig):
        helps = C.field_help(cls)
        assert helps and all(len(h) > 5 for h in helps.values()), (cls.__name__, helps)


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = write(tmp_path, "moba: {topk: 5}\nmodel: {seq_length: 2048}\n")
    cfg = C.load_recipe(path, ["--moba.topk=8"])
    assert cfg.moba.topk == 8                     # CLI beats YAML
    assert cfg.model.seq_length == 2048           # YAML beats default
    assert cfg.moba.block_size == C.MoBAConfig().block_size  # default
    cfg = C.load_recipe(path, ["--train.lr", "1e-3", "--attention.pattern=hybrid", "--attention.full_last_n=2"])
    assert cfg.train.lr == 1e-3 and cfg.attention.pattern == "hybrid"
    assert C.layer_attention_kinds(cfg.model, cfg.attention) == ["moba", "moba", "full", "full"]


def test_int_accepted_for_float_but_not_str_for_int(tmp_path):
    assert C.load_recipe(None, ["--train.lr=1"]).train.lr == 1.0
    with pytest.raises(C.RecipeError, match="moba.topk: expected an integer, got str 'many'"):
        C.load_recipe(None, ["--moba.topk=many"])
    with pytest.raises(C.RecipeError, match="train.lr: expected a number, got bool"):
        C.load_recipe(None, ["--train.lr=true"])


@pytest.mark.parametrize(
    "yaml_text,overrides,pattern",
    [
        ("moba: {topkk: 3}\n", [], r"moba: unknown key\(s\) topkk; valid keys are backend, block_size, kernel, key_conv, topk"),
        ("modle: {}\n", [], r"recipe: unknown key\(s\) modle"),
        ("", ["--moba.nope=1"], "override --moba.nope: moba has no key 'nope'"),
        ("", ["--nope.x=1"], "override --nope.x: recipe has no key 'nope'"),
        ("", ["--moba.topk.x=1"], "moba.topk is not a section"),
        ("", ["moba.topk=1"], "expected --section.key=value"),
        ("", ["--moba.topk"], "has no value"),
        ("model: {normalization: BatchNorm}\n", [], "model.normalization: 'BatchNorm' is not allowed"),
        ("attention: {layers: [moba, 3]}\n", [], r"attention.layers\[1\]: expected a string"),
        ("model: [1, 2]\n", [], "model: expected a mapping"),
        ("- a\n- b\n", [], "the top level must be a mapping"),
        ("model: {num_layers: 0}\n", [], "model.num_layers=0 must be >= 1"),
        ("model: {hidden_size: 100, num_attention_heads: 3, num_query_groups: 3}\n", [],
         "hidden_size=100 is not divisible by model.num_attention_heads=3"),
        ("model: {num_attention_heads: 4, num_query_groups: 3, hidden_size: 96}\n", [], "not divisible by\n?.*num_query_groups=3"),
        ("parallel: {tp: 8}\n", [], "num_attention_heads=4 is not divisible by parallel.tp=8"),
        ("model: {num_attention_heads: 4, num_query_groups: 1}\nparallel: {tp: 2}\n", [],
         "num_query_groups=1 is not divisible by parallel.tp=2"),
        ("model: {seq_length: 1000}\nmoba: {block_size: 128}\nparallel: {cp: 2}\n", [],
         r"seq_length=1000 is not divisible by 2 \* parallel.cp \* moba.block_size = 512"),
        ("attention: {pattern: hybrid, full_last_n: 9}\n", [], "full_last_n=9 must be within"),
        ("attention: {pattern: explicit, layers: [moba]}\n", [], "needs attention.layers with model.num_layers=4"),
        ("attention: {pattern: explicit, layers: [moba, full, bad, moba]}\n", [], "entries must be 'moba' or 'full'"),
        ("attention: {layers: [moba, moba, moba, moba]}\n", [], "use pattern=explicit"),
        ("train: {global_batch_size: 3, micro_batch_size: 2}\n", [], "not a multiple of"),
        ("train: {warmup_steps: 500, steps: 10}\n", [], "warmup_steps=500 must be within"),
        ("data: {source: indexed}\n", [], "needs data.paths"),
        ("parallel: {sequence_parallel: true}\n", [], "needs parallel.tp > 1"),
        ("model: {seq_length: [\n", [], "is not valid YAML"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, yaml_text, overrides, pattern):
    path = write(tmp_path, yaml_text)
    with pytest.raises(C.RecipeError, match=pattern):
        C.load_recipe(path, overrides)


def test_missing_file_is_a_clear_error():
    with pytest.raises(C.RecipeError, match="does not exist"):
        C.load_recipe("no/such/recipe.yaml")


def test_world_size_rules():
    cfg = C.load_recipe(None, ["--parallel.cp=2", "--model.seq_length=1024", "--moba.block_size=128",
                               "--train.global_batch_size=4"])
    C.validate(cfg, world_size=4)  # dp = 2, 4 % (1*2) == 0
    with pytest.raises(C.RecipeError, match="world size 3 is not divisible by parallel.tp \\* parallel.cp = 2"):
        C.validate(cfg, world_size=3)
    cfg.parallel.dp = 4
    with pytest.raises(C.RecipeError, match="Fix: set parallel.dp=2"):
        C.validate(cfg, world_size=4)
    cfg.parallel.dp = None
    cfg.train.global_batch_size = 3
    cfg.train.micro_batch_size = 1
    with pytest.raises(C.RecipeError, match="micro_batch_size\\*dp = 1\\*2"):
        C.validate(cfg, world_size=4)


def test_full_iteration_cuda_graph_rules():
    """train.cuda_graph=full_iteration: one process on a GPU, no recomputation; each refusal names
    the value, the rule and the fix, before any work."""
    one = ["--parallel.cp=1", "--train.cuda_graph=full_iteration"]
    C.validate(C.load_recipe(None, one), world_size=1, device="cuda")
    C.validate(C.load_recipe(None, one))  # where it will run is not known yet: not checked
    assert C.load_recipe(None, []).train.cuda_graph == "none"
    with pytest.raises(C.RecipeError, match="needs a CUDA GPU; this run is on cpu. Fix: train.cuda_graph=none"):
        C.validate(C.load_recipe(None, one), world_size=1, device="cpu")
    with pytest.raises(C.RecipeError, match="runs on one process .* this run has 2 .*parallel.cp=1"):
        C.validate(C.load_recipe(None, one), world_size=2, device="cuda")
    with pytest.raises(C.RecipeError, match="this run has 2 \\(parallel.tp=1, parallel.cp=2"):
        C.validate(C.load_recipe(None, ["--parallel.cp=2", "--model.seq_length=1024", "--moba.block_size=128",
                                        "--train.cuda_graph=full_iteration"]))
    with pytest.raises(C.RecipeError, match="train.recompute=selective: recomputation saves and restores the CUDA "
                                            "RNG state.*Fix: train.cuda_graph=none, or train.recompute=none"):
        C.validate(C.load_recipe(None, [*one, "--train.recompute=selective"]), world_size=1, device="cuda")
    with pytest.raises(C.RecipeError, match="train.cuda_graph"):
        C.load_recipe(None, ["--train.cuda_graph=layers"])


def test_auto_cuda_graph_applies_only_where_full_iteration_could_run():
    auto = C.load_recipe(None, ["--parallel.cp=1", "--train.cuda_graph=auto"])
    assert C.cuda_graph_applies(auto, 1, "cuda")
    assert not C.cuda_graph_applies(auto, 1, "cpu")
    assert not C.cuda_graph_applies(auto, 2, "cuda")
    for other in (["--train.recompute=selective"], ["--parallel.cp=2", "--model.seq_length=1024",
                                                     "--moba.block_size=128"]):
        cfg = C.load_recipe(None, ["--train.cuda_graph=auto", *other])  # never refused
        C.validate(cfg, world_size=2 if "--parallel.cp=2" in other else 1, device="cuda")
        assert not C.cuda_graph_applies(cfg, 2 if "--parallel.cp=2" in other else 1, "cuda")
    assert not C.cuda_graph_applies(C.load_recipe(None, ["--parallel.cp=1"]), 1, "cuda")  # none: the default
    assert C.cuda_graph_applies(C.load_recipe(None, ["--parallel.cp=1", "--train.cuda_graph=full_iteration"]),
                                1, "cuda")
    assert C.load_recipe("recipes/1gpu-32k.yaml").train.cuda_graph == "auto"


def test_components_receive_only_their_sub_config():
    cfg = C.load_recipe(None)
    assert dataclasses.is_dataclass(cfg.moba) and set(C.field_help(C.MoBAConfig)) == {"block_size", "topk", "backend", "key_conv", "kernel"}


def test_dump_round_trips(tmp_path):
    cfg = C.load_recipe(None, ["--moba.topk=7", "--data.retrieval_kinds=[passkey, single]"])
    path = write(tmp_path, C.dump(cfg))
    assert C.load_recipe(path) == cfg


def _is_sweep(path):
    import yaml

    return "kind" in (yaml.safe_load(open(path)) or {})


@pytest.mark.parametrize("recipe", [r for r in sorted(glob.glob("recipes/**/*.yaml", recursive=True)) if not _is_sweep(r)])
def test_every_shipped_recipe_validates(recipe):
    C.load_recipe(recipe)


def test_cli_config_prints_resolved_recipe_and_reports_errors(capsys):
    assert cli_main(["config", "recipes/tiny.yaml", "--moba.topk=6"]) == 0
    out = capsys.readouterr().out
    assert "topk: 6" in out and "block_size: 64" in out
    assert cli_main(["config", "recipes/tiny.yaml", "--moba.topk=zero"]) == 2
    assert "moba.topk: expected an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0
    assert "moba-cp 0.1.0" in capsys.readouterr().out
