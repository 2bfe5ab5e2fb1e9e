#!/usr/bin/env bash
# Issue 16, deliverable 7, on ONE GPU (H100/H200): train a small MoBA model for a few minutes, then
# measure what CP traffic its block selection implies with `moba-cp analyze selection`.
#
#   OUT=/some/dir bash scripts/gpu/analyze_selection.sh        # (the device tool sets $OUT)
#
# Shape: recipes/1gpu-32k.yaml (hidden 1024, 16 query / 4 KV heads, 32K tokens, MoBA block 512,
# top-k 3: the MoBA paper's setting) cut to 8 layers, TRAIN_STEPS steps (default 500) of 2 sequences.
# Writes under $OUT: train.log, run/ (metrics.jsonl, checkpoint), analysis/selection.json and
# selection.png, analyze.log, and dry_run_*.log (the multi-node recipes planned with the measured
# union). Copy analysis/ to docs/results/ afterwards. Needs no network: megatron-core comes from
# ./.whl when it is not installed (see the lead's gpu-wheels tool).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/_gpu_env.sh  # sets PY and OUT
STEPS="${TRAIN_STEPS:-500}"

"$PY" -m moba_cp.cli train recipes/1gpu-32k.yaml --model.num_layers=8 --train.steps="$STEPS" \
  --train.warmup_steps=30 --train.global_batch_size=2 --train.micro_batch_size=1 --train.recompute=none \
  --logging.dir="$OUT/run" --logging.tensorboard=false --checkpoint.interval=0 --checkpoint.keep_last=1 \
  --data.cache_dir="$OUT/cache" 2>&1 | tee "$OUT/train.log"

"$PY" -m moba_cp.cli analyze selection "$OUT/run" --seq-len 32768 --cp 2,4,8,16,32 --num-seqs 4 \
  --out "$OUT/analysis" --data.cache_dir="$OUT/cache" 2>&1 | tee "$OUT/analyze.log"

# --cp above covers these recipes' cp (16 and 32): the dry run reads the union at its own cp
for r in 64gpu-4m 128gpu-10m; do
  "$PY" -m moba_cp.cli train "recipes/$r.yaml" --dry-run --selection "$OUT/analysis/selection.json" \
    2>&1 | tee "$OUT/dry_run_$r.log"
done
rm -rf "$OUT/cache" "$OUT/run/checkpoints"  # large and not needed for the results
