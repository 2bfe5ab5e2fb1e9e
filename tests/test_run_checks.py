"""Runs that never lie, the parts that need no training: the run-directory rules on saved
checkpoint recipes, metrics without duplicate steps after a resume, kernel limits and world-size
fixes in recipe validation, `--dry-run` refusing what a launch would refuse, and evaluation that
checks its grid first and resumes where it was interrupted."""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from moba_cp import config as C
from moba_cp.cli import main as cli_main
from moba_cp.data.tokenizers import ByteTokenizer
from moba_cp.train.run_dir import RunDirError, inspect_run_dir

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "recipes/quickstart.yaml")


def _fake_checkpoint(run_dir: Path, step: int, cfg, with_config: bool = True) -> Path:
    """A complete checkpoint directory as far as the run-directory check reads it."""
    ckpt = run_dir / "checkpoints" / f"iter_{step:07d}"
    ckpt.mkdir(parents=True)
    meta = {"step": step, "recipe": cfg.name}
    if with_config:
        meta["config"] = C.to_dict(cfg)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "__0_0.distcp").write_bytes(b"weights")
    (run_dir / "recipe.yaml").write_text(C.dump(cfg))
    return ckpt


def _tree(path: Path) -> dict:
    """Every file under ``path``: bytes and modification time."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}


def _cfg(tmp_path, *overrides):
    return C.load_recipe(QUICK, [f"--logging.dir={tmp_path}/run", *overrides])


def test_run_dir_rules(tmp_path):
    saved = _cfg(tmp_path, "--train.steps=10")
    _fake_checkpoint(tmp_path / "run", 6, saved)
    # The same recipe resumes; allowed changes are listed.
    st = inspect_run_dir(_cfg(tmp_path, "--train.steps=20", "--logging.interval=1", "--moba.backend=naive",
                              "--checkpoint.interval=5"))
    assert st.step == 6 and not st.complete
    assert {k for k, _, _ in st.changes} == {"train.steps", "logging.interval", "moba.backend", "checkpoint.interval"}
    assert ("train.steps", 10, 20) in st.changes
    # Meaning-changing keys are refused, each named with both values, with the fix.
    with pytest.raises(RunDirError) as e:
        inspect_run_dir(_cfg(tmp_path, "--train.steps=10", "--attention.pattern=full", "--model.hidden_size=64",
                             "--train.seed=7", "--data.tokenizer=byte", "--moba.topk=4"))
    msg = str(e.value)
    for line in ("attention.pattern: checkpoint 'moba', now 'full'", "model.hidden_size: checkpoint 128, now 64",
                 "train.seed: checkpoint 1234, now 7", "moba.topk: checkpoint 3, now 4"):
        assert line in msg, msg
    assert "data.tokenizer" not in msg  # unchanged keys are not listed
    assert "--logging.dir=NEW_DIR" in msg
    assert "resume with the saved values (--attention.pattern=moba --moba.topk=3 --model.hidden_size=128 " \
           "--train.seed=1234)" in msg
    with pytest.raises(RunDirError, match=r"parallel.tp: checkpoint 1, now 2 \(resuming under another tensor-parallel"):
        inspect_run_dir(_cfg(tmp_path, "--train.steps=10", "--parallel.tp=2", "--parallel.cp=1"))
    # A finished run is complete; a fresh start into a used directory is refused.
    assert inspect_run_dir(_cfg(tmp_path, "--train.steps=6")).complete
    with pytest.raises(RunDirError, match="checkpoint.resume=false starts a new run.*holds checkpoints"):
        inspect_run_dir(_cfg(tmp_path, "--checkpoint.resume=false"))
    # An empty directory (or one without a complete checkpoint) is a new run.
    assert inspect_run_dir(_cfg(tmp_path / "other")).checkpoint is None


def test_run_dir_check_reads_recipe_yaml_of_older_checkpoints(tmp_path):
    _fake_checkpoint(tmp_path / "run", 4, _cfg(tmp_path), with_config=False)
    with pytest.raises(RunDirError, match="model.num_layers: checkpoint 2, now 3"):
        inspect_run_dir(_cfg(tmp_path, "--model.num_layers=3"))


def test_refused_relaunch_and_finished_rerun_touch_nothing(tmp_path, monkeypatch, capsys):
    """Through the CLI (as a torchrun worker of a 2-process world): a different model is refused
    before any process group exists, leaving recipe.yaml and checkpoints byte-identical; the same
    command on a finished run says it is complete, exits 0 and changes nothing."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    _fake_checkpoint(run, 8, _cfg(tmp_path, "--train.steps=8"))
    before = _tree(run)
    for change in (["--attention.pattern=full"], ["--model.hidden_size=64"]):
        assert cli_main(["train", QUICK, f"--logging.dir={run}", "--train.steps=8", *change]) == 2
        err = capsys.readouterr().err
        assert change[0].split("=")[0][2:] in err and "nothing was written" in err, err
        assert _tree(run) == before and not dist.is_initialized()
    assert cli_main(["train", QUICK, f"--logging.dir={run}", "--train.steps=8"]) == 0
    assert "is complete" in capsys.readouterr().out
    assert _tree(run) == before and not dist.is_initialized()


def test_metrics_rows_after_the_resumed_step_are_replaced(tmp_path):
    from moba_cp.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        log.log({"step": step, "loss": float(step)})
    log.log({"step": 4, "valid_loss": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a row cut short by a kill
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=3)
    log.log({"step": 4, "loss": 40.0})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_kernel_limits_and_world_size_fixes():
    base = C.load_recipe(QUICK)
    assert C.kernel_limit_errors(base, "cuda") == []
    cfg = C.load_recipe(QUICK, ["--model.hidden_size=96", "--moba.block_size=40", "--model.seq_length=1280"])
    errs = C.kernel_limit_errors(cfg, "cuda")  # auto on CUDA -> the Triton limits
    assert len(errs) == 2 and "head dim" in errs[0] and "takes head dims [16, 32, 64, 128]" in errs[0]
    assert "moba.block_size=40" in errs[1] and "moba.block_size=32 or 48" in errs[1]
    assert C.kernel_limit_errors(cfg, "cpu") == []  # auto on CPU runs the naive oracle
    wide = C.load_recipe(QUICK, ["--moba.topk=200", "--moba.block_size=16", "--model.seq_length=4096"])
    assert "selects at most 128 blocks per query" in C.kernel_limit_errors(wide, "cuda")[0]
    full = C.load_recipe(QUICK, ["--model.hidden_size=96", "--attention.pattern=full"])
    assert C.kernel_limit_errors(full, "cuda") == []  # no MoBA layer, no MoBA kernel
    with pytest.raises(C.RecipeError, match="moba.backend=triton takes head dims"):
        C.load_recipe(QUICK, ["--moba.backend=triton", "--model.hidden_size=96"])
    with pytest.raises(C.RecipeError, match=r"world size 3 .* Fix: launch a multiple of 2 processes \(--nproc_per_node "
                                            r"/ NGPU = 2, 4, 8, \.\.\.\), or set --parallel.cp to one of \[1, 3\]"):
        C.validate(base, world_size=3)


@pytest.mark.parametrize("args,message", [
    (["--data.source=indexed", "--data.paths=[/no/such/prefix]"], "missing /no/such/prefix.bin"),
    (["--moba.backend=triton", "--model.hidden_size=96"], "head dim model.hidden_size / model.num_attention_heads"),
    (["--model.hidden_size=96"], "moba.backend=auto (Triton on CUDA) takes head dims"),
    (["--data.tokenizer=/no/tokenizer.json"], "tokenizer"),
])
def test_dry_run_rejects_what_a_launch_would(args, message, capsys, tmp_path):
    # a directory of its own: the recipe's default (runs/quickstart) holds the quickstart's
    # checkpoint once the README's main job has run, and that mismatch would be reported instead
    assert cli_main(["train", QUICK, f"--logging.dir={tmp_path / 'run'}", "--dry-run", *args]) == 2
    out = capsys.readouterr()
    assert message in out.out + out.err, out
    assert "dry run OK" not in out.out


def test_dry_run_reports_kernels_and_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_checkpoint(run, 5, _cfg(tmp_path, "--train.steps=10"))
    assert cli_main(["train", QUICK, f"--logging.dir={run}", "--train.steps=10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "moba.backend=auto -> Triton on GPU" in out and f"resuming from {run}/checkpoints/iter_0000005" in out
    assert cli_main(["train", QUICK, f"--logging.dir={run}", "--attention.pattern=full", "--dry-run"]) == 2
    assert "attention.pattern: checkpoint 'moba', now 'full'" in capsys.readouterr().out


# ----------------------------------------------------------------------------- evaluation

TOK = ByteTokenizer()


def _needle_args(out, lengths="700,900", kinds="passkey,single"):
    from moba_cp.eval import eval_command

    return eval_command.add_needle_arguments(argparse.ArgumentParser()).parse_args(
        ["--lengths", lengths, "--depths", "0,50,100", "--kinds", kinds, "--n-per-cell", "2", "--out", str(out)])


def _copier(calls):
    """A logits function that predicts the next token perfectly (counting its calls)."""
    def fn(tokens):
        calls.append(tokens.shape[1])
        nxt = torch.cat([tokens[0, 1:], tokens[0, :1]])
        out = torch.zeros(1, tokens.shape[1], TOK.vocab_size)
        out[0, torch.arange(tokens.shape[1]), nxt] = 1.0
        return out
    return fn


def test_needle_grid_is_checked_before_any_sample(tmp_path):
    from moba_cp.eval import eval_command
    from moba_cp.eval.needle import check_needle_grid

    calls = []
    with pytest.raises(ValueError, match=r"'multikey' needs at least \d+ tokens .*too short: length=150.*"
                                         r"Fix: raise --lengths"):
        eval_command.run_needle_eval(_needle_args(tmp_path, "2k,150", "passkey,multikey"), _copier(calls), TOK,
                                 progress=None)
    assert calls == [] and not list(tmp_path.iterdir())  # no sample ran, nothing written
    check_needle_grid(TOK, [2048], [0, 100], ["multikey"], 4, 0)  # long enough: no error


def test_eval_cli_checks_needle_lengths_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """`moba-cp eval needle --lengths 512,1k` on a multikey grid: refused at once (no process
    group, no model, nothing written), naming the lengths; a length beyond the trained
    seq_length gets a notice (and the loss flags are checked the same way)."""
    import torch.distributed as dist

    from moba_cp.eval.eval_command import check_eval_inputs

    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    _fake_checkpoint(run, 4, _cfg(tmp_path, "--train.steps=8"))
    out = tmp_path / "needle"
    assert cli_main(["eval", "needle", str(run), "--lengths", "200,1k", "--kinds", "passkey,multikey",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'multikey' needs at least" in err and "too short: length=200" in err, err
    assert not dist.is_initialized() and not out.exists()
    parsed = argparse.Namespace(checkpoint=str(run), kind="needle", lengths="1k,2k", depths="0,100",
                                kinds="passkey", n_per_cell=1, seed=0)
    _, trained, meta, longest = check_eval_inputs(parsed, [])
    assert longest == 2048 and meta["step"] == 4 and trained.model.seq_length == 1024
    assert "length(s) 2048 exceed the trained model.seq_length=1024" in capsys.readouterr().err
    assert cli_main(["eval", "loss", str(run), "--seq-len", "100", "--last", "200"]) == 2
    assert "--last=200 must be within [1, --seq-len=100]" in capsys.readouterr().err


def test_interrupted_needle_eval_resumes(tmp_path):
    """A grid interrupted after 3 cells keeps them; the rerun runs only the other cells and its
    result equals an uninterrupted run's."""
    from moba_cp.eval import eval_command

    source = {"checkpoint": "ckpt/iter_0000004", "step": 4}
    calls = []
    full = eval_command.run_needle_eval(_needle_args(tmp_path / "ref"), _copier(calls), TOK, progress=None, source=source)
    n_cells = 2 * 2 * 3
    assert len(calls) == n_cells * 2 and len(full["cells"]) == n_cells

    def interrupted(tokens, seen=[]):  # noqa: B006 - counts across calls
        seen.append(1)
        if len(seen) > 3 * 2:
            raise KeyboardInterrupt
        return _copier([])(tokens)

    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        eval_command.run_needle_eval(_needle_args(out), interrupted, TOK, progress=None, source=source)
    partial = json.loads((out / "needle.partial.json").read_text())
    assert len(partial["cells"]) == 3 and not (out / "needle.json").exists()
    calls = []
    again = eval_command.run_needle_eval(_needle_args(out), _copier(calls), TOK, progress=None, source=source)
    assert len(calls) == (n_cells - 3) * 2
    assert again["kinds"] == full["kinds"] and again["cells"] == full["cells"]
    assert (out / "needle.json").is_file() and not (out / "needle.partial.json").exists()
    # Another checkpoint's saved cells are never reused.
    calls = []
    eval_command.run_needle_eval(_needle_args(out), _copier(calls), TOK, progress=None, source=dict(source, step=5))
    assert len(calls) == n_cells * 2


def test_interrupted_loss_eval_resumes(tmp_path):
    from moba_cp.eval import eval_command
    from moba_cp.eval.lm_loss import per_token_loss_from_logits

    args = eval_command.add_loss_arguments(argparse.ArgumentParser()).parse_args(
        ["--seq-len", "32", "--last", "8", "--num-seqs", "3", "--buckets", "4", "--out", str(tmp_path)])
    seqs = [torch.randint(0, 200, (33,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calls = []
    loss_fn = per_token_loss_from_logits(_copier(calls))
    ref = eval_command.run_loss_eval(args, loss_fn, seqs, source={"step": 1})

    def dies_on_third(tokens, labels, n=[]):  # noqa: B006
        n.append(1)
        if len(n) == 3:
            raise KeyboardInterrupt
        return loss_fn(tokens, labels)

    (tmp_path / "eval_loss.json").unlink()
    with pytest.raises(KeyboardInterrupt):
        eval_command.run_loss_eval(args, dies_on_third, seqs, source={"step": 1})
    calls.clear()
    again = eval_command.run_loss_eval(args, loss_fn, seqs, source={"step": 1})
    assert len(calls) == 1  # only the sequence the interruption lost
    assert again == ref and not math.isnan(again["trailing_loss"])
    with pytest.raises(ValueError, match="--last=40 must be within"):
        eval_command.run_loss_eval(argparse.Namespace(**{**vars(args), "last": 40}), loss_fn, seqs)
