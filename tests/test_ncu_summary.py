"""benchmarks/ncu_summary.py: one line per kernel from an Nsight Compute raw CSV."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ncu_summary  # noqa: E402

CSV = '''"ID","Kernel Name","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed","launch__registers_per_thread","launch__shared_mem_per_block_dynamic","sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"
"","","usecond","%","register/thread","byte","%","ratio","ratio","ratio"
"0","_dkdv_kernel","1,234.6","55.2","255","65536","61.0","1.5","3.25","0.5"
"1","_merge_kernel","200","12","104","128","","0.25","n/a","0.1"
'''


def test_summary_converts_units_orders_stalls_and_marks_missing_columns(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text(CSV)
    dk, merge = ncu_summary.summarize(str(p), n_stalls=2)
    assert dk.startswith("_dkdv_kernel")
    assert "ms    1.235" in dk and "SM%   55.2" in dk and "regs  255.0" in dk and "smemKB   64.0" in dk
    assert "tensor%   61.0" in dk
    assert dk.endswith("stalls/issue: barrier 3.25, long_scoreboard 1.50")  # the two largest, largest first
    assert "mem% -" in dk and "dram% -" in dk and "l1% -" in dk  # not in this report
    assert "ms    0.200" in merge and "tensor% -" in merge
    assert merge.endswith("stalls/issue: long_scoreboard 0.25, wait 0.10")  # 'n/a' skipped
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/ncu_summary.py"), str(p)], capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines()[0] == f"# {p}" and len(out.splitlines()) == 3


def test_an_empty_report_is_refused_with_its_path(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text('"ID","Kernel Name"\n"",""\n')
    with pytest.raises(SystemExit, match="no kernel rows"):
        ncu_summary.summarize(str(p))
