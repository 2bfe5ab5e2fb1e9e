"""``moba-cp prepare-data``: local text files -> a Megatron indexed dataset (``PREFIX.bin/.idx``).

One document per file (or per separator-delimited part of a file), each EOD-terminated, in a
deterministic order (inputs expanded and sorted), written with Megatron-Core's
``IndexedDatasetBuilder`` so any Megatron-LM user can read it (``IndexedDataset(PREFIX)``).
The files are written under temporary names and renamed into place, ``.idx`` last, so a crash
never leaves a half-written dataset under the final name.

    moba-cp prepare-data docs/ notes/*.md --output data/mycorpus --tokenizer byte
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from moba_cp.data.tokenizers import ByteTokenizer, TokenizerError, build_tokenizer

__all__ = ["prepare_data", "write_indexed_dataset", "expand_inputs", "encode_document", "token_dtype",
           "PrepareStats", "DataPrepError", "add_arguments", "run", "main"]

# Extensions taken when a directory is given (files given by name or glob are always taken).
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".java", ".js", ".ts",
                      ".go", ".rs", ".tex", ".html", ".xml", ".json", ".yaml", ".yml", ".toml", ".csv")


class DataPrepError(ValueError):
    """Inputs that cannot make a dataset (missing files, no text); the message says which."""


@dataclass
class PrepareStats:
    """What a build wrote."""

    output_prefix: str
    files: int
    documents: int
    tokens: int
    bytes_read: int
    seconds: float
    skipped_short: int = 0
    skipped_binary: int = 0


def token_dtype(vocab_size: int):
    """Smallest dtype for token ids: ``uint16`` up to 65536 ids, else ``int32`` (Megatron's rule)."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def expand_inputs(inputs: Sequence[str], extensions: Sequence[str] | None = DEFAULT_EXTENSIONS) -> list[str]:
    """Files, directories (recursive, filtered by ``extensions``; None = all) and globs -> sorted paths.

    Raises:
        DataPrepError: an input matches nothing (named in the message).
    """
    if not inputs:
        raise DataPrepError("no inputs given: pass files, directories or glob patterns.")
    found: set[str] = set()
    missing = []
    for item in inputs:
        if os.path.isfile(item):
            found.add(os.path.abspath(item))
        elif os.path.isdir(item):
            n0 = len(found)
            for root, dirs, files in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
                for f in files:
                    if extensions is None or f.endswith(tuple(extensions)):
                        found.add(os.path.abspath(os.path.join(root, f)))
            if len(found) == n0:
                missing.append(f"{item} (directory without files ending in {', '.join(extensions or ())})")
        else:
            matches = [m for m in glob.glob(item, recursive=True) if os.path.isfile(m)]
            if not matches:
                missing.append(item)
            found.update(os.path.abspath(m) for m in matches)
    if missing:
        raise DataPrepError("input(s) not found or empty: " + "; ".join(missing))
    return sorted(found)


def encode_document(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` followed by the EOD id, as an int64 array ``[n + 1]``."""
    if isinstance(tokenizer, ByteTokenizer):
        ids = tokenizer.encode_np(text).astype(np.int64)
    else:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return np.concatenate([ids, np.array([tokenizer.eod], dtype=np.int64)])


class _Progress:
    """Prints docs, tokens and throughput at most every ``every`` seconds (and once at the end)."""

    def __init__(self, label: str, every: float = 5.0, stream=None) -> None:
        self.label, self.every, self.stream = label, every, stream or sys.stdout
        self.t0 = self.last = time.perf_counter()

    def update(self, docs: int, tokens: int, nbytes: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        print(f"[{self.label}] {docs} docs, {tokens} tokens, {nbytes / 1e6:.1f} MB read, "
              f"{tokens / dt / 1e6:.2f} M tok/s, {nbytes / dt / 1e6:.1f} MB/s, {dt:.1f}s"
              + (" (done)" if final else ""), file=self.stream, flush=True)


def write_indexed_dataset(docs: Iterable[np.ndarray], output_prefix: str, vocab_size: int,
                          progress: _Progress | None = None) -> tuple[int, int]:
    """Write token arrays (one per document, EOD already appended) as ``output_prefix.bin/.idx``.

    Written under unique temporary names then renamed (``.bin`` first, ``.idx`` last), so
    concurrent writers of identical content and crashes mid-write are both harmless.

    Returns:
        ``(documents, tokens)`` written.
    """
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dtype = token_dtype(vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n_docs = n_tok = 0
    try:
        for arr in docs:
            builder.add_document(arr, [len(arr)])  # one sequence per document
            n_docs += 1
            n_tok += len(arr)
            if progress is not None:
                progress.update(n_docs, n_tok, 0)
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", output_prefix + ".bin")
        os.replace(tmp + ".idx", output_prefix + ".idx")
    finally:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    return n_docs, n_tok


def _read_text(path: str) -> str | None:
    """File contents as text, or None for binary files (NUL bytes / not UTF-8)."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def prepare_data(inputs: Sequence[str], output_prefix: str, tokenizer="byte", *, min_doc_chars: int = 1,
                 separator: str | None = None, extensions: Sequence[str] | None = DEFAULT_EXTENSIONS,
                 progress_every: float = 5.0, stream=None) -> PrepareStats:
    """Build a Megatron indexed dataset from local text.

    Args:
        inputs: files, directories (searched recursively for ``extensions``) and glob patterns.
        output_prefix: writes ``output_prefix.bin`` and ``output_prefix.idx``.
        tokenizer: a tokenizer object or a spec for :func:`build_tokenizer` (``'byte'`` or a HF JSON path).
        min_doc_chars: documents shorter than this (in characters, after stripping) are skipped.
        separator: if given, each file is split on this string into several documents.
        extensions: file endings taken from directories (None = every file).
        progress_every: seconds between progress lines.
        stream: where progress goes (stdout by default).

    Returns:
        :class:`PrepareStats`. Documents are in sorted-path order, then in file order.

    Raises:
        DataPrepError: an input is missing, or no document survives the filters.
    """
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    paths = expand_inputs(inputs, extensions)
    stats = PrepareStats(output_prefix, files=len(paths), documents=0, tokens=0, bytes_read=0, seconds=0.0)
    prog = _Progress(f"prepare-data {os.path.basename(output_prefix)}", progress_every, stream)
    t0 = time.perf_counter()

    def docs() -> Iterator[np.ndarray]:
        for p in paths:
            text = _read_text(p)
            stats.bytes_read += os.path.getsize(p)
            if text is None:
                stats.skipped_binary += 1
                continue
            parts = text.split(separator) if separator else [text]
            for part in parts:
                if len(part.strip()) < min_doc_chars:
                    stats.skipped_short += 1
                    continue
                arr = encode_document(tok, part)
                stats.documents += 1
                stats.tokens += len(arr)
                prog.update(stats.documents, stats.tokens, stats.bytes_read)
                yield arr

    # Peek first so that "no text" is an error before any file is created.
    it = docs()
    first = next(it, None)
    if first is None:
        raise DataPrepError(
            f"no text found in {len(paths)} file(s) ({stats.skipped_binary} binary, {stats.skipped_short} "
            f"shorter than min_doc_chars={min_doc_chars}); nothing written to {output_prefix!r}.")

    def chain():
        yield first
        yield from it

    write_indexed_dataset(chain(), output_prefix, tok.vocab_size)
    stats.seconds = time.perf_counter() - t0
    prog.update(stats.documents, stats.tokens, stats.bytes_read, final=True)
    return stats


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prepare-data`` arguments to ``parser`` (for the ``moba-cp`` CLI)."""
    parser.add_argument("inputs", nargs="+", help="text files, directories (recursive) or glob patterns")
    parser.add_argument("--output", "-o", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (default) or a HuggingFace tokenizer.json")
    parser.add_argument("--min-doc-chars", type=int, default=1, help="skip documents shorter than this")
    parser.add_argument("--separator", default=None,
                        help="split each file into documents on this string (escapes like \\n are decoded)")
    parser.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS),
                        help="comma-separated file endings taken from directories ('*' = all files)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``prepare-data`` from parsed arguments; returns a process exit code."""
    sep = args.separator.encode().decode("unicode_escape") if args.separator else None
    exts = None if args.ext.strip() == "*" else tuple(e.strip() for e in args.ext.split(",") if e.strip())
    try:
        st = prepare_data(args.inputs, args.output, args.tokenizer, min_doc_chars=args.min_doc_chars,
                          separator=sep, extensions=exts)
    except (DataPrepError, TokenizerError) as e:
        print(f"moba-cp prepare-data: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {st.output_prefix}.bin/.idx: {st.documents} documents, {st.tokens} tokens from "
          f"{st.files} files in {st.seconds:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m moba_cp.data.prepare INPUTS... --output PREFIX [--tokenizer byte|PATH.json]``."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="moba-cp prepare-data", description="Build a Megatron indexed dataset (.bin/.idx) from text files."))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
