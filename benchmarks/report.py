"""Shared by the benchmark scripts: results printed on rank 0 and written to --out as they come
(so a run cut short by a timeout keeps every row it finished), and a device sync for timers."""

from __future__ import annotations

import torch

_state = {"rank": 0, "out": None, "lines": []}


def configure(*, rank: int | None = None, out: str | None = None) -> None:
    """Set this process's rank and/or the results file (either may be set separately)."""
    if rank is not None:
        _state["rank"] = rank
    if out is not None:
        _state["out"] = out


def emit(line: str = "") -> None:
    """Print on rank 0 and rewrite the results file with every line so far."""
    if _state["rank"] != 0:
        return
    print(line, flush=True)
    _state["lines"].append(line)
    if _state["out"]:
        with open(_state["out"], "w") as f:
            f.write("\n".join(_state["lines"]) + "\n")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
