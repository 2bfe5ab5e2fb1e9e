"""Training logs: one console line per logging step, a JSONL file and TensorBoard events (rank 0)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

__all__ = ["MetricsLogger", "peak_memory_gib", "peak_reserved_gib", "format_eta"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch (GiB), or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def peak_reserved_gib(device: torch.device) -> float | None:
    """Peak GPU memory reserved by torch's caching allocator (GiB); None on CPU. Above
    :func:`peak_memory_gib` by the cache's free blocks, including the private pools of CUDA
    graphs, whose intermediates are never counted as allocated while the graphs replay."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return None


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _truncate_after(path: Path, step: int) -> None:
    """Keep the rows of ``path`` (JSONL) with ``row["step"] <= step``; atomic replace."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    tmp.replace(path)


class MetricsLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``run_dir`` and prints a line per step.

    Only the main rank writes; other ranks' calls are no-ops.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        """``resume_step``: the step the run resumes from (0 = a new run). Rows of later steps,
        written by the interrupted run after its last checkpoint, are dropped (the resumed run
        writes them again), and TensorBoard purges its events past that step."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_step > 0 and path.is_file():
            _truncate_after(path, resume_step)
            self._jsonl = open(path, "a")
        else:
            self._jsonl = open(path, "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional at run time: events off without it

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step > 0 else None)
            except ImportError:
                print("logging: tensorboard is not installed; TensorBoard events are off "
                      "(pip install tensorboard, or set logging.tensorboard=false to silence this)")

    def log(self, record: dict, line: str | None = None) -> None:
        """Append ``record`` (must hold ``step``) to the JSONL file and TensorBoard; print ``line``."""
        if not self.enabled:
            return
        record = dict(record, time=time.time())
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()
        if line:
            print(line, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
