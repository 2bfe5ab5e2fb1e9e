#!/usr/bin/env bash
# Issue 13's training lines on ONE GPU (the targets name an H200), MoBA against full attention in
# the same call, in the order that matters most when a call is cut short: 128K, then 8K, then 32K,
# then the d=64 kernel table with cuDNN. Each part writes its table under $OUT as its rows finish.
#
#   OUT=/some/dir COMMIT=<sha> bash scripts/gpu/training_lines.sh          # (the device tool sets $OUT)
#   OUT=/some/dir COMMIT=<sha> PARTS=128k MOBA_KERNEL="bwd.skip_unseen=false" bash scripts/gpu/training_lines.sh
#
# PARTS: comma-separated of 128k, 128k-graph, 8k, 32k, table, b4096, tests, tune, run in that order (default:
# 128k, 8k, 32k, table; 128k, 8k, 32k and table took ~2.5 + 1.5 + 1 + 0.5 minutes on an H200 in
# sessions 31-33, more on a cold machine that compiles first). 128k-graph: the 128K line replayed from
# a CUDA graph (its default since session 36, as every line's) and eager (train.cuda_graph=none),
# both attentions, four runs. b4096: the paper setting's kernel row at 128K with cuDNN (bench_moba.py
# --suite paper-b4096 --max-seq 131072; the block >= 512 target's d=128 row). tests: the kernels' GPU
# tests (pytest -m gpu tests/test_moba_triton*.py tests/test_moba_gpu_training_shapes.py; ~3 minutes on
# an H100; 370 s on an H200 with tests/test_train_cuda_graph.py as well; -rA names each test and
# its outcome in the log). A machine start is the scarce part, so one call may take several parts,
# but 128k with one A/B row, b4096 and tests come near the 10-minute limit together: run tests as a
# second call on the same warm machine. tune: the backward alone with TUNE_BWD's overrides (a JSON
# object of BwdConfig fields, required with this part) against the default, default / option /
# default / option / default in one process per shape (train-b1024 128K, train-b512 32K, small-b512
# 4 x 8K, paper-b512 32K at d=128).
# MOBA_KERNEL: a ';'-separated list of moba.kernel overrides, each adding a MoBA row (an A/B against
# the default in the same call; bench_train.py --moba-kernel). REPEATS_8K (default 2): pairs at 8K
# (its eager step was host-bound and scattered between processes; replayed from a graph it held
# within ~3% on an H100). COMMIT: the commit line of the tables (a tree copied to the GPU machine
# may carry no .git). The 128K step needs ~104 GiB: an H100 (80 GB) skips it.
# Files under $OUT (at most 8, what the device tool brings back): train_{128k,128k-graph,8k,32k}.md,
# train.log (every training part's output), kernels_d64.{md,log}, kernels_b4096.{md,log}, gpu_tests.log,
# tune_bwd.log.
# Needs no network: megatron-core comes from ./.whl when it is not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PARTS="${PARTS:-128k,8k,32k,table}"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
if has tune && [[ -z "${TUNE_BWD:-}" ]]; then
  echo "part tune needs TUNE_BWD, a JSON object of BwdConfig overrides, e.g. TUNE_BWD='{\"num_stages\": 4}'" >&2
  exit 2
fi
source scripts/gpu/_gpu_env.sh  # sets PY and OUT
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
mem_gib=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)")

line() {  # line <part> <bench_train setting name> [more bench_train arguments...]
  local part="$1" name="$2"
  shift 2
  "$PY" benchmarks/bench_train.py --only "$name" --commit "$COMMIT" ${MOBA_KERNEL:+--moba-kernel "$MOBA_KERNEL"} \
    --out "$OUT/train_$part.md" "$@" >> "$OUT/train.log" 2>&1 || echo "part $part failed: see train.log"
  grep "^| \|^- " "$OUT/train_$part.md" 2>/dev/null || true
}

for part in 128k 128k-graph; do
  has "$part" || continue
  if (( mem_gib < 120 )); then
    echo "part $part skipped: the 128K step needs ~104 GiB and this GPU has ${mem_gib} GiB"
  elif [[ $part == 128k ]]; then
    line 128k "128K block 1024 top-12 (24 layers, hidden 1024)"
  else
    line 128k-graph "128K block 1024 top-12 (24 layers, hidden 1024)" --both=--train.cuda_graph=none
  fi
done
has 8k && line 8k "8K block 512 top-3 (6 layers, hidden 384, 6 heads)" --repeats "${REPEATS_8K:-2}"
has 32k && line 32k "32K block 512 top-3 (24 layers, hidden 1024)"
if has table; then
  "$PY" benchmarks/bench_moba.py --suite train-b1024,train-b512,small-b512,paper-b512 --peers sdpa --sdpa cudnn \
    --commit "$COMMIT" --out "$OUT/kernels_d64.md" > "$OUT/kernels_d64.log" 2>&1 || echo "part table failed: see kernels_d64.log"
  cut -c1-220 "$OUT/kernels_d64.md" 2>/dev/null | grep "^| " || true
fi
if has b4096; then
  "$PY" benchmarks/bench_moba.py --suite paper-b4096 --max-seq 131072 --peers sdpa --sdpa cudnn \
    --commit "$COMMIT" --out "$OUT/kernels_b4096.md" > "$OUT/kernels_b4096.log" 2>&1 || echo "part b4096 failed: see kernels_b4096.log"
  cut -c1-220 "$OUT/kernels_b4096.md" 2>/dev/null | grep "^| " || true
fi
if has tests; then
  "$PY" -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_moba_triton*.py tests/test_moba_gpu_training_shapes.py \
    > "$OUT/gpu_tests.log" 2>&1 || echo "part tests: failures, see gpu_tests.log"
  tail -3 "$OUT/gpu_tests.log"
fi
if has tune; then
  for s in train-b1024:131072 train-b512:32768 small-b512:8192 paper-b512:32768; do
    "$PY" benchmarks/bench_moba.py --tune "$s" --tune-parts bwd --tune-bwd "[{}, $TUNE_BWD, {}, $TUNE_BWD, {}]" \
      --commit "$COMMIT" >> "$OUT/tune_bwd.log" 2>&1 || echo "part tune failed at $s: see tune_bwd.log"
  done
  grep "^tune .* bwd " "$OUT/tune_bwd.log" | cut -c1-200 || true
fi
