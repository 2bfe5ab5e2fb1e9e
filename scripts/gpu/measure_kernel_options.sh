#!/usr/bin/env bash
# Issue 13, on ONE GPU (H100/H200): time and check the kernel options that are off until measured,
# against the defaults in the same process. Each part writes its log as it runs, so a call cut
# short keeps what finished; PARTS picks the parts (default: bwd,tests,gate, in that order; every
# new tiling compiles its kernels first (tens of seconds each, a guess: not timed), so all three may
# not fit one 10-minute call).
#
#   OUT=/some/dir bash scripts/gpu/measure_kernel_options.sh        # (the device tool sets $OUT)
#   OUT=/some/dir PARTS=gate bash scripts/gpu/measure_kernel_options.sh
#   OUT=/some/dir PARTS=nore COMMIT=<sha> bash scripts/gpu/measure_kernel_options.sh  # COMMIT: the training table's
#     commit line (a tree copied to the GPU machine may carry no .git)
#
# 1. `bench_moba.py --tune` of the whole backward (delta, row copy, dK/dV, dQ, casts) at
#    train-b1024 128K, train-b512 32K and small-b512 4 x 8K, every variant in the same process
#    -> $OUT/tune_bwd.log (part bwd). Variants: the default; a block's key sub-tiles adjacent in the grid
#    (sub_major); the fused dQ added per element into dq (fuse_dq, as measured in session 9) with
#    sub_major; dQ summed in the gathered rows' copy (dq_rows) by atomics or by TMA bulk reductions
#    (tma_dq), with and without sub_major, and dQ as (K^T dS^T)^T (dq_trans). The default runs first
#    and last, so the drift within the call shows.
# 2. The GPU tests of those options (bf16 against the naive op) -> $OUT/gpu_tests.log (part tests;
#    TESTS_K narrows them, e.g. TESTS_K=gate_variants).
# 3. The gate at FlashMoBA 512K (the gate target's shape) and train-b1024 128K: today's default
#    first and last, the while loop on 16 slots (the default before session 16), the counted loop,
#    the key loop with its max-and-erase steps (the default before session 20), the default's
#    below-the-last steps on 4 and 8 warps; first the default's pieces: centroids, the gate kernel, and that
#    kernel without its running top-k (products and masks only: the loop's time is the difference)
#    -> $OUT/tune_gate.log (part gate).
# 4.-11. Not in the default PARTS: `table` (bench_moba's table with cuDNN), `d128` (backward and
#    forward variants at d=128), `rows64` (larger gathered-row tiles for today's fused-dQ backward at
#    d=64), `nore` (training without recomputation at 128K and 32K: MoBA keeping its gather index,
#    MoBA with bwd.keep_index=false, full attention) and `b128` (forward tilings for 128-key blocks,
#    written against the two-pass default that session 17 replaced). Session 15 ran nore, tests,
#    rows64 and gate (benchmarks/results/*2026-12-04_session15*); session 16 gate (its pieces) and
#    table, then tests (TESTS_K=gate_variants), gate (the loops) and d128; session 17 tests and b128
#    (later calls: the lists in the headers of benchmarks/results/*2026-12-04_session17*); session 18
#    b128bwd (then its own calls: headers of benchmarks/results/*2026-12-04_session18*); session 19
#    sink (first form, with the row_tiles option it then removed) and its own calls (headers of
#    benchmarks/results/*2026-12-04_session19*). Parts qmajor (12.) and splitdv (13.) were written in session 22,
#    b512fwd (14.) in session 23, b128mask (15.) in session 24, layerops (16.) in session 28; splitdv,
#    b512fwd, b128mask and qmajor ran in sessions 25-26, layerops has not run yet.
# Needs no network: megatron-core comes from ./.whl when it is not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/_gpu_env.sh  # sets PY and OUT
git rev-parse HEAD 2>/dev/null > "$OUT/commit.txt" || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true

PARTS="${PARTS:-bwd,tests,gate}"
has() { [[ ",$PARTS," == *",$1,"* ]]; }

# (session 12's list, written against the tiling before session 13; on today's default (sub_major,
# and with TMA dq_rows + tma_dq, dq_trans under GQA) each variant sets every one of those fields)
OLD='"sub_major": false, "dq_rows": false, "tma_dq": false, "dq_trans": false'
VARIANTS="[{$OLD}, {}, {\"sub_major\": true, \"dq_rows\": false, \"tma_dq\": false, \"dq_trans\": false},
 {\"sub_major\": true, \"dq_rows\": true, \"tma_dq\": true, \"dq_trans\": false},
 {\"sub_major\": true, \"dq_rows\": true, \"tma_dq\": true, \"dq_trans\": true},
 {\"sub_major\": true, \"dq_rows\": true, \"tma_dq\": false, \"dq_trans\": true}, {$OLD}]"
if has bwd; then
  "$PY" benchmarks/bench_moba.py --tune train-b1024:131072,train-b512:32768,small-b512:8192 --tune-parts bwd \
    --tune-bwd "$VARIANTS" 2>&1 | tee "$OUT/tune_bwd.log" || true
fi

if has tests; then
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_moba_triton*.py -k "${TESTS_K:-variants or real_sizes or half_partials}" 2>&1 \
    | tee "$OUT/gpu_tests.log" || true
fi

# (session 16 measured the loops that fold a tile into the running top-k against the while loop
# on 16 slots, and made the key loop on 8 slots the default (8 warps at blocks <= 128); this list
# is today's default against those it replaced)
GATES='[{}, {"loop": "while", "slots": 16, "num_warps": 4}, {"loop": "counted", "num_warps": 4}, {"loop": "keys"},
 {"num_warps": 4}, {"num_warps": 8}, {}]'
if has gate; then
  "$PY" benchmarks/bench_moba.py --tune flashmoba:524288,train-b1024:131072 --tune-parts gate \
    --tune-gate "$GATES" 2>&1 | tee "$OUT/tune_gate.log" || true
fi

# 4. (part table) the kernel table with cuDNN in the same process at the training shapes (d=64) and
#    the paper's block-512 shapes (d=128): TFLOP/s on MoBA's required work against cuDNN's.
if has table; then
  "$PY" benchmarks/bench_moba.py --suite train-b1024,train-b512,small-b512,paper-b512 --peers sdpa --sdpa cudnn \
    --out "$OUT/kernels.md" 2>&1 | tee "$OUT/kernels.log" || true
fi

# 5. (part d128) d=128 at blocks 512 and 4096 has never had the d=64 backward's row copy, adjacent
#    sub-tiles or fused dQ measured: the backward variants at paper-b512 32K and paper-b4096 128K,
#    and the forward on 128-row partials, each against the shape's default in the same process.
D128_BWD='[{}, {"gather_rows": true, "split_mask": true}, {"gather_rows": true, "split_mask": true, "sub_major": true},
 {"gather_rows": true, "split_mask": true, "sub_major": true, "dq_rows": true, "tma_dq": true},
 {"gather_rows": true, "split_mask": true, "sub_major": true, "dq_rows": true, "tma_dq": true, "dq_trans": true},
 {"gather_rows": true, "split_mask": true, "sub_major": true, "bm": 32, "dq_rows": true, "tma_dq": true},
 {"gather_rows": true, "split_mask": true, "sub_major": true, "bm": 32, "num_warps": 4, "dq_rows": true, "tma_dq": true},
 {}]'
D128_FWD='[{}, {"method": "partials", "bm": 128, "bn": 64, "chunk": 128, "num_warps": 8, "num_stages": 3},
 {"method": "partials", "bm": 128, "bn": 64, "chunk": 128, "num_warps": 8, "num_stages": 2},
 {"method": "partials", "bm": 64, "bn": 64, "chunk": 128, "num_warps": 4, "num_stages": 3}, {}]'
if has d128; then
  "$PY" benchmarks/bench_moba.py --tune paper-b512:32768,paper-b4096:131072 --tune-parts fwd,bwd \
    --tune-fwd "$D128_FWD" --tune-bwd "$D128_BWD" 2>&1 | tee "$OUT/tune_d128.log" || true
fi

# 6. (part rows64) the d=64 backward's gathered-row tile (bm=32) was chosen before dQ was fused
#    into the dK/dV program (session 8); with dq_rows + tma_dq each row tile also costs a TMA
#    reduction, so larger tiles (fewer reductions, larger products) may now win. Also split_group
#    with a 1 GiB bound (one query head per launch at 128K: ~0.9 GB of rows instead of ~3.6 GB,
#    the time it costs). Today's default first and last.
ROWS64='[{}, {"bm": 64}, {"bm": 64, "num_warps": 8}, {"bm": 64, "num_stages": 2}, {"bm": 16},
 {"split_group": true, "dq_chunk_bytes": 1073741824}, {}]'
# and the forward's partial outputs in bf16 (half_partials: half the bytes the merge reads).
FWD64='[{}, {"half_partials": true}, {}]'
if has rows64; then
  "$PY" benchmarks/bench_moba.py --tune train-b1024:131072,train-b512:32768,small-b512:8192 --tune-parts fwd,bwd \
    --tune-fwd "$FWD64" --tune-bwd "$ROWS64" 2>&1 | tee "$OUT/tune_rows64.log" || true
fi

# 7. (part nore) training without recomputing core attention (both attentions), where MoBA ran
#    out of memory at 128K in session 10 while full attention ran 22% faster than with selective
#    recomputation: MoBA with its default (gather index kept), MoBA keeping only the int8 selection
#    (bwd.keep_index=false), full attention; peak memory in the table.
if has nore; then
  "$PY" benchmarks/bench_train.py --only "128K;32K" --extra=--train.recompute=none --moba-kernel "bwd.keep_index=false" \
    --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" --out "$OUT/train_norecompute.md" 2>&1 \
    | tee "$OUT/train_norecompute.log" || true
fi

# 8. (part b128) block 128 (FlashMoBA's setting) ran two passes (three products per tile, fp32 atomic
#    adds into o); the partials forward now keeps a block that fits one key sub-tile (bn 0: the whole
#    block) in registers for the program's whole chunk, so a tile is two products and one store.
#    Forward variants at FlashMoBA 8K, 32K, 128K and 512K, today's default first and last; then the
#    short d=128 / d=64 block-512 calls' forward tilings at 8K.
P1='"method": "partials", "bn": 0'
B128_FWD="[{}, {$P1, \"bm\": 64, \"chunk\": 256, \"num_warps\": 4, \"num_stages\": 2},
 {$P1, \"bm\": 64, \"chunk\": 256, \"num_warps\": 4, \"num_stages\": 3},
 {$P1, \"bm\": 64, \"chunk\": 128, \"num_warps\": 4, \"num_stages\": 2},
 {$P1, \"bm\": 64, \"chunk\": 512, \"num_warps\": 4, \"num_stages\": 2},
 {$P1, \"bm\": 128, \"chunk\": 256, \"num_warps\": 8, \"num_stages\": 2},
 {$P1, \"bm\": 64, \"chunk\": 256, \"num_warps\": 4, \"num_stages\": 2, \"half_partials\": true},
 {$P1, \"bm\": 128, \"chunk\": 256, \"num_warps\": 8, \"num_stages\": 2, \"half_partials\": true},
 {\"method\": \"partials\", \"bm\": 64, \"bn\": 64, \"chunk\": 256, \"num_warps\": 4, \"num_stages\": 2},
 {\"method\": \"two_pass\", \"chunk\": 512}, {}]"
SHORT_FWD='[{}, {"bm": 128, "num_warps": 8, "num_stages": 3, "chunk": 128}, {"num_stages": 4}, {"num_stages": 2},
 {"chunk": 256}, {"bn": 128, "num_warps": 8}, {"half_partials": true}, {}]'
if has b128; then
  "$PY" benchmarks/bench_moba.py --tune flashmoba:8192,flashmoba:32768,flashmoba:131072,flashmoba:524288 \
    --tune-parts fwd --tune-fwd "$B128_FWD" 2>&1 | tee "$OUT/tune_b128.log" || true
  "$PY" benchmarks/bench_moba.py --tune paper-b512:8192,small-b512:8192 --tune-parts fwd \
    --tune-fwd "$SHORT_FWD" 2>&1 | tee "$OUT/tune_short_fwd.log" || true
fi

# 9. (part b128bwd) the backward at block 128 is the largest piece of FlashMoBA's setting (34.5 of
#    57 ms at 128K after session 17). Each tune line set ends with the default's fused dQ stored
#    instead of added and left out (wrong dq: what the atomics cost); then bwd.dq_slots (each
#    block's dQ of a row stored once in bf16 into its own slot, one fp32 sum pass) against the
#    default, first and last; at d=64 it needs 128-key programs (bnb 128, also timed alone).
#    Written against session 17's default and run in session 18's first call; dq_slots is now the
#    default at these shapes, so the lists time today's default against itself.
if has b128bwd; then
  "$PY" benchmarks/bench_moba.py --tune flashmoba:131072,flashmoba:524288 --tune-parts bwd \
    --tune-bwd '[{}, {"dq_slots": true}, {"dq_slots": true, "num_stages": 2}, {}]' 2>&1 | tee "$OUT/tune_b128_bwd.log" || true
  "$PY" benchmarks/bench_moba.py --tune train-b128:131072 --tune-parts bwd \
    --tune-bwd '[{}, {"bnb": 128}, {"bnb": 128, "dq_slots": true}, {"bnb": 128, "dq_slots": true, "num_warps": 8}, {}]' \
    2>&1 | tee -a "$OUT/tune_b128_bwd.log" || true
fi

# 10. (part b128table) the kernel table at blocks of 128 keys (FlashMoBA's setting, d=128, 8K-512K;
#    d=64 16/4 heads 8K-128K) with cuDNN in the same process, peak memory beside SDPA's: session 18
#    measured the unfilled dq slot buffer in tune lines only (moba_tune_h200_2026-12-04_session18_unfilled.log).
if has b128table; then
  "$PY" benchmarks/bench_moba.py --suite flashmoba,train-b128 --max-seq 131072 --peers sdpa --sdpa cudnn \
    --out "$OUT/kernels_b128.md" 2>&1 | tail -5 | tee "$OUT/kernels_b128.log" || true
  "$PY" benchmarks/bench_moba.py --suite flashmoba --min-seq 524288 --max-seq 524288 --peers sdpa --sdpa cudnn \
    --out "$OUT/kernels_b128_512k.md" 2>&1 | tail -5 | tee -a "$OUT/kernels_b128.log" || true
fi

# 11. (part sink) trained models may put every query's selection on an attention-sink block;
#    random inputs spread it. The backward's dK/dV program of a (KV head, block) walked its whole
#    bucket, so a sink made block 0's program hold every row of its documents (G x T rows at GQA
#    group G). Session 19 measured that (the cut off: FlashMoBA 128K backward 193.8 vs 32.1 ms) and
#    made bwd.max_rows (programs cut at 8192 / 16384 rows) the default from 32K tokens: the default
#    against max_rows=0, first and last, with and without --sink 8, at the training and FlashMoBA shapes.
if has sink; then
  for SK in 0 8; do
    "$PY" benchmarks/bench_moba.py --sink "$SK" \
      --tune flashmoba:32768,flashmoba:131072,train-b128:32768,train-b128:131072,train-b512:32768,small-b512:8192,paper-b512:32768,train-b1024:131072 \
      --tune-parts bwd --tune-bwd '[{}, {"max_rows": 0}, {}]' 2>&1 | grep "^tune" | grep -v "default config" \
      | tee -a "$OUT/tune_sink.log" || true
  done
fi

# 12. (part qmajor) the query-major forward (fwd.method=query_major, session 22: built after that
#    session's device time). First its bf16 GPU tests, then the forward (from the selection: the
#    partials lines include building their gather index) at the short shapes, default first and
#    last, on random inputs (a 128-row tile's union is nearly every past block: a masked dense
#    kernel, expected to lose) and with an attention sink (--sink 8: every row also selects block 0,
#    so tiles share blocks), the two ends between which a trained model's selection lies.
if has qmajor; then
  "$PY" -m pytest -q -m gpu tests/test_moba_triton*.py -k query_major -p no:cacheprovider 2>&1 \
    | tail -3 | tee "$OUT/gpu_tests_qmajor.log" || true
  QM='"method": "query_major", "bn": 64, "chunk": 128, "tma_kv": false, "half_partials": false'
  for SK in 0 8; do
    "$PY" benchmarks/bench_moba.py --sink "$SK" --tune small-b512:8192,train-b512:32768,paper-b512:8192 \
      --tune-parts fwd --tune-fwd "[{}, {$QM, \"bm\": 128}, {$QM, \"bm\": 64}, {$QM, \"bm\": 128, \"num_stages\": 3}, {}]" \
      2>&1 | grep "^tune" | grep -v "default config" | tee -a "$OUT/tune_qmajor.log" || true
  done
fi

# 13. (part splitdv) the dK/dV programs as two launches, dV alone then dK with the fused dQ
#    (bwd.split_dv, session 22: built after that session's device time). Offline the split takes
#    the d=64 block-1024 kernel's spills away (192 -> 0 bytes a thread;
#    benchmarks/results/kernel_resources_sm90_2026-12-04_session22.txt) for one product more and the
#    rows read twice. Its GPU tests, then the backward at the training shapes, default first and last;
#    then at d=128 (blocks 512 and 4096, FlashMoBA's 128) and d=64 block 128, where it also removes spills.
#    (The split with 64-row steps on 8 warps in both launches compiles without spills at d=64 block
#    1024, 205-234 registers; session 23, offline.)
if has splitdv; then
  "$PY" -m pytest -q -m gpu tests/test_moba_triton*.py -k split_dv -p no:cacheprovider 2>&1 \
    | tail -3 | tee "$OUT/gpu_tests_splitdv.log" || true
  "$PY" benchmarks/bench_moba.py --tune train-b1024:131072,train-b512:32768,small-b512:8192 --tune-parts bwd \
    --tune-bwd '[{}, {"split_dv": true}, {"split_dv": true, "dv_bm": 64}, {"split_dv": true, "dv_bm": 64, "dv_warps": 8},
                 {"split_dv": true, "bm": 64, "num_warps": 8}, {}]' \
    2>&1 | grep "^tune" | grep -v "default config" | tee "$OUT/tune_splitdv.log" || true
  # session 23, offline: the split also takes the spills of the d=128 and block-128 kernels away
  # (72-200 bytes a thread; benchmarks/results/kernel_resources_sm90_2026-12-04_session23.txt)
  "$PY" benchmarks/bench_moba.py --tune paper-b512:32768,paper-b4096:131072,flashmoba:131072,train-b128:131072 \
    --tune-parts bwd --tune-bwd '[{}, {"split_dv": true}, {}]' \
    2>&1 | grep "^tune" | grep -v "default config" | tee -a "$OUT/tune_splitdv.log" || true
fi

# 14. (part b512fwd) d=128 block 512, the shape furthest from the "70% of cuDNN" target (35% at 32K):
#    its forward runs 64-row tiles on 4 warps (254 registers, two programs an SM), while block 4096
#    runs the same kernel with 128-row tiles on 8 warps, which with tma_kv compiles without spills
#    (235 registers; session 23, offline) and reaches 447 TFLOP/s there. Session 16 timed 128-row
#    tiles at block 512 before tma_kv (5.39 against 5.05 ms); this times them on today's default.
if has b512fwd; then
  "$PY" benchmarks/bench_moba.py --tune paper-b512:32768,paper-b512:8192 --tune-parts fwd \
    --tune-fwd '[{}, {"bm": 128, "num_warps": 8}, {"bm": 128, "num_warps": 8, "num_stages": 2}, {}]' \
    2>&1 | grep "^tune" | grep -v "default config" | tee "$OUT/tune_b512fwd.log" || true
fi

# 15. (part b128mask, session 24) FlashMoBA's backward (d=128, block 128, dQ in slots) runs every row
#    through the masked loop; the rows of later blocks in an unmasked loop (split_mask, without the
#    row copy that lost there in session 18) move its step's bound from 3900 ALU clocks to 3544 of
#    shared memory offline
#    (benchmarks/results/sass_loops_sm90_2026-12-05_session24.txt): its GPU test, then the tune,
#    default first and last.
if has b128mask; then
  "$PY" -m pytest -q -m gpu tests/test_moba_triton*.py -k dq_slots -p no:cacheprovider 2>&1 \
    | tail -3 | tee "$OUT/gpu_tests_b128mask.log" || true
  "$PY" benchmarks/bench_moba.py --tune flashmoba:131072,flashmoba:32768 --tune-parts bwd \
    --tune-bwd '[{}, {"split_mask": true}, {}]' \
    2>&1 | grep "^tune" | grep -v "default config" | tee "$OUT/tune_b128mask.log" || true
fi

# 16. (part layerops, session 28) the fused RoPE and SwiGLU outside attention (model.fused_ops, the
#    default on a GPU since session 28; one H100 call so far): their GPU tests (bf16 against the oracles
#    and Megatron's unfused RoPE; the fused-versus-unfused model test), each op fused against unfused at
#    the three training models' shapes (the Triton RMSNorm beside torch's: measured slower, not used),
#    and what a layer saves for its backward either way (bf16).
if has layerops; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_rope.py tests/test_ops_swiglu.py tests/test_ops_rms_norm.py \
    tests/test_fused_layers.py 2>&1 | tail -15 | tee "$OUT/gpu_tests_layerops.log" || true
  "$PY" benchmarks/bench_layer_ops.py --out "$OUT/layer_ops.md" 2>&1 | tail -3 || true
  "$PY" benchmarks/saved_activations.py 2>&1 | grep "^|\|^#" | tee "$OUT/saved_activations.md" || true
fi
