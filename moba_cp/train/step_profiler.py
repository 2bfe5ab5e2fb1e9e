"""``logging.profile``: torch.profiler over a range of training steps.

    moba-cp train RECIPE.yaml --logging.profile=[5,7]

profiles steps 5, 6 and 7 (1-based, as the console counts them) on every rank and writes, under
``RUN_DIR/profile/``:

* ``rank{R}_steps{A}-{B}.trace.json``: a Chrome / Perfetto trace (open it in ui.perfetto.dev);
* ``rank{R}_steps{A}-{B}.kernels.txt``: the operators and kernels sorted by their own device time
  (CPU time on a CPU run), with the profiled wall time per step on top, so "where does a step's
  time go" is a file to read, not a trace to click through;
* ``rank{R}_steps{A}-{B}.host.txt``: where the *host's* time goes over the same steps (cProfile:
  the Python functions by their own time, then by cumulative time). A short step is often bound by
  the host enqueueing kernels, not by the kernels (the GPU idles between them); the kernels table
  cannot show that, this file does. Both profilers slow the host while they record, so compare
  shares within the file, not its times with an unprofiled step's.

Steps outside the range run without the profiler (it costs host time while it records). The
range is checked with the recipe (:func:`moba_cp.config.parse_profile_steps`), before any work starts.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["StepProfiler"]


class StepProfiler:
    """Starts torch.profiler before step ``A`` and writes its results after step ``B``.

    Args:
        steps: ``(A, B)`` from :func:`moba_cp.config.parse_profile_steps`, or None (then every call is a no-op).
        out_dir: where the files go (``RUN_DIR/profile``).
        rank: this process's global rank (one pair of files per rank).
        device: the training device (CUDA activity is recorded only on a GPU).
    """

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, rank: int, device: torch.device):
        self.steps = steps
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._prof = None
        self._host = None
        self._t0 = 0.0

    def before_step(self, done: int) -> None:
        """Call before the step that will be number ``done`` (1-based)."""
        if self.steps is None or done != self.steps[0]:
            return
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        self._prof = profile(activities=acts, record_shapes=False)
        self._prof.__enter__()
        self._host = cProfile.Profile()
        self._host.enable()
        self._t0 = time.perf_counter()

    def after_step(self, done: int, stopping: bool = False) -> Path | None:
        """Call after step ``done``; after the last profiled step (or the last step before a
        requested stop, so a stopped run keeps the steps it profiled), writes the files and
        returns the table's path."""
        if self._prof is None or (done != self.steps[1] and not stopping):
            return None
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._host.disable()
        host, self._host = self._host, None
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        a, b = self.steps[0], done
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}_steps{a}-{b}"
        prof.export_chrome_trace(str(stem) + ".trace.json")
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        n = b - a + 1
        head = (f"steps {a}-{b} ({n} step{'s' if n > 1 else ''}) on rank {self.rank}: "
                f"{wall * 1e3 / n:.2f} ms per step (wall, with the profiler on); sorted by {sort}\n\n")
        table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)
        path = Path(str(stem) + ".kernels.txt")
        path.write_text(head + table + "\n")
        Path(str(stem) + ".host.txt").write_text(_host_table(host, head.split(";")[0]))
        return path


def _host_table(host: cProfile.Profile, head: str, rows: int = 45) -> str:
    """cProfile's view of the profiled steps: by own time, then by cumulative time."""
    out = [f"{head}; host (Python) time under cProfile\n"]
    for key, what in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buf = io.StringIO()
        pstats.Stats(host, stream=buf).sort_stats(key).print_stats(rows)
        out.append(f"== by {what} ==\n{buf.getvalue().strip()}\n")
    return "\n".join(out)
