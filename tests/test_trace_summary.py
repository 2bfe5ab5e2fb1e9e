"""benchmarks/trace_summary.py: busy/idle as the union of device intervals, kinds, and the diff."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import trace_summary  # noqa: E402


def _trace(path, events):
    path.write_text(json.dumps({"traceEvents": events}))
    return str(path)


def test_busy_is_the_union_of_overlapping_intervals_and_the_diff_names_the_kernels(tmp_path):
    k = lambda name, ts, dur, cat="kernel": {"name": name, "cat": cat, "ts": ts, "dur": dur}  # noqa: E731
    a = _trace(tmp_path / "a.json", [
        k("_dkdv_kernel", 0, 100), k("_dq_kernel", 50, 100),  # overlap: 150 us busy, not 200
        k("Memcpy DtoD", 300, 50, "gpu_memcpy"), k("ampere_gemm", 400, 100),
        {"name": "aten::mm", "cat": "cpu_op", "ts": 0, "dur": 999},  # host events are not device time
    ])
    b = _trace(tmp_path / "b.json", [k("cudnn_fprop", 0, 200), k("ampere_gemm", 250, 100)])
    span, busy, idle = trace_summary.busy_idle_ms(trace_summary.gpu_events(a))
    assert (span, busy, idle) == (0.5, 0.3, 0.2)
    kinds = [trace_summary.kind(e) for e in trace_summary.gpu_events(a)]
    assert kinds == ["moba_cp triton", "moba_cp triton", "memcpy", "other"]
    # the fused layer ops run under both attentions: their own kind, not MoBA's kernels
    assert [trace_summary.kind(k(n, 0, 1)) for n in ("_rope_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel")] \
        == ["moba_cp layer ops"] * 3
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/trace_summary.py"), a, b], capture_output=True,
                         text=True, check=True).stdout
    assert "span 0.5 ms, GPU busy 0.3 ms, idle 0.2 ms" in out
    lines = out.splitlines()
    diff = lines[lines.index(next(x for x in lines if x.startswith("kernels by total time"))) + 1:]
    assert diff[0].split()[0] == "-0.20" and diff[0].endswith("cudnn_fprop")  # largest |difference| first
    assert any(x.split()[0] == "+0.00" and x.endswith("ampere_gemm") for x in diff)


def test_gaps_are_the_idle_intervals_between_device_events_longest_first(tmp_path):
    k = lambda name, ts, dur: {"name": name, "cat": "kernel", "ts": ts, "dur": dur}  # noqa: E731
    a = _trace(tmp_path / "a.json", [
        k("first", 0, 100), k("inside", 20, 30),  # ends inside "first": no gap
        k("after_3", 103, 10),                    # 3 us gap
        k("after_2000", 2113, 10),                # 2000 us gap
        k("after_50", 2173, 5),                   # 50 us gap
    ])
    gaps = trace_summary.idle_gaps(trace_summary.gpu_events(a))
    assert [(g[0], g[2]) for g in gaps] == [(2000, "after_2000"), (50, "after_50"), (3, "after_3")]
    span, busy, idle = trace_summary.busy_idle_ms(trace_summary.gpu_events(a))
    assert abs(idle * 1e3 - sum(g[0] for g in gaps)) < 1e-9  # the gaps are exactly the idle time
    hist = trace_summary.gap_histogram(gaps)
    assert "0-5 us: 1 gaps, 0.00 ms" in hist and "20-100 us: 1 gaps, 0.05 ms" in hist and ">=1000 us: 1 gaps, 2.00 ms" in hist
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/trace_summary.py"), a, "--gaps", "2"],
                         capture_output=True, text=True, check=True).stdout
    listed = [x for x in out.splitlines() if "ms idle at" in x]
    assert len(listed) == 2 and listed[0].strip().startswith("2.000 ms idle at +0.1 ms, before after_2000")
