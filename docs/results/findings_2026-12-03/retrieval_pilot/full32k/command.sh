#!/usr/bin/env bash
# session 10: the retrieval pilot (~6 min): one full-attention point of findings-retrieval-32k (seed 1, per-sample
# weighting), then its answer loss and an 8K/32K needle grid; decides whether the six retrieval points are worth running.
set -u
source scripts/gpu/_gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 330 $PY -m moba_cp.train recipes/experiments/base-findings-32k.yaml --train.steps=800 --train.warmup_steps=50 \
  --data.retrieval_fraction=0.5 --train.loss_normalization=sample "--data.retrieval_kinds=[passkey, single]" \
  --data.retrieval_loss_on=answer --eval.interval=400 --attention.pattern=full --train.seed=1 --logging.dir=runs/pilot > $OUT/pilot_train.log 2>&1
echo "train rc $?"; grep -v -i warn $OUT/pilot_train.log | tail -4
timeout 60 $PY -m moba_cp.experiments.answer_loss runs/pilot --seq-len 32768 --num-samples 16 --depths 0,50,100 --kinds passkey > $OUT/pilot_answer.log 2>&1; tail -1 $OUT/pilot_answer.log
timeout 120 $PY -m moba_cp.cli eval needle runs/pilot --out $OUT/needle --lengths 8k,32k --depths 0,50,100 --kinds passkey --n-per-cell 4 > $OUT/pilot_needle.log 2>&1; grep accuracy $OUT/pilot_needle.log
cp runs/pilot/metrics.jsonl $OUT/ 2>/dev/null
