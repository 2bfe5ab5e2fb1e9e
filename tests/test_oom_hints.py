"""Out-of-memory advice: the recipe's levers as pasteable overrides, most specific first, and the
train command printing them before the error goes through."""

import argparse

import pytest
import torch

from moba_cp.config import load_recipe
from moba_cp.train import train_command
from moba_cp.train.oom_hints import oom_hints, oom_message

RECIPE = "recipes/1gpu-32k.yaml"


def _cfg(*overrides):
    return load_recipe(RECIPE, list(overrides))


def test_moba_without_recomputation_is_told_to_keep_the_selection_first():
    hints = oom_hints(_cfg("--train.recompute=none", "--train.micro_batch_size=1", "--train.global_batch_size=2"))
    assert hints[0].startswith("--moba.kernel=bwd.keep_index=false:")
    assert not any(h.startswith("--train.micro_batch_size") for h in hints)  # already 1
    assert any(h.startswith("--train.recompute=selective") for h in hints)
    assert any(h.startswith("--train.recompute=full") for h in hints)
    assert any(h.startswith("--parallel.cp=2 ") for h in hints)


def test_the_recipes_own_kernel_overrides_are_kept_in_the_advice():
    hints = oom_hints(_cfg("--train.recompute=none", "--moba.kernel=gate.presplit=true"))
    assert hints[0].startswith("--moba.kernel=gate.presplit=true,bwd.keep_index=false:")


@pytest.mark.parametrize("overrides", [
    ("--train.recompute=none", "--moba.kernel=bwd.keep_index=false"),  # already set
    ("--train.recompute=selective",),  # the index lives only from the recomputed forward on
    ("--train.recompute=none", "--attention.pattern=full"),  # no MoBA layer
])
def test_no_keep_index_advice_where_it_cannot_help(overrides):
    assert not any("keep_index" in h for h in oom_hints(_cfg(*overrides)))


def test_unfused_layer_ops_are_told_the_fused_swiglu_keeps_less():
    # under selective recomputation (so the keep_index advice, first without it, does not apply)
    hints = oom_hints(_cfg("--model.fused_ops=torch", "--train.recompute=selective"))
    assert hints[0].startswith("--model.fused_ops=auto:")
    assert not any("fused_ops" in h for h in oom_hints(_cfg()))  # already fused (auto)
    assert not any("fused_ops" in h for h in oom_hints(_cfg("--model.fused_ops=torch", "--model.swiglu=false")))


def test_a_graphed_step_is_told_to_run_eagerly_and_recomputation_comes_with_it():
    """train.cuda_graph=full_iteration: the graph's pool is a lever, and recomputation cannot be
    captured, so each recomputation hint also turns the graph off (a pasted hint must validate)."""
    hints = oom_hints(_cfg("--train.cuda_graph=full_iteration"))
    assert hints[0].startswith("--moba.kernel=bwd.keep_index=false:")  # still the most specific
    assert hints[1].startswith("--train.cuda_graph=none: the step runs eagerly")
    recompute = [h for h in hints if "--train.recompute=" in h]
    assert [h.split(":")[0] for h in recompute] == ["--train.cuda_graph=none --train.recompute=selective",
                                                   "--train.cuda_graph=none --train.recompute=full"]
    for h in recompute:  # each one, pasted, gives a recipe that validates
        load_recipe(RECIPE, ["--train.cuda_graph=full_iteration", *h.split(":")[0].split()])
    # the recipe's auto: graphed on one GPU (the same first hint; recomputation turns it off by itself)
    auto = oom_hints(_cfg())
    assert auto[1].startswith("--train.cuda_graph=none: the step runs eagerly")
    assert any(h.startswith("--train.recompute=selective:") for h in auto)
    assert not any("cuda_graph" in h for h in oom_hints(_cfg(), world_size=2))  # eager there: nothing about graphs
    assert not any("cuda_graph" in h for h in oom_hints(_cfg("--train.cuda_graph=none")))


def test_levers_already_at_their_limit_are_left_out():
    hints = oom_hints(_cfg("--train.recompute=full", "--train.micro_batch_size=4", "--train.global_batch_size=8",
                           "--parallel.cp=2"))
    assert not any(h.startswith("--train.recompute") for h in hints)
    assert hints[0].startswith("--train.micro_batch_size=2:")
    assert any(h.startswith("--parallel.cp=4 ") for h in hints)


def test_train_command_prints_the_advice_and_lets_the_error_through(monkeypatch, capsys):
    def fake_train(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 688.00 MiB.")

    monkeypatch.setattr(train_command, "train", fake_train)
    args = argparse.Namespace(recipe=RECIPE, dry_run=False, world_size=None, link_gbps=None, selection=None)
    with pytest.raises(torch.OutOfMemoryError):
        train_command.run_train_command(args, ["--train.recompute=none"])
    err = capsys.readouterr().err
    assert err.startswith("moba-cp train: the run ran out of device memory")
    assert "--moba.kernel=bwd.keep_index=false" in err and f"moba-cp train {RECIPE} --dry-run" in err
    assert err.strip().splitlines()[1:] == [line for line in oom_message(
        _cfg("--train.recompute=none"), RECIPE).splitlines()[1:]]
