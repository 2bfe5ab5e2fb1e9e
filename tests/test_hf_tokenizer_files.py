"""Tokenizer files of an export: the byte tokenizer's HF equivalent, and a model trained with a
tokenizers JSON gets that file (and moba_cp rebuilds the same tokenizer from the export)."""

import json

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers", reason="the 'export' extra is not installed")

from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from moba_cp.data.tokenizers import ByteTokenizer, HFTokenizer  # noqa: E402
from moba_cp.hf.tokenizer_files import moba_tokenizer_of, write_tokenizer_files  # noqa: E402


def test_byte_tokenizer_export_round_trips(tmp_path):
    ref = ByteTokenizer()
    write_tokenizer_files(ref, tmp_path, "byte")
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "The pass key is 71432.\n\t héllo ✓ 日本 " + "".join(map(chr, range(32, 127)))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ref.encode(text) and tok.decode(ids) == text
    assert tok.decode([104, 256, 105, 300]) == ref.decode([104, 256, 105, 300]) == "h<|eod|>i<|300|>"
    assert tok.decode([0xE2, 0x9C]) == ref.decode([0xE2, 0x9C])  # a cut UTF-8 sequence: U+FFFD alike
    assert isinstance(moba_tokenizer_of(tmp_path), ByteTokenizer)


def test_hf_tokenizer_json_is_copied_and_rebuilt(tmp_path):
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["the pass key is 12345, remember it"] * 20,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<|endoftext|>", "<pad>"]))
    src = tmp_path / "src.json"
    bpe.save(str(src))
    trained = HFTokenizer(str(src))
    out = tmp_path / "export"
    out.mkdir()
    write_tokenizer_files(trained, out, str(src))
    assert (out / "tokenizer.json").read_bytes() == src.read_bytes()
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {"eos_token": "<|endoftext|>", "pad_token": "<pad>"}
    rebuilt = moba_tokenizer_of(out)
    assert (rebuilt.sha256, rebuilt.eod, rebuilt.pad) == (trained.sha256, trained.eod, trained.pad)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("the pass key", add_special_tokens=False)["input_ids"] == trained.encode("the pass key")
    assert tok.eos_token_id == trained.eod
