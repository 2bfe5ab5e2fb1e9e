"""Up-front checks of a recipe's data section, before any process group or model exists.

Free of Megatron-Core, so ``moba-cp train --dry-run`` and the pre-flight checks import no more than
they need (``moba_cp.data.datasets`` builds the datasets and re-exports these names).
"""

from __future__ import annotations

import os
import struct
from typing import Optional, Sequence

from moba_cp.data.tokenizers import TokenizerError, build_tokenizer

__all__ = ["DataConfigError", "parse_blend", "validate_data_paths"]


class DataConfigError(ValueError):
    """Bad data settings or missing data files, found before training starts."""


def parse_blend(paths: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """``data.paths`` -> ``(prefixes, weights or None)``.

    Accepts ``['a', 'b']`` (weights from dataset sizes) or ``['0.7', 'a', '0.3', 'b']``. Prefixes may
    be given with a ``.bin``/``.idx`` suffix, which is stripped.

    Raises:
        DataConfigError: mixed / malformed weights.
    """
    paths = [str(p).strip() for p in paths]
    if not paths:
        raise DataConfigError("data.paths is empty; give indexed-dataset prefixes (PREFIX for PREFIX.bin/.idx).")

    def is_num(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    def strip(p: str) -> str:
        return p[:-4] if p.endswith((".bin", ".idx")) else p

    if len(paths) % 2 == 0 and all(is_num(paths[i]) for i in range(0, len(paths), 2)):
        weights = [float(paths[i]) for i in range(0, len(paths), 2)]
        prefixes = [strip(paths[i]) for i in range(1, len(paths), 2)]
        if any(is_num(p) for p in prefixes):
            raise DataConfigError(f"data.paths {paths}: expected alternating weight, prefix pairs.")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataConfigError(f"data.paths weights {weights} must be >= 0 and not all zero.")
        return prefixes, weights
    if any(is_num(p) for p in paths):
        raise DataConfigError(
            f"data.paths {paths}: weights must come in pairs before every prefix ('0.7', 'a', '0.3', 'b') or not at all.")
    return [strip(p) for p in paths], None


def _check_prefix(prefix: str) -> None:
    bin_p, idx_p = prefix + ".bin", prefix + ".idx"
    missing = [p for p in (bin_p, idx_p) if not os.path.isfile(p)]
    if missing:
        hint = ""
        if os.path.isfile(prefix):
            hint = " (the path is a file: give the prefix without .bin/.idx)"
        raise DataConfigError(
            f"indexed dataset {prefix!r}: missing {', '.join(missing)}{hint}. Fix: build it with "
            f"`moba-cp prepare-data INPUTS --output {prefix}` or correct data.paths.")
    with open(idx_p, "rb") as f:
        head = f.read(34)
    if head[:9] != b"MMIDIDX\x00\x00" or len(head) < 34:
        raise DataConfigError(f"{idx_p} is not a Megatron index file (bad header).")
    n_seq, n_docs = struct.unpack("<QQ", head[18:34])
    if n_seq == 0:
        raise DataConfigError(f"indexed dataset {prefix!r} holds no sequences.")


def validate_data_paths(data_cfg) -> None:
    """Check ``data_cfg`` (a ``DataConfig``) before any process group or model exists.

    Checks: the tokenizer spec builds; for ``source=indexed`` every prefix has a readable
    ``.bin``/``.idx`` pair with data; the split string parses; ``cache_dir`` can be created/written.

    Raises:
        DataConfigError: with the offending path or key and the fix.
    """
    try:
        build_tokenizer(data_cfg.tokenizer)
    except TokenizerError as e:
        raise DataConfigError(f"data.tokenizer: {e}") from None
    if data_cfg.source == "indexed":
        if not data_cfg.paths:
            raise DataConfigError("data.source=indexed needs data.paths (Megatron .bin/.idx prefixes).")
        prefixes, _ = parse_blend(data_cfg.paths)
        for p in prefixes:
            _check_prefix(p)
    parts = [x for x in str(data_cfg.split).replace("/", ",").split(",") if x.strip()]
    try:
        vals = [float(x) for x in parts]
    except ValueError:
        vals = []
    if not vals or len(vals) > 3 or any(v < 0 for v in vals) or sum(vals) <= 0 or vals[0] <= 0:
        raise DataConfigError(f"data.split={data_cfg.split!r}: expected 'train,valid,test' weights like '98,2,0' "
                              f"with a positive train weight.")
    if data_cfg.source != "mock":
        try:
            os.makedirs(data_cfg.cache_dir, exist_ok=True)
        except OSError as e:
            raise DataConfigError(f"data.cache_dir={data_cfg.cache_dir!r} cannot be created: {e}") from None
        if not os.access(data_cfg.cache_dir, os.W_OK):
            raise DataConfigError(f"data.cache_dir={data_cfg.cache_dir!r} is not writable.")
