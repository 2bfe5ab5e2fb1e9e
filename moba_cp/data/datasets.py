"""Train/valid datasets on Megatron-Core (``GPTDataset``, blends, ``MockGPTDataset``), the retrieval
mixture, and up-front validation of data paths.

Items (all datasets here) are dicts of tensors of length ``seq_length``:
``tokens`` int64, ``labels`` int64 (``tokens`` shifted by one), ``loss_mask`` float32,
``position_ids`` int64. No ``attention_mask`` is materialised (it would be ``S x S``; causal masking
is the attention kernel's job). Documents are packed across EOD boundaries as Megatron does, with
positions running on (``reset_position_ids=False``) and EOD kept in the loss, unless asked otherwise.

Every rank of a context-parallel group must see the same sample for the same index: all of this is
deterministic in (data, seed, seq_length, index), and Megatron's index caches are built on global
rank 0 first (when ``torch.distributed`` is initialised) and then read by the others.

Example (the training loop)::

    tok = build_tokenizer(cfg.data.tokenizer)
    validate_data_paths(cfg.data)                       # before any process group
    train_ds, valid_ds = build_train_valid_datasets(
        cfg.data, seq_length=cfg.model.seq_length, seed=cfg.train.seed,
        num_train_samples=cfg.train.steps * cfg.train.global_batch_size,
        num_valid_samples=n_evals * cfg.eval.iters * cfg.train.global_batch_size, tokenizer=tok)
    sample = train_ds[step * cfg.train.global_batch_size + i]   # the order is a function of the step
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from moba_cp.data.checks import DataConfigError, parse_blend, validate_data_paths
from moba_cp.data.builtin_corpus import (DEFAULT_BUDGET_BYTES, _FileLock, collect_documents, ensure_builtin_corpus,
                                         select_documents)
from moba_cp.data.large_corpus import DEFAULT_HELDOUT_FRACTION, ensure_large_corpus
from moba_cp.data.prepare import encode_document
from moba_cp.data.retrieval_docs import fixed_tokens, haystack_tokens, make_needle_sample
from moba_cp.data.tokenizers import build_tokenizer

__all__ = ["DataConfigError", "parse_blend", "validate_data_paths", "build_train_valid_datasets",
           "RetrievalMixtureDataset", "gpt_dataset_config", "heldout_sequences", "corpus_record"]


def gpt_dataset_config(*, seq_length: int, seed: int, tokenizer, blend=None, split: str = "98,2,0",
                       path_to_cache: Optional[str] = None, reset_position_ids: bool = False,
                       eod_mask_loss: bool = False, blend_per_split=None):
    """A Megatron-Core 0.16 ``GPTDatasetConfig`` with moba_cp's defaults (no attention mask tensor).

    ``blend_per_split`` (``[train, valid, test]`` blends) replaces ``blend`` and ``split``."""

    if blend_per_split is not None:
        blend, split = None, None
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, split=split, path_to_cache=path_to_cache,
        blend_per_split=blend_per_split,
        tokenizer=tokenizer, reset_position_ids=reset_position_ids, reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss, create_attention_mask=False, mmap_bin_files=True)


def _default_is_built_on_rank() -> bool:
    # Every rank holds the dataset (dp ranks read different indices, cp/tp ranks the same ones);
    # Megatron's builder still builds the caches on rank 0 first and barriers.
    return True


def build_train_valid_datasets(data_cfg, *, seq_length: int, seed: int, num_train_samples: int,
                               num_valid_samples: int, tokenizer=None,
                               is_built_on_rank: Callable[[], bool] | None = None,
                               builtin_budget_bytes: int = DEFAULT_BUDGET_BYTES,
                               reset_position_ids: bool = False, eod_mask_loss: bool = False,
                               announce: bool = True):
    """Build the train and validation datasets of a recipe.

    Args:
        data_cfg: ``moba_cp.config.DataConfig`` (source builtin / indexed / mock, paths, split,
            cache_dir, tokenizer, retrieval_fraction).
        seq_length: tokens per sample (the global, unsharded length).
        seed: data order seed (Megatron's shuffle, and which samples become retrieval documents).
        num_train_samples: samples the run will draw (steps * global batch); the dataset is at least this long
            (Megatron repeats epochs as needed).
        num_valid_samples: validation samples needed (0 = no validation dataset).
        tokenizer: a tokenizer object (default: built from ``data_cfg.tokenizer``).
        is_built_on_rank: Megatron's callable; default: every rank.
        builtin_budget_bytes: size of the embedded corpus (source=builtin).
        reset_position_ids, eod_mask_loss: Megatron ``GPTDatasetConfig`` options (off by default).
        announce: print the :func:`corpus_record` summary (first rank); the training loop says it
            itself, with the run's record file.

    Returns:
        ``(train, valid)``: indexable datasets of dicts (``tokens``, ``labels``, ``loss_mask``,
        ``position_ids``, each ``[seq_length]``); ``valid`` is None when ``num_valid_samples == 0`` or
        the split gives it no documents. With ``data_cfg.retrieval_fraction > 0`` the train set is a
        :class:`RetrievalMixtureDataset` (validation stays plain LM data).

    Raises:
        DataConfigError: bad paths/config (checked first), or too little data for the split.
    """

    validate_data_paths(data_cfg)
    tok = tokenizer if tokenizer is not None else build_tokenizer(data_cfg.tokenizer)
    per_split = None
    if data_cfg.source == "mock":
        blend, cls, split, cache = None, MockGPTDataset, None, None
    else:
        if _is_large(data_cfg):
            # The large corpus carries its own held-out split: validation reads it, not a share of training.
            corpus = ensure_large_corpus(data_cfg.cache_dir, tok, heldout_fraction=_heldout_fraction(data_cfg))
            prefixes, weights = [corpus.train_prefix], None
            per_split = [([os.path.abspath(corpus.train_prefix)], None),
                         ([os.path.abspath(corpus.heldout_prefix)], None) if num_valid_samples else None, None]
        elif data_cfg.source == "builtin":
            # Every rank calls this; one builds under a file lock (and prints), the others wait and reuse it.
            prefixes, weights = [ensure_builtin_corpus(data_cfg.cache_dir, tok, budget_bytes=builtin_budget_bytes)], None
        else:
            prefixes, weights = parse_blend(data_cfg.paths)
        blend = ([os.path.abspath(p) for p in prefixes], weights)
        cls, split = GPTDataset, data_cfg.split
        cache = os.path.join(data_cfg.cache_dir, "index_cache")
    if blend is not None and per_split is None:
        _check_split_has_tokens(blend[0], data_cfg.split, need_valid=bool(num_valid_samples),
                                weighted=blend[1] is not None)
    cfg = gpt_dataset_config(seq_length=seq_length, seed=seed, tokenizer=tok, blend=blend,
                             split=split or "98,2,0", path_to_cache=cache, blend_per_split=per_split,
                             reset_position_ids=reset_position_ids, eod_mask_loss=eod_mask_loss)
    sizes = [int(num_train_samples), int(num_valid_samples) if num_valid_samples else None, None]
    if blend is not None and blend[1] is not None:
        # Megatron needs a size for every split when weights are given; 0-sized splits are dropped below.
        sizes = [sizes[0], sizes[1] or 0, 0]
    builder = BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank or _default_is_built_on_rank, cfg)
    try:
        with _rank0_when_not_distributed(), _index_cache_lock(cache):
            train, valid, _test = builder.build()
    except (AssertionError, IndexError, ValueError) as e:
        raise DataConfigError(
            f"building datasets from {blend[0] if blend else 'mock data'} with split={data_cfg.split!r} and "
            f"seq_length={seq_length} failed ({type(e).__name__}: {e}). A split with no documents or a corpus "
            f"shorter than one sequence are the usual causes: add data or change data.split.") from e
    if train is None or len(train) == 0:
        raise DataConfigError(
            f"the training split is empty (split={data_cfg.split!r}, seq_length={seq_length}): the data is too "
            f"small for one sample. Add data or lower model.seq_length.")
    if not num_valid_samples or valid is None or len(valid) == 0:
        valid = None
    if announce and _is_rank0():
        rec = corpus_record(data_cfg, tokenizer=tok, builtin_budget_bytes=builtin_budget_bytes, seq_length=seq_length,
                            num_train_samples=num_train_samples)
        if rec:
            print(f"[data] {rec['summary']}", flush=True)
    if data_cfg.retrieval_fraction > 0:
        train = RetrievalMixtureDataset(train, tok, data_cfg.retrieval_fraction, seq_length, seed,
                                        kinds=tuple(data_cfg.retrieval_kinds), loss_on=data_cfg.retrieval_loss_on)
    return train, valid


def _is_large(data_cfg) -> bool:
    return data_cfg.source == "builtin" and getattr(data_cfg, "builtin_corpus", "stdlib") == "large"


def _heldout_fraction(data_cfg) -> float:
    return float(getattr(data_cfg, "builtin_heldout_fraction", DEFAULT_HELDOUT_FRACTION))


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def corpus_record(data_cfg, *, tokenizer=None, builtin_budget_bytes: int = DEFAULT_BUDGET_BYTES,
                  seq_length: int | None = None, num_train_samples: int | None = None) -> dict | None:
    """What a run trains on, for its log and its metadata: corpus name, sizes and the epochs drawn.

    Builds nothing new when the corpus is cached (the builders are cached by content). Returns
    None for ``source=mock``. Keys: ``corpus``, ``train_tokens`` (tokens of the training documents;
    for a split corpus the train share of ``data.split``), ``heldout_tokens`` / ``heldout_documents``
    (the large corpus's held-out split, else None), ``run_tokens`` (samples x (seq_length + 1) when
    given), ``epochs`` (run_tokens / train_tokens) and a one-line ``summary``.
    """
    if data_cfg.source == "mock":
        return None
    tok = tokenizer if tokenizer is not None else build_tokenizer(data_cfg.tokenizer)
    rec: dict = {"source": data_cfg.source, "heldout_tokens": None, "heldout_documents": None}
    if _is_large(data_cfg):
        corpus = ensure_large_corpus(data_cfg.cache_dir, tok, heldout_fraction=_heldout_fraction(data_cfg),
                                     verbose=False)
        man = corpus.manifest
        rec.update(corpus=corpus.name, train_tokens=man["train"]["tokens"], train_documents=man["train"]["documents"],
                   heldout_tokens=man["heldout"]["tokens"], heldout_documents=man["heldout"]["documents"],
                   duplicates_dropped=man["duplicates"])
    else:
        if data_cfg.source == "builtin":
            prefixes = [ensure_builtin_corpus(data_cfg.cache_dir, tok, budget_bytes=builtin_budget_bytes, verbose=False)]
        else:
            prefixes = parse_blend(data_cfg.paths)[0]
        share = parse_and_normalize_split(data_cfg.split)[0]
        total = docs = 0
        for p in prefixes:
            ds = IndexedDataset(p)
            total += int(ds.sequence_lengths.sum())
            docs += len(ds.sequence_lengths)
            del ds
        rec.update(corpus=", ".join(os.path.basename(p) for p in prefixes), train_tokens=int(total * share),
                   train_documents=int(round(docs * share)))
    run = None if seq_length is None or num_train_samples is None else int(num_train_samples) * (int(seq_length) + 1)
    rec["run_tokens"] = run
    rec["epochs"] = run / rec["train_tokens"] if run and rec["train_tokens"] else None
    held = (f"; held out {rec['heldout_documents']} documents, {rec['heldout_tokens']:,} tokens"
            if rec["heldout_tokens"] is not None else "")
    draws = f"; this run draws {run:,} tokens = {rec['epochs']:.2f} epochs" if rec["epochs"] is not None else ""
    rec["summary"] = (f"corpus {rec['corpus']}: train {rec['train_documents']} documents, {rec['train_tokens']:,} "
                      f"tokens{held}{draws}" + (" (data repeats: use data.builtin_corpus=large or fewer tokens)"
                                                if (rec["epochs"] or 0) > 1 else ""))
    return rec


def _check_split_has_tokens(prefixes: Sequence[str], split: str, need_valid: bool, weighted: bool) -> None:
    """Every split that Megatron will draw samples from must own at least one token of every dataset.

    Megatron-Core 0.16.1's ``GPTDataset._get_num_epochs`` loops forever when a split it must draw
    samples from holds no tokens (e.g. 2 documents with split 80,20,0: the valid range is empty), so
    this is checked here, with the same document ranges Megatron computes, and turned into an error.
    Drawn splits: train; valid when validation samples are wanted; and with weighted ``data.paths``
    every split of nonzero weight (Megatron then samples each, even with size 0).
    """

    weights = parse_and_normalize_split(split)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w)
    drawn = [(0, "train")]
    if need_valid or (weighted and weights[1] > 0):
        drawn.append((1, "valid"))
    if weighted and weights[2] > 0:
        drawn.append((2, "test"))
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        lengths = ds.sequence_lengths
        n = len(lengths)
        for i, name in drawn:
            beg, end = int(round(bounds[i] * n)), int(round(bounds[i + 1] * n))
            if int(lengths[beg:end].sum()) == 0:
                if name == "train":
                    fix = "change data.split or add data."
                elif need_valid and name == "valid":
                    fix = "change data.split, add data, or run without validation (eval.interval=0)."
                else:
                    fix = (f"with weighted data.paths every split of nonzero weight is built: set the {name} "
                           f"weight to 0 (e.g. data.split=98,2,0), or add data.")
                raise DataConfigError(
                    f"data.split={split!r} gives the {name} split no documents of {prefix!r} ({n} documents in all; "
                    f"{name} would take documents [{beg}, {end})). Fix: {fix}")
        del ds


@contextlib.contextmanager
def _index_cache_lock(cache: Optional[str]):
    """Serialise index-cache builds across *separate jobs* sharing ``data.cache_dir`` (a parallel sweep).

    Megatron writes its ``.npy`` index caches in place and trusts any file that exists, so a second
    job could read a half-written cache. Only global rank 0 takes the lock: inside one job the other
    ranks wait at Megatron's own barrier and read what rank 0 wrote (locking them too would deadlock).
    """
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if cache is None or not rank0:
        yield
        return
    os.makedirs(cache, exist_ok=True)
    with _FileLock(os.path.join(cache, ".build.lock")):
        yield


@contextlib.contextmanager
def _rank0_when_not_distributed():
    """Megatron-Core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on a cache miss
    even in a single process without a process group (which raises). Only in that case, and only
    while the builder runs, ``get_rank`` answers 0 (what it would be in a one-process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        yield
        return
    orig = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = orig


def _unit(seed: int, idx: int, salt: str) -> int:
    """A 64-bit integer hash of (seed, idx, salt): stable across processes and Python versions."""
    return int.from_bytes(hashlib.blake2b(f"{seed}|{idx}|{salt}".encode(), digest_size=8).digest(), "little")


class RetrievalMixtureDataset(torch.utils.data.Dataset):
    """Replaces a fraction of a dataset's samples with synthetic retrieval documents.

    Sample ``idx`` is replaced iff ``hash(seed, idx) / 2**64 < fraction`` (deterministic, independent
    of access order and worker count). A replaced sample is a :func:`moba_cp.data.retrieval_docs.make_needle_sample`
    of ``seq_length + 1`` tokens (kind and depth 0..100 also drawn from the hash), whose haystack is the
    original sample's own text (EOD/pad tokens removed), so the model reads real text with a needle in
    it, not the same filler every time; the item is then shifted into ``tokens``/``labels`` like any
    GPT sample, so the answer is the tail of ``labels``.

    Loss mask (``loss_on``): ``"all"`` (default) keeps the LM loss on every token, so a retrieval sample
    still trains language modelling on its haystack and the answer is learned in context;
    ``"answer"`` puts the loss only on the answer tokens (a sharper retrieval signal, but such samples
    then carry few tokens in a token-averaged loss).

    Args:
        base: dataset of GPT items (see module docstring).
        tokenizer: the training tokenizer.
        fraction: share of samples replaced, in [0, 1].
        seq_length, seed: as for the base dataset.
        kinds: needle kinds to draw from (see :data:`moba_cp.data.retrieval_docs.KINDS`); those too long for
            ``seq_length`` are left out (``self.kinds`` says which remain; none left raises).
        loss_on: ``"all"`` or ``"answer"`` (see above).

    Raises:
        DataConfigError: ``seq_length`` fits no retrieval kind while ``fraction > 0``.
    """

    def __init__(self, base, tokenizer, fraction: float, seq_length: int, seed: int,
                 kinds: Sequence[str] = ("passkey", "single", "multikey", "multivalue"), loss_on: str = "all"):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"retrieval fraction {fraction} must be in [0, 1].")
        if loss_on not in ("all", "answer"):
            raise ValueError(f"loss_on={loss_on!r}: choose 'all' or 'answer'.")
        self.base, self.tok, self.fraction = base, tokenizer, float(fraction)
        self.seq_length, self.seed, self.loss_on = int(seq_length), int(seed), loss_on
        # Keep the kinds whose fixed parts leave room for a haystack (>= 64 tokens, + 32 for key-length spread).
        need = {k: fixed_tokens(tokenizer, k) + 96 for k in kinds}
        self.kinds = tuple(k for k in kinds if need[k] <= self.seq_length + 1)
        if self.fraction > 0 and not self.kinds:
            raise DataConfigError(
                f"seq_length={seq_length} is too short for retrieval documents ({', '.join(f'{k} needs {n}' for k, n in need.items())} "
                f"tokens). Fix: raise model.seq_length or set data.retrieval_fraction=0.")

    def __len__(self) -> int:
        return len(self.base)

    def is_retrieval(self, idx: int) -> bool:
        """Whether sample ``idx`` is a synthetic retrieval document."""
        return _unit(self.seed, idx, "mix") / 2.0 ** 64 < self.fraction

    def __getitem__(self, idx: int) -> dict:
        item = self.base[idx]
        if not self.is_retrieval(idx):
            return item
        h = _unit(self.seed, idx, "needle")
        kind = self.kinds[h % len(self.kinds)]
        depth = (h >> 8) % 101
        filler = haystack_tokens(self.tok, item["tokens"].tolist())
        if len(filler) < 64:  # (near-)empty sample: fall back to the passkey filler
            filler = None
        s = make_needle_sample(self.tok, self.seq_length + 1, depth, kind, seed=h >> 16, filler_tokens=filler)
        seq = torch.tensor(s.tokens, dtype=torch.long)
        tokens, labels = seq[:-1].contiguous(), seq[1:].contiguous()
        if self.loss_on == "all":
            loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        else:
            loss_mask = torch.zeros(self.seq_length, dtype=torch.float32)
            loss_mask[s.answer_start - 1:] = 1.0  # labels[j] = seq[j + 1]: the answer is labels[answer_start-1:]
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": torch.arange(self.seq_length, dtype=torch.long)}


def heldout_sequences(data_cfg, *, seq_length: int, num_sequences: int, tokenizer=None, seed: int = 0,
                      builtin_budget_bytes: int = DEFAULT_BUDGET_BYTES) -> list[torch.Tensor]:
    """Long held-out sequences for the trailing / position-wise loss: each from ONE document.

    Packed training samples cross document boundaries, which would blur a position-wise loss
    curve; these are the first ``seq_length + 1`` tokens of single documents at least that long.

    - ``source=builtin``, ``builtin_corpus=large``: the corpus's held-out documents (by text hash), in
      their stored order.
    - ``source=builtin`` (stdlib): standard-library documents that the byte budget left *out* of the
      training corpus (never trained on), in the same fixed order the corpus uses.
    - ``source=indexed``: documents of the validation split range (``data.split``) of the first prefix.
    - ``source=mock``: seeded random tokens (for plumbing tests only).

    Args:
        data_cfg: ``DataConfig``.
        seq_length: ``S``; every returned tensor has ``S + 1`` tokens (``tokens = x[:-1]``, ``labels = x[1:]``).
        num_sequences: how many (fewer are returned only when fewer documents are long enough; 0 raises).
        tokenizer: default built from ``data_cfg.tokenizer``.

    Returns:
        list of ``LongTensor[S + 1]``.

    Raises:
        DataConfigError: no held-out document has ``S + 1`` tokens (the message gives the longest).
    """
    tok = tokenizer if tokenizer is not None else build_tokenizer(data_cfg.tokenizer)
    need = seq_length + 1
    out: list[torch.Tensor] = []
    longest = 0
    if data_cfg.source == "mock":
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, tok.vocab_size, (need,), generator=g) for _ in range(num_sequences)]
    if _is_large(data_cfg):
        corpus = ensure_large_corpus(data_cfg.cache_dir, tok, heldout_fraction=_heldout_fraction(data_cfg))
        ds = IndexedDataset(corpus.heldout_prefix)
        where = f"the {len(ds.sequence_lengths)} held-out documents of the large corpus {corpus.name}"
        for i, n in enumerate(ds.sequence_lengths.tolist()):
            if len(out) >= num_sequences:
                break
            longest = max(longest, n - 1)
            if n - 1 >= need:  # the stored document ends with EOD
                out.append(torch.from_numpy(np.array(ds.get(i, 0, need), dtype=np.int64)))
        del ds
    elif data_cfg.source == "builtin":
        docs = collect_documents()
        chosen = {d.name for d in select_documents(docs, builtin_budget_bytes)}
        rest = sorted((d for d in docs if d.name not in chosen),
                      key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
        where = f"the {len(rest)} standard-library documents outside the {builtin_budget_bytes}-byte training corpus"
        for d in rest:
            if len(out) >= num_sequences:
                break
            arr = encode_document(tok, d.text)[:-1]  # without the EOD: one document, nothing after it
            longest = max(longest, len(arr))
            if len(arr) >= need:
                out.append(torch.from_numpy(np.asarray(arr[:need], dtype=np.int64)))
    else:
        validate_data_paths(data_cfg)
        prefix = parse_blend(data_cfg.paths)[0][0]
        ds = IndexedDataset(prefix)
        split = parse_and_normalize_split(data_cfg.split)
        n_docs = len(ds.document_indices) - 1
        lo, hi = int(round(split[0] * n_docs)), int(round((split[0] + split[1]) * n_docs))
        where = f"validation documents {lo}..{hi - 1} of {prefix}"
        lengths = ds.sequence_lengths
        for i in range(lo, hi):
            if len(out) >= num_sequences:
                break
            n = int(lengths[i])
            longest = max(longest, n - 1)
            if n - 1 >= need:  # the stored document ends with EOD
                out.append(torch.from_numpy(np.array(ds.get(i, 0, need), dtype=np.int64)))  # a copy: ds's mmap closes with it
    if not out:
        raise DataConfigError(f"no held-out document of >= {need} tokens among {where} (longest: {longest}). "
                              f"Use a shorter --seq-len or data with longer documents.")
    return out
