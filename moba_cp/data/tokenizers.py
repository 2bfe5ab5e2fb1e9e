"""Tokenizers: a built-in byte-level one, and a wrapper for a HuggingFace ``tokenizers`` JSON.

Both share one small interface (``encode``, ``decode``, ``vocab_size``, ``eod``, ``pad``) and
also carry what Megatron-Core's ``GPTDatasetConfig`` reads from its ``tokenizer`` field:
``vocab_size`` (chooses the on-disk token dtype), ``eod`` (end-of-document id), ``pad`` (masked
out of the loss) and ``unique_identifiers`` (a JSON-serialisable dict hashed into the dataset
index-cache key, so a different tokenizer never reuses a stale cache).

Example:
    >>> tok = build_tokenizer("byte")
    >>> tok.decode(tok.encode("héllo")) == "héllo"
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "build_tokenizer", "pad_vocab_size", "TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer spec is unusable (missing file, missing package, no end-of-document token)."""


def pad_vocab_size(n: int, multiple: int = 128) -> int:
    """Round a vocabulary size up to a multiple (efficient embedding / output GEMMs)."""
    return ((n + multiple - 1) // multiple) * multiple


class _TokenizerBase:
    """Shared helpers; subclasses define ``encode``/``decode`` and the special ids."""

    eod: int
    pad: int | None
    vocab_size: int

    # Megatron's MegatronDataset looks these up; aliases keep its pad-collision check meaningful.
    @property
    def eos(self) -> int:
        return self.eod

    def tokenize(self, text: str) -> list[int]:
        """Alias of :meth:`encode` (the Megatron tokenizer method name)."""
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Alias of :meth:`decode` (the Megatron tokenizer method name)."""
        return self.decode(ids)

    @property
    def special_tokens_dict(self) -> dict[str, int]:
        d = {"eod_token": self.eod}
        if self.pad is not None:
            d["pad_token"] = self.pad
        return d


class ByteTokenizer(_TokenizerBase):
    """UTF-8 bytes as tokens 0..255, then special tokens; vocabulary padded to 384 (3 * 128).

    Special ids: ``eod`` = 256 (end of document), ``pad`` = 257, ``bos`` = 258, ``sep`` = 259.
    Retrieval prompts are plain text, so no further special tokens are needed. ``decode`` renders
    special ids as ``<|eod|>``-style names (they are not parsed back by ``encode``: plain text in,
    bytes out) and undecodable byte runs as U+FFFD.
    """

    SPECIALS = ("eod", "pad", "bos", "sep")
    name = "byte"

    def __init__(self) -> None:
        self.eod, self.pad, self.bos, self.sep = 256, 257, 258, 259
        self.vocab_size = pad_vocab_size(256 + len(self.SPECIALS))
        self.unique_identifiers = OrderedDict(
            [("class", "ByteTokenizer"), ("version", 1), ("vocab_size", self.vocab_size)]
        )

    def encode(self, text: str) -> list[int]:
        """``str`` -> list of byte values (each in [0, 256))."""
        return list(text.encode("utf-8"))

    def encode_np(self, text: str) -> np.ndarray:
        """Fast path for large texts: ``str`` -> ``uint16[n_bytes]``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int]) -> str:
        """list of ids -> ``str`` (special ids as ``<|name|>``)."""
        out, buf = [], bytearray()
        for t in ids:
            t = int(t)
            if 0 <= t < 256:
                buf.append(t)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            k = t - 256
            out.append(f"<|{self.SPECIALS[k]}|>" if 0 <= k < len(self.SPECIALS) else f"<|{t}|>")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


# Names under which common HF tokenizer files spell their end-of-document / padding tokens.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>", "[SEP]", "<eod>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")


class HFTokenizer(_TokenizerBase):
    """A HuggingFace ``tokenizers`` JSON file (``tokenizer.json``), imported lazily.

    Args:
        path: the JSON file.
        eod_token: the end-of-document token's text; default: the first of
            ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``, ... present in the vocabulary.
        pad_token: the padding token's text; default: ``<pad>``/``[PAD]``/... when present, else None
            (Megatron then uses -1, a value never in the data).
    """

    name = "hf"

    def __init__(self, path: str, eod_token: str | None = None, pad_token: str | None = None) -> None:
        if not os.path.isfile(path):
            raise TokenizerError(
                f"tokenizer file {path!r} does not exist. Fix: pass data.tokenizer=byte or the path of a "
                f"HuggingFace tokenizer.json.")
        try:
            from tokenizers import Tokenizer  # lazy: optional dependency
        except ImportError:
            raise TokenizerError(
                f"data.tokenizer={path!r} needs the HuggingFace 'tokenizers' package, which is not installed. "
                f"Fix: pip install tokenizers (or use data.tokenizer=byte).") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise TokenizerError(f"cannot load tokenizer {path!r}: {e}") from None
        self.path = os.path.abspath(path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        if eod_token is not None:
            if eod_token not in vocab:
                raise TokenizerError(f"tokenizer {path!r} has no token {eod_token!r} (asked for as eod).")
            self.eod = vocab[eod_token]
        else:
            found = [t for t in _EOD_CANDIDATES if t in vocab]
            if not found:
                raise TokenizerError(
                    f"tokenizer {path!r} has none of the usual end-of-document tokens {_EOD_CANDIDATES}; "
                    f"pass eod_token= explicitly.")
            self.eod = vocab[found[0]]
        if pad_token is not None:
            self.pad = vocab.get(pad_token)
        else:
            pads = [t for t in _PAD_CANDIDATES if t in vocab]
            self.pad = vocab[pads[0]] if pads else None
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.sha256 = digest
        self.unique_identifiers = OrderedDict(
            [("class", "HFTokenizer"), ("sha256", digest), ("eod", self.eod), ("pad", self.pad)]
        )

    def encode(self, text: str) -> list[int]:
        """``str`` -> ids (no special tokens added: documents get the EOD id appended by the caller)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> ``str`` (special tokens skipped, as the library does by default)."""
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


def build_tokenizer(spec: str):
    """Build a tokenizer from a recipe's ``data.tokenizer``: ``'byte'`` or a path to a HF JSON.

    Returns:
        :class:`ByteTokenizer` or :class:`HFTokenizer`.
    Raises:
        TokenizerError: unknown spec, missing file, missing ``tokenizers`` package.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".json") or os.path.sep in spec or os.path.isfile(spec):
        return HFTokenizer(spec)
    raise TokenizerError(
        f"unknown tokenizer {spec!r}: use 'byte' (built-in byte-level) or the path of a HuggingFace "
        f"tokenizers JSON file (e.g. path/to/tokenizer.json).")


def tokenizer_fingerprint(tok) -> str:
    """A short stable string naming the tokenizer (for content hashes of built datasets)."""
    return hashlib.sha256(json.dumps(tok.unique_identifiers, sort_keys=True).encode()).hexdigest()[:16]
