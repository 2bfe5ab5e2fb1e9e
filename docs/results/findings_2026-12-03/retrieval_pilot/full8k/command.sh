#!/usr/bin/env bash
# session 10: retrieval pilot at 8K (~5.5 min): full attention, the 8K findings model (6 layers, hidden 384),
# half retrieval documents (passkey + single, loss on the answer, per-sample weighting), 3500 steps x 8 x 8K
# = 229M tokens (~14K retrieval samples); then answer loss and an 8K needle grid.
set -u
source scripts/gpu/_gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 300 $PY -m moba_cp.train recipes/experiments/base-findings-8k.yaml --train.steps=3500 --train.warmup_steps=100 \
  --data.retrieval_fraction=0.5 --train.loss_normalization=sample "--data.retrieval_kinds=[passkey, single]" \
  --data.retrieval_loss_on=answer --eval.interval=1000 --checkpoint.interval=1000 --attention.pattern=full --train.seed=1 \
  --logging.dir=runs/pilot8k > $OUT/pilot8k_train.log 2>&1
echo "train rc $?"; grep -v -i warn $OUT/pilot8k_train.log | grep "step\|valid" | tail -3
cp runs/pilot8k/metrics.jsonl $OUT/ 2>/dev/null
timeout 40 $PY -m moba_cp.experiments.answer_loss runs/pilot8k --seq-len 8192 --num-samples 32 --depths 0,50,100 --kinds passkey > $OUT/pilot8k_answer.log 2>&1; tail -1 $OUT/pilot8k_answer.log
timeout 40 $PY -m moba_cp.experiments.answer_loss runs/pilot8k --seq-len 8192 --num-samples 32 --depths 0,50,100 --kinds single > $OUT/pilot8k_answer_single.log 2>&1; tail -1 $OUT/pilot8k_answer_single.log
timeout 60 $PY -m moba_cp.cli eval needle runs/pilot8k --out $OUT/needle8k --lengths 8k --depths 0,25,50,75,100 --kinds passkey,single --n-per-cell 4 > $OUT/pilot8k_needle.log 2>&1; grep accuracy $OUT/pilot8k_needle.log
