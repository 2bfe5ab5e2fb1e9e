"""The large built-in corpus (``data.builtin_corpus: large``): every Python source and text file a
fresh machine has, deduplicated, split into training and held-out documents by hash.

For experiments that must not show a model the same data twice (a sweep point of ~20M tokens on
the 4 MB default corpus repeats it five times). Offline and deterministic: nothing is downloaded.

Sources (:func:`source_roots`): the standard library (as the default corpus reads it) and every
installed-packages directory of the running Python (``site.getsitepackages()``, the user site,
``sysconfig``'s purelib/platlib), each walked for ``.py``, ``.txt``, ``.md`` and ``.rst`` files.
Skipped: ``__pycache__``, test directories (``test``, ``tests``, ``idle_test``), package metadata
(``*.dist-info``, ``*.egg-info``), editable-install hooks (``__editable__*``, which hold paths of
this machine), non-UTF-8 and binary files, and nested ``site-packages`` of the standard library.

1. **Deduplication** per file: a file whose text (line endings normalised, trailing spaces cut)
   was already seen earlier in (root, path) order is dropped, so vendored copies (``pip/_vendor``,
   ``setuptools/_vendor``...) and repeated licence files count once.
2. **Documents**: per root, the default corpus's grouping (:func:`moba_cp.data.builtin_corpus.group_documents`):
   a package is one document cut at file boundaries into parts of at most 256 KB.
3. **Held-out split by document hash**: a document is held out iff the first 8 bytes of the
   SHA-256 of its text, as a fraction of 2**64, fall below ``heldout_fraction``; so the split
   depends on a document's content only (never on what else is installed). Training documents are
   written in the order of that hash (a fixed shuffle), held-out ones likewise.

Written as two Megatron indexed datasets, ``<cache>/builtin/large-<hash>-train`` and
``-heldout``, and a manifest ``large-<hash>.json`` (sizes, roots, duplicates; written last: the
completion marker). ``<hash>`` covers the format, the tokenizer, the split and every document.
A small index keyed by the candidate files' paths, sizes and mtimes finds a built corpus without
reading every file again. One process builds under a file lock; the others wait and reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass

from moba_cp.data.builtin_corpus import (MAX_DOC_BYTES, MIN_DOC_BYTES, CorpusDocument, _candidate_files, _FileLock,
                                         _read, group_documents, stdlib_dir)
from moba_cp.data.prepare import encode_document, write_indexed_dataset
from moba_cp.data.tokenizers import build_tokenizer, tokenizer_fingerprint

__all__ = ["LargeCorpus", "source_roots", "collect_large_documents", "is_heldout", "split_heldout",
           "ensure_large_corpus", "DEFAULT_HELDOUT_FRACTION"]

FORMAT_VERSION = 1
DEFAULT_HELDOUT_FRACTION = 0.05
_SKIP_FILE_PREFIXES = ("__editable__",)


@dataclass
class LargeCorpus:
    """A built large corpus: the two indexed-dataset prefixes and the manifest (a dict)."""

    train_prefix: str
    heldout_prefix: str
    manifest: dict

    @property
    def name(self) -> str:
        return f"large-{self.manifest['hash']}"


def source_roots() -> list[tuple[str, str]]:
    """``[(label, directory)]``: ``("stdlib", ...)`` then ``("site0", ...)``, ``("site1", ...)`` for the
    installed-packages directories that exist, in sorted real-path order (labels, not paths, name the
    documents, so the same packages in another virtual environment give the same corpus)."""
    paths = set(site.getsitepackages()) | {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    if site.ENABLE_USER_SITE:
        paths.add(site.getusersitepackages())
    std = os.path.realpath(stdlib_dir())
    real = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)} - {std})
    return [("stdlib", stdlib_dir())] + [(f"site{i}", p) for i, p in enumerate(real)]


def _files(root: str) -> list[str]:
    """Candidate files of one root (the default corpus's rules, plus the metadata skips)."""
    out = []
    for rel in _candidate_files(root):
        parts = rel.split("/")
        if any(p.endswith((".dist-info", ".egg-info")) for p in parts[:-1]):
            continue
        if parts[-1].startswith(_SKIP_FILE_PREFIXES):
            continue
        out.append(rel)
    return out


def _normalised(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))


def collect_large_documents(roots: list[tuple[str, str]] | None = None, *, min_doc_bytes: int = MIN_DOC_BYTES,
                            max_doc_bytes: int = MAX_DOC_BYTES) -> tuple[list[CorpusDocument], dict]:
    """Documents of every root after file-level deduplication (see the module docstring).

    Returns:
        ``(documents in name order, stats)``; ``stats`` has ``roots`` (label, path, files, bytes kept
        per root), ``files_seen``, ``duplicates`` and ``duplicate_bytes``.
    """
    roots = source_roots() if roots is None else roots
    seen: set[bytes] = set()
    docs: list[CorpusDocument] = []
    stats = {"roots": [], "files_seen": 0, "duplicates": 0, "duplicate_bytes": 0}
    for label, root in roots:
        texts: dict[str, str] = {}
        kept_bytes = 0
        for rel in _files(root):
            text = _read(root, rel)
            if text is None or not text.strip():
                continue
            stats["files_seen"] += 1
            key = hashlib.sha256(_normalised(text).encode("utf-8")).digest()
            n = len(text.encode("utf-8"))
            if key in seen:
                stats["duplicates"] += 1
                stats["duplicate_bytes"] += n
                continue
            seen.add(key)
            texts[rel] = text
            kept_bytes += n
        stats["roots"].append({"label": label, "path": root, "files": len(texts), "bytes": kept_bytes})
        docs += group_documents(texts, min_doc_bytes=min_doc_bytes, max_doc_bytes=max_doc_bytes, prefix=f"{label}/")
    return sorted(docs, key=lambda d: d.name), stats


def _doc_hash(doc: CorpusDocument) -> str:
    return hashlib.sha256(doc.text.encode("utf-8")).hexdigest()


def is_heldout(doc: CorpusDocument, fraction: float) -> bool:
    """Whether ``doc`` belongs to the held-out split (its text's hash, not its name or position)."""
    return int(_doc_hash(doc)[:16], 16) / 2.0 ** 64 < fraction


def split_heldout(docs: list[CorpusDocument], fraction: float) -> tuple[list[CorpusDocument], list[CorpusDocument]]:
    """``(train, heldout)``, each in the order of the documents' text hashes."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout_fraction={fraction} must be in (0, 1).")
    ranked = sorted(docs, key=_doc_hash)
    return [d for d in ranked if not is_heldout(d, fraction)], [d for d in ranked if is_heldout(d, fraction)]


def _fingerprint(roots, tok, fraction: float) -> str:
    """Cheap key of what the build would read: every candidate file's path, size and mtime."""
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "python": sys.version_info[:3],
                                   "tokenizer": tokenizer_fingerprint(tok), "fraction": fraction}).encode())
    for label, root in roots:
        h.update(f"{label}\0{os.path.realpath(root)}\0".encode())
        for rel in _files(root):
            try:
                st = os.stat(os.path.join(root, rel))
            except OSError:
                continue
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:20]


def _content_hash(train, heldout, tok, fraction: float) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tok),
                                   "fraction": fraction}).encode())
    for split, docs in (("train", train), ("heldout", heldout)):
        for d in docs:
            h.update(f"{split}\0{d.name}\0".encode() + d.text.encode("utf-8") + b"\0")
    return h.hexdigest()[:20]


def _load(out_dir: str, digest: str) -> LargeCorpus | None:
    base = os.path.join(out_dir, f"large-{digest}")
    if not (os.path.exists(base + ".json") and _is_complete_pair(base)):
        return None
    with open(base + ".json") as f:
        return LargeCorpus(base + "-train", base + "-heldout", json.load(f))


def _is_complete_pair(base: str) -> bool:
    return all(os.path.exists(base + s + e) for s in ("-train", "-heldout") for e in (".bin", ".idx"))


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def ensure_large_corpus(cache_dir: str, tokenizer="byte", *, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                        roots: list[tuple[str, str]] | None = None, verbose: bool = True) -> LargeCorpus:
    """Build (once) and return the large corpus; safe to call from every rank at once.

    Args:
        cache_dir: the recipe's ``data.cache_dir``; files go to ``<cache_dir>/builtin/``.
        tokenizer: tokenizer object or spec (``'byte'`` / HF JSON path).
        heldout_fraction: share of documents held out (by text hash), in (0, 1).
        roots: ``[(label, directory)]`` to read (default :func:`source_roots`; tests pass a small tree).
        verbose: print the size when building.

    Raises:
        RuntimeError: no text, or one of the splits came out empty (the message says which and how much).
    """
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    roots = source_roots() if roots is None else roots
    out_dir = os.path.join(cache_dir, "builtin")
    os.makedirs(out_dir, exist_ok=True)
    fp_path = os.path.join(out_dir, f"large-index-{_fingerprint(roots, tok, heldout_fraction)}.json")
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            found = _load(out_dir, json.load(f)["hash"])
        if found is not None:
            return found
    t0 = time.perf_counter()
    docs, stats = collect_large_documents(roots)
    train, heldout = split_heldout(docs, heldout_fraction)
    if not train or not heldout:
        raise RuntimeError(
            f"the large corpus under {[r for _, r in roots]} has {len(train)} training and {len(heldout)} held-out "
            f"documents (heldout_fraction={heldout_fraction}); both need at least one. Fix: more source text, "
            f"another data.builtin_heldout_fraction, or data.builtin_corpus=stdlib.")
    digest = _content_hash(train, heldout, tok, heldout_fraction)
    base = os.path.join(out_dir, f"large-{digest}")
    with _FileLock(base + ".lock"):
        found = _load(out_dir, digest)
        if found is None:
            splits = {}
            for split, part in (("train", train), ("heldout", heldout)):
                n_docs, n_tok = write_indexed_dataset((encode_document(tok, d.text) for d in part), f"{base}-{split}",
                                                      tok.vocab_size)
                splits[split] = {"documents": n_docs, "tokens": n_tok,
                                 "bytes": sum(len(d.text.encode("utf-8")) for d in part),
                                 "names": [d.name for d in part]}
            manifest = {"hash": digest, "format": FORMAT_VERSION, "python": sys.version.split()[0],
                        "tokenizer": dict(tok.unique_identifiers), "heldout_fraction": heldout_fraction,
                        **stats, **splits}
            _write_json(base + ".json", manifest)  # completion marker, written last
            found = LargeCorpus(base + "-train", base + "-heldout", manifest)
            if verbose:
                tr, ho = manifest["train"], manifest["heldout"]
                print(f"[builtin corpus] built {base}: train {tr['documents']} documents, {tr['tokens']:,} tokens "
                      f"({tr['bytes'] / 1e6:.1f} MB); held out {ho['documents']} documents, {ho['tokens']:,} tokens; "
                      f"{stats['duplicates']} duplicate files ({stats['duplicate_bytes'] / 1e6:.1f} MB) dropped; "
                      f"from {', '.join(r['label'] + '=' + r['path'] for r in stats['roots'])} "
                      f"in {time.perf_counter() - t0:.1f}s", flush=True)
    _write_json(fp_path, {"hash": digest})
    return found

