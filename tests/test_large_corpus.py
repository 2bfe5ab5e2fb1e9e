"""The large built-in corpus on a small synthetic tree: deterministic, deduplicated, the skip rules,
a held-out split by document hash that is disjoint from training and stable when other packages
come and go, the fingerprint cache, and the datasets / held-out sequences built on it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moba_cp.config import DataConfig
from moba_cp.data import large_corpus as lc
from moba_cp.data.tokenizers import ByteTokenizer


def _write(path, text, newline="\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline=newline) as f:
        f.write(text)


def _tree(tmp_path, n_pkgs=24):
    """A stand-in 'stdlib' and 'site-packages': packages of distinct text, a vendored duplicate (CRLF,
    trailing spaces), metadata, an editable-install hook and a tests dir (all skipped)."""
    std, site = str(tmp_path / "std"), str(tmp_path / "site")
    for i in range(n_pkgs):
        body = "".join(f"def f_{i}_{j}(x):\n    return x * {i} + {j}  # package {i}\n" for j in range(200))
        _write(f"{std if i % 2 else site}/pkg{i:02d}/__init__.py", body)
    shared = "".join(f"VENDORED_{j} = {j}\n" for j in range(300))
    _write(f"{site}/tool/_vendor/six.py", shared)
    _write(f"{site}/other/_vendor/six.py", shared.replace("\n", "  \n"), newline="\r\n")  # same text, normalised
    _write(f"{site}/tool-1.0.dist-info/LICENSE.txt", "METADATA_TEXT\n" * 50)
    _write(f"{site}/__editable___tool_finder.py", "EDITABLE_HOOK = '/home/someone'\n" * 50)
    _write(f"{site}/pkg00/tests/test_a.py", "TEST_TEXT\n" * 50)
    _write(f"{std}/README.md", "# readme\n" + "words of the readme\n" * 100)
    return [("stdlib", std), ("site0", site)]


def _all_text(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    out = [bytes(np.asarray(ds[i], dtype=np.uint8)[:-1]).decode() for i in range(len(ds))]  # drop the EOD
    del ds
    return out


def test_large_corpus_is_deterministic_deduplicated_and_split_disjoint(tmp_path):
    roots = _tree(tmp_path)
    a = lc.ensure_large_corpus(str(tmp_path / "c1"), "byte", heldout_fraction=0.3, roots=roots, verbose=False)
    b = lc.ensure_large_corpus(str(tmp_path / "c2"), "byte", heldout_fraction=0.3, roots=roots, verbose=False)
    assert a.name == b.name
    for x, y in ((a.train_prefix, b.train_prefix), (a.heldout_prefix, b.heldout_prefix)):
        assert open(x + ".bin", "rb").read() == open(y + ".bin", "rb").read()
    man = a.manifest
    train, held = set(man["train"]["names"]), set(man["heldout"]["names"])
    assert train and held and not train & held  # disjoint by document
    train_text, held_text = _all_text(a.train_prefix), _all_text(a.heldout_prefix)
    assert len(train_text) == man["train"]["documents"] and len(held_text) == man["heldout"]["documents"]
    assert not set(train_text) & set(held_text)  # disjoint by content
    docs, stats = lc.collect_large_documents(roots)
    assert {d.name for d in docs} == train | held
    for d in docs:
        assert lc.is_heldout(d, 0.3) == (d.name in held)  # the split is the documents' own hash
    everything = "\n".join(train_text + held_text)
    assert everything.count("VENDORED_299 = 299") == 1 and man["duplicates"] == 1  # one copy of the vendored file
    for skipped in ("METADATA_TEXT", "EDITABLE_HOOK", "TEST_TEXT"):
        assert skipped not in everything
    assert [r["label"] for r in man["roots"]] == ["stdlib", "site0"]
    assert json.load(open(os.path.join(str(tmp_path / "c1"), "builtin", a.name + ".json")))["hash"] == man["hash"]


def test_heldout_membership_does_not_depend_on_other_packages(tmp_path):
    roots = _tree(tmp_path)
    before = {d.name: lc.is_heldout(d, 0.3) for d in lc.collect_large_documents(roots)[0]}
    _write(str(tmp_path / "site" / "newpkg" / "__init__.py"), "NEW = 1\n" * 3000)  # a package is installed
    after = {d.name: lc.is_heldout(d, 0.3) for d in lc.collect_large_documents(roots)[0]}
    assert "site0/newpkg/#0" in after
    assert all(after[n] == before[n] for n in before)


def test_large_corpus_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    roots = _tree(tmp_path)
    cache = str(tmp_path / "c")
    first = lc.ensure_large_corpus(cache, "byte", heldout_fraction=0.3, roots=roots, verbose=False)
    calls = []
    real = lc.write_indexed_dataset
    monkeypatch.setattr(lc, "write_indexed_dataset", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(lc, "collect_large_documents", lambda *a, **k: pytest.fail("files were read again"))
    assert lc.ensure_large_corpus(cache, "byte", heldout_fraction=0.3, roots=roots, verbose=False).name == first.name
    assert not calls
    monkeypatch.undo()
    _write(str(tmp_path / "std" / "pkg01" / "__init__.py"), "CHANGED = 1\n" * 2000)
    assert lc.ensure_large_corpus(cache, "byte", heldout_fraction=0.3, roots=roots, verbose=False).name != first.name
    with pytest.raises(RuntimeError, match="both need at least one"):
        lc.ensure_large_corpus(str(tmp_path / "d"), "byte", heldout_fraction=1e-9, roots=roots, verbose=False)


def test_datasets_on_the_large_corpus_validate_on_heldout_documents(tmp_path, monkeypatch, capsys):
    from moba_cp.data.datasets import build_train_valid_datasets, corpus_record, heldout_sequences

    roots = _tree(tmp_path)
    monkeypatch.setattr(lc, "source_roots", lambda: roots)
    cfg = DataConfig(source="builtin", builtin_corpus="large", builtin_heldout_fraction=0.3,
                     cache_dir=str(tmp_path / "cache"))
    corpus = lc.ensure_large_corpus(cfg.cache_dir, "byte", heldout_fraction=0.3, verbose=False)
    held = "\n".join(_all_text(corpus.heldout_prefix))
    train, valid = build_train_valid_datasets(cfg, seq_length=256, seed=1, num_train_samples=20, num_valid_samples=8,
                                              tokenizer=ByteTokenizer())
    assert "[data] corpus large-" in capsys.readouterr().out
    tok = ByteTokenizer()
    for i in range(len(valid)):
        text = bytes(t for t in valid[i]["tokens"].tolist() if t < 256).decode(errors="replace")
        piece = max(text.split("\n"), key=len)
        assert piece in held
    rec = corpus_record(cfg, tokenizer=tok, seq_length=256, num_train_samples=20)
    assert rec["heldout_documents"] == corpus.manifest["heldout"]["documents"] and 0 < rec["epochs"] < 1
    seqs = heldout_sequences(cfg, seq_length=1024, num_sequences=3, tokenizer=tok)
    assert len(seqs) >= 1 and all(len(s) == 1025 for s in seqs)
    assert all(bytes(s.tolist()[:200]).decode() in held for s in seqs)
