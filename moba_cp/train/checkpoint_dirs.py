"""Checkpoint directories of a run (``iter_NNNNNNN`` with a ``meta.json`` once complete): which is
newest, which step a directory holds. Free of Megatron-Core, so the run-directory check and
``--dry-run`` need no more; ``moba_cp.train.checkpoint`` writes and reads the checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["CheckpointError", "latest_checkpoint", "complete_checkpoints", "checkpoint_step"]

_DIR_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message names the path and the cause."""


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint directory (one with meta.json), or None."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    best = None
    for p in root.iterdir():
        m = _DIR_RE.match(p.name)
        if m and (p / "meta.json").is_file():
            if best is None or int(m.group(1)) > int(_DIR_RE.match(best.name).group(1)):
                best = p
    return best


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Every complete checkpoint directory (one with meta.json), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _DIR_RE.match(p.name) and (p / "meta.json").is_file())


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory ``iter_0000100`` (-> 100)."""
    m = _DIR_RE.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected iter_NNNNNNN).")
    return int(m.group(1))
