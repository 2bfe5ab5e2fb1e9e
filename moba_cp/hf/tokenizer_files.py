"""Tokenizer files of an exported model: a HuggingFace ``tokenizers`` JSON plus what AutoTokenizer reads.

For a model trained with moba_cp's built-in :class:`~moba_cp.data.tokenizers.ByteTokenizer`, the
JSON is built here as its exact equivalent: a byte-level pre-tokenizer (every UTF-8 byte its own
piece), a BPE model without merges whose vocabulary maps byte ``b`` to id ``b``, the special
tokens ``<|eod|>`` 256, ``<|pad|>`` 257, ``<|bos|>`` 258, ``<|sep|>`` 259 and placeholders up to
the padded vocabulary (384), and a byte-level decoder (invalid UTF-8 becomes U+FFFD, as in
``ByteTokenizer.decode``). One difference: the HF tokenizer parses the special tokens' text
(``"<|eod|>"``) as that token, moba_cp's encodes it as bytes. A model trained with a
``tokenizer.json`` gets that file copied.

``moba_cp_tokenizer.json`` records which moba_cp tokenizer the model was trained with, so
``moba-cp eval needle --generate`` on an exported directory builds the same prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moba_cp.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = ["write_tokenizer_files", "byte_tokenizer_json", "moba_tokenizer_of", "MOBA_TOKENIZER_FILE"]

MOBA_TOKENIZER_FILE = "moba_cp_tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _special_name(tok: ByteTokenizer, i: int) -> str:
    k = i - 256
    return f"<|{tok.SPECIALS[k]}|>" if 0 <= k < len(tok.SPECIALS) else f"<|{i}|>"


def byte_tokenizer_json(tok: ByteTokenizer) -> dict:
    """The ``tokenizers`` JSON equivalent of ``tok`` (see the module docstring)."""
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    added = [{"id": i, "content": _special_name(tok, i), "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in range(256, tok.vocab_size)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def write_tokenizer_files(tokenizer, out: Path, spec: str) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
    :data:`MOBA_TOKENIZER_FILE` for the moba_cp ``tokenizer`` built from recipe value ``spec``."""
    out = Path(out)
    if isinstance(tokenizer, ByteTokenizer):
        (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(tokenizer), ensure_ascii=False))
        names = {"eos_token": "<|eod|>", "pad_token": "<|pad|>", "bos_token": "<|bos|>"}
        moba = {"tokenizer": "byte"}
    elif isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, out / "tokenizer.json")
        vocab = {i: t for t, i in tokenizer._tok.get_vocab(with_added_tokens=True).items()}
        names = {"eos_token": vocab[tokenizer.eod]}
        if tokenizer.pad is not None:
            names["pad_token"] = vocab[tokenizer.pad]
        moba = {"tokenizer": "tokenizer.json", "sha256": tokenizer.sha256}
    else:
        raise TypeError(f"cannot export tokenizer {tokenizer!r} (recipe data.tokenizer={spec!r})")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
         "clean_up_tokenization_spaces": False, **names}, indent=1))
    (out / MOBA_TOKENIZER_FILE).write_text(json.dumps(moba, indent=1))


def moba_tokenizer_of(export_dir: str | Path):
    """The moba_cp tokenizer an exported model was trained with (from :data:`MOBA_TOKENIZER_FILE`)."""
    d = Path(export_dir)
    spec = json.loads((d / MOBA_TOKENIZER_FILE).read_text())["tokenizer"]
    return build_tokenizer("byte" if spec == "byte" else str(d / spec))
