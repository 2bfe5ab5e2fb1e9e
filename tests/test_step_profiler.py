"""logging.profile's StepProfiler on CPU: the range it records, the files, a stop inside the range."""

import json
import re

import torch

from moba_cp.config import parse_profile_steps
from moba_cp.train.step_profiler import StepProfiler


def _marker():
    """A step's work: an operator for torch.profiler, a function call for cProfile."""
    return torch.ones(64, 64) @ torch.ones(64, 64)


def _steps(prof, first, last, stop_at=None):
    tables = []
    for done in range(first, last + 1):
        prof.before_step(done)
        _marker()
        tables.append(prof.after_step(done))
        if done == stop_at:
            tables.append(prof.after_step(done, stopping=True))
            break
    return [t for t in tables if t is not None]


def test_profiles_exactly_the_range_and_writes_a_trace_and_a_table(tmp_path):
    prof = StepProfiler(parse_profile_steps([2, 3]), tmp_path, rank=1, device=torch.device("cpu"))
    tables = _steps(prof, 1, 5)
    assert tables == [tmp_path / "rank1_steps2-3.kernels.txt"]  # written once, after step 3
    text = tables[0].read_text()
    assert text.startswith("steps 2-3 (2 steps) on rank 1: ") and "aten::mm" in text
    trace = json.loads((tmp_path / "rank1_steps2-3.trace.json").read_text())
    assert sum(e.get("name") == "aten::mm" for e in trace["traceEvents"]) == 2  # steps 2 and 3, not 1, 4, 5
    host = (tmp_path / "rank1_steps2-3.host.txt").read_text()
    assert host.startswith("steps 2-3 (2 steps) on rank 1: ") and "== by own time ==" in host
    assert "== by cumulative time ==" in host
    # the host profile covers the same two steps: the marker function ran twice inside the range
    assert re.search(r"^\s+2\s+(\S+\s+){4}\S*test_step_profiler\.py:\d+\(_marker\)$", host, re.M)


def test_a_stop_inside_the_range_keeps_the_steps_profiled_so_far(tmp_path):
    prof = StepProfiler(parse_profile_steps([2, 6]), tmp_path, rank=0, device=torch.device("cpu"))
    tables = _steps(prof, 1, 8, stop_at=3)
    assert tables == [tmp_path / "rank0_steps2-3.kernels.txt"]
    assert tables[0].read_text().startswith("steps 2-3 (2 steps) on rank 0: ")


def test_no_range_records_nothing(tmp_path):
    prof = StepProfiler(parse_profile_steps(None), tmp_path, rank=0, device=torch.device("cpu"))
    assert _steps(prof, 1, 3, stop_at=2) == [] and not list(tmp_path.iterdir())
