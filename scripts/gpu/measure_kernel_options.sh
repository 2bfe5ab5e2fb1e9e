#!/usr/bin/env bash
# Issue 13, on ONE GPU (H100/H200): time and check the kernel options that are off until measured,
# against the defaults in the same process. Each part writes its log as it runs, so a call cut
# short keeps what finished; PARTS picks the parts (default: bwd,tests,gate, in that order; every
# new tiling compiles its kernels first (tens of seconds each, a guess: not timed), so all three may
# not fit one 10-minute call).
#
#   OUT=/some/dir bash scripts/gpu/measure_kernel_options.sh        # (the device tool sets $OUT)
#   OUT=/some/dir PARTS=gate bash scripts/gpu/measure_kernel_options.sh
#
# 1. `bench_moba.py --tune` of the whole backward (delta, row copy, dK/dV, dQ, casts) at
#    train-b1024 128K, train-b512 32K and small-b512 4 x 8K, every variant in the same process
#    -> $OUT/tune_bwd.log (part bwd). Variants: the default; a block's key sub-tiles adjacent in the grid
#    (sub_major); the fused dQ added per element into dq (fuse_dq, as measured in session 9) with
#    sub_major; dQ summed in the gathered rows' copy (dq_rows) by atomics or by TMA bulk reductions
#    (tma_dq), with and without sub_major, and dQ as (K^T dS^T)^T (dq_trans). The default runs first
#    and last, so the drift within the call shows.
# 2. The GPU tests of those options (bf16 against the naive op) -> $OUT/gpu_tests.log (part tests).
# 3. The gate's loop options (split_edges: unmasked middle tiles; prefilter off) at FlashMoBA 512K
#    (the gate target's shape) and train-b1024 128K -> $OUT/tune_gate.log (part gate).
# Needs no network: megatron-core comes from ./.whl when it is not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
source scripts/gpu/_gpu_env.sh
git rev-parse HEAD 2>/dev/null > "$OUT/commit.txt" || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true

PARTS="${PARTS:-bwd,tests,gate}"
has() { [[ ",$PARTS," == *",$1,"* ]]; }

VARIANTS='[{}, {"sub_major": true}, {"fuse_dq": true, "sub_major": true},
 {"dq_rows": true}, {"dq_rows": true, "sub_major": true}, {"dq_rows": true, "sub_major": true, "dq_trans": true},
 {"dq_rows": true, "tma_dq": true}, {"dq_rows": true, "tma_dq": true, "sub_major": true},
 {"dq_rows": true, "tma_dq": true, "sub_major": true, "dq_trans": true}, {}]'
if has bwd; then
  "$PY" benchmarks/bench_moba.py --tune train-b1024:131072,train-b512:32768,small-b512:8192 --tune-parts bwd \
    --tune-bwd "$VARIANTS" 2>&1 | tee "$OUT/tune_bwd.log" || true
fi

if has tests; then
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_moba_triton.py -k "variants or real_sizes" 2>&1 \
    | tee "$OUT/gpu_tests.log" || true
fi

GATES='[{}, {"split_edges": true}, {"prefilter": false}, {"split_edges": true, "prefilter": false}, {}]'
if has gate; then
  "$PY" benchmarks/bench_moba.py --tune flashmoba:524288,train-b1024:131072 --tune-parts gate \
    --tune-gate "$GATES" 2>&1 | tee "$OUT/tune_gate.log" || true
fi
