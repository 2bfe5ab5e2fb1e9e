"""One line per kernel from an Nsight Compute raw CSV (``ncu --import R --page raw --csv``).

Usage: python benchmarks/ncu_summary.py ncu_flashmoba_32768_raw.csv [--stalls 4]

Per profiled kernel: its time, SM and memory throughput (% of peak), DRAM, L2 and L1/shared
throughput, the
tensor, ALU, FMA and load/store pipes' activity (% of peak while the SM is active), achieved
occupancy against the theoretical one, registers per thread, shared memory per block, cycles
per issued instruction, and the warp-stall reasons with the most cycles per issued instruction
(the ``WarpStateStats`` section). Columns the report lacks print as '-'.
Written for ``scripts/gpu/ncu_kernels.sh``.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys

STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(.+)_per_issue_active\.ratio$")
COLUMNS = (  # (label, metric, scale)
    ("ms", "gpu__time_duration.sum", None),
    ("SM%", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("mem%", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("dram%", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("l2%", "lts__throughput.avg.pct_of_peak_sustained_elapsed", 1),
    ("l1%", "l1tex__throughput.avg.pct_of_peak_sustained_active", 1),
    ("tensor%", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", 1),
    ("alu%", "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active", 1),
    ("fma%", "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active", 1),
    ("lsu%", "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active", 1),
    ("occ%", "sm__warps_active.avg.pct_of_peak_sustained_active", 1),
    ("occ_th%", "sm__maximum_warps_per_active_cycle_pct", 1),
    ("regs", "launch__registers_per_thread", 1),
    ("smemKB", "launch__shared_mem_per_block_dynamic", 1 / 1024),
    ("cyc/issue", "smsp__average_warp_latency_per_inst_issued.ratio", 1),
)


def _num(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def read(path: str) -> tuple[list[str], list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if len(rows) < 3:
        raise SystemExit(f"{path}: no kernel rows (an empty or failed ncu report?)")
    return rows[0], rows[1], rows[2:]


def summarize(path: str, n_stalls: int = 4) -> list[str]:
    head, units, rows = read(path)
    col = {name: i for i, name in enumerate(head)}
    stalls = [(m.group(1), i) for i, n in enumerate(head) if (m := STALL.match(n))]
    out = []
    for r in rows:
        name = r[col["Kernel Name"]] if "Kernel Name" in col else r[0]
        parts = [f"{name[:28]:28s}"]
        for label, metric, scale in COLUMNS:
            i = col.get(metric)
            v = _num(r[i]) if i is not None else None
            if v is not None and scale is None:  # time: to ms from the report's unit
                unit = units[i].strip().lower()
                v = v / {"ns": 1e6, "nsecond": 1e6, "us": 1e3, "usecond": 1e3, "ms": 1.0, "msecond": 1.0}.get(unit, 1e6)
                parts.append(f"{label} {v:8.3f}")
            elif v is not None:
                if label == "smemKB":  # the report's unit: byte, Kbyte or Mbyte (per block)
                    unit = units[i].strip().lower()
                    scale = 1.0 if unit.startswith("kbyte") else 1024.0 if unit.startswith("mbyte") else 1 / 1024
                parts.append(f"{label} {v * scale:6.1f}")
            else:
                parts.append(f"{label} -")
        st = sorted(((v, s) for s, i in stalls if (v := _num(r[i])) is not None), reverse=True)[:n_stalls]
        if st:
            parts.append("stalls/issue: " + ", ".join(f"{s} {v:.2f}" for v, s in st))
        out.append(" | ".join(parts))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--stalls", type=int, default=4, help="stall reasons to print per kernel")
    args = ap.parse_args(argv)
    for p in args.csv:
        print(f"# {p}")
        for line in summarize(p, args.stalls):
            print(line)


if __name__ == "__main__":
    sys.exit(main())
