"""Synthetic retrieval ("needle in a haystack") documents: the generators.

Used by the training-data mixture (:class:`moba_cp.data.datasets.RetrievalMixtureDataset`) and by
the retrieval evaluation (:mod:`moba_cp.eval.needle`, which scores them).

Generated locally and deterministically (seeded ``random.Random``, no downloads), in the style of
passkey retrieval (Mohtashami & Jaggi 2023) and RULER's NIAH tasks (Hsieh et al. 2024).

A sample is a token sequence of exactly ``length`` tokens (so it can be fed to a context-parallel
model whose sequence length must divide into zigzag chunks), laid out as::

    [intro] [haystack[:cut]] [needle] [haystack[cut:]] [question] [answer]

- ``haystack`` is ``H = length - len(intro) - len(needles) - len(question) - len(answer)`` filler
  tokens (the passkey sentences by default, or any token source the caller gives, cycled).
- Depth is exact in tokens: exactly ``depth_tokens = round(depth / 100 * H)`` filler tokens precede
  the *target* needle, so it starts at ``needle_pos = len(intro) + depth_tokens + (tokens of the other
  needles placed before it)``; with a single needle that is ``len(intro) + round(depth / 100 * H)``.
  Other needles of multi-key / multi-value samples sit at seeded random haystack offsets, never inside
  another needle.
- The answer is the last ``len(answer)`` tokens; ``answer_start = length - len(answer)``.

Kinds:
- ``passkey``: "The pass key is 71432. Remember it. 71432 is the pass key." -> the 5-digit key.
- ``single``: RULER niah_single: "One of the special magic numbers for {key} is: {7 digits}."
- ``multikey``: the target needle plus ``n_distractors`` needles with other keys (RULER niah_multikey).
- ``multivalue``: ``n_values`` needles with the same key and different numbers; the answer lists
  them in document order, comma-separated (RULER niah_multivalue).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["NeedleSample", "make_needle_sample", "haystack_tokens", "check_needle_grid", "sample_seed", "fixed_tokens", "KINDS",
           "PASSKEY_FILLER", "INTRO"]

KINDS = ("passkey", "single", "multikey", "multivalue")

# The passkey paper's filler: repetitive, so the needle is the only surprising content.
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")

# Keys for the RULER-style needles: short, distinct, common words.
_WORDS = ("apple", "river", "candle", "falcon", "garden", "harbor", "island", "jacket", "kettle", "lantern",
          "meadow", "needle", "orchid", "pepper", "quartz", "rabbit", "saddle", "timber", "violet", "walnut",
          "anchor", "bridge", "cactus", "dragon", "ember", "forest", "glacier", "hammer", "igloo", "jungle",
          "koala", "lemon", "marble", "nectar", "oyster", "pillow", "quiver", "rocket", "silver", "tunnel",
          "umbrella", "valley", "window", "yogurt", "zebra", "basket", "copper", "donkey", "engine", "feather")


@dataclass
class NeedleSample:
    """One retrieval sample.

    Attributes:
        tokens: ``length`` token ids (the model input; the answer is its tail).
        answer_start: index of the first answer token; ``tokens[answer_start:] == answer``.
        answer: answer token ids.
        needle_pos: index where the target needle starts (exact depth, see module docstring).
        needle_positions: start index of every needle, in document order.
        needle_len: token length of each needle, same order as ``needle_positions``.
        haystack_len: ``H``, the number of filler tokens.
        depth_tokens: filler tokens before the target needle, ``round(depth / 100 * H)``.
        kind, length, depth, key, values: what was asked; ``values`` in document order.
    """

    tokens: list[int]
    answer_start: int
    answer: list[int]
    needle_pos: int
    needle_positions: list[int]
    needle_len: list[int]
    haystack_len: int
    depth_tokens: int
    kind: str
    length: int
    depth: float
    key: str
    values: list[str] = field(default_factory=list)


def _needles(kind: str, rng: random.Random, n_distractors: int, n_values: int):
    """Return (target needle text, other needle texts, question text, answer text, key, values)."""
    if kind == "passkey":
        v = str(rng.randint(10000, 99999))
        needle = f"The pass key is {v}. Remember it. {v} is the pass key. "
        return needle, [], "What is the pass key? The pass key is ", v, "pass key", [v]
    keys = rng.sample(_WORDS, 1 + (n_distractors if kind == "multikey" else 0))
    key = keys[0]
    num = lambda: str(rng.randint(1_000_000, 9_999_999))  # noqa: E731
    tmpl = "One of the special magic numbers for {} is: {}. "
    if kind == "single":
        v = num()
        q = f"What is the special magic number for {key} mentioned in the provided text? " \
            f"The special magic number for {key} mentioned in the provided text is "
        return tmpl.format(key, v), [], q, v, key, [v]
    if kind == "multikey":
        v = num()
        others = [tmpl.format(k, num()) for k in keys[1:]]
        q = f"What is the special magic number for {key} mentioned in the provided text? " \
            f"The special magic number for {key} mentioned in the provided text is "
        return tmpl.format(key, v), others, q, v, key, [v]
    if kind == "multivalue":
        vals = []
        while len(vals) < n_values:  # distinct values, so the answer order is unambiguous
            x = num()
            if x not in vals:
                vals.append(x)
        q = f"What are all the special magic numbers for {key} mentioned in the provided text? " \
            f"The special magic numbers for {key} mentioned in the provided text are "
        # The answer is fixed after placement (document order); here the target is vals[0].
        return tmpl.format(key, vals[0]), [tmpl.format(key, x) for x in vals[1:]], q, None, key, vals
    raise ValueError(f"unknown needle kind {kind!r}; choose one of {KINDS}")


def _plan(tokenizer, length: int, depth: float, kind: str, seed: int, n_distractors: int, n_values: int):
    """The seeded generator and the encoded fixed parts of a sample (everything but the haystack).

    Returns ``(rng, (target, others, question, answer_text, key, values), intro, answer_len, fixed)``
    with token lists and ``fixed`` = their total length; ``rng`` continues where the sample needs it.
    """
    if not 0 <= depth <= 100:
        raise ValueError(f"depth={depth} must be within [0, 100] (percent).")
    rng = random.Random(f"{seed}|{kind}|{length}|{depth}")
    target, others, question, answer_text, key, values = _needles(kind, rng, n_distractors, n_values)
    enc = tokenizer.encode
    intro_t, target_t, question_t = enc(INTRO), enc(target), enc("\n" + question)
    others_t = [enc(o) for o in others]
    if kind == "multivalue":
        # Answer length is known before placement: every value has 7 digits.
        answer_len = len(enc(", ".join(values)))
    else:
        answer_len = len(enc(answer_text))
    fixed = len(intro_t) + len(target_t) + sum(map(len, others_t)) + len(question_t) + answer_len
    return rng, (target_t, others_t, question_t, answer_text, key, values), intro_t, answer_len, fixed


def sample_seed(seed: int, j: int) -> int:
    """The generator seed of sample ``j`` of a grid cell (see :func:`run_needle_grid`)."""
    return seed * 1_000_003 + j


def check_needle_grid(tokenizer, lengths: Sequence[int], depths: Sequence[float], kinds: Sequence[str],
                      n_per_cell: int, seed: int) -> None:
    """Raise ``ValueError`` naming every (kind, length) whose samples cannot be built, before any runs.

    Generates only the fixed parts of every sample of the grid (no haystack, no model), so a
    grid that would fail at its 45th cell fails here, at once, with the lengths that would work.
    """
    bad_kinds = [k for k in kinds if k not in KINDS]
    if bad_kinds:
        raise ValueError(f"--kinds: unknown {bad_kinds}; choose from {', '.join(KINDS)}.")
    if n_per_cell < 1:
        raise ValueError(f"--n-per-cell={n_per_cell} must be >= 1.")
    if any(d < 0 or d > 100 for d in depths):
        raise ValueError(f"--depths {list(depths)}: every depth must be a percent in [0, 100].")
    problems = []
    for kind in kinds:
        need = {L: max(_plan(tokenizer, L, d, kind, sample_seed(seed, j), 3, 4)[-1]
                       for d in depths for j in range(n_per_cell)) for L in lengths}
        short = [L for L in lengths if L < need[L]]
        if short:
            problems.append(f"{kind!r} needs at least {max(need.values())} tokens of fixed text (intro, needles, "
                            f"question, answer); too short: {', '.join(f'length={L}' for L in short)}")
    if problems:
        raise ValueError("needle grid: " + "; ".join(problems) + ". Fix: raise --lengths above those sizes, "
                         "or drop those kinds from --kinds.")


def make_needle_sample(tokenizer, length: int, depth: float, kind: str = "single", seed: int = 0, *,
                       filler_tokens: Sequence[int] | None = None, n_distractors: int = 3,
                       n_values: int = 4) -> NeedleSample:
    """Generate one retrieval sample of exactly ``length`` tokens with the target needle at ``depth`` %.

    Args:
        tokenizer: anything with ``encode(str) -> list[int]`` (see :mod:`moba_cp.data.tokenizers`).
        length: total tokens (intro + haystack + needles + question + answer).
        depth: 0..100, position of the target needle within the haystack (0 = right after the intro,
            100 = right before the question).
        kind: one of :data:`KINDS`.
        seed: everything random (values, keys, other needles' offsets) comes from ``Random(seed)``
            (together with kind/length/depth, so cells of a grid differ).
        filler_tokens: haystack token source, cycled (default: the passkey filler sentences).
        n_distractors: ``multikey``: needles with other keys.
        n_values: ``multivalue``: values for the one key.

    Returns:
        :class:`NeedleSample`.

    Raises:
        ValueError: ``length`` too short for the fixed parts, bad depth or kind.
    """
    rng, (target_t, others_t, question_t, answer_text, key, values), intro_t, answer_len, fixed = _plan(
        tokenizer, length, depth, kind, seed, n_distractors, n_values)
    enc = tokenizer.encode
    H = length - fixed
    if H < 0:
        raise ValueError(f"length={length} is too short for a {kind!r} sample: its fixed parts take {fixed} tokens.")
    cut = round(depth / 100.0 * H)
    # Other needles go at seeded haystack offsets; ties keep generation order so placement is stable.
    offsets = sorted(((rng.randint(0, H), i + 1) for i in range(len(others_t))))
    placed = sorted([(cut, 0)] + offsets)  # (haystack offset, needle id 0 = target); target first on ties
    pieces = [(0, target_t)] + [(i + 1, t) for i, t in enumerate(others_t)]
    needle_of = dict(pieces)

    fill = list(filler_tokens) if filler_tokens is not None else enc(PASSKEY_FILLER)
    if not fill:
        raise ValueError("filler_tokens is empty.")
    reps = H // len(fill) + 1
    hay = (fill * reps)[:H]

    tokens: list[int] = list(intro_t)
    positions, lens, pos_of = [], [], {}
    prev = 0
    for off, nid in placed:
        tokens.extend(hay[prev:off])
        prev = off
        pos_of[nid] = len(tokens)
        positions.append(len(tokens))
        lens.append(len(needle_of[nid]))
        tokens.extend(needle_of[nid])
    tokens.extend(hay[prev:])
    tokens.extend(question_t)
    if kind == "multivalue":
        order = [nid for _, nid in placed]  # document order of the values
        values = [values[nid] for nid in order]
        answer_text = ", ".join(values)
    answer_t = enc(answer_text)
    assert len(answer_t) == answer_len, "answer length changed with the value order"
    answer_start = len(tokens)
    tokens.extend(answer_t)
    assert len(tokens) == length, (len(tokens), length)
    return NeedleSample(tokens=tokens, answer_start=answer_start, answer=answer_t, needle_pos=pos_of[0],
                        needle_positions=positions, needle_len=lens, haystack_len=H, depth_tokens=cut, kind=kind, length=length,
                        depth=float(depth), key=key, values=values)


def haystack_tokens(tokenizer, tokens) -> list[int]:
    """A token sequence as haystack text: its ids without the tokenizer's EOD and padding (a needle
    sample is one document, so document boundaries and padding of the source must not show in it)."""
    drop = {int(tokenizer.eod)} | ({int(tokenizer.pad)} if getattr(tokenizer, "pad", None) is not None else set())
    return [int(t) for t in tokens if int(t) not in drop]


def fixed_tokens(tokenizer, kind: str, n_seeds: int = 16) -> int:
    """Upper estimate of the non-haystack tokens of a ``kind`` sample (intro, needles, question, answer).

    The maximum over ``n_seeds`` seeds (key words differ in length); a sample needs
    ``length >= fixed_tokens(...)`` plus whatever haystack is wanted.
    """
    big = 1 << 16
    return max(big - make_needle_sample(tokenizer, big, 50, kind, seed=s, filler_tokens=[0]).haystack_len
               for s in range(n_seeds))
