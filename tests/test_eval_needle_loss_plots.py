"""Evaluation: needle generators and scoring (on models known by construction), LM losses, plots."""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from moba_cp.data.tokenizers import ByteTokenizer
from moba_cp.eval.lm_loss import per_token_loss_from_logits, trailing_and_positional_loss
from moba_cp.data.retrieval_docs import INTRO, KINDS, make_needle_sample
from moba_cp.eval.needle import parse_depths, parse_kinds, parse_lengths
from moba_cp.eval.needle import run_needle_grid, score_needle, write_json
from moba_cp.eval import plots

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
V = TOK.vocab_size


def _onehot_logits(pred: list[int]) -> torch.Tensor:
    """[1, S, V] logits whose argmax at position p is pred[p]."""
    out = torch.zeros(1, len(pred), V)
    out[0, torch.arange(len(pred)), torch.tensor(pred)] = 10.0
    return out


# ----------------------------------------------------------------------------- generators

@pytest.mark.parametrize("kind", KINDS)
def test_generator_deterministic_and_depth_exact(kind):
    intro_len = len(TOK.encode(INTRO))
    for depth in (0, 10, 33.3, 50, 87, 100):
        s = make_needle_sample(TOK, 1500, depth, kind, seed=5)
        assert len(s.tokens) == s.length == 1500
        # the stated depth, in tokens: exactly round(depth% * H) filler tokens precede the target needle
        before = sum(n for p, n in zip(s.needle_positions, s.needle_len) if p < s.needle_pos)
        assert s.depth_tokens == round(depth / 100 * s.haystack_len)
        assert s.needle_pos == intro_len + s.depth_tokens + before
        if kind in ("passkey", "single"):
            assert s.needle_pos == intro_len + round(depth / 100 * s.haystack_len)
        needle = TOK.decode(s.tokens[s.needle_pos:s.needle_pos + s.needle_len[s.needle_positions.index(s.needle_pos)]])
        assert s.values[0] in needle or any(v in needle for v in s.values)
        assert (s.key in needle) and ("pass key" in needle if kind == "passkey" else "magic number" in needle)
        assert s.tokens[s.answer_start:] == s.answer and TOK.decode(s.answer).replace(", ", "").isdigit()
        # needles never overlap, and the haystack plus needles plus fixed parts fill the length exactly
        ends = [p + n for p, n in zip(s.needle_positions, s.needle_len)]
        assert all(e <= p for e, p in zip(ends[:-1], s.needle_positions[1:]))
        again = make_needle_sample(TOK, 1500, depth, kind, seed=5)
        assert again.tokens == s.tokens and again.answer == s.answer
    assert make_needle_sample(TOK, 1500, 50, kind, seed=6).answer != s.answer or kind == "passkey"


def test_generator_edges_and_kinds():
    s0 = make_needle_sample(TOK, 800, 0, "single", seed=1)
    assert s0.needle_pos == len(TOK.encode(INTRO))  # depth 0: right after the intro
    s100 = make_needle_sample(TOK, 800, 100, "single", seed=1)
    q = TOK.decode(s100.tokens[s100.needle_pos + s100.needle_len[0]:s100.answer_start])
    assert q.startswith("\nWhat is the special magic number")  # depth 100: right before the question
    mk = make_needle_sample(TOK, 3000, 40, "multikey", seed=2)
    text = TOK.decode(mk.tokens[:mk.answer_start])
    keys = re.findall(r"magic numbers for (\w+) is", text)
    assert len(keys) == 4 and len(set(keys)) == 4 and keys.count(mk.key) == 1  # 3 distractor keys
    mv = make_needle_sample(TOK, 3000, 40, "multivalue", seed=2)
    found = re.findall(rf"magic numbers for {mv.key} is: (\d+)", TOK.decode(mv.tokens[:mv.answer_start]))
    assert found == mv.values and TOK.decode(mv.answer) == ", ".join(found)  # document order
    with pytest.raises(ValueError, match="too short"):
        make_needle_sample(TOK, 100, 50, "single")
    with pytest.raises(ValueError, match="depth"):
        make_needle_sample(TOK, 1000, 120, "single")
    assert parse_lengths("4k, 8K,1000,1m") == [4096, 8192, 1000, 1048576]
    with pytest.raises(ValueError, match="'4q' is not a token count"):
        parse_lengths("4k,4q")
    with pytest.raises(ValueError, match="positive token counts"):
        parse_lengths("0")
    assert parse_kinds(" passkey,single ") == ["passkey", "single"]
    with pytest.raises(ValueError, match=r"unknown \['needle'\]; choose from passkey"):
        parse_kinds("passkey,needle")


# ----------------------------------------------------------------------------- scoring on known models

def oracle_retriever(tokens: torch.Tensor) -> torch.Tensor:
    """Causal by construction: once the text so far ends with the question, it reads the values of the
    asked key from the text *before* the question and emits the answer, character by character;
    elsewhere it predicts a space."""
    ids = tokens[0].tolist()
    text = TOK.decode(ids)  # byte tokenizer + ASCII: character i == token i
    pred = [ord(" ")] * len(ids)
    m = re.search(r"\nWhat (?:is|are) [^\n]*?(?:mentioned in the provided text (?:is|are) |The pass key is )", text)
    if m:
        before = text[:m.start()]
        key = re.search(r"numbers? for (\w+) mentioned", m.group(0))
        if key:
            vals = re.findall(rf"magic numbers for {key.group(1)} is: (\d+)", before)
        else:
            vals = re.findall(r"The pass key is (\d+)", before)
        answer = ", ".join(vals)
        for i, ch in enumerate(answer):
            p = m.end() - 1 + i  # position whose logits predict text[m.end() + i]
            if p < len(ids):
                pred[p] = ord(ch)
    return _onehot_logits(pred)


def induction_model(window: int | None, k: int = 12):
    """Causal k-gram copier: predicts the token that followed the latest earlier occurrence of the last k
    tokens, searching only the last `window` positions (None = whole context)."""

    def fn(tokens):
        ids = tokens[0].tolist()
        pred = []
        for p in range(len(ids)):
            guess = 0
            if p >= k:
                key = ids[p - k + 1:p + 1]
                lo = k - 1 if window is None else max(k - 1, p - window)
                for j in range(p - 1, lo - 1, -1):
                    if ids[j - k + 1:j + 1] == key:
                        guess = ids[j + 1]
                        break
            pred.append(guess)
        return _onehot_logits(pred)

    return fn


def test_score_needle_known_models():
    for kind in KINDS:
        for depth in (0, 50, 100):
            s = make_needle_sample(TOK, 1200, depth, kind, seed=3)
            r = score_needle(oracle_retriever, s)
            assert r["correct"] and r["token_accuracy"] == 1.0, (kind, depth)
            # A model that never retrieves (always predicts 'x') is never right.
            r0 = score_needle(lambda t: _onehot_logits([ord("x")] * t.shape[1]), s)
            assert not r0["correct"] and r0["token_accuracy"] == 0.0
            # Off by one (predicting the current token instead of the next) must fail: checks the shift.
            r1 = score_needle(lambda t: _onehot_logits(t[0].tolist()), s)
            assert not r1["correct"]
            # A logits_fn may return only the tail (memory at long S): same verdict.
            assert score_needle(lambda t: oracle_retriever(t)[:, -40:], s)["correct"]
    bad = make_needle_sample(TOK, 600, 50, "single", seed=3)
    with pytest.raises(ValueError, match="shape"):
        score_needle(lambda t: torch.zeros(1, 5, V), bad)


def test_needle_grid_matches_model_reach(tmp_path):
    # Passkey with a k-gram copier: full context retrieves everywhere; a 256-token window only when the
    # needle is within reach of the question (the needle-to-question distance is ~60 + 40 tokens).
    lengths, depths = [1024, 2048], [0, 50, 100]
    full = run_needle_grid(induction_model(None), TOK, lengths, depths, ("passkey",), n_per_cell=2, seed=1)
    assert full["kinds"]["passkey"]["accuracy"] == [[1.0] * 3, [1.0] * 3] and full["kinds"]["passkey"]["mean"] == 1.0
    local = run_needle_grid(induction_model(256), TOK, lengths, depths, ("passkey",), n_per_cell=2, seed=1)
    assert local["kinds"]["passkey"]["accuracy"] == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    assert len(local["cells"]) == 6 and {c["n"] for c in local["cells"]} == {2}
    both = run_needle_grid(oracle_retriever, TOK, [1024], [0, 100], ("single", "multikey", "multivalue"), seed=2)
    assert all(both["kinds"][k]["mean"] == 1.0 for k in ("single", "multikey", "multivalue"))
    p = write_json(local, str(tmp_path / "eval" / "needle.json"))
    assert json.load(open(p)) == local
    assert run_needle_grid(induction_model(None), TOK, [1024], [30], ("passkey",), seed=1) == \
        run_needle_grid(induction_model(None), TOK, [1024], [30], ("passkey",), seed=1)


# ----------------------------------------------------------------------------- LM losses

def test_trailing_and_positional_loss_hand_computed():
    S = 12

    def loss_fn(tokens, labels):  # loss at position i is i (+ the first token, to tell sequences apart)
        return torch.arange(S, dtype=torch.float32) + tokens[0].float()

    seqs = [{"tokens": torch.full((S,), 0), "labels": torch.zeros(S, dtype=torch.long)},
            {"tokens": torch.full((S,), 2), "labels": torch.zeros(S, dtype=torch.long),
             "loss_mask": torch.tensor([1.0] * 11 + [0.0])}]
    r = trailing_and_positional_loss(loss_fn, seqs, last_n=3, n_buckets=4)
    # seq 0: positions 9, 10, 11 -> 9, 10, 11; seq 1: positions 9, 10 (11 masked) -> 11, 12
    assert r["trailing_loss"] == pytest.approx((9 + 10 + 11 + 11 + 12) / 5) and r["trailing_tokens"] == 5
    assert r["per_sequence_trailing"] == pytest.approx([10.0, 11.5])
    assert r["buckets"]["start"] == [0, 3, 6, 9] and r["buckets"]["end"] == [3, 6, 9, 12]
    # bucket 0: seq0 0,1,2 and seq1 2,3,4 -> mean 2
    assert r["buckets"]["loss"] == pytest.approx([2.0, 5.0, 8.0, (9 + 10 + 11 + 11 + 12) / 5])
    assert r["buckets"]["tokens"] == [6, 6, 6, 5]
    total = sum(range(S)) + sum(i + 2 for i in range(11))
    assert r["mean_loss"] == pytest.approx(total / 23) and r["num_sequences"] == 2
    with pytest.raises(ValueError, match="last_n"):
        trailing_and_positional_loss(loss_fn, seqs, last_n=13)
    with pytest.raises(ValueError, match="same length"):
        trailing_and_positional_loss(loss_fn, [seqs[0], {"tokens": torch.zeros(5), "labels": torch.zeros(5)}], 2,
                                     n_buckets=4)


def test_per_token_loss_from_logits_raw_sequences():
    uniform = per_token_loss_from_logits(lambda t: torch.zeros(1, t.shape[1], V))
    r = trailing_and_positional_loss(uniform, [list(range(9)), list(range(1, 10))], last_n=4, n_buckets=2)
    assert r["trailing_loss"] == pytest.approx(math.log(V)) and r["seq_length"] == 8

    def perfect(t):  # knows the next token of an arithmetic sequence: t+1
        return _onehot_logits([(x + 1) % V for x in t[0].tolist()]) * 10

    r = trailing_and_positional_loss(per_token_loss_from_logits(perfect), [list(range(9))], last_n=4)
    assert r["trailing_loss"] < 1e-6


# ----------------------------------------------------------------------------- plots

def _check_png(path, min_w=200, min_h=150):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_w and im.size[1] >= min_h
    import matplotlib.image as mpimg

    assert mpimg.imread(path).ndim == 3


def test_plots_written_and_valid(tmp_path):
    runs = []
    for i, name in enumerate(("moba", "full", "hybrid")):
        d = tmp_path / name
        (d / "eval").mkdir(parents=True)
        with open(d / "metrics.jsonl", "w") as f:
            for step in range(1, 21):
                f.write(json.dumps({"step": step, "loss": 5.0 / step + i * 0.1, "tokens": step * 1024}) + "\n")
                if step % 10 == 0:
                    f.write(json.dumps({"step": step, "valid_loss": 5.0 / step + 0.2}) + "\n")
            f.write('{"step": 21, "loss": 0.1')  # torn last line (crash): skipped
        seqs = [list(range(65)) for _ in range(2)]
        loss = trailing_and_positional_loss(
            lambda t, l, i=i: torch.linspace(3, 2 - 0.1 * i, t.numel()), seqs, last_n=16, n_buckets=8)
        write_json(loss, str(d / "eval" / "eval_loss.json"))
        needle = run_needle_grid(induction_model(256 if name == "moba" else None), TOK, [1024, 2048], [0, 50, 100],
                                 ("passkey",), seed=1)
        write_json(needle, str(d / "needle.json"))
        runs.append(str(d))
    recs = plots.load_metrics(runs[0])
    assert len(recs) == 22 and recs[-1]["step"] == 20
    out = plots.plot_runs(runs, str(tmp_path / "figs"), x="tokens")
    assert sorted(os.path.basename(p) for p in out) == ["loss_curves.png", "needle_heatmaps.png",
                                                        "positional_loss.png", "trailing_loss.png"]
    for p in out:
        _check_png(p)
    # the individual functions, from data
    p = plots.plot_trailing_loss({"moba": 2.31, "full": 2.30}, str(tmp_path / "bars.png"))
    _check_png(p)
    with pytest.raises(FileNotFoundError, match="not found"):
        plots.plot_runs([str(tmp_path / "nope")], str(tmp_path / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to plot"):
        plots.plot_runs([str(tmp_path / "empty")], str(tmp_path / "x"))


# ----------------------------------------------------------------------------- CLI runners

def test_eval_command_runners(tmp_path):
    import argparse

    from moba_cp.eval import eval_command as cli

    assert parse_depths("0,10,...,100") == [float(x) for x in range(0, 101, 10)]
    assert parse_depths("0, 50,100") == [0.0, 50.0, 100.0]
    with pytest.raises(ValueError):
        parse_depths("0,120")
    out = str(tmp_path / "run" / "eval")
    args = cli.add_needle_arguments(argparse.ArgumentParser()).parse_args(
        ["--lengths", "1k", "--depths", "0,100", "--kinds", "single,passkey", "--n-per-cell", "1", "--out", out])
    res = cli.run_needle_eval(args, oracle_retriever, TOK, label="oracle", progress=None)
    assert res["kinds"]["single"]["mean"] == 1.0 and os.path.isfile(os.path.join(out, "needle.json"))
    _check_png(os.path.join(out, "needle_heatmap.png"))
    largs = cli.add_loss_arguments(argparse.ArgumentParser()).parse_args(
        ["--seq-len", "32", "--last", "8", "--num-seqs", "2", "--buckets", "4", "--out", out])
    seqs = [list(range(33))] * 3
    lres = cli.run_loss_eval(largs, per_token_loss_from_logits(lambda t: torch.zeros(1, t.shape[1], V)), seqs)
    assert lres["num_sequences"] == 2 and lres["trailing_loss"] == pytest.approx(math.log(V))
    # the run folder is now plottable
    written = plots.plot_runs([str(tmp_path / "run")], str(tmp_path / "figs"))
    assert {os.path.basename(p) for p in written} == {"positional_loss.png", "trailing_loss.png", "needle_heatmaps.png"}


def test_heldout_haystack_per_sample_and_never_mixed(tmp_path):
    """--haystack heldout: sample j of every cell sits in haystack j; a saved grid of one haystack is never
    resumed under the other; fillers and the flag must agree."""
    import argparse

    from moba_cp.eval import eval_command as cli

    fillers = [TOK.encode("alpha beta gamma. " * 8), TOK.encode("delta epsilon zeta. " * 8)]
    seen = []

    def recording(tokens):
        seen.append(TOK.decode(tokens[0].tolist()))
        return oracle_retriever(tokens)

    res = run_needle_grid(recording, TOK, [512], [0, 100], ("passkey",), n_per_cell=3, seed=1, fillers=fillers)
    assert res["kinds"]["passkey"]["mean"] == 1.0 and len(seen) == 6
    for cell in range(2):  # samples 0, 1, 2 of each cell: haystacks 0, 1, 0 (cycled); no passkey filler
        texts = seen[3 * cell:3 * cell + 3]
        assert [("alpha" in t, "delta" in t) for t in texts] == [(True, False), (False, True), (True, False)]
        assert not any("The grass is green" in t for t in texts)

    def parse(*flags):
        return cli.add_needle_arguments(argparse.ArgumentParser()).parse_args(
            ["--lengths", "512", "--depths", "0,100", "--kinds", "passkey", "--n-per-cell", "2",
             "--out", str(tmp_path / "eval"), *flags])

    calls = []

    def counting(tokens):
        calls.append(1)
        return oracle_retriever(tokens)

    held = cli.run_needle_eval(parse("--haystack", "heldout"), counting, TOK, progress=None, fillers=fillers)
    saved = json.load(open(tmp_path / "eval" / "needle.json"))
    assert held["haystack"] == saved["haystack"] == "heldout" and saved["identity"]["settings"]["haystack"] == "heldout"
    assert len(calls) == 4
    cli.run_needle_eval(parse("--haystack", "heldout"), counting, TOK, progress=None, fillers=fillers)
    assert len(calls) == 4  # same haystack and source: every cell taken from the saved grid
    plain = cli.run_needle_eval(parse(), counting, TOK, progress=None)
    assert len(calls) == 8 and plain["haystack"] == "passkey"  # the other haystack is measured anew
    with pytest.raises(ValueError, match="--haystack heldout needs held-out haystacks"):
        cli.run_needle_eval(parse("--haystack", "heldout"), counting, TOK, progress=None)
    with pytest.raises(ValueError, match="--haystack passkey needs no fillers"):
        cli.run_needle_eval(parse(), counting, TOK, progress=None, fillers=fillers)
    with pytest.raises(SystemExit):
        parse("--haystack", "essays")


def test_heldout_haystacks_are_heldout_documents_without_eod():
    from moba_cp.config import load_recipe
    from moba_cp.data.datasets import heldout_sequences
    from moba_cp.data.tokenizers import build_tokenizer
    from moba_cp.eval.eval_command import heldout_haystacks

    data = load_recipe(str(ROOT / "recipes" / "quickstart.yaml")).data
    tok = build_tokenizer(data.tokenizer)
    hay = heldout_haystacks(data, tok, 600, 3)
    docs = heldout_sequences(data, seq_length=600, num_sequences=3, tokenizer=tok,
                             builtin_budget_bytes=data.builtin_budget_bytes)
    assert len(hay) == 3 and len({tuple(h) for h in hay}) == 3
    for h, d in zip(hay, docs):
        assert int(tok.eod) not in h and h == [int(t) for t in d.tolist() if int(t) != int(tok.eod)]
        assert len(h) >= 500
