"""Tile configurations of the MoBA Triton kernels: immutable values chosen from the shape.

A :class:`KernelConfig` says how every kernel of one call is tiled. :func:`choose_config`
picks it from the shape (block size, head dim, GQA group, tokens); callers may pass their own
(benchmarks sweep configs that way), and nothing in the package mutates a config at run time.

What the backward needs to read the forward's saved gather index (its ``chunk``) travels with
the index (``GatherIndex.chunk``), never through a module global, so a config change between
forward and backward cannot misread it.

The table's values come from GPU sweeps; ``benchmarks/NOTES_moba_kernels.md`` and the logs in
``benchmarks/results/`` hold the measurements behind each row.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field, fields, replace

import torch

__all__ = ["FwdConfig", "BwdConfig", "GateConfig", "KernelConfig", "choose_config", "tiling_for", "device_has_tma",
           "parse_overrides", "apply_overrides", "compact_selection_dtype", "GATE_LOOPS", "SELECTION_FWD_METHODS"]

FWD_METHODS = ("partials", "two_pass", "one_pass", "query_major")
#: Forward methods that read the selection itself: the forward builds and saves no gather index
#: (the backward builds it).
SELECTION_FWD_METHODS = ("one_pass", "query_major")
GATE_LOOPS = ("while", "counted", "keys", "below")


@dataclass(frozen=True)
class FwdConfig:
    """Forward attention tiling.

    method:
        ``partials``: one pass over gathered tiles per (query head, key block); each entry's
        normalised partial output (fp32) and LSE are written, then merged per row by LSE.
        Two products per key tile; the fp32 partials exist for one chunk of query heads at a
        time (at most ``partial_bytes``; with ``partials_q_bound`` also at most q's own size, at
        least 256 MiB), one launch of the tile kernel and one merge per chunk.
        ``two_pass``: pass 1 the per-entry LSE, pass 2 the normalised ``P V`` added atomically
        into fp32 ``o`` (three products per key tile, no partial buffer).
        ``one_pass``: a program owns ``qchunk`` tokens of one head and walks the key blocks in
        order, keeping each row's online-softmax state in fp32 scratch (large blocks).
        ``query_major``: a program owns ``bm`` consecutive rows of one head (a dense tile, no
        gather) and walks the union of the blocks they selected, each row masked to its own
        blocks; ``o`` and ``lse`` written once (no index, partials or merge). Its products grow
        with the tile's union, so it suits short calls whose tiles select similar blocks.
        Not a default: on one H200 (session 26, ``moba_tune_h200_2026-12-05_session26_qmajor.log``)
        it lost wherever a tile's union spans the causal past (32K: 5.3-5.5x the partials forward's
        time on random selections, 2.9-3.4x under a sink; d=128 at 8K 1.1-2x) and won only at 4 x 8K, d=64, block 512
        with every row also selecting block 0 (``bm=64``: 0.86 against 0.92-0.94 ms). ``bm=64``
        beat 128 in every line.
    bm: gathered rows per tile (``query_major``: consecutive rows a program); bn: keys per sub-tile
        (0: the whole block, up to 128; ``query_major``: 64).
    chunk: entries per program of the gather index (a multiple of ``bm``; the dQ kernel
        walks the same chunks).
    qchunk: ``one_pass`` tokens per program (0: from the shape).
    partials_q_bound (``partials``): bound a launch's partials by q's own size as well as by
        ``partial_bytes``. At 128K, 16 heads, top-12, d=64 with half partials that is one query head
        a launch (218 MB against q's 256 MiB): 16 tile launches and 16 merges a layer, each with
        its tail. Off, ``partial_bytes`` alone bounds it: at 1 GiB four heads a launch there, whose
        forward transient (1.32 GiB, one H100, session 37) passes the backward's 1.25 and so would
        raise the call's peak; the default over 32K tokens at d=64 is off with 768 MiB (three heads,
        1.13 GiB: see :func:`choose_config`). The same o and lse bit for bit.
    half_partials (``partials``, half inputs): the normalised partial outputs are stored in q's
        dtype instead of fp32 (half the bytes written and read back by the merge: ~7 of ~14 GB
        at 128K, 16 heads, top-12, d=64); the merge still sums in fp32. Each partial is rounded
        once (relative 2^-9 in bf16), so o carries about twice the rounding of the fp32 path
        before its own final rounding. On by default at blocks <= 128, where a gathered row does
        only one sub-tile of work per partial written and the partials' bytes bound the forward
        (FlashMoBA's setting, 128K: 22.9 against 42.4 ms with fp32 partials on the same tiles). At
        block 1024 it first changed nothing measurable (128K, top-12: 22.47 against 22.67/22.62 ms;
        ``moba_tune_h200_2026-12-04_session15_rows64.log``) because the merge, not the bytes, bound
        the merge: 32 unrolled rows a program spill at 255 registers (12.5% occupancy). With 16 rows
        (118 registers, 4 programs an SM) the bytes count: on by default at d <= 64, blocks 256-1024,
        calls over 32K tokens (session 21, ``moba_tune_h200_2026-12-04_session21_merge.log``), and
        at d = 128 for blocks from 256 on wherever the partials forward runs (session 22).
    merge_rows, merge_warps (``partials``): rows per merge program and its warps; merge_unroll:
        the merge's loop over a row's ``W`` partials unrolled at compile time (up to the next
        power of two, the surplus masked), so all of a row's loads are issued before the first
        is used. Same sums in the same order either way. One H200
        (``moba_tune_h200_2026-12-04_session17_merge.log``, FlashMoBA's setting, whole forward with
        its index, 64 rows first and last): 32 rows 16.0 vs 19.9/19.9 ms at 128K, 63.9 vs 79.5/79.3
        at 512K; unrolled on 64 rows 46.1 and 184.6 ms (spills), on 32 rows 15.9 and 63.7; at d=64,
        block 1024, 128K, 32 rows unrolled 21.97 vs 22.72/22.72 (unrolled there: :func:`choose_config`).
    merge_at_once (``partials``): a merge program loads all ``W`` partials of its rows as one
        ``[merge_rows, W, D]`` tile, issued before the LSEs are read and masked by nothing they
        decide (a slot that holds no partial is selected away, never multiplied in), then sums
        them over the slot axis. Why: the loop's load of a slot waits for that slot's LSE (its
        mask, through a layout conversion in shared memory), so a program makes one dependent trip
        to memory per slot; at 128K, block 1024, the merge
        moved ~3.5 GB a layer in 1.8 ms (~2 TB/s, session 32's profile), under half the H200's
        bandwidth. The slots are then summed as a tree, not in slot order: o may differ from the
        loop's in the last fp32 bits before its rounding (same values within rounding; tested
        against the oracle). The padded ``[rows, next_pow2(W), D]`` tile lives in registers, so a
        program then takes at most ``merge_rows`` rows and 16K partial elements (16 rows at d=64 and
        up to 16 slots, 8 at d=128; ``triton_attn_fwd.merge_rows``).
    maxnreg (``partials``' tile kernel): a cap on its registers per thread (0: the compiler's
        choice, which is 250-255 at every shape, two programs of 4 warps per SM). Nsight Compute
        found that kernel latency-bound at that occupancy (``wait`` stalls, tensor pipe 20-35%
        active; ``results/ncu_h200_2026-12-04_session20.md``); 168 lets three programs share an
        SM, for spills where the tile needs more. Measured slower wherever it applies (one H200,
        ``moba_tune_h200_2026-12-04_session20_fwd_cap.log``, default first / last): d=64 block 1024
        128K 22.63 vs 21.77/22.16 ms (128-row tiles spill 78 registers; 64-row tiles capped 25.31),
        block 128 128K 6.70 vs 5.53/5.56 (64-row capped 5.93), block 512 32K 1.92 vs 1.87/1.64,
        4 x 8K 0.95 vs 0.90/0.88; at d=128 block 128 shared memory (K, V and the row stages:
        107 KB) already holds an SM to two programs. So no shape sets it.
    tma_kv (``partials``' tile kernel, blocks of several ``bn`` sub-tiles): the unmasked key
        sub-tiles of K and V (every one but a tile's diagonal or a short block's last) are read
        through tensor descriptors (TMA on Hopper: one asynchronous bulk copy per sub-tile, no
        per-element addresses in registers) instead of per-thread loads (the interpreter runs
        the same descriptors). Any head stride (Megatron's V is a strided slice of the fused QKV
        projection) with 16-byte aligned base and strides, else a ValueError before any launch.
        The masked sub-tiles keep the masked loads, so rows past a block never enter a product.
        On by default at d <= 64, blocks 256-1024, calls over 32K tokens, and at d = 128 for blocks
        from 256 on wherever the partials forward runs (see :func:`choose_config`).
    """

    method: str = "two_pass"
    bm: int = 64
    bn: int = 64
    chunk: int = 256
    num_warps: int = 4
    num_stages: int = 2
    qchunk: int = 0
    partial_bytes: int = 1 << 30
    partials_q_bound: bool = True
    half_partials: bool = False
    merge_rows: int = 32
    merge_warps: int = 4
    merge_unroll: bool = False
    merge_at_once: bool = False
    maxnreg: int = 0
    tma_kv: bool = False

    def __post_init__(self):
        if self.method not in FWD_METHODS:
            raise ValueError(f"FwdConfig.method={self.method!r}; choose one of {FWD_METHODS}")
        if self.maxnreg and not 32 <= self.maxnreg <= 255:
            raise ValueError(f"FwdConfig.maxnreg={self.maxnreg}: a register cap per thread is 32-255 (0: the "
                             f"compiler's choice)")
        if self.chunk % self.bm:
            raise ValueError(f"FwdConfig.chunk={self.chunk} must be a multiple of bm={self.bm}")
        if self.merge_rows < 1 or self.merge_rows & (self.merge_rows - 1):
            raise ValueError(f"FwdConfig.merge_rows={self.merge_rows} must be a power of two (a Triton block)")
        if self.tma_kv and self.method != "partials":
            raise ValueError(f"FwdConfig.tma_kv=True is an option of the partials tile kernel, not of "
                             f"method={self.method!r}. Fix: method='partials' or tma_kv=False")


@dataclass(frozen=True)
class BwdConfig:
    """Backward tiling. dK/dV: ``bnb`` keys per program, ``bm`` gathered rows per step
    (0: ``bnb`` from the head dim); ``fuse_dq`` adds dQ by fp32 atomics in the dK/dV program
    (None: when a block needs <= 2 key sub-tiles), else the dQ kernel (``dq_bm`` rows,
    ``dq_bn`` keys per step; ``dq_bm`` divides the index's chunk) does. ``trans``: keys as the
    M dimension of the dK/dV products. ``split_mask``: the rows of a bucket that see every key
    of a sub-tile (rows of later blocks; found by a binary search on their positions) run in a
    second loop without the causal mask (only where positions are sorted: the single-device op).
    ``gather_rows``: before the dK/dV kernel, copy each KV-head chunk's rows (q, do, lse, delta,
    position) in bucket order, so its loop loads contiguous tiles instead of looking up every
    row through the index (the chunk's copy counts against ``dq_chunk_bytes`` too). ``tma`` (with
    ``gather_rows``): those tiles of q and dO are read through tensor descriptors (TMA on Hopper:
    asynchronous copies straight to shared memory, no per-element addresses in registers); off:
    measured 2-5% slower than the masked loads at the 128K, 32K and 4 x 8K training shapes
    (``benchmarks/results/moba_tune_h200_2026-12-03_session9_tma.log``).
    ``sub_major``: the dK/dV grid puts a block's key sub-tiles side by side (one 1-D grid), so the
    programs that share a block's gathered rows (and, with ``fuse_dq``, its dQ rows) run together
    and find them in L2; off: the sub-tile is the grid's second axis, so the sub-tiles of one
    block start (KV heads x blocks) programs apart, at 128K often a wave or more.
    ``dq_rows`` (implies the fused dQ): the dK/dV program adds its dQ tiles
    into fp32 rows in bucket order (contiguous tiles; its key sub-tiles add into the
    same rows), then one pass sums each token's W rows into dq, written once in dq's dtype: no
    separate dQ kernel and no recomputed ``QK^T`` / ``dO V^T``, and no fp32 ``[Tq, Hq, D]``
    scratch; the rows cost ``4 D`` bytes per gathered row (counted in ``dq_chunk_bytes``).
    Without ``gather_rows`` the loop reads q and dO through the index and only the dQ rows are in
    bucket order (a pass writes each entry's row number for the sum, and nothing is copied): the
    row copy's pass and its ``2 D`` half-precision values (q and dO) per gathered row are saved,
    for loads that look each row up (session 48; exact). Timed on one H100 (session 49,
    ``results/moba_tune_h100_2026-12-07_session49_index_rows.log``, backward alone, two runs each):
    69.5-69.6 ms against 50.5-52.4 at 128K block 1024 (+35%; 69.2 with ``zero_ahead``), 3.05-3.08
    against 2.31-2.42 at 32K block 512 (+28%), for a transient of 0.51 against 0.90 GiB at 32K;
    32K training 161.7K against 167.2K tok/s (-3.3%) at the same step peak. A setting for a call
    whose own peak matters, not a default.
    ``tma_dq`` (with ``dq_rows``, CUDA only): those adds as TMA bulk reductions, one
    asynchronous ``cp.reduce.async.bulk`` per tile (how FlashAttention-3 accumulates dQ) instead
    of per-element atomics.
    ``dq_trans`` (fused dQ): computed as ``(K^T dS^T)^T``, so the product's M is the head dim
    (a whole Hopper warpgroup MMA) rather than ``bm`` gathered rows (32 at d=64).
    ``dq_chunk_bytes``: largest fp32 dQ scratch when dq is
    returned in a half dtype (the backward then runs in chunks of KV heads).
    ``split_group``: a chunk may hold fewer than one KV head's G query heads (its dK/dV then sum
    over the chunks in fp32, ``8 D`` bytes per key row of the one KV head being summed, cast into
    dk/dv after that head's last chunk), so
    ``dq_chunk_bytes`` can bound the transient memory below one KV head's rows (at 128K, 16/4
    heads, top-12, ``dq_rows``: ~3.6 GB per KV head, ~0.9 GB per query head); off: one KV head
    is the smallest chunk. On by default at d<=64 with a 1 GiB bound (see :func:`choose_config`).
    ``dq_slots`` (fused dQ, a block of at most ``bnb`` keys: one key sub-tile per block, so each
    selected block's dQ of a row is complete in one program): that dQ is stored, not added, in
    q's dtype into the row's own slot of a ``[Tq, hc, W, D]`` buffer, and one pass sums each
    row's ``W`` slots in fp32 into dq. The single-device op leaves the buffer unfilled but for its
    unselected slots (the gather index's tail; the backward's ``blocks_nonempty``): 7.71 vs 8.09 ms
    at FlashMoBA 32K, 8.17 vs 8.66 at d=64 block 128 128K, a tie at FlashMoBA 128K and 512K
    (``moba_tune_h200_2026-12-04_session18_unfilled.log``); the CP slot form zero-fills it. Where the fused dQ's fp32 atomics into ``[Tq, Hq, D]``
    scratch move ~1 KB of read-modify-write per entry (FlashMoBA's setting at 128K: ~19 GB of
    atomics), the slots move half the bytes each way; each slot is rounded once to q's dtype
    (relative 2^-9 in bf16, the grade of the dS tile the product already rounds). On by default
    for blocks of 65-128 keys (:func:`choose_config`: FlashMoBA 128K backward 31.9 vs 34.4 ms, d=64
    block 128 8.5 vs 14.6 ms); the slot buffer counts against ``dq_chunk_bytes``.
    ``max_rows`` (> 0): no dK/dV program walks more than ``max_rows`` gathered rows. A (KV head,
    block) whose rows over the launch's query heads number ``n > max_rows`` gets
    ``ceil(n / max_rows)`` programs, listed on the device (longest blocks first, no host sync); each
    stores its partial dK/dV in a scratch slot of its own, and a sum kernel adds a block's partials in
    order and stores them (deterministic: no atomics). Blocks of at most ``max_rows`` rows run and
    store as before. ``max_rows_bytes`` bounds the scratch (``8 x block x D`` bytes per program of a
    cut block): blocks whose programs would pass it keep one program (correct, only slower). For selections concentrated on
    a few blocks: an attention sink (as trained models may form) puts every row of a document into block 0,
    whose single program would walk ``G x T`` rows while the rest of the grid idles.
    ``keep_index`` (the single-device op, not the CP slot form): the forward's gather index is
    saved for the backward (True), or only the selection, in the smallest integer type that holds
    its block ids, and the backward builds the index again (False). At 128K tokens, 16 query
    heads, top-12 and block 1024 that is ~27 MB instead of ~110 MB per layer, for one more index
    build (1.4 ms on an H200) in each backward. It pays only where the saved state outlives the
    forward (``train.recompute=none``) and memory is tight; under recomputation the state lives
    from the recomputed forward to its backward only. On one H200 (session 15,
    ``train_h200_2026-12-04_session15_norecompute.md``) 128K training without recomputation ran
    out of memory keeping the index and trained with False (2.85x full attention's tokens/s,
    135.6 GiB peak); at 32K it cost 2% (2.43x -> 2.38x). So True stays the default, and
    ``moba.kernel: bwd.keep_index=false`` is the setting for memory-bound runs without recomputation.
    ``split_dv``: the dK/dV programs run as two launches over the same programs and rows: dV alone
    (``P^T dO``: two products a step; ``dv_bm`` rows a step, 0: ``bm``, on ``dv_warps`` warps, 0:
    ``num_warps``), then dK with the fused dQ (four). One product more in all (``QK^T`` twice) and
    the rows read twice, for half the accumulators a program holds: at d=64, block 1024 the fused
    program spills (192 bytes a thread at 255 registers, ``results/kernel_resources_sm90_*``) and
    Nsight Compute found it bound by shared memory on its 32-row steps, which a dV launch with
    larger steps could relieve. Off: measured on one H200 (session 25,
    ``moba_tune_h200_2026-12-05_session25_options.log``) it lost at every shape, by 6-44% (d=64 block
    1024, 128K: 62.4, 60.7 with ``dv_bm=64``, against 56.1-56.4 ms): the second read of K and the rows
    costs more than the spills it removes.
    ``skip_unseen`` (with ``split_mask`` where positions are sorted): a key sub-tile's program
    starts its masked loop at the first row that sees one of its keys. A block's bucket begins
    with the block's own rows, and the ``n0`` of them before sub-tile ``n0 / bnb``'s first key see
    none of it (their P is 0), so walking them only costs time: at block 1024 the 8 sub-tiles
    walk ~448 such rows on average (~14 steps of 32) against a mean bucket of ~11.8K rows at 128K
    (top-12), ~4%; at 32K (block 512, top-3) ~6 steps of ~64. Exact: the skipped steps add zeros.
    Not with ``dq_slots`` (its programs store every row's slot; a block is one sub-tile there anyway).
    With it, both searches for the loops' bounds first try the row the block's own rows predict
    (two independent loads, checked) before the binary search. On by default since session 33
    (one H100, ``moba_tune_h100_2026-12-06_session33_skip_unseen.log``, off / on / off / on / off):
    backward 57.6/59.4/58.0 against 55.0/55.2 ms at 128K block 1024 top-12 (d=64), 2.56-2.58
    against 2.27-2.28 at 32K block 512 top-3, 0.92 against 0.83-0.84 at 4 x 8K, 9.03-9.13 against
    8.13-8.19 at d=128 block 512 32K, 595.5-597.0 against 562.3-566.2 at d=128 block 4096 128K;
    in training (same H100) 32K 164.4K -> 169.3K tok/s, 8K 1.61M -> 1.63-1.64M.
    ``acc_red`` (a split GQA group's later launches): their dK/dV are added to the earlier
    launches' fp32 sums by reductions in L2 (``red.global.add.f32``: each element has one writer a
    launch, so the sums are the load-add-store's, in the same order, but for subnormals, flushed to
    zero) instead of a load, add and store in the program's epilogue. The loaded tiles cost the
    d=64 block-1024 kernel registers it does not have: compiled for sm_90 (``kernel_resources.py
    --at train-b1024:131072 --loops``), the later launches take 400 bytes of stack a thread against
    the first launch's 208, and their unmasked step 593 instructions and 19.5 KB of local memory
    against 575 and 14.5 (12 of the 16 launches a 128K layer are such launches). Timed on one H100
    (session 37, ``moba_tune_h100_2026-12-06_session37.log``, off / on / off / on / off, 128K block
    1024 top-12, 16/4 heads): backward 54.1 / 57.5 / 56.8 ms off against 49.7 / 50.0 on (-11%, the
    offline model said ~-2.5%: the spills cost the whole loop, not only the epilogue). dK/dV bit
    for bit on the GPU at the d=64 GQA tiling. At d=128 (block 512, 32/8 heads) dV stays bit for
    bit and dK differs by one fp32 rounding of the partial sums: there the compiler fuses the
    load-add-store's ``dk * scale + sum`` into one FFMA (sm_90 SASS), where the reduction adds the
    rounded ``dk * scale`` (at d=64 both round twice). Measured with the sums captured in fp32
    (``benchmarks/diag_acc_red.py``, one H100, session 38): on against off max 4.8e-7 of a largest
    |dK| of 5.2, the same with 4-warp programs, while either run lies 8.8e-5 from a run without
    the split; cast to bf16, 698 of 16.8M elements differ, by at most 2.0e-3. Elementwise the fp32
    difference reaches 0.36 of an element near zero (a sum of cancelling partials keeps the
    partials' rounding), which is why session 37's check of one bf16 ulp per element failed; the
    cause is this rounding, not the warp count. On by default at d=64, blocks 256-1024, and at
    d=128 (128K block 4096 top-12, 32/8 heads, one H100, session 38: backward 564.9-568.7 ms off
    against 540.3 / 542.9 on, -4.4% of the mean); it acts only where a group is split over launches.
    ``zero_ahead`` (acts only with ``dq_rows``, where a backward runs several launches, as
    ``acc_red`` acts only where a group is split: so one override suits a GPU with TMA, whose
    defaults copy dQ rows, and one without, whose defaults do not): each dK/dV launch
    also zeroes the next launch's fp32 dQ row copy, every program a share of it before its own
    work, instead of a separate fill pass before that launch. The fill is a pass of pure writes at
    memory bandwidth (1.99 ms of a 128K block-1024 layer's ~68 ms of MoBA attention on an H100,
    ``results/profile_train128k_12l_h100_2026-12-07_session47``), while the dK/dV kernel is bound
    by shared memory and leaves DRAM room: the same zeros, written beside work instead of alone.
    The cost is memory: two copies live during a launch instead of one. Exact: the same adds into
    the same zeros. Timed once (one H100, session 47, ``moba_tune_h100_2026-12-07_session47_zero_ahead.log``,
    128K block 1024 top-12, backward alone): 49.26 / 49.54 ms against the default's 50.18 / 52.96
    / 53.61 (drifting), transient 1.63 against 1.25 GiB. In 128K training (24 layers, one H200,
    session 48, ``results/train_h200_2026-12-07_session48_128k_call{1,2}.md``) it gained 0.5% in
    each of two calls (64.47K / 64.60K against 64.16K / 64.27K tok/s, warm-step ranges apart in
    the second) with the same training peak. Off by default: the 128K kernel call's peak would go
    ~0.4 GiB above SDPA's, where it is equal now, for 0.5% of training (the default's pairs: 3.50, 3.51x)."""

    bnb: int = 0
    bm: int = 64
    fuse_dq: bool | None = None
    trans: bool = True
    split_mask: bool = False
    gather_rows: bool = False
    tma: bool = False
    sub_major: bool = False
    dq_rows: bool = False
    tma_dq: bool = False
    dq_trans: bool = False
    num_warps: int = 0
    num_stages: int = 0
    dq_bm: int = 64
    dq_bn: int = 64
    dq_warps: int = 4
    dq_stages: int = 2
    dq_chunk_bytes: int = 2 << 30
    split_group: bool = False
    keep_index: bool = True
    dq_slots: bool = False
    max_rows: int = 0
    max_rows_bytes: int = 32 << 20
    split_dv: bool = False
    dv_bm: int = 0
    dv_warps: int = 0
    skip_unseen: bool = True
    acc_red: bool = False
    zero_ahead: bool = False

    def __post_init__(self):
        if self.split_dv and self.tma and self.dv_bm not in (0, self.bm):
            raise ValueError(f"BwdConfig.split_dv with tma=True reads the rows through descriptors of bm={self.bm} "
                             f"rows; dv_bm={self.dv_bm} would need others. Fix: dv_bm=0 (= bm) or tma=False")
        for name in ("dv_bm", "dv_warps"):
            val = getattr(self, name)
            if val and (val < (16 if name == "dv_bm" else 1) or val & (val - 1)):
                raise ValueError(f"BwdConfig.{name}={val}: a power of two (>= 16 rows for dv_bm), or 0 for the "
                                 f"{'bm' if name == 'dv_bm' else 'num_warps'} of the dK launch")
        if self.max_rows < 0 or self.max_rows_bytes < 0:
            raise ValueError(f"BwdConfig.max_rows={self.max_rows} and max_rows_bytes={self.max_rows_bytes} must be "
                             f">= 0 (max_rows 0: one dK/dV program per block, however many rows it has)")
        if self.tma and not self.gather_rows:
            raise ValueError("BwdConfig.tma=True reads the rows copied in bucket order through tensor descriptors; "
                             "it needs gather_rows=True")
        if self.dq_rows and self.fuse_dq is False:
            raise ValueError("BwdConfig.dq_rows=True adds the dK/dV program's fused dQ into fp32 rows in bucket "
                             "order; it needs fuse_dq True or None (got fuse_dq=False). Fix: bwd.fuse_dq=true, or "
                             "bwd.dq_rows=false for the separate dQ kernel")
        if self.tma_dq and not self.dq_rows:
            raise ValueError("BwdConfig.tma_dq=True reduces dQ tiles into the bucket-order copy; it needs "
                             "dq_rows=True. Fix: set both off (bwd.dq_rows=false,bwd.tma_dq=false) or both on")
        if self.dq_slots and (self.dq_rows or self.fuse_dq is False):
            raise ValueError(f"BwdConfig.dq_slots=True stores the fused dQ of each selected block in its own slot; "
                             f"it replaces dq_rows and needs fuse_dq True or None (got dq_rows={self.dq_rows}, "
                             f"fuse_dq={self.fuse_dq}). Fix: bwd.dq_rows=false, or bwd.dq_slots=false")

    def key_tile(self, block_size: int, head_dim: int) -> int:
        """Keys per dK/dV program (``bnb``; 0 means 128 at d >= 128, else 64, at most the block)."""
        return self.bnb or min(128 if head_dim >= 128 else 64, _pow2(block_size))

    def fuses_dq(self, block_size: int, head_dim: int) -> bool:
        """Whether the dK/dV program adds dQ itself (``fuse_dq``; None: with ``dq_rows`` or
        ``dq_slots``, or where a block is at most 2 key sub-tiles), else the dQ kernel does."""
        if self.fuse_dq is not None:
            return self.fuse_dq
        return self.dq_rows or self.dq_slots or -(-block_size // self.key_tile(block_size, head_dim)) <= 2

    def check_block(self, block_size: int, head_dim: int) -> None:
        """The rules that depend on the shape; raises ``ValueError`` naming the values and the fix.
        ``dq_slots`` stores a block's whole dQ of a row from one program: the block must fit one
        key sub-tile."""
        bnb = self.key_tile(block_size, head_dim)
        if self.dq_slots and block_size > bnb:
            raise ValueError(f"BwdConfig.dq_slots=True needs each block in one key sub-tile of the backward: "
                             f"block_size={block_size} with bnb={bnb} (head dim {head_dim}) is "
                             f"{-(-block_size // bnb)} sub-tiles. Fix: bwd.dq_slots=false (it is for blocks of one key "
                             f"tile, e.g. 128 keys at head dim 128), or bwd.bnb={_pow2(block_size)}")


@dataclass(frozen=True)
class GateConfig:
    """Gate tiling: ``bm`` query rows per program (0: by head dim and top-k), ``bn``
    centroids per step. ``split_edges``: the centroid tiles that are candidates of every row of
    the program (past blocks of its rows' document that all of them see) run in their own loop
    without the mask. ``prefilter``: each tile's scores not above the row's k-th best are set to
    -inf before the insertion loop (off: the loop compares each row's best remaining score with
    its k-th best instead; same selection, one fewer pass over the tile). The default is
    ``split_edges`` on and ``prefilter`` off: together they took the gate from 145.1 to 121.5 ms
    at FlashMoBA 512K (block 128, d=128) and from 2.17 to 1.90 ms at 128K (block 1024, d=64) on
    one H200, the old loop timed before and after in the same process (``benchmarks/results/moba_tune_h200_2026-12-03_session13_gate.log``).
    ``presplit`` (half inputs): the fp32 centroids are split into their half-precision hi + lo
    parts once per call, instead of in every program for every tile it reads (at FlashMoBA 512K
    ~8K programs per head each split every tile they read); the same parts, so the same scores and
    selection bit for bit. On by default for blocks <= 128 (thousands of centroids per head):
    122.5/122.3 -> 117.2/117.1 ms at FlashMoBA 512K on one H200; at 128K, block 1024 (128
    centroids) it did not help (1.74/1.92 -> 1.85/2.01 ms), so larger blocks keep it off
    (``moba_tune_h200_2026-12-04_session15_gate.log``).

    ``loop``: how a tile is folded into the running top-k. ``while`` (each step asks whether any
    row of the program still has a candidate: a block-wide reduction per step); ``counted`` (the
    step count fixed once per tile, a row's best and its column in one reduction: the same
    selection); ``keys`` (``counted`` on int32 keys that carry the score's order bits and the
    column, so a step is one plain max; scores within ~2^-17 relative may order either way, the
    grade of the half-input gate's hi + lo scores; fp32 inputs run ``counted``); ``below`` (the
    ``keys`` selection bit for bit, each step taking the largest key below the last by an
    unsigned min, with no rewrite of the tile: fewer ALU instructions, where ``keys`` is ALU-bound). At FlashMoBA
    512K the ``while`` loop's products and masks alone took 36.6-37.1 of its 114.7-115.0 ms: the
    loop was the rest (``moba_tune_h200_2026-12-04_session16_gate_pieces.log`` and ``_gate.log``). ``slots``: register columns of the running top-k (at least the next power
    of two above top-k). Measured on one H200, the old default (``while``, 16 slots) first and
    last (``moba_tune_h200_2026-12-04_session16_gate.log``):

    ==========================  ==================  =================
    gate (ms)                   FlashMoBA 512K b128  128K b1024 d=64
    ==========================  ==================  =================
    while, 16 slots             116.5 / 116.6        1.87 / 1.92
    counted, 16 / 8 slots       109.4 / 103.6        1.60 / 1.58
    keys, 16 / 8 slots          93.1 / 87.7          1.20 / 1.20
    keys, 8 slots, bn 128       83.8                 1.68
    keys, 8 slots, 8 warps      80.1                 2.43
    ==========================  ==================  =================

    So ``keys`` with 8 slots became the default, with 8 warps at blocks <= 128 (thousands of
    centroids per head). Session 20: Nsight Compute showed that gate ALU-bound (the ALU pipe 73%
    active at FlashMoBA 32K, 88% at 128K block 1024; ``results/ncu_h200_2026-12-04_session20.md``),
    and ``below`` (the same selection, its step one subtraction and one unsigned min per key instead
    of a max, a compare and a select) is the default since. Select (centroids + gate) on one H200,
    ``keys`` first and last against ``below`` twice (``moba_tune_h200_2026-12-04_session20_gate.log``):
    FlashMoBA 128K 7.52/7.43 vs 6.23/6.18 ms, 512K 80.16/80.04 vs 69.74/69.81 (4 warps 75.9), d=64
    block 128 128K 3.27/3.23 vs 2.67/2.44, block 1024 128K 1.40/1.40 vs 1.08/1.18 (8 warps 2.13),
    32K block 512 0.27/0.21 vs 0.26/0.22 (within the drift of a 0.2 ms call)."""

    bm: int = 0
    bn: int = 64
    num_warps: int = 4
    split_edges: bool = True
    prefilter: bool = False
    presplit: bool = False
    loop: str = "below"
    slots: int = 8

    def __post_init__(self):
        if self.loop not in GATE_LOOPS:
            raise ValueError(f"GateConfig.loop={self.loop!r}; choose one of {GATE_LOOPS}")
        if self.slots < 2 or self.slots & (self.slots - 1):
            raise ValueError(f"GateConfig.slots={self.slots} must be a power of two >= 2 (the running top-k's "
                             f"register columns; it grows to the next power of two above top-k by itself)")
        if self.loop != "while" and self.prefilter:
            raise ValueError(f"GateConfig.prefilter=True belongs to loop='while'; loop={self.loop!r} counts each "
                             f"tile's candidates itself. Fix: gate.prefilter=false or gate.loop=while")


@dataclass(frozen=True)
class KernelConfig:
    """The tiling of one MoBA call (gate, forward, backward)."""

    fwd: FwdConfig = field(default_factory=FwdConfig)
    bwd: BwdConfig = field(default_factory=BwdConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def replace(self, **parts) -> "KernelConfig":
        """A copy with some fields changed: ``cfg.replace(fwd={"bm": 128})``."""
        new = {}
        for name, change in parts.items():
            new[name] = replace(getattr(self, name), **change) if isinstance(change, dict) else change
        return replace(self, **new)

    def encode(self) -> str:
        """A canonical string (custom ops take strings, not dataclasses). Plain string
        formatting of constants, so ``torch.compile`` traces it (it cannot trace ``json``)."""
        parts = []
        for part in _PARTS:
            obj = getattr(self, part)
            parts.append(part + ":" + ";".join(name + "=" + repr(getattr(obj, name)) for name in _FIELDS[part]))
        return "|".join(parts)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def decode(text: str) -> "KernelConfig":
        """Inverse of :meth:`encode` (cached: every op call of a layer decodes the same string)."""
        kw = {}
        for chunk in text.split("|"):
            part, body = chunk.split(":", 1)
            values = dict(item.split("=", 1) for item in body.split(";"))
            kw[part] = _CLASSES[part](**{k: ast.literal_eval(v) for k, v in values.items()})
        return KernelConfig(**kw)


_PARTS = ("fwd", "bwd", "gate")
_CLASSES = {"fwd": FwdConfig, "bwd": BwdConfig, "gate": GateConfig}
_FIELDS = {part: tuple(f.name for f in fields(cls)) for part, cls in _CLASSES.items()}
# Field types as annotated (strings: this module uses postponed annotations).
_TYPES = {part: {f.name: f.type for f in fields(cls)} for part, cls in _CLASSES.items()}


def compact_selection_dtype(n_tokens: int, block_size: int) -> torch.dtype:
    """The smallest signed integer type for the block ids of an ``n_tokens`` call (a document has
    at most ``ceil(n_tokens / block_size)`` blocks): int8 up to 128 blocks, int16 up to 32768,
    else int32. What ``BwdConfig.keep_index=False`` keeps; a static bound, so no device sync."""
    n_blocks = -(-n_tokens // block_size)
    return torch.int8 if n_blocks <= 128 else torch.int16 if n_blocks <= 32768 else torch.int32


@functools.lru_cache(maxsize=64)
def parse_overrides(text: str) -> tuple[tuple[str, tuple[tuple[str, object], ...]], ...]:
    """Tiling overrides from a recipe or a command line: ``"bwd.dq_rows=true,gate.split_edges=true"``
    (comma-separated ``part.field=value``; values are Python or YAML-style literals: ``true``,
    ``false``, ``none``, numbers, quoted strings). Returns them as a hashable tuple of
    ``(part, ((field, value), ...))``, for ``KernelConfig.replace(**dict(...))`` after converting
    each inner tuple to a dict (see :func:`apply_overrides`). Raises ``ValueError`` naming the
    item, the rule and the valid names; the combined config's own rules (e.g. ``dq_rows`` needs
    ``gather_rows``) are checked where the override meets a shape's default."""
    words = {"true": True, "false": False, "none": None, "null": None}
    parts: dict[str, dict[str, object]] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, eq, raw = item.partition("=")
        part, dot, name = key.strip().partition(".")
        if not eq or not dot:
            raise ValueError(f"kernel override {item!r}: write part.field=value, e.g. bwd.dq_rows=true "
                             f"(parts: {', '.join(_PARTS)}).")
        if part not in _CLASSES:
            raise ValueError(f"kernel override {item!r}: no part {part!r}; choose one of {', '.join(_PARTS)}.")
        if name not in _FIELDS[part]:
            raise ValueError(f"kernel override {item!r}: {part} has no field {name!r}; its fields: "
                             f"{', '.join(_FIELDS[part])}.")
        raw, kind = raw.strip(), _TYPES[part][name]
        if raw.lower() in words:
            value = words[raw.lower()]
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                if kind != "str" or not raw:
                    raise ValueError(f"kernel override {item!r}: {raw!r} is not a literal (true, false, none, a "
                                     f"number or a quoted string).") from None
                value = raw  # a bare word for a text field: fwd.method=partials
        ok = {"bool": isinstance(value, bool), "bool | None": value is None or isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool), "str": isinstance(value, str)}[kind]
        if not ok:
            raise ValueError(f"kernel override {item!r}: {part}.{name} takes {kind}, got {value!r}.")
        parts.setdefault(part, {})[name] = value
    return tuple((part, tuple(sorted(fields_.items()))) for part, fields_ in sorted(parts.items()))


@functools.lru_cache(maxsize=256)
def apply_overrides(cfg: KernelConfig, text: str) -> KernelConfig:
    """``cfg`` with the overrides of :func:`parse_overrides` applied (``text`` empty: ``cfg``).
    A combination a config class rejects raises its ``ValueError``, prefixed with ``text``.
    Cached (configs are immutable): every layer's call of a shape gets the same object."""
    if not text:
        return cfg
    changes = {part: dict(items) for part, items in parse_overrides(text)}
    try:
        return cfg.replace(**changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"kernel overrides {text!r} on the shape's default tiling: {e}") from None


def tiling_for(block_size: int, head_dim: int, group: int, n_tokens: int, device: torch.device | str,
               kernel: str = "") -> KernelConfig:
    """The tiling of one call on ``device``: :func:`choose_config` with the device's TMA, then
    ``kernel``'s overrides (:func:`parse_overrides`)."""
    return apply_overrides(choose_config(block_size, head_dim, group, n_tokens, device_has_tma(device)), kernel)


def device_has_tma(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA GPU with Hopper's tensor memory accelerator (compute
    capability 9.0 or newer): the TMA bulk reductions of ``BwdConfig.tma_dq`` need one."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=256)
def choose_config(block_size: int, head_dim: int, group: int = 1, n_tokens: int = 0, tma: bool = False) -> KernelConfig:
    """The default tiling for a shape.

    Args:
        block_size: MoBA block ``B``; head_dim: ``D``; group: query heads per KV head;
        n_tokens: tokens in the call (``T``; 0 when unknown); tma: the device has Hopper's TMA
        (:func:`device_has_tma`; the backward's dQ reductions use it).

    Cached (configs are immutable, so sharing one object is safe). Rows measured on one H200, bf16 (``benchmarks/results/moba_tune_h200_2026-12-02_run*.log``;
    H100 rows in ``benchmarks/NOTES_moba_kernels.md``); a shape between rows takes the nearest.

    Every shape's backward cuts its dK/dV programs at ``max_rows`` rows (:func:`default_max_rows`).
    """
    cfg = _tiling(block_size, head_dim, group, n_tokens, tma)
    return replace(cfg, bwd=replace(cfg.bwd, max_rows=default_max_rows(group, n_tokens)))


def default_max_rows(group: int, n_tokens: int) -> int:
    """``BwdConfig.max_rows`` for a call of ``n_tokens`` tokens at GQA group ``group``: 0 (no cut)
    below 32K tokens or where no (KV head, block) can hold more than 32K rows (``group x n_tokens
    <= 32768``); else 8192 below 128K tokens, 16384 from there (and when unknown).

    Why (one H200, ``moba_tune_h200_2026-12-04_session19_max_rows*.log``, uncut first / last): an
    attention sink (every query of a document selecting its block 0; ``bench_moba.py --sink 8``)
    made one dK/dV program walk ``G x T`` rows while the grid idled. Uncut against cut at 16384
    rows, with random inputs' uncut time in brackets: FlashMoBA 128K 193.8/193.7 vs 32.7 ms (32.1),
    512K 771.8 vs 131.3, d=64 block 128 128K 94.5 vs 8.3 (8.3), block 1024 128K 110.9 vs 56.0
    (55.8), block 512 32K 6.64 vs 2.40 (2.35) at d=64 and 30.4 vs 8.37 (7.99) at d=128. 32768 rows
    lost at FlashMoBA 128K (53.1 ms) and 16384 at its 32K (13.2 against 8.0 at 8192, 25.4 uncut). On
    random inputs the default cost 0-7% at 32K-128K against no cut (512K not timed without a sink).
    Below 32K tokens the cut cost 5-17% on random inputs in the tune lines (FlashMoBA 8K 2.08 vs
    1.93 ms), where a sink cost FlashMoBA 8K little (2.14 ms uncut, 2.36 cut) though d=64 block 128
    8K doubled (1.78 vs 0.94-1.09 ms cut): short calls stay uncut (``bwd.max_rows=4096`` is the
    override for a sink there). 4 x 8K block 512 (6 heads, no GQA: at most 32K rows a block) lost
    1.03/1.07 vs 0.94 ms cut and gained nothing under a sink (1.00 vs 0.89;
    ``..._session19_max_rows_default.log``), so such shapes stay uncut too."""
    if 0 < n_tokens < 32 * 1024 or 0 < group * n_tokens <= 32 * 1024:
        return 0
    return 16384 if n_tokens == 0 or n_tokens >= 128 * 1024 else 8192


def _tiling(block_size: int, head_dim: int, group: int, n_tokens: int, tma: bool) -> KernelConfig:
    """:func:`choose_config` before the backward's ``max_rows``."""
    bwd_old = BwdConfig(
        bnb=min(128 if head_dim >= 128 else 64, _pow2(block_size)),
        bm=64,
        num_warps=8 if head_dim >= 128 else 4,
        # 3 stages from block 256 up: block 512 at 8K, 4.23 -> 3.50 ms (H100, run 5).
        num_stages=3 if block_size >= 256 else 2,
    )
    # d=128 (H200, bf16, 32/8 heads; moba_tune_h200_2026-12-04_session16_d128.log, the old default
    # first and last): the d=64 backward's structure (rows copied in bucket order, the later blocks'
    # rows unmasked, a block's key sub-tiles adjacent, with TMA dQ fused and reduced into the row
    # copy as (K^T dS^T)^T) took 128K, block 4096, top-12 from 956.5/956.9 to 563.9 ms and 32K,
    # block 512, top-3 from 11.27/11.12 to 7.68 ms; without TMA the measured step is sub_major on
    # the row copy (634.4 and 8.93 ms). 32-row tiles lost (733 ms; 1729 with 4 warps). GQA groups
    # split over launches of at most 1 GiB of rows, as at d=64 (one query head's rows are ~1.7 GB
    # at 128K, top-12: a whole group's would be ~7 GB). The split group's later launches add dK/dV
    # by L2 reductions (acc_red; session 38, one H100, moba_tune_h100_2026-12-06_session38.log,
    # 128K block 4096 top-12, off / on / off / on / off): 568.7 / 566.8 / 564.9 ms off against
    # 542.9 / 540.3 on (-4.4% of the mean); dK moves by one fp32 rounding there (see BwdConfig).
    bwd_d128 = replace(bwd_old, gather_rows=True, split_mask=True, sub_major=True, dq_rows=tma, tma_dq=tma,
                       dq_trans=tma and group > 1, split_group=True, dq_chunk_bytes=1 << 30, acc_red=True)
    if block_size >= 2048:
        if 0 < n_tokens <= 256 * 1024:
            # H200, 128K, block 4096, d=128, 32/8 heads: partials on 128-row tiles with 8 warps
            # 220 ms vs one pass 264 ms. Longer calls keep the one pass: one head's fp32
            # partials (T * topk * D * 4 bytes) would pass 1 GiB there, and the one pass was
            # measured at 1M (H100: 2686 ms with 32K-token chunks).
            # Session 22 (moba_tune_h200_2026-12-04_session22_d128_fwd.log, 128K, 32/8 heads, top-12,
            # default first / last): K/V through tensor descriptors (tma_kv) 193.8 against 218.9/220.1
            # ms; with bf16 partials merged 16 rows a program as well 182.6 (the d=64 finding of
            # session 21 holds here: the descriptors take the tile kernel's spills away).
            fwd = FwdConfig(method="partials", bm=128, bn=64, chunk=128, num_warps=8, num_stages=3, tma_kv=True,
                            half_partials=True, merge_rows=16)
        else:
            # H100, 128K, block 4096, d=128: one pass with 4 stages 268 ms vs two passes 394 ms.
            # The d=128 backward at 512K: 4488.5 -> 2605.2 ms (moba_tune_h200_2026-12-04_session16_d128_512k.log).
            # Its row copy grows with T: one query head's rows at 512K, top-12, are ~6.5 GB, inside
            # the ~10 GiB between this call's peak with the old backward (26.6 GiB) and SDPA's (36.9).
            fwd = FwdConfig(method="one_pass", bm=128, bn=64, chunk=256, num_warps=8, num_stages=4)
        return KernelConfig(fwd=fwd, bwd=bwd_d128 if head_dim > 64 else bwd_old)
    if block_size <= 128:
        # Partials with the whole block in one key sub-tile, loaded once per program (SINGLE), and
        # the partial outputs in q's half dtype: FlashMoBA's setting (d=128, 16 heads), forward with
        # its gather index, against two passes (first / last) at 8K, 32K, 128K, 512K: 1.77 vs
        # 2.34/2.51, 5.95 vs 8.77/8.78, 22.9 vs 36.5/36.5, 93.4 vs 155.7/155.7 ms. With fp32
        # partials the same tiles lost to two passes (42.4 ms at 128K; 64-key sub-tiles 33.4), and
        # 128-row tiles on 8 warps lost with either (26.9 ms at 128K with half partials): the
        # partials' bytes bound this forward (moba_tune_h200_2026-12-04_session17_b128.log). Then
        # (..._session17_b128_refine.log, default first / last): 3 stages 20.7 vs 22.9/22.7 ms at
        # FlashMoBA 128K; at d=64 (16/4 heads, 128K, top-8) 128-row tiles 5.48 vs 6.78/6.77 ms.
        # At d=128 a program's chunk of 512 entries (moba_tune_h200_2026-12-04_session17_b128_fwd3.log):
        # 5.42 vs 5.60/5.56 ms at FlashMoBA 32K, 79.7 vs 84.4/84.4 at 512K; 8K (16K tokens) 1.87 vs
        # 1.65/1.90 keeps 256. The backward on 3 stages: 34.5 vs 35.9/36.0 ms at FlashMoBA 128K
        # (..._session17_b128_bwd.log; 64-key programs, 32-row steps, the separate dQ kernel, the
        # unmasked later rows and the transposed dQ product all lost there).
        #
        # Session 18: a row's dQ from a block of one key sub-tile is complete in one program, so it
        # is stored once in q's dtype into the row's own slot and summed per row afterwards
        # (dq_slots) instead of added by fp32 atomics. Blocks of 65-128 keys (one H200, default
        # without slots first / last; moba_tune_h200_2026-12-04_session18_b128_bwd.log): FlashMoBA
        # 1.97 vs 2.19/2.01 ms at 8K, 7.91 vs 8.07/8.12 at 32K, 31.9 vs 34.4/34.5 at 128K, 127.7 vs
        # 138.1/138.2 at 512K. At d=64 (16/4 heads, top-8) with 128-key programs: 128K 8.50 vs
        # 14.64/14.64 ms on 32-row steps with 4 warps and 3 stages; 32K 2.39 (2.35 with the rows
        # copied: within the drift) vs 3.74/3.71; at 8K the rows copied in bucket order with the
        # later rows unmasked, 64-row steps on 8 warps, 0.85 vs 1.26/1.30 ms (32-row steps 1.38)
        # (same log, calls 2 and 3). The slot buffer's bound per launch, time and the
        # backward's transient peak (..._session18_slots_bound.log): at d=128 256 MiB costs 8.16 vs
        # 7.92 ms at FlashMoBA 32K for 1.00 vs 1.75 GiB (the atomics: 8.01 ms, 1.25 GiB), and nothing
        # at 128K (31.88 vs 31.84 ms; 3.52 vs 4.02 GiB; the atomics 34.25 ms, 5.02 GiB). At d=64 a
        # bound below one KV head's slots needs its GQA group split (fp32 dK/dV over the launches),
        # which lost: 12.5 vs 8.7 ms at 128K, 3.85 vs 2.32 at 32K; so there 1 GiB (transient 1.38
        # GiB at 128K against the atomics' 0.88, 0.60 against 0.22 at 32K).
        slots = 64 < block_size
        if head_dim <= 64:
            fwd = FwdConfig(method="partials", bm=128, bn=0, chunk=256, num_warps=4, num_stages=2, half_partials=True)
            if not slots:
                bwd = bwd_old
            elif 0 < n_tokens <= 16384:
                bwd = BwdConfig(bnb=128, bm=64, num_warps=8, num_stages=3, gather_rows=True, split_mask=True,
                                dq_slots=True, dq_chunk_bytes=1 << 30)
            else:
                bwd = BwdConfig(bnb=128, bm=32, num_warps=4, num_stages=3, dq_slots=True, dq_chunk_bytes=1 << 30)
        else:
            fwd = FwdConfig(method="partials", bm=64, bn=0, chunk=512 if n_tokens > 16384 else 256, num_warps=4,
                            num_stages=3, half_partials=True)
            bwd = replace(bwd_old, num_stages=3, dq_slots=slots, dq_chunk_bytes=(1 << 28) if slots else bwd_old.dq_chunk_bytes)
        # Centroid hi + lo parts made once per call (presplit): gate 122.4 -> 117.1 ms at FlashMoBA
        # 512K, block 128, d=128 (H200, two runs each; moba_tune_h200_2026-12-04_session15_gate.log).
        # The key loop on 8 warps: 87.7 -> 80.1 ms at FlashMoBA 512K (at block 1024, 128
        # centroids, 8 warps lost: 1.20 -> 2.43 ms; moba_tune_h200_2026-12-04_session16_gate.log).
        # At d=64 the gate stays on 4 warps: block 128, 16/4 heads, 128K (1024 centroids per head),
        # 3.30 vs 5.97/6.04 ms on 8 warps; at d=128 (FlashMoBA 128K) 8 warps 7.33/7.31 vs 8.14
        # (moba_tune_h200_2026-12-04_session17_gate_b128.log).
        return KernelConfig(fwd=fwd, bwd=bwd, gate=GateConfig(presplit=True, num_warps=8 if head_dim > 64 else 4))
    if head_dim <= 64:
        # H200, d=64, 16/4 heads: partials on 128-row tiles, 4 warps, 3 stages: fwd 44.7 -> 22.5 ms
        # (128K, block 1024, top-k 12), 2.37 -> 1.65 ms (32K, block 512, top-k 3), 1.29 -> 1.06 ms
        # (4 x 8K, block 512, 6 heads). dK/dV on 128 keys x 32 gathered rows, 4 warps: bwd 106 ->
        # 84 ms, 4.53 -> 3.98 ms, 1.70 -> 1.41 ms at the same three shapes. The rows of later blocks
        # in their own unmasked loop (split_mask): 85.5 -> 81.9, 4.06 -> 3.95, 1.33 -> 1.29 ms
        # (moba_tune_h200_2026-12-03_bwd_split.log). Rows copied in bucket order before the dK/dV
        # loop (gather_rows) instead of looked up through the index: 81.4 -> 69.5, 3.93 -> 2.87,
        # 1.42 -> 1.20 ms; 4 stages then help short calls only (8K 1.20 -> 1.08, 32K 2.87 -> 2.84,
        # 128K 69.5 -> 70.1 ms) (moba_tune_h200_2026-12-03_gather_rows.log), and so in the forward
        # (32K 1.27 -> 1.24 and 1.37 -> 1.32, 4 x 8K 0.94 -> 0.73 and 0.91 -> 0.73, 128K 22.5 -> 22.6 and
        # 22.6 -> 22.7 ms in two runs); 3 stages in the dQ kernel: 69.1 -> 68.5 and 69.4 -> 68.5, 2.93 ->
        # 2.84 and 2.94 -> 2.88 ms (moba_tune_h200_2026-12-03_session8.log).
        # Session 13 (moba_tune_h200_2026-12-03_session13_bwd.log, default timed first and last):
        # a block's key sub-tiles adjacent in the grid (sub_major): 69.7/69.6 -> 57.3 ms at 128K,
        # 3.09/2.90 -> 2.63 ms at 32K, 1.02/1.10 -> 1.06 ms at 4 x 8K. With TMA, dQ fused into the
        # dK/dV program, added by bulk reductions into the bucket-order copy and computed as
        # (K^T dS^T)^T (dq_rows, tma_dq, dq_trans): 56.0 and 2.35 ms; without TMA that trio with
        # plain atomics measured 59.3 and 2.51 ms, so there sub_major stays alone. The transposed
        # product only with GQA: at 4 x 8K with 6/6 heads it lost in both calls (1.22 vs 1.05 ms;
        # 1.14/1.20 vs 0.94 ms), at 32K with 16/4 heads it tied (2.39 vs 2.39 ms)
        # (moba_tune_h200_2026-12-03_session13_small.log).
        # Session 15 (moba_tune_h200_2026-12-04_session15_rows64.log, default first and last): a GQA
        # group split over launches of at most 1 GiB of bucket-order rows (split_group): 55.7 against
        # 56.5/58.0 ms at 128K (one query head per launch: ~0.9 GB of rows instead of ~3.6 GB),
        # 2.41 against 2.57/2.35 ms at 32K, 1.00 against 1.01/0.99 ms at 4 x 8K: no measurable time cost,
        # ~2.7 GB less transient memory at 128K. Larger row tiles lost: bm=64 with 4 warps spills
        # (308 ms at 128K), with 8 warps 59.7 ms; bm=16 63.0 ms.
        # Session 21 (moba_tune_h200_2026-12-04_session21_fwd.log, default first and last): the unmasked
        # K/V sub-tiles through tensor descriptors (tma_kv) 21.03 against 21.93/21.77 ms at 128K (4
        # stages 21.12), 1.207 against 1.233/1.213 at 32K, 0.969 against 0.976/0.902 at 4 x 8K (within
        # the default's drift there). Other tilings on it lost: 8 warps 30.9 ms at 128K, 64-row tiles
        # 26.1 (capped at 168 registers 22.5), 128-key sub-tiles on 8 warps 28.8. Then the merge
        # (moba_tune_h200_2026-12-04_session21_merge.log, two calls, default first and last in
        # each): partials in bf16 merged 16 rows a program (the 32-row unrolled merge spilled at
        # 255 registers) 20.15/20.33 against 21.14/21.49 ms at 128K, 1.59/1.28 against 1.71/1.38
        # at 32K, 0.989/0.981 against 1.028/1.016 at 4 x 8K, with 0.05-0.07 GiB less transient
        # memory; the same on 8 merge warps 19.49/20.24, 1.59/1.33, 1.04/1.00 (less even). In 8K
        # training (4 x 8K tokens a call, CUDA graphs) the three together measured slower in one
        # call: 897,272 tok/s against 942,349 with the previous forward (full attention 927,840;
        # the call before, 865,607 against full's 985,172), so calls up to 32K tokens kept it.
        # Session 27 narrowed that to the 8K calls (up to 16K tokens): it was decided on 8K training,
        # whose calls (4 x 8K rows folded into heads: 8K tokens) replay CUDA graphs in a host-bound
        # step, while the 32K recipe's call (32K tokens x 16 heads, eager, device-bound) measured the
        # three faster at its own shape in the tune lines above (train-b512 32K, 4 stages: bf16
        # partials + 16-row merge 1.415 against 1.638/1.733 ms, and 1.592, 1.277 against the adjacent
        # defaults' 1.706, 1.383 in the second call; tma_kv 1.207 against 1.233/1.213). Not yet
        # measured in 32K training (A/B: --moba-kernel 'fwd.tma_kv=false,fwd.half_partials=false,fwd.merge_rows=32').
        # Session 36 (one H200, 128K training, train_h200_2026-12-06_session36_128k_stages.md, one
        # process each): the backward on 4 stages 61.59K tok/s [61.53K-61.61K over its warm steps]
        # against 3 stages' 60.88K [60.70K-60.89K] (+1.2%); the forward on 4 stages 60.47K (-0.7%).
        # So the backward takes 4 stages at every length, the forward only on short calls.
        short = 0 < n_tokens <= 32 * 1024  # 4 forward stages
        graphed_len = 0 < n_tokens <= 16 * 1024  # the previous forward
        stages = 4 if short else 3
        # Session 37 (one H100, moba_tune_h100_2026-12-06_session37.log, 128K block 1024 top-12, three
        # calls, default first / between / last): the merge's partials loaded at once with four query
        # heads a launch 18.61, 18.86/18.89 ms against 19.46-21.04 (transient 1.32 GiB, above the
        # backward's 1.25); with three (partial_bytes 768 MiB) 18.65/18.68 against 19.51-19.60 (1.13
        # GiB: the call's peak stays the backward's). At 32K and 4 x 8K the merge alone measured no
        # gain (1.15 against 1.12 ms; 0.63-0.66 against 0.61-0.64), so only longer calls take them.
        fwd = FwdConfig(method="partials", bm=128, bn=64, chunk=128, num_warps=4, num_stages=stages,
                        half_partials=not graphed_len, merge_rows=32 if graphed_len else 16, merge_unroll=True,
                        tma_kv=not graphed_len, merge_at_once=not short, partials_q_bound=short,
                        partial_bytes=(1 << 30) if short else (768 << 20))
        # The 1 GiB bound on a launch's rows (session 36, moba_tune_h200_2026-12-06_session36_chunks.log,
        # one H200, default between each): at 32K block 512 top-3, 16/4 heads, it is one launch
        # (2.10-2.31 ms, 0.90 GiB transient); 256 MiB (a KV head a launch) 3.22 ms (0.31 GiB), 128 MiB
        # 4.81, 64 MiB 5.69; at 4 x 8K 0.96-0.98 against 1.10, 1.18, 1.87 ms. Fewer programs a launch
        # leave the GPU's tail idle, so the bound stays where the time is.
        # The copy-less backward (gather_rows, dq_rows, tma, tma_dq all off: rows read through the
        # index, dQ by fp32 atomics) bounds the 32K transient lower than a KV head a launch, in less
        # time (one H100: 3.47 ms for 0.31 GiB in session 43; session 45,
        # tune_bwd_copyless_h100_2026-12-07_session45.log: 2.77-2.81 against 2.22-2.29 ms, 0.25
        # against 0.90 GiB); but 32K training lost ~5% with it (2.73x against 2.87x) at the same step
        # peak, so it is a setting for calls whose own peak matters, not the default.
        bwd = BwdConfig(bnb=128, bm=32, split_mask=True, gather_rows=True, num_warps=4, num_stages=4,
                        dq_bm=64, dq_bn=64, dq_stages=3, sub_major=True, dq_rows=tma, tma_dq=tma,
                        dq_trans=tma and group > 1, split_group=True, dq_chunk_bytes=1 << 30, acc_red=True)
        return KernelConfig(fwd=fwd, bwd=bwd)
    # d=128, blocks 256-1024: the forward as partials on 64-row tiles, 4 warps, 3 stages: 5.05 ms
    # against two passes' 5.58/5.75 at 32K, block 512, top-3 (128-row tiles with 8 warps: 5.39);
    # the backward as above. Session 22 (moba_tune_h200_2026-12-04_session22_d128_fwd.log, 32K,
    # 32/8 heads, default first / last): tma_kv 3.94 against 4.68/4.48 ms (the descriptors cut the
    # tile kernel's 104 bytes of stack to 8, kernel_resources_sm90_2026-12-04_session21.txt), with
    # bf16 partials and the 16-row merge 3.64.
    fwd = FwdConfig(method="partials", bm=64, bn=64, chunk=128, num_warps=4, num_stages=3, tma_kv=True,
                    half_partials=True, merge_rows=16)
    return KernelConfig(fwd=fwd, bwd=bwd_d128)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
