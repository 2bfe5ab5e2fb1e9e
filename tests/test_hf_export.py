"""`moba-cp export hf` on a checkpoint trained with `moba-cp train` (tp=2, hybrid MoBA + full layers):
the directory loads in transformers (AutoModelForCausalLM / AutoTokenizer, trust_remote_code) without
Megatron-Core, its logits equal moba_cp's own forward (tensor-parallel as trained, and context-parallel), KV-cache decoding equals the
full forward at every position, `generate` works greedy and sampled, and `eval needle --generate`
scores like the teacher-forced `eval needle`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the 'export' extra (pip install -e '.[export]') is not installed")
pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moba_cp.data.retrieval_docs import make_needle_sample  # noqa: E402
from moba_cp.data.tokenizers import ByteTokenizer  # noqa: E402
from moba_cp.eval.needle import score_needle  # noqa: E402
from moba_cp.hf.needle_generate import generate_scorer  # noqa: E402
from tests.distributed_harness import run_cli, run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--parallel.tp=2", "--parallel.cp=1", "--model.num_layers=3", "--model.hidden_size=64", "--model.num_attention_heads=4",
    "--model.num_query_groups=2", "--model.seq_length=512", "--moba.block_size=32", "--moba.topk=3",
    "--attention.pattern=hybrid", "--attention.full_last_n=1", "--train.precision=fp32",
    "--logging.tensorboard=false", "--train.steps=3", "--train.warmup_steps=1", "--train.lr=3e-2",
]
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def _run(args, timeout=400):
    """``python ARGS`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _cli(args, nproc=None, timeout=400):
    """``python -m moba_cp.cli ARGS`` (``torchrun --nproc_per_node NPROC -m moba_cp.cli ARGS``), in
    workers forked from the preloaded server (run_cli: ~10 s of imports less per process)."""
    proc = run_cli(args, nproc=nproc, env=ENV, cwd=str(ROOT), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hfexport")
    _cli(["train", "recipes/quickstart.yaml", *SMALL, f"--logging.dir={tmp}/run", f"--data.cache_dir={tmp}/cache"],
         nproc=2)
    proc = _cli(["export", "hf", str(tmp / "run"), "--out", str(tmp / "hf")])
    assert "logits match moba_cp's forward" in proc.stdout
    return tmp


@pytest.fixture(scope="module")
def model(exported):
    return AutoModelForCausalLM.from_pretrained(str(exported / "hf"), trust_remote_code=True).eval()


def _tokens(n, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def test_export_directory_and_its_self_check(exported):
    out = exported / "hf"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_moba.py", "configuration_moba.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "moba_cp_export.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_moba.MoBAForCausalLM"
    assert cfg["attention_kinds"] == ["moba", "moba", "full"]
    assert (cfg["moba_block_size"], cfg["moba_topk"], cfg["vocab_size"]) == (32, 3, 384)
    report = json.loads((out / "moba_cp_export.json").read_text())
    assert report["step"] == 3 and report["logits_check"]["ok"]
    assert report["logits_check"]["max_abs_diff"] < 1e-4


def _w_ref_logits(rank, world_size, run, layout, tokens):
    from moba_cp.eval.model_runner import load_eval_model
    from moba_cp.train.distributed import shutdown_distributed

    em = load_eval_model(run, 150, layout)
    logits = em.logits_fn(tokens)
    shutdown_distributed()
    return logits if em.env.is_main else None


@pytest.mark.parametrize("layout", [["--parallel.tp=2", "--parallel.cp=1"], ["--parallel.tp=1", "--parallel.cp=2"]],
                         ids=["tp2-as-trained", "cp2"])
def test_logits_equal_moba_cp_parallel_forward(exported, model, tmp_path, layout):
    """The reference is moba_cp's own forward of the checkpoint in two processes: tensor-parallel
    as it was trained, and context-parallel."""
    tokens = _tokens(150, seed=1)
    ref = run_distributed(_w_ref_logits, 2, args=(str(exported / "run"), layout, tokens), timeout=400)[0]
    with torch.no_grad():
        got = model(tokens, use_cache=False).logits
    assert got.shape == ref.shape == (1, 150, 384)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_kv_cache_decoding_equals_full_forward_at_every_position(model):
    """Moba and full layers, a prompt ending inside a block, decoding across three block boundaries."""
    tokens = _tokens(140, seed=2)
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        out = model(tokens[:, :45], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        steps = [out.logits]
        for t in range(45, 140):
            kw = {"cache" if hasattr(out, "cache") else "past_key_values": cache}
            steps.append(model(tokens[:, t:t + 1], use_cache=True, **kw).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_generate_greedy_and_sampled(model):
    prompt = _tokens(70, seed=3)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                         eos_token_id=None)
    x = prompt
    with torch.no_grad():  # greedy without a cache: argmax of the full forward, token after token
        for _ in range(30):
            x = torch.cat([x, model(x, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, x)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=True, top_k=20,
              temperature=0.8, eos_token_id=None)
    torch.manual_seed(7)
    a = model.generate(prompt, use_cache=True, **kw)
    torch.manual_seed(7)
    b = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(a, b) and a.shape == (1, 90) and int(a.max()) < 384
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.generate(prompt, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="padding is not supported"):
        model(prompt, attention_mask=torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 69, dtype=torch.long)], 1))


def test_auto_tokenizer_is_the_byte_tokenizer(exported):
    tok, ref = AutoTokenizer.from_pretrained(str(exported / "hf"), trust_remote_code=True), ByteTokenizer()
    assert len(tok) == ref.vocab_size and tok.eos_token_id == ref.eod and tok.pad_token_id == ref.pad
    for text in ["The passkey is 71432. Remember it.", "  héllo ✓ 日本\n\tend", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids) == text


def test_exported_model_loads_and_runs_without_megatron(exported):
    code = (
        "import sys\n"
        "sys.modules['megatron'] = None  # any import of megatron fails\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(exported / 'hf')!r}, trust_remote_code=True)\n"
        "out = m.generate(torch.tensor([[72, 105, 33] * 20]), max_new_tokens=5, do_sample=False)\n"
        "assert out.shape == (1, 65)\n"
        "assert not any(k.startswith('megatron') for k in sys.modules if sys.modules[k] is not None)\n"
        "print('ok')\n")
    assert "ok" in _run(["-c", code]).stdout


def test_generation_scoring_agrees_with_teacher_forcing(model):
    tok = ByteTokenizer()
    scorer = generate_scorer(model, tok)
    logits_fn = lambda x: model(x, use_cache=False).logits  # noqa: E731
    for kind, depth in [("passkey", 0), ("passkey", 50), ("single", 100)]:
        s = make_needle_sample(tok, 400, depth, kind, 11)
        g, t = scorer(s), score_needle(logits_fn, s)
        assert g["correct"] == t["correct"]
        # the first answer token has the same prefix in both: same prediction
        assert g["predicted"][0] == t["predicted"][0]
        # greedy continues from its own tokens: it agrees with teacher forcing up to its first miss
        n_ok = next((i for i, (p, a) in enumerate(zip(t["predicted"], s.answer)) if p != a), len(s.answer))
        assert g["predicted"][:n_ok + 1] == t["predicted"][:n_ok + 1]


def test_eval_needle_generate_scores_like_teacher_forced_eval(exported):
    grid = ["--lengths", "400", "--depths", "0,100", "--kinds", "passkey", "--n-per-cell", "1"]
    run = str(exported / "run")
    _cli(["eval", "needle", run, *grid, "--out", str(exported / "tf")], nproc=2)  # tp=2
    _cli(["eval", "needle", run, "--generate", *grid, "--out", str(exported / "gen")])
    _cli(["eval", "needle", str(exported / "hf"), "--generate", *grid, "--out", str(exported / "gen_hf")])
    tf = json.loads((exported / "tf" / "needle.json").read_text())
    for out in ("gen", "gen_hf"):
        gen = json.loads((exported / out / "needle.json").read_text())
        assert gen["identity"]["source"]["scoring"] == "generate"
        assert gen["label"] == "quickstart (generate)"
        assert gen["kinds"]["passkey"]["accuracy"] == tf["kinds"]["passkey"]["accuracy"]
        assert (exported / out / "needle_heatmap.png").is_file()


def test_export_refuses_a_foreign_output_folder(exported, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli(["export", "hf", str(exported / "run"), "--out", str(tmp_path)], env=ENV, cwd=str(ROOT), timeout=200)
    assert proc.returncode == 2 and "is not an earlier moba-cp export" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_lm_eval_harness_needle_task_matches_generate_scoring(exported, model, tmp_path):
    """`moba-cp export needle-task` + lm-evaluation-harness's `hf` model on the exported directory,
    offline: every sample's generation is what `eval needle --generate` decodes."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (scripts/test.sh installs it)")
    task = tmp_path / "task"
    grid = ["--lengths", "505", "--depths", "0,50,100", "--kinds", "passkey,single", "--n-per-cell", "1"]
    printed = _cli(["export", "needle-task", str(exported / "hf"), "--out", str(task), *grid]).stdout
    assert "max_length=512 " in printed  # 505 + the single kind's 7-digit answer
    env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={exported / 'hf'},trust_remote_code=True,dtype=float32,max_length=512", "--include_path", str(task),
           "--tasks", "moba_needle", "--batch_size", "1", "--device", "cpu", "--output_path", str(tmp_path / "out"),
           "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_moba_needle_*.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == 6
    tok = ByteTokenizer()
    scorer = generate_scorer(model, tok)
    for s in samples:
        doc = s["doc"]
        sample = make_needle_sample(tok, doc["length"], doc["depth"], doc["kind"], 0)  # sample_seed(0, 0) == 0
        assert doc["context"] == tok.decode(sample.tokens[:sample.answer_start])
        mine = scorer(sample)
        assert s["resps"][0][0][: len(doc["answer"])] == mine["text"]
        assert s["exact_match"] == float(mine["correct"])


def _w_to_bf16(rank, world_size, src, run):
    """Rewrite the fp32 checkpoint of ``src`` as a bf16 one in ``run`` (what GPU training leaves)."""
    from megatron.core import dist_checkpointing

    from moba_cp.eval.model_runner import load_eval_model

    em = load_eval_model(src, 512, ["--parallel.tp=1"])
    em.model.bfloat16()
    dst = Path(run) / "checkpoints" / "iter_0000003"
    dst.mkdir(parents=True)
    dist_checkpointing.save({"model": em.model.sharded_state_dict()}, str(dst))
    meta = json.loads((Path(src) / "checkpoints/iter_0000003/meta.json").read_text())
    meta["config"]["train"]["precision"] = "bf16"
    (dst / "meta.json").write_text(json.dumps(meta))


def test_a_bf16_checkpoint_exports_on_cpu(exported, tmp_path):
    """Trained in bf16 on GPUs, exported on a CPU machine: the bf16 tensors load into the fp32 CPU
    model, the export is bf16 (the training precision) and its logits check passes."""
    run = tmp_path / "bf16run"
    run_distributed(_w_to_bf16, 1, args=(str(exported / "run"), str(run)), timeout=400)
    proc = _cli(["export", "hf", str(run), "--out", str(tmp_path / "hf")])
    assert "bfloat16; logits match" in proc.stdout
    report = json.loads((tmp_path / "hf" / "moba_cp_export.json").read_text())
    assert report["dtype"] == "bfloat16" and report["logits_check"]["ok"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_generate_and_exported_task_refuse_heldout_haystacks(tmp_path, capsys):
    """Held-out haystacks need the run's corpus: decoding and the exported lm-eval task say so instead of
    silently scoring the passkey haystack."""
    import argparse

    from moba_cp.eval import eval_command
    from moba_cp.hf import lm_eval_task, needle_generate

    args = eval_command.add_needle_arguments(argparse.ArgumentParser()).parse_args(
        ["--lengths", "400", "--haystack", "heldout", "--out", str(tmp_path / "o")])
    args.checkpoint, args.label, args.generate = str(tmp_path / "missing"), None, True
    assert needle_generate.run(args, []) == 2
    assert "--haystack heldout is for teacher-forced scoring of a run directory" in capsys.readouterr().err
    targs = lm_eval_task.add_arguments(argparse.ArgumentParser()).parse_args(
        [str(tmp_path / "export"), "--out", str(tmp_path / "task"), "--haystack", "heldout"])
    assert lm_eval_task.run(targs, []) == 2
    assert "the exported task has no training corpus" in capsys.readouterr().err
