"""Data pipeline: tokenizers, prepare-data, the builtin corpus, Megatron datasets, retrieval mixture."""

import json
import multiprocessing as mp
import os
import sys
import types

import numpy as np
import pytest
import torch

from moba_cp.config import DataConfig
from moba_cp.data import builtin_corpus as bc
from moba_cp.data.datasets import (DataConfigError, RetrievalMixtureDataset, build_train_valid_datasets, parse_blend,
                                   validate_data_paths)
from moba_cp.data.prepare import DataPrepError, add_arguments, prepare_data, run
from moba_cp.data.tokenizers import ByteTokenizer, HFTokenizer, TokenizerError, build_tokenizer


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _docs(prefix):
    """Copies of every document: arrays from IndexedDataset view its mmap, which Megatron closes
    when the dataset object is collected (reading them afterwards segfaults)."""
    ds = _indexed(prefix)
    return [np.array(ds[i]) for i in range(len(ds))]


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_roundtrip_and_specials():
    tok = build_tokenizer("byte")
    text = "héllo wörld\n\tλ → 🚀 ascii"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 384 and tok.vocab_size % 128 == 0
    assert len({tok.eod, tok.pad, tok.bos, tok.sep}) == 4 and min(tok.eod, tok.pad) >= 256
    assert tok.decode([104, 105, tok.eod]) == "hi<|eod|>"
    assert tok.encode_np(text).tolist() == ids


def test_hf_tokenizer_missing_file_and_package(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        build_tokenizer("gpt2")
    f = tmp_path / "tok.json"
    f.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        build_tokenizer(str(f))


def test_hf_tokenizer_wrapper_with_stub_library(tmp_path, monkeypatch):
    # The real package may be absent here; a stub with the same API checks the wrapper's logic.
    vocab = {"a": 0, "b": 1, " ": 2, "<|endoftext|>": 3, "<pad>": 4}
    inv = {v: k for k, v in vocab.items()}

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    class _Tok:
        @staticmethod
        def from_file(path):
            return _Tok()

        def get_vocab(self, with_added_tokens=True):
            return dict(vocab)

        def get_vocab_size(self, with_added_tokens=True):
            return len(vocab)

        def encode(self, text, add_special_tokens=True):
            return _Enc([vocab[c] for c in text])

        def decode(self, ids):
            return "".join(inv[i] for i in ids)

    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=_Tok))
    f = tmp_path / "tok.json"
    f.write_text('{"stub": 1}')
    tok = build_tokenizer(str(f))
    assert isinstance(tok, HFTokenizer)
    assert (tok.eod, tok.pad, tok.vocab_size) == (3, 4, 5)
    assert tok.encode("ab ba") == [0, 1, 2, 1, 0] and tok.decode([0, 1, 2, 1, 0]) == "ab ba"
    assert tok.unique_identifiers["sha256"] != ByteTokenizer().unique_identifiers.get("sha256")


# ----------------------------------------------------------------------------- prepare-data

def test_prepare_data_builds_readable_dataset(tmp_path, capsys):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second document")
    (d / "a.txt").write_text("first document, ünïcode")
    (d / "sub" / "c.md").write_text("part one\n===\npart two")
    (d / "tiny.txt").write_text("x")
    (d / "blob.bin").write_bytes(b"\x00\x01binary")  # not a text extension: ignored
    (d / "bin.txt").write_bytes(b"\x00\x01binary")    # text extension but binary: skipped
    out = str(tmp_path / "out" / "corpus")
    st = prepare_data([str(d)], out, "byte", min_doc_chars=2)
    assert st.documents == 3 and st.skipped_short == 1 and st.skipped_binary == 1
    ds = _indexed(out)
    tok = ByteTokenizer()
    texts = ["first document, ünïcode", "second document", "part one\n===\npart two"]  # sorted path order
    assert len(ds) == 3
    for i, t in enumerate(texts):
        arr = ds[i]
        assert arr[-1] == tok.eod and tok.decode(arr[:-1].tolist()) == t
    assert ds[0].dtype == np.uint16
    assert st.tokens == sum(len(t.encode()) + 1 for t in texts)
    assert "docs" in capsys.readouterr().out  # progress line printed
    # separator splits files into documents; globs work; deterministic bytes
    out2 = str(tmp_path / "sep")
    st2 = prepare_data([str(d / "sub" / "*.md")], out2, "byte", separator="\n===\n")
    assert st2.documents == 2 and ByteTokenizer().decode(_docs(out2)[1][:-1].tolist()) == "part two"
    out3 = str(tmp_path / "again")
    prepare_data([str(d)], out3, "byte", min_doc_chars=2)
    for ext in (".bin", ".idx"):
        assert open(out + ext, "rb").read() == open(out3 + ext, "rb").read()
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p]


def test_prepare_data_errors(tmp_path, capsys):
    with pytest.raises(DataPrepError, match="not found"):
        prepare_data([str(tmp_path / "missing.txt")], str(tmp_path / "o"))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataPrepError, match="no text found"):
        prepare_data([str(tmp_path / "empty.txt")], str(tmp_path / "o"))
    assert not os.path.exists(str(tmp_path / "o") + ".bin")
    import argparse

    args = add_arguments(argparse.ArgumentParser()).parse_args([str(tmp_path / "nothing*"), "--output", "x"])
    assert run(args) == 2 and "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- builtin corpus

def _fake_stdlib(root, n_mods=12):
    """A tiny stand-in for a stdlib tree (packages, small and big modules, a test dir to skip)."""
    os.makedirs(os.path.join(root, "pkg", "sub"))
    os.makedirs(os.path.join(root, "test"))
    os.makedirs(os.path.join(root, "site-packages"))
    for i in range(n_mods):
        with open(os.path.join(root, f"mod{i:02d}.py"), "w") as f:
            f.write(f"# module {i}\n" + "def f():\n    return 1\n" * (50 * (i + 1)))
    for name in ("__init__.py", "core.py", "sub/x.py"):
        with open(os.path.join(root, "pkg", name), "w") as f:
            f.write(f"'''{name}'''\n" + "x = 1\n" * 3000)
    with open(os.path.join(root, "pkg", "README.txt"), "w") as f:
        f.write("docs of pkg\n" * 100)
    with open(os.path.join(root, "test", "test_x.py"), "w") as f:
        f.write("SKIPPED_TEST_TEXT\n")
    with open(os.path.join(root, "site-packages", "y.py"), "w") as f:
        f.write("SKIPPED_SITE_TEXT\n")


def test_builtin_corpus_documents_and_determinism(tmp_path):
    root = str(tmp_path / "lib")
    _fake_stdlib(root)
    docs = bc.collect_documents(root, min_doc_bytes=4000, max_doc_bytes=30000)
    names = [d.name for d in docs]
    assert "pkg/#0" in names and not any("SKIPPED" in d.text for d in docs)
    pkg = [d for d in docs if d.name.startswith("pkg/#")]
    assert len(pkg) >= 2 and all(len(d.text.encode()) <= 30000 for d in pkg)  # cut at file boundaries
    assert all(d.text.startswith("# ===== file: pkg/") for d in pkg)
    joined = "\n".join(d.text for d in pkg)
    for f in ("README.txt", "__init__.py", "core.py", "sub/x.py"):
        assert joined.count(f"# ===== file: pkg/{f} =====") == 1
    merged = [d for d in docs if "+" in d.name]  # small modules concatenated
    assert merged and all(len(d.text.encode()) >= 4000 for d in merged[:-1])
    p1 = bc.ensure_builtin_corpus(str(tmp_path / "c1"), "byte", budget_bytes=60000, root=root, verbose=False)
    p2 = bc.ensure_builtin_corpus(str(tmp_path / "c2"), "byte", budget_bytes=60000, root=root, verbose=False)
    assert os.path.basename(p1) == os.path.basename(p2)  # same content hash
    assert open(p1 + ".bin", "rb").read() == open(p2 + ".bin", "rb").read()
    man = json.load(open(p1 + ".json"))
    assert sum(man["doc_bytes"]) <= 60000 and man["documents"] == len(_indexed(p1))
    p3 = bc.ensure_builtin_corpus(str(tmp_path / "c1"), "byte", budget_bytes=30000, root=root, verbose=False)
    assert p3 != p1  # budget is part of the hash


def test_builtin_corpus_real_stdlib_has_long_documents(tmp_path):
    p = bc.ensure_builtin_corpus(str(tmp_path), "byte", budget_bytes=1_000_000, verbose=False)
    man = json.load(open(p + ".json"))
    assert 0 < sum(man["doc_bytes"]) <= 1_000_000
    assert np.median(man["doc_bytes"]) >= 10_000  # long documents for long-context training
    assert p == bc.ensure_builtin_corpus(str(tmp_path), "byte", budget_bytes=1_000_000, verbose=False)


def _child(cache, root, barrier, q):
    barrier.wait()
    q.put(bc.ensure_builtin_corpus(cache, "byte", budget_bytes=60000, root=root, verbose=False))


def test_builtin_corpus_concurrent_callers(tmp_path, monkeypatch):
    root, cache = str(tmp_path / "lib"), str(tmp_path / "cache")
    _fake_stdlib(root)
    ctx = mp.get_context("fork")
    builds = ctx.Value("i", 0)
    real = bc.write_indexed_dataset

    def counting(*a, **k):
        with builds.get_lock():
            builds.value += 1
        return real(*a, **k)

    monkeypatch.setattr(bc, "write_indexed_dataset", counting)
    n = 4
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(cache, root, barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    prefixes = {q.get(timeout=5) for _ in range(n)}
    assert len(prefixes) == 1 and builds.value == 1
    prefix = prefixes.pop()
    assert len(_indexed(prefix)) > 0
    assert not [f for f in os.listdir(os.path.dirname(prefix)) if ".tmp-" in f]


# ----------------------------------------------------------------------------- datasets

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    _fake_stdlib(str(root), n_mods=30)
    out = tmp_path_factory.mktemp("data")
    prefix = str(out / "fake")
    prepare_data([str(root)], prefix, "byte", stream=open(os.devnull, "w"))
    return prefix, str(out)


def test_datasets_shapes_and_determinism(small_corpus):
    prefix, cache = small_corpus
    cfg = DataConfig(source="indexed", paths=[prefix], cache_dir=cache, split="90,10,0")
    tr, va = build_train_valid_datasets(cfg, seq_length=256, seed=7, num_train_samples=40, num_valid_samples=4,
                                        tokenizer=ByteTokenizer())
    assert len(tr) >= 40 and va is not None and len(va) >= 4
    item = tr[3]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    for k in item:
        assert item[k].shape == (256,)
    assert item["tokens"].dtype == torch.long and item["loss_mask"].dtype == torch.float32
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert torch.equal(item["position_ids"], torch.arange(256))
    tr2, _ = build_train_valid_datasets(cfg, seq_length=256, seed=7, num_train_samples=40, num_valid_samples=4,
                                        tokenizer=ByteTokenizer())
    for i in (0, 5, 17):
        assert torch.equal(tr[i]["tokens"], tr2[i]["tokens"])
    tr3, _ = build_train_valid_datasets(cfg, seq_length=256, seed=8, num_train_samples=40, num_valid_samples=4,
                                        tokenizer=ByteTokenizer())
    assert any(not torch.equal(tr[i]["tokens"], tr3[i]["tokens"]) for i in range(5))  # seed changes order
    # weighted blend of two prefixes, no validation
    cfg_b = DataConfig(source="indexed", paths=["0.3", prefix, "0.7", prefix], cache_dir=cache, split="90,10,0")
    trb, vab = build_train_valid_datasets(cfg_b, seq_length=128, seed=1, num_train_samples=30, num_valid_samples=0,
                                          tokenizer=ByteTokenizer())
    assert len(trb) == 30 and vab is None and trb[29]["tokens"].shape == (128,)


def test_mock_source_and_mixture(small_corpus):
    _, cache = small_corpus
    tok = ByteTokenizer()
    cfg = DataConfig(source="mock", cache_dir=cache, retrieval_fraction=0.5)
    tr, _ = build_train_valid_datasets(cfg, seq_length=512, seed=3, num_train_samples=64, num_valid_samples=0,
                                       tokenizer=tok)
    assert isinstance(tr, RetrievalMixtureDataset)
    flags = [tr.is_retrieval(i) for i in range(400)]
    assert 0.4 < sum(flags) / 400 < 0.6  # the stated fraction, deterministically
    i = flags.index(True)
    a, b = tr[i], tr[i]
    assert all(torch.equal(a[k], b[k]) for k in a) and a["tokens"].shape == (512,)
    assert torch.equal(a["tokens"][1:], a["labels"][:-1]) and a["loss_mask"].sum() == 512
    assert "pass key" in tok.decode(a["labels"].tolist()) or "magic number" in tok.decode(a["labels"].tolist())
    # answer-only loss mask covers exactly the answer at the end of labels
    ans = RetrievalMixtureDataset(tr.base, tok, 1.0, 512, 3, kinds=("single",), loss_on="answer")[0]
    m = ans["loss_mask"].bool()
    assert m.sum() == 7 and m[-7:].all() and tok.decode(ans["labels"][m].tolist()).isdigit()
    short = RetrievalMixtureDataset(tr.base, tok, 0.5, 400, 3)
    assert short.kinds == ("passkey",)  # the longer kinds do not fit 400 tokens
    with pytest.raises(DataConfigError, match="too short for retrieval"):
        RetrievalMixtureDataset(tr.base, tok, 0.5, 64, 3)
    j = flags.index(False)
    assert torch.equal(tr[j]["tokens"], tr.base[j]["tokens"])


def test_bad_paths_fail_clearly(tmp_path, small_corpus):
    prefix, _ = small_corpus
    bad = DataConfig(source="indexed", paths=[str(tmp_path / "nope")], cache_dir=str(tmp_path))
    with pytest.raises(DataConfigError, match="missing .*nope.bin.*moba-cp prepare-data"):
        validate_data_paths(bad)
    with pytest.raises(DataConfigError, match="missing"):
        build_train_valid_datasets(bad, seq_length=64, seed=0, num_train_samples=1, num_valid_samples=0)
    with pytest.raises(DataConfigError, match="without .bin/.idx|missing"):
        validate_data_paths(DataConfig(source="indexed", paths=[prefix + ".bin.x"], cache_dir=str(tmp_path)))
    with pytest.raises(DataConfigError, match="data.tokenizer"):
        validate_data_paths(DataConfig(source="builtin", tokenizer="missing/tok.json", cache_dir=str(tmp_path)))
    with pytest.raises(DataConfigError, match="data.split"):
        validate_data_paths(DataConfig(source="mock", split="a,b"))
    with pytest.raises(DataConfigError, match="pairs"):
        parse_blend(["0.5", prefix, prefix])
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, definitely not" * 2)
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(DataConfigError, match="bad header"):
        validate_data_paths(DataConfig(source="indexed", paths=[str(tmp_path / "junk")], cache_dir=str(tmp_path)))
    assert parse_blend([prefix + ".bin"]) == ([prefix], None)
    # A split that leaves validation without documents: Megatron would loop forever; we raise.
    few = str(tmp_path / "few")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.txt").write_text("a" * 500)
    (tmp_path / "two" / "b.txt").write_text("b" * 500)
    prepare_data([str(tmp_path / "two")], few, "byte", stream=open(os.devnull, "w"))
    with pytest.raises(DataConfigError, match="valid split no documents.*eval.interval=0"):
        build_train_valid_datasets(DataConfig(source="indexed", paths=[few], cache_dir=str(tmp_path), split="80,20,0"),
                                   seq_length=64, seed=0, num_train_samples=4, num_valid_samples=2)
    tr, va = build_train_valid_datasets(DataConfig(source="indexed", paths=[few], cache_dir=str(tmp_path),
                                                   split="80,20,0"), seq_length=64, seed=0, num_train_samples=4,
                                        num_valid_samples=0)
    assert va is None and len(tr) >= 4
    with pytest.raises(DataConfigError, match="test split no documents.*nonzero weight"):  # would hang too
        build_train_valid_datasets(DataConfig(source="indexed", paths=["1", few], cache_dir=str(tmp_path),
                                              split="90,0,10"), seq_length=64, seed=0, num_train_samples=4,
                                   num_valid_samples=0)
    validate_data_paths(DataConfig(source="indexed", paths=["1", prefix], cache_dir=str(tmp_path)))  # fine


def test_training_sample_order_resume_and_dp():
    """The loop's sampler: sample indices are a function of the step (so a resumed run continues
    exactly), split into contiguous micro-batches per data-parallel rank."""
    from moba_cp.train.batches import microbatch_indices

    # global batch 4, micro-batch 2, one dp rank: two micro-batches per step, in order
    full = [mb for step in range(5) for mb in microbatch_indices(step, 4, 2, 1, 0)]
    assert full[0] == [0, 1] and len(full) == 10
    assert [x for mb in full for x in mb] == list(range(20))
    # resume at step 1 with dp=2: each rank one micro-batch per step, ranks interleaved
    r0 = [mb for step in range(1, 5) for mb in microbatch_indices(step, 4, 2, 2, 0)]
    r1 = [mb for step in range(1, 5) for mb in microbatch_indices(step, 4, 2, 2, 1)]
    assert r0[0] == [4, 5] and r1[0] == [6, 7] and len(r0) == len(r1) == 4
    assert sorted(x for b in r0 + r1 for x in b) == list(range(4, 20))


def test_heldout_sequences(small_corpus, tmp_path):
    from moba_cp.data.datasets import heldout_sequences

    prefix, cache = small_corpus
    cfg = DataConfig(source="indexed", paths=[prefix], cache_dir=cache, split="50,50,0")
    seqs = heldout_sequences(cfg, seq_length=1000, num_sequences=3)
    assert 1 <= len(seqs) <= 3 and all(s.shape == (1001,) and s.dtype == torch.long for s in seqs)
    assert all(ByteTokenizer().eod not in s.tolist() for s in seqs)  # one document each
    with pytest.raises(DataConfigError, match="no held-out document"):
        heldout_sequences(cfg, seq_length=10**7, num_sequences=1)
    b = heldout_sequences(DataConfig(source="builtin", cache_dir=str(tmp_path)), seq_length=4096, num_sequences=2)
    assert len(b) == 2 and b[0].shape == (4097,)
    m = heldout_sequences(DataConfig(source="mock"), seq_length=64, num_sequences=2)
    assert len(m) == 2 and m[0].shape == (65,)


def _dist_build(rank, world_size, cache, root):
    # Every rank builds the corpus and the datasets at once, as the training loop does.
    import moba_cp.data.builtin_corpus as bcm

    real = bcm.collect_documents
    bcm.collect_documents = lambda r=None, **k: real(root, **k)  # a tiny stdlib stand-in, for speed
    cfg = DataConfig(source="builtin", cache_dir=cache, split="50,50,0", retrieval_fraction=0.25)
    tr, va = build_train_valid_datasets(cfg, seq_length=512, seed=5, num_train_samples=16, num_valid_samples=2,
                                        tokenizer=ByteTokenizer(), builtin_budget_bytes=60000)
    return [tr[i]["tokens"] for i in range(8)], va[0]["tokens"]


def test_datasets_under_torch_distributed(tmp_path):
    from tests.distributed_harness import run_distributed

    root = str(tmp_path / "lib")
    _fake_stdlib(root)
    out = run_distributed(_dist_build, world_size=2, args=(str(tmp_path / "cache"), root), timeout=120)
    (a, va), (b, vb) = out
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(va, vb)  # identical on every rank


def test_host_batch_is_the_cp_shard_of_the_stacked_samples(monkeypatch):
    # what a rank copies to its GPU: its zigzag shard, cut on the host (the shard of the whole
    # stacked batch, as Megatron's get_batch_on_this_cp_rank cuts it on the device), int64 ids
    from moba_cp.parallel.zigzag import zigzag_shard
    from moba_cp.train.batches import BATCH_KEYS, collate, host_batch, to_device
    from tests.test_cp_zigzag import _FakeGroup  # a CP group's rank and size, no process group

    S = 16
    ds = [{"tokens": np.arange(i, i + S, dtype=np.int32), "labels": np.arange(i + 1, i + S + 1, dtype=np.int32),
           "loss_mask": np.linspace(0, 1, S, dtype=np.float32), "position_ids": np.arange(S, dtype=np.int32)}
          for i in range(0, 500, 100)]
    idx = [3, 1, 4]
    whole = {k: torch.stack([torch.as_tensor(ds[i][k]) for i in idx]) for k in BATCH_KEYS}
    for cp in (2, 4):
        for r in range(cp):
            b = host_batch(ds, idx, cp_group=_FakeGroup(r, cp))
            assert set(b) == set(BATCH_KEYS)
            for k in BATCH_KEYS:
                want = zigzag_shard(whole[k], r, cp, seq_dim=1)
                assert b[k].shape == (3, S // cp) and torch.equal(b[k].to(want.dtype), want), (cp, r, k)
            assert all(b[k].dtype == torch.int64 for k in ("tokens", "labels", "position_ids"))
            assert b["loss_mask"].dtype == torch.float32
    # one process (cp 1): the batch as stacked; collate = host_batch moved to the device
    b = host_batch(ds, idx, cp_group=_FakeGroup(0, 1))
    assert torch.equal(b["tokens"], whole["tokens"].long())
    moved = to_device(b, torch.device("cpu"))
    assert all(torch.equal(moved[k], b[k]) for k in BATCH_KEYS)
    import moba_cp.train.batches as batches

    orig = batches.shard_batch_for_cp  # collate reads Megatron's CP group: one of size 1 here
    monkeypatch.setattr(batches, "shard_batch_for_cp", lambda batch, cp_group=None: orig(batch, _FakeGroup(0, 1)))
    c = collate(ds, idx, torch.device("cpu"))
    assert all(torch.equal(c[k], b[k]) for k in BATCH_KEYS)
