"""`moba-cp analyze selection` on a tiny trained checkpoint: its unions and distances equal a
brute-force count (Python sets over the naive oracle's selection) written here."""

import json
from pathlib import Path

import pytest

from tests.distributed_harness import run_cli, run_distributed

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
    "--model.num_query_groups=2", "--model.seq_length=512", "--moba.block_size=32", "--moba.topk=3",
    "--train.precision=fp32", "--logging.tensorboard=false", "--train.steps=2", "--train.warmup_steps=1",
]
SEQ, CPS, NSEQ, B = 512, (2, 4, 8), 2, 32


def _cli(args, cwd):
    """``python -m moba_cp.cli ARGS``, in a process forked from the preloaded server (run_cli)."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = run_cli(args, env=env, cwd=str(cwd), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _owner(chunk, cp):
    return chunk if chunk < cp else 2 * cp - 1 - chunk


def _brute_force(rank, ws, run_dir, cache):
    """Select with the naive oracle on each MoBA layer's (q, k) and count unions with sets."""
    import torch

    from moba_cp.data.datasets import heldout_sequences
    from moba_cp.eval.model_runner import load_eval_model
    from moba_cp.ops.moba import naive

    em = load_eval_model(run_dir, SEQ, ["--parallel.cp=1", f"--data.cache_dir={cache}"])
    seen = {}

    def hook(module, args):
        seen.setdefault(module.layer_number, []).append((args[0][:, 0].clone(), args[1][:, 0].clone()))

    for m in em.model.modules():
        if getattr(m, "base_kind", None) == "moba":
            m.register_forward_pre_hook(hook)
    seqs = heldout_sequences(em.cfg.data, seq_length=SEQ, num_sequences=NSEQ, tokenizer=em.tokenizer,
                             builtin_budget_bytes=em.cfg.data.builtin_budget_bytes)
    for x in seqs:
        em.loss_fn(x[:-1], x[1:])
    out = {}
    for layer, pairs in seen.items():
        causal = {cp: [[] for _ in range(cp)] for cp in CPS}
        kv_all = {cp: [[] for _ in range(cp)] for cp in CPS}
        prev = n = first = 0
        for q, k in pairs:
            sel = naive.select_blocks(q, k, block_size=B, topk=3).tolist()
            group = q.shape[1] // k.shape[1]
            nb = SEQ // B
            for i, row in enumerate(sel):
                for g in [g for heads in row for g in heads if g >= 0 and g != i // B]:
                    n += 1
                    prev += g == i // B - 1
                    first += g == 0
            for cp in CPS:
                c = SEQ // (2 * cp)
                for r in range(cp):
                    mine = [i for i in range(SEQ) if _owner(i // c, cp) == r]
                    remote = [g for g in range(nb) if _owner(g * B // c, cp) != r]
                    past = [g for g in remote if g < max(mine) // B]
                    union, union_kv = set(), set()
                    for i in mine:
                        for h, heads in enumerate(sel[i]):
                            for g in heads:
                                if g >= 0 and g in remote:
                                    union.add(g)
                                    union_kv.add((g, h // group))
                    causal[cp][r].append(len(union) / len(past))
                    kv_all[cp][r].append(len(union_kv) / (len(remote) * k.shape[1]))
        out[layer] = dict(
            causal={cp: [sum(v) / len(v) for v in causal[cp]] for cp in CPS},
            kv_all={cp: [sum(v) / len(v) for v in kv_all[cp]] for cp in CPS},
            prev=prev / n, first=first / n, n=n)
    return out


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selection")
    _cli(["train", "recipes/quickstart.yaml", *SMALL, "--parallel.cp=1", f"--logging.dir={tmp}/run",
          f"--data.cache_dir={tmp}/cache"],
         ROOT)
    stdout = _cli(["analyze", "selection", str(tmp / "run"), "--seq-len", str(SEQ), "--cp", ",".join(map(str, CPS)),
                   "--num-seqs", str(NSEQ), "--out", str(tmp / "out"), f"--data.cache_dir={tmp}/cache"], ROOT)
    return tmp, stdout


def test_analyze_selection_equals_brute_force(analysed):
    tmp, stdout = analysed
    report = json.loads((tmp / "out" / "selection.json").read_text())
    assert (tmp / "out" / "selection.png").stat().st_size > 5000
    assert "causal-past union" in stdout
    assert report["num_seqs"] == NSEQ and report["cps"] == list(CPS) and report["block_size"] == B
    brute = run_distributed(_brute_force, 1, args=(str(tmp / "run"), str(tmp / "cache")), timeout=400)[0]
    assert sorted(brute) == [lay["layer"] for lay in report["layers"]] == [1, 2]
    for lay in report["layers"]:
        ref = brute[lay["layer"]]
        d = lay["distance"]
        assert d["selections"] == ref["n"] > 0
        assert d["previous_block"] == pytest.approx(ref["prev"]) and d["first_block"] == pytest.approx(ref["first"])
        assert sum(d["histogram"].values()) == ref["n"]
        for cp in CPS:
            e = lay["cp"][str(cp)]
            assert e["union_causal_fraction_per_rank"] == pytest.approx(ref["causal"][cp]), (lay["layer"], cp)
            assert e["kv_union_fraction_per_rank"] == pytest.approx(ref["kv_all"][cp]), (lay["layer"], cp)
            assert e["union_causal_fraction_max"] == pytest.approx(max(ref["causal"][cp]))
            assert 0 < e["union_causal_fraction_max"] <= 1
            assert "ring" in e["bytes_per_rank"]
            assert ("a2a" in e["bytes_per_rank"]) == (cp <= 4)  # 4 query heads: head-parallel up to cp=4
            ring = e["bytes_per_rank"]["ring"]
            assert ring["ring_union"] == e["union_causal_fraction_max"] and ring["fwd"] > 0
