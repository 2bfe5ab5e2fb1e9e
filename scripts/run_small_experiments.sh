#!/usr/bin/env bash
# The `small` scale of the MoBA paper's three experiments on one machine's GPUs, all points at once:
# scaling (8K, MoBA vs full, five sizes), block granularity (32K, 75% sparsity) and layer-wise hybrid
# (32K, trailing loss + needles; its MoBA / hybrid-2 / full points are also the long-context
# evaluation's three models). Finished points are skipped, so rerunning continues a stopped run.
#
#   GPUS=4 DEADLINE_MIN=50 bash scripts/run_small_experiments.sh [--a.b=value overrides for every point]
#
# Then: moba-cp plot --sweep runs/sweeps/{scaling,granularity,hybrid}-small
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
PY=${PYTHON:-python3}
args=(--gpus "$GPUS")
[[ -n "${DEADLINE_MIN:-}" ]] && args+=(--deadline-min "$DEADLINE_MIN")
exec "$PY" -m moba_cp.cli sweep recipes/experiments/hybrid-small.yaml recipes/experiments/granularity-small.yaml \
    recipes/experiments/scaling-small.yaml "${args[@]}" "$@"
