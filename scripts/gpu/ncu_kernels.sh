#!/usr/bin/env bash
# Nsight Compute hardware counters for MoBA's kernels (one Hopper GPU; ncu needs a runtime that
# lets it read the counters, e.g. the Firecracker machines):
#   OUT=/tmp/ncu AT="flashmoba:32768 train-b1024:131072" bash scripts/gpu/ncu_kernels.sh
# Per suite:seq of benchmarks/bench_moba.py: one warmed-up fwd+bwd (profile_moba.py --ncu) under
# ncu with the sections below; the report (.ncu-rep), its details page and its raw CSV go to $OUT,
# and benchmarks/ncu_summary.py prints one line per kernel (time, SM / memory / tensor-pipe
# throughput, occupancy, registers, the largest warp-stall reasons).
# KERNELS (ncu -k filter) and COUNT (kernels profiled per shape) narrow or widen it.
set -euo pipefail
source scripts/gpu/_gpu_env.sh
: "${OUT:?set OUT to a folder for the reports}"
: "${AT:?set AT to suite:seq shapes, e.g. flashmoba:32768}"
NCU="${NCU:-$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)}"
[ -x "$NCU" ] || { echo "ncu not found (set NCU=/path/to/ncu)" >&2; exit 2; }
KERNELS="${KERNELS:-regex:_gate_topk_kernel|_fwd_partial_kernel|_merge_kernel|_dkdv_kernel|_dq_kernel|_dq_rows_sum_kernel|_gather_rows_kernel|_fwd_one_pass_kernel}"
COUNT="${COUNT:-12}"
mkdir -p "$OUT"
"$NCU" --version | tail -1
for at in $AT; do
  tag="${at//:/_}"
  echo "== $at"
  rc=0
  timeout "${NCU_TIMEOUT:-300}" "$NCU" --profile-from-start off --clock-control none -k "$KERNELS" -c "$COUNT" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SourceCounters \
    -o "$OUT/ncu_$tag" -f "$PY" benchmarks/profile_moba.py --ncu --at "$at" > "$OUT/ncu_${tag}_run.log" 2>&1 || rc=$?
  tail -3 "$OUT/ncu_${tag}_run.log"
  [ "$rc" = 0 ] || echo "ncu exited $rc for $at (log: ncu_${tag}_run.log)"
  if [ -f "$OUT/ncu_$tag.ncu-rep" ]; then
    "$NCU" --import "$OUT/ncu_$tag.ncu-rep" --page details > "$OUT/ncu_${tag}_details.txt" || true
    "$NCU" --import "$OUT/ncu_$tag.ncu-rep" --page raw --csv > "$OUT/ncu_${tag}_raw.csv" || true
    "$PY" benchmarks/ncu_summary.py "$OUT/ncu_${tag}_raw.csv" || true
  fi
done
