"""The embedded default corpus: built offline from the local Python standard library.

Every machine that runs moba_cp has a Python installation, and its standard library is a few
dozen MB of real, long-range-structured text (source code with docstrings, plus the pydoc topic
help in ``pydoc_data/topics.py`` and any ``.txt``/``.rst`` files shipped beside the modules).

How documents are formed (long ones, for long-context training):
1. Candidates: ``*.py``, ``*.txt``, ``*.rst`` under ``sysconfig.get_paths()['stdlib']``, skipping
   ``site-packages``, ``__pycache__``, test suites (``test``, ``tests``, ``idle_test``) and files
   that are not UTF-8.
2. A package directory (``asyncio/``, ``email/``...) becomes one document: its files concatenated
   in sorted order, each under a ``# ===== file: path =====`` header, cut at file boundaries into
   parts of at most ``max_doc_bytes``. A top-level module of at least ``min_doc_bytes`` stays one
   document (whole, or cut at line boundaries above ``max_doc_bytes``); smaller top-level modules are
   concatenated in sorted order until a document reaches ``min_doc_bytes``.
3. Selection under the byte budget: documents are ranked by the SHA-256 of their name (a fixed,
   content-independent shuffle, so the corpus is not just the alphabetically first modules),
   taken in that order while they fit the budget, then written in that order.

The result is cached as ``<cache_dir>/builtin/stdlib-<hash>.bin/.idx``, where the hash covers the
format version, the Python version, the tokenizer and the budget, and the content of every
candidate file, so it is built once and rebuilt when anything that changes it changes.
:func:`ensure_builtin_corpus` is safe when several processes call it at once: a file lock lets
one build while the others wait, and the files appear by atomic rename, with a manifest written
last as the completion marker (so even without working locks, e.g. on some network filesystems,
readers only ever see complete, identical files).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from moba_cp.data.prepare import encode_document, write_indexed_dataset
from moba_cp.data.tokenizers import build_tokenizer, tokenizer_fingerprint

__all__ = ["CorpusDocument", "collect_documents", "group_documents", "select_documents", "ensure_builtin_corpus", "corpus_hash",
           "DEFAULT_BUDGET_BYTES", "stdlib_dir"]

FORMAT_VERSION = 1
DEFAULT_BUDGET_BYTES = 4_000_000
MIN_DOC_BYTES = 16_384
MAX_DOC_BYTES = 262_144
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
              "lib-dynload", "ensurepip"}
_EXTS = (".py", ".txt", ".rst")


@dataclass
class CorpusDocument:
    """One document of the corpus: a name (its source) and its text."""

    name: str
    text: str


def stdlib_dir() -> str:
    """The standard-library directory of the running Python."""
    return sysconfig.get_paths()["stdlib"]


def _candidate_files(root: str) -> list[str]:
    """Relative paths (``/``-separated, sorted) of candidate files under ``root``."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith(".")
                         and not x.startswith("config-"))
        for f in files:
            if f.endswith(_EXTS):
                out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def _read(root: str, rel: str) -> str | None:
    try:
        with open(os.path.join(root, rel), "rb") as fh:
            raw = fh.read()
        return raw.decode("utf-8") if b"\x00" not in raw else None
    except (OSError, UnicodeDecodeError):
        return None


def _split_lines(text: str, max_bytes: int) -> list[str]:
    """Cut ``text`` at line boundaries into parts of at most ~``max_bytes`` UTF-8 bytes."""
    parts, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if cur and size + n > max_bytes:
            parts.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += n
    if cur:
        parts.append("".join(cur))
    return parts


def _header(rel: str) -> str:
    return f"# ===== file: {rel} =====\n"


def collect_documents(root: str | None = None, *, min_doc_bytes: int = MIN_DOC_BYTES,
                      max_doc_bytes: int = MAX_DOC_BYTES) -> list[CorpusDocument]:
    """All candidate documents of the standard library at ``root`` (default: this Python's), in name order.

    See the module docstring for the grouping rules. Deterministic for a given directory content.
    """
    root = root or stdlib_dir()
    texts = {rel: t for rel in _candidate_files(root) if (t := _read(root, rel)) is not None and t.strip()}
    return group_documents(texts, min_doc_bytes=min_doc_bytes, max_doc_bytes=max_doc_bytes)


def group_documents(texts: dict[str, str], *, min_doc_bytes: int = MIN_DOC_BYTES,
                    max_doc_bytes: int = MAX_DOC_BYTES, prefix: str = "") -> list[CorpusDocument]:
    """Files (``{relative path: text}``) -> documents by the module docstring's rules, in name order.

    A top-level directory (a package) becomes one document cut at file boundaries into parts of at
    most ``max_doc_bytes``; top-level files of at least ``min_doc_bytes`` stay alone, smaller ones
    are concatenated in path order. ``prefix`` is put before every document name.
    """
    groups: dict[str, list[str]] = {}
    for rel in sorted(texts):
        top = rel.split("/", 1)[0] if "/" in rel else ""
        groups.setdefault(top, []).append(rel)

    docs: list[CorpusDocument] = []
    # Packages: one document each, cut at file boundaries (a lone huge file at line boundaries).
    for pkg in sorted(k for k in groups if k):
        part, size, idx = [], 0, 0
        for rel in groups[pkg]:
            chunk = _header(rel) + texts[rel]
            n = len(chunk.encode("utf-8"))
            pieces = [chunk] if n <= max_doc_bytes else _split_lines(chunk, max_doc_bytes)
            for piece in pieces:
                pn = len(piece.encode("utf-8"))
                if part and size + pn > max_doc_bytes:
                    docs.append(CorpusDocument(f"{prefix}{pkg}/#{idx}", "\n".join(part)))
                    part, size, idx = [], 0, idx + 1
                part.append(piece)
                size += pn
        if part:
            docs.append(CorpusDocument(f"{prefix}{pkg}/#{idx}", "\n".join(part)))
    # Top-level modules: big ones alone, small ones merged in sorted order.
    pending, psize, first = [], 0, None
    for rel in groups.get("", []):
        chunk = _header(rel) + texts[rel]
        n = len(chunk.encode("utf-8"))
        if n >= min_doc_bytes:
            pieces = [chunk] if n <= max_doc_bytes else _split_lines(chunk, max_doc_bytes)
            for i, piece in enumerate(pieces):
                docs.append(CorpusDocument(f"{prefix}{rel}" if len(pieces) == 1 else f"{prefix}{rel}#{i}", piece))
            continue
        if not pending:
            first = rel
        pending.append(chunk)
        psize += n
        if psize >= min_doc_bytes:
            docs.append(CorpusDocument(f"{prefix}{first}+{len(pending) - 1}", "\n".join(pending)))
            pending, psize = [], 0
    if pending:
        docs.append(CorpusDocument(f"{prefix}{first}+{len(pending) - 1}", "\n".join(pending)))
    return sorted(docs, key=lambda d: d.name)


def select_documents(docs: list[CorpusDocument], budget_bytes: int) -> list[CorpusDocument]:
    """Fixed pseudo-random selection under a byte budget (rank by SHA-256 of the name; greedy fit)."""
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    out, used = [], 0
    for d in ranked:
        n = len(d.text.encode("utf-8"))
        if used + n <= budget_bytes:
            out.append(d)
            used += n
    return out


def corpus_hash(docs: list[CorpusDocument], tokenizer, budget_bytes: int) -> str:
    """Content hash naming a built corpus (format, Python version, tokenizer, budget, selected texts)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "python": sys.version_info[:3],
                         "tokenizer": tokenizer_fingerprint(tokenizer), "budget": budget_bytes}).encode())
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode("utf-8") + b"\0")
    return h.hexdigest()[:20]


class _FileLock:
    """``fcntl.flock`` on a lock file: exclusive, blocking, released on close (or process death)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except OSError:  # filesystems without flock: atomic renames alone keep readers safe
            pass
        return self

    def __exit__(self, *exc):
        try:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
        except OSError:
            pass
        self.fh.close()


def _is_complete(prefix: str) -> bool:
    return all(os.path.exists(prefix + e) for e in (".bin", ".idx", ".json"))


def ensure_builtin_corpus(cache_dir: str, tokenizer="byte", *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                          root: str | None = None, verbose: bool = True) -> str:
    """Build (once) and return the indexed-dataset prefix of the embedded corpus.

    Safe to call from every rank at once (no torch.distributed needed): one process builds under
    a file lock, the others wait for it and then reuse the result.

    Args:
        cache_dir: the recipe's ``data.cache_dir``; files go to ``<cache_dir>/builtin/``.
        tokenizer: tokenizer object or spec (``'byte'`` / HF JSON path).
        budget_bytes: upper bound on the corpus text size in bytes (default 4 MB).
        root: standard-library directory to read (default: this Python's; tests pass a small one).
        verbose: print one line when building.

    Returns:
        ``prefix`` such that ``prefix.bin``/``prefix.idx`` form a Megatron indexed dataset, and
        ``prefix.json`` is its manifest (document names, sizes, hash).
    """
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    t0 = time.perf_counter()
    docs = select_documents(collect_documents(root), budget_bytes)
    if not docs:
        raise RuntimeError(
            f"the builtin corpus found no text under {root or stdlib_dir()!r} within budget_bytes={budget_bytes}; "
            f"use data.source=indexed with data.paths, or raise the budget.")
    digest = corpus_hash(docs, tok, budget_bytes)
    out_dir = os.path.join(cache_dir, "builtin")
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, f"stdlib-{digest}")
    if _is_complete(prefix):
        return prefix
    with _FileLock(prefix + ".lock"):
        if _is_complete(prefix):  # another process built it while we waited
            return prefix
        arrays: Iterator[np.ndarray] = (encode_document(tok, d.text) for d in docs)
        n_docs, n_tok = write_indexed_dataset(arrays, prefix, tok.vocab_size)
        manifest = {"hash": digest, "format": FORMAT_VERSION, "python": sys.version.split()[0],
                    "root": root or stdlib_dir(), "tokenizer": dict(tok.unique_identifiers),
                    "budget_bytes": budget_bytes, "documents": n_docs, "tokens": n_tok,
                    "names": [d.name for d in docs],
                    "doc_bytes": [len(d.text.encode("utf-8")) for d in docs]}
        tmp = f"{prefix}.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, prefix + ".json")  # completion marker, written last
        if verbose:
            print(f"[builtin corpus] built {prefix}: {n_docs} documents, {n_tok} tokens "
                  f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return prefix
