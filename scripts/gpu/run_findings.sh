#!/usr/bin/env bash
# Issue 17, deliverable 5, on ONE GPU (H200): run one finding's sweep of recipes/experiments/findings-*.yaml
# within a deadline, then copy every finished point's small files (no checkpoints) to $OUT.
#
#   OUT=/some/dir bash scripts/gpu/run_findings.sh FINDING [--a.b=value overrides for every point]
#
# FINDING: scaling (findings-scaling-8k), trailing32k (findings-scaling-trailing-32k), granularity
# (findings-granularity-32k), or retrieval (findings-retrieval-hybrid-8k: retrieval and the layer-wise
# hybrid from the same models; `hybrid` is the same sweep).
# DEADLINE_MIN (default 8): the sweep starts no point predicted to pass it and stops running ones at
# it (they save a checkpoint); run the same command again to continue: finished points are skipped,
# a stopped one resumes while the machine still holds runs/ (else it starts again). A lent machine is
# fresh on every call, so RESUME_FROM=DIR (a committed results folder of this finding, e.g.
# docs/results/<date>/<finding>, holding finished points' folders) copies those points into the
# sweep folder first: the sweep skips them after checking they match its recipe and corpus.
# POINTS_PER_GPU=2 runs two points at once on the GPU (small models leave it mostly idle).
# Writes under $OUT: FINDING.log, <sweep>.tgz (the folder below as one archive), and runs/sweeps/<sweep>/ with results.jsonl, paired.md/.json and
# per point sweep_point.json, metrics.jsonl, recipe.yaml, eval/*.json, sweep.log. Commit those under
# docs/results/<date>/. Needs no network: megatron-core comes from ./.whl when it is not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  scaling) SWEEP=findings-scaling-8k ;;
  trailing32k) SWEEP=findings-scaling-trailing-32k ;;
  granularity) SWEEP=findings-granularity-32k ;;
  hybrid|retrieval) SWEEP=findings-retrieval-hybrid-8k ;;
  *) echo "usage: $0 scaling|trailing32k|granularity|hybrid|retrieval [--a.b=value ...]" >&2; exit 2 ;;
esac
FINDING="$1"
shift
source scripts/gpu/_gpu_env.sh  # sets PY and OUT
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

if [[ -n "${RESUME_FROM:-}" ]]; then
  [[ -d "$RESUME_FROM" ]] || { echo "RESUME_FROM=$RESUME_FROM is not a folder" >&2; exit 2; }
  mkdir -p "runs/sweeps/$SWEEP"
  for point in "$RESUME_FROM"/*/; do
    name=$(basename "$point")
    if [[ -f "$point/sweep_point.json" && ! -e "runs/sweeps/$SWEEP/$name" ]]; then
      cp -r "$point" "runs/sweeps/$SWEEP/$name"
      echo "resume: $name finished in $RESUME_FROM"
    fi
  done
fi

rc=0
"$PY" -m moba_cp.cli sweep "recipes/experiments/$SWEEP.yaml" --gpus 1 --points-per-gpu "${POINTS_PER_GPU:-1}" \
  --deadline-min "${DEADLINE_MIN:-8}" "$@" \
  2>&1 | tee -a "$OUT/$FINDING.log" || rc=$?
# The numbers of every finished point travel back; checkpoints and data caches stay on the machine.
if [[ -d "runs/sweeps/$SWEEP" ]]; then
  (cd runs/sweeps && find "$SWEEP" -name checkpoints -prune -o -type f \
     \( -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' -o -name '*.md' -o -name '*.log' -o -name '*.png' \) \
     -print0 | xargs -0 -r cp --parents -t "$OUT/")
  mkdir -p "$OUT/runs/sweeps" && rm -rf "$OUT/runs/sweeps/$SWEEP" && mv "$OUT/$SWEEP" "$OUT/runs/sweeps/"
  # the same files as one archive: a transfer that leaves out deep folders still brings this back
  # (session 13's device call returned "runs/sweeps/<sweep> (depth)" and none of the tree)
  tar czf "$OUT/$SWEEP.tgz" -C "$OUT/runs/sweeps" "$SWEEP"
fi
exit "$rc"
