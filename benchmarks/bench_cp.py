"""Context-parallel MoBA on 2 GPUs: equality at bf16, weak scaling, bytes moved, ring attention.

Usage (2 GPUs, one node):
    PYTHONPATH=$PWD torchrun --nproc_per_node 2 benchmarks/bench_cp.py --out $OUT/cp.md
CPU smoke test of the script itself (gloo, naive kernels, tiny shapes):
    PYTHONPATH=$PWD torchrun --nproc_per_node 2 benchmarks/bench_cp.py --smoke

Sections (all printed as markdown, and saved to ``--out`` as they complete):
1. Equality: bf16 ``moba_attn_cp`` (CP=2) and the single-GPU op against an fp64 oracle of
   the global sequence (relative L2 error of o, dq, dk, dv), and the same for
   ``ring_attn_cp`` against fp64 causal attention.
2. Per sequence length S and (block, topk): forward+backward time of ``moba_attn_cp`` at
   CP=2 (K/V kept for backward, and re-fetched), of the single-GPU op on S/2 tokens (weak
   scaling: same tokens per GPU) and on S tokens; bytes received per rank against a full-KV
   ring, the union of blocks that leave their owner, on random inputs and on structured ones
   (16 "hot" blocks whose keys share a direction the queries also carry).
3. ``ring_attn_cp`` full causal attention on the same input (flash; cuDNN when it runs).

Times: CUDA events around one fwd+bwd call, the median over ranks' medians of ``reps`` calls
after warm-up, maximum over the two ranks (a CP step is as slow as its slowest rank). A time
budget (``--budget-s``) skips what would not fit, and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from report import configure, emit, sync  # benchmarks/report.py (the script's folder is on sys.path)

from moba_cp.ops.moba import naive
from moba_cp.ops.moba.api import moba_attn
from moba_cp.parallel import last_stats, moba_attn_cp, ring_attn_cp, zigzag_positions, zigzag_shard, zigzag_unshard

T0 = time.time()


def timed(fn, warmup: int, reps: int) -> float:
    """Median ms of ``fn`` on this rank, maximum over ranks."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        sync()
        if torch.cuda.is_available():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            sync()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return allmax(statistics.median(times))


def allmax(x: float) -> float:
    t = torch.tensor([float(x)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def peak_gib(fn) -> float:
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return allmax(torch.cuda.max_memory_allocated() / 2**30)


def rel(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def gather_unshard(x: torch.Tensor, cp: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous())
    return zigzag_unshard(parts, seq_dim=0)


# ------------------------------------------------------------------------------- inputs
def local_inputs(s_global, hq, hkv, d, dtype, dev, seed, cp, rank, structured=False, block=None, n_hot=16,
                 boost=8.0, grad=True):
    """This rank's zigzag shard of a random sequence, generated locally (no global tensor).

    ``structured``: ``n_hot`` blocks spread over the sequence (block 0 first) get ``boost*u``
    added to their keys and every query gets ``boost*u`` (u: a random unit vector per KV head),
    so hot blocks win the gate wherever they are candidates.
    """
    g = torch.Generator(device=dev).manual_seed(seed * 1000 + rank)
    s_loc = s_global // cp
    mk = lambda h: torch.randn(s_loc, h, d, generator=g, device=dev, dtype=torch.float32)  # noqa: E731
    q, k, v, do = mk(hq), mk(hkv), mk(hkv), mk(hq)
    if structured:
        gu = torch.Generator(device=dev).manual_seed(seed)  # the same u and hot set on every rank
        u = torch.randn(hkv, d, generator=gu, device=dev)
        u = u / u.norm(dim=-1, keepdim=True)
        nb = s_global // block
        hot = torch.linspace(0, nb - 1, n_hot, device=dev).round().long().unique()
        blk = zigzag_positions(s_loc, rank, cp, device=dev) // block
        is_hot = torch.isin(blk, hot)
        k[is_hot] += boost * u
        q += boost * u.repeat_interleave(hq // hkv, dim=0)
    out = [x.to(dtype) for x in (q, k, v, do)]
    if grad:
        for x in out[:3]:
            x.requires_grad_()
    return out


def fwd_bwd(op, q, k, v, do, **kw):
    def run():
        o = op(q, k, v, **kw)
        torch.autograd.grad(o, (q, k, v), do)
    return run


# ------------------------------------------------------------------------------- sections
def equality(args, cp, rank, dev, backend, ring_impls):
    s, hq, hkv, d = args.eq_seq, args.eq_hq, args.eq_hkv, args.d
    emit(f"## 1. Equality at {str(args.dtype).replace('torch.', '')} (S={s}, Hq={hq}, Hkv={hkv}, d={d}): "
         f"relative L2 error against an fp64 oracle of the global sequence")
    emit()
    emit("| op | config | o | dq | dk | dv |")
    emit("|---|---|---|---|---|---|")
    g = torch.Generator(device=dev).manual_seed(1234)
    q, k, v, do = (torch.randn(s, h, d, generator=g, device=dev).to(args.dtype) for h in (hq, hkv, hkv, hq))
    for block, topk in args.eq_configs:
        # fp64 oracle on the bf16 values (rank 0), single-device op, CP op
        if rank == 0:
            q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
            o64, _ = naive.moba_attn_naive(q64, k64, v64, block_size=block, topk=topk)
            ref = [o64.detach(), *torch.autograd.grad(o64, (q64, k64, v64), do.double())]
            del q64, k64, v64, o64
            q1, k1, v1 = (x.clone().requires_grad_() for x in (q, k, v))
            o1 = moba_attn(q1, k1, v1, block_size=block, topk=topk, backend=backend)
            single = [o1.detach(), *torch.autograd.grad(o1, (q1, k1, v1), do)]
        ql, kl, vl = (zigzag_shard(x, rank, cp).requires_grad_() for x in (q, k, v))
        ol = moba_attn_cp(ql, kl, vl, block_size=block, topk=topk, cp_group=dist.group.WORLD, backend=backend,
                          comm=args.comm, a2a_size=args.a2a_size)
        grads = torch.autograd.grad(ol, (ql, kl, vl), zigzag_shard(do, rank, cp))
        cpres = [gather_unshard(x, cp) for x in (ol.detach(), *grads)]
        if rank == 0:
            e_1 = [rel(a, b) for a, b in zip(single, ref)]
            e_cp = [rel(a, b) for a, b in zip(cpres, ref)]
            e_x = [rel(a, b) for a, b in zip(cpres, single)]
            fmt = lambda es: " | ".join(f"{e:.2e}" for e in es)  # noqa: E731
            emit(f"| moba_attn 1 GPU ({backend}) | B={block} topk={topk} | {fmt(e_1)} |")
            emit(f"| moba_attn_cp CP={cp} ({backend}, comm={args.comm}) | B={block} topk={topk} | {fmt(e_cp)} |")
            emit(f"| CP vs 1 GPU (not vs fp64) | B={block} topk={topk} | {fmt(e_x)} |")
        dist.barrier()
    # ring attention vs fp64 causal attention
    if rank == 0:
        q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
        o64, _ = naive.moba_attn_naive(q64, k64, v64, block_size=s, topk=1)  # one block: causal full
        ref = [o64.detach(), *torch.autograd.grad(o64, (q64, k64, v64), do.double())]
        del q64, k64, v64, o64
        if dev.type == "cuda":
            import torch.nn.functional as F

            q1, k1, v1 = (x.clone().requires_grad_() for x in (q, k, v))
            t = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731
            o1 = F.scaled_dot_product_attention(t(q1), t(k1.repeat_interleave(hq // hkv, 1)),
                                                t(v1.repeat_interleave(hq // hkv, 1)), is_causal=True)
            o1 = o1.squeeze(0).transpose(0, 1)
            single = [o1.detach(), *torch.autograd.grad(o1, (q1, k1, v1), do)]
            emit(f"| SDPA 1 GPU (default backend) | causal full | "
                 + " | ".join(f"{rel(a, b):.2e}" for a, b in zip(single, ref)) + " |")
    for impl in ring_impls:
        ql, kl, vl = (zigzag_shard(x, rank, cp).requires_grad_() for x in (q, k, v))
        ol = ring_attn_cp(ql, kl, vl, cp_group=dist.group.WORLD, impl=impl, comm=args.comm, a2a_size=args.a2a_size)
        grads = torch.autograd.grad(ol, (ql, kl, vl), zigzag_shard(do, rank, cp))
        cpres = [gather_unshard(x, cp) for x in (ol.detach(), *grads)]
        if rank == 0:
            emit(f"| ring_attn_cp CP={cp} ({impl}, comm={args.comm}) | causal full | "
                 + " | ".join(f"{rel(a, b):.2e}" for a, b in zip(cpres, ref)) + " |")
    emit()
    return ring_impls


def scaling(args, cp, rank, dev, backend, ring_impls):
    emit(f"## 2. moba_attn_cp at CP={cp} vs one GPU: forward+backward per call "
         f"(Hq={args.hq}, Hkv={args.hkv}, d={args.d}, {str(args.dtype).replace('torch.', '')})")
    emit()
    emit("| S | B / topk | inputs | CP=2 keep (ms) | CP=2 refetch (ms) | 1 GPU S/2 (ms) | weak ratio | "
         "1 GPU S (ms) | KV recv/rank (MiB) | full-KV ring (MiB) | recv / ring | union blocks / NB | "
         "dK/dV back (MiB) | peak keep / refetch (GiB) |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    ring_rows = []
    hq, hkv, d, dt = args.hq, args.hkv, args.d, args.dtype
    mib = 2**20

    def over() -> bool:
        return time.time() - T0 > args.budget_s

    for s in args.seqs:
        big = s >= args.big_seq
        # large S: one timed call (seconds each); warm-up only below --no-warm-seq
        warm, reps = (1 if s < args.no_warm_seq else 0, 1) if big else (1, args.reps)
        for block, topk in args.configs:
            for structured in ((False, True) if args.structured else (False,)):
                if over():
                    emit(f"| {s} | {block} / {topk} | {'structured' if structured else 'random'} | "
                         f"skipped: time budget of {args.budget_s:.0f} s spent |" + " |" * 10)
                    continue
                kind = "structured" if structured else "random"
                q, k, v, do = local_inputs(s, hq, hkv, d, dt, dev, seed=s % 997 + block, cp=cp, rank=rank,
                                           structured=structured, block=block, boost=args.boost, n_hot=args.n_hot)
                kw = dict(block_size=block, topk=topk, cp_group=dist.group.WORLD, backend=backend, comm=args.comm,
                          a2a_size=args.a2a_size)
                p_keep = p_ref = float("nan")
                # The mode the ratios below use: keep (then re-fetch is compared), or re-fetch only.
                t_cp = timed(fwd_bwd(moba_attn_cp, q, k, v, do, **kw, keep_kv=args.keep), 0 if structured else warm,
                             reps)
                t_keep, t_ref = (t_cp, float("nan")) if args.keep else (float("nan"), t_cp)
                st = last_stats().as_dict()
                recv = allmax(st["kv_bytes_recv"])
                grad = allmax(st["grad_bytes_sent"])
                if args.keep and not structured and s < args.no_warm_seq and not over():
                    t_ref = timed(fwd_bwd(moba_attn_cp, q, k, v, do, **kw, keep_kv=False), 0, 1 if big else reps)
                    if not big:
                        p_keep = peak_gib(fwd_bwd(moba_attn_cp, q, k, v, do, **kw, keep_kv=True))
                        p_ref = peak_gib(fwd_bwd(moba_attn_cp, q, k, v, do, **kw, keep_kv=False))
                elif not structured and not big:
                    p_ref = peak_gib(fwd_bwd(moba_attn_cp, q, k, v, do, **kw, keep_kv=False))
                del q, k, v, do
                t_half = t_full = float("nan")
                if not structured and not over():
                    qs, ks, vs, dos = local_inputs(s, hq, hkv, d, dt, dev, seed=7, cp=cp, rank=rank)  # S/2 tokens
                    t_half = timed(fwd_bwd(moba_attn, qs, ks, vs, dos, block_size=block, topk=topk, backend=backend),
                                   warm, reps)
                    del qs, ks, vs, dos
                    if s <= args.max_single_full and not over():
                        try:
                            qf, kf, vf, dof = local_inputs(s, hq, hkv, d, dt, dev, seed=8, cp=1, rank=0)
                            t_full = timed(fwd_bwd(moba_attn, qf, kf, vf, dof, block_size=block, topk=topk,
                                                   backend=backend), 0, 1)  # kernels warm from the S/2 run
                            del qf, kf, vf, dof
                        except torch.OutOfMemoryError:
                            t_full = float("inf")
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                row = dict(S=s, block=block, topk=topk, inputs=kind, cp_keep_ms=t_keep, cp_refetch_ms=t_ref,
                           single_half_ms=t_half, weak_ratio=t_cp / t_half if t_half == t_half else float("nan"),
                           cp_ms=t_cp, cp_mode="keep" if args.keep else "refetch",
                           single_full_ms=t_full, kv_recv_bytes=recv, full_ring_bytes=st["full_ring_kv_bytes"],
                           union_blocks=st["global_union_blocks"], n_blocks=st["n_blocks"], grad_bytes=grad,
                           peak_keep_gib=p_keep, peak_refetch_gib=p_ref, kept_kv_bytes=st["kept_kv_bytes"])
                rows.append(row)
                f = lambda x, p=1: "-" if x != x else ("OOM" if x == float("inf") else f"{x:.{p}f}")  # noqa: E731
                emit(f"| {s} | {block} / {topk} | {kind} | {f(t_keep)} | {f(t_ref)} | {f(t_half)} | "
                     f"{f(row['weak_ratio'], 2)} | {f(t_full)} | {recv / mib:.1f} | {st['full_ring_kv_bytes'] / mib:.1f} | "
                     f"{recv / st['full_ring_kv_bytes']:.3f} | {st['global_union_blocks']} / {st['n_blocks']} | "
                     f"{grad / mib:.1f} | {f(p_keep, 1)} / {f(p_ref, 1)} |")
        # ring attention on the same shapes
        if s <= args.max_ring_seq:
            for impl in (ring_impls if s < args.ring_long_seq else
                         [i for i in ring_impls if i in args.ring_long_impls.split(",")]):
                if over():
                    ring_rows.append(dict(S=s, impl=impl, ms=None))
                    continue
                q, k, v, do = local_inputs(s, hq, hkv, d, dt, dev, seed=11, cp=cp, rank=rank)
                try:
                    t = timed(fwd_bwd(ring_attn_cp, q, k, v, do, cp_group=dist.group.WORLD, impl=impl),
                              0 if big else 1, 1)  # seconds per call: one timed call
                except torch.OutOfMemoryError:
                    t = float("inf")
                del q, k, v, do
                ring_rows.append(dict(S=s, impl=impl, ms=t))
                emit(f"<!-- ring_attn_cp S={s} {impl}: {t:.1f} ms -->")
    emit()
    emit(f"## 3. ring_attn_cp (full causal attention, CP={cp}) vs moba_attn_cp, forward+backward")
    emit()
    mode = "K/V kept" if args.keep else "K/V re-fetched"
    emit("| S | ring impl | ring_attn_cp (ms) | "
         + " | ".join(f"MoBA B={b} k={t}, {mode} (ms) | speedup" for b, t in args.configs) + " |")
    emit("|---|---|---|" + "---|---|" * len(args.configs))
    for rr in ring_rows:
        cells = []
        for b, t in args.configs:
            m = [r for r in rows if r["S"] == rr["S"] and r["block"] == b and r["inputs"] == "random"]
            ms = m[0]["cp_ms"] if m else float("nan")
            sp = rr["ms"] / ms if (rr["ms"] and ms == ms) else float("nan")
            cells.append(f"{ms:.1f} | {sp:.1f}x")
        ring_ms = "skipped (budget)" if rr["ms"] is None else f"{rr['ms']:.1f}"
        emit(f"| {rr['S']} | {rr['impl']} | {ring_ms} | "
             + " | ".join(cells) + " |")
    emit()
    return rows, ring_rows


def profile_calls(args, cp, rank, dev, backend) -> None:
    """torch.profiler over one CP fwd+bwd and one single-GPU fwd+bwd on S/2 tokens (warm):
    the kernels that take the time, as rank 0 sees them (where the weak-scaling gap goes)."""
    from torch.profiler import ProfilerActivity, profile

    s, block, topk = (int(x) for x in args.profile.split(":"))
    hq, hkv, d, dt = args.hq, args.hkv, args.d, args.dtype
    q, k, v, do = local_inputs(s, hq, hkv, d, dt, dev, seed=3, cp=cp, rank=rank)
    calls = [(f"moba_attn_cp CP={cp}, S={s}", fwd_bwd(moba_attn_cp, q, k, v, do, block_size=block, topk=topk,
                                                     cp_group=dist.group.WORLD, backend=backend)),
             (f"moba_attn one GPU, S/2={s // 2}", fwd_bwd(moba_attn, q, k, v, do, block_size=block, topk=topk,
                                                          backend=backend))]
    emit(f"## Profile: B={block}, top-k {topk} (rank 0; one warm fwd+bwd call each; self device time per op)")
    emit()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, fn in calls:
        fn()
        sync()
        dist.barrier()
        t0 = time.time()
        with profile(activities=activities) as prof:
            fn()
            sync()
        wall = (time.time() - t0) * 1e3
        if rank == 0:
            ka = prof.key_averages()
            for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
                try:
                    table = ka.table(sort_by=key, row_limit=18, max_name_column_width=60)
                    break
                except (AttributeError, KeyError, ValueError):
                    continue
            emit(f"### {name}: {wall:.0f} ms wall under the profiler")
            emit()
            emit("```")
            emit(table)
            emit("```")
            emit()
    del q, k, v, do, calls
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_only(args) -> None:
    """Bytes without GPUs: the CP gate and request plan of every rank, simulated in one process.

    Traffic is a function of the selection alone, so this reproduces the exchange of
    ``moba_attn_cp`` at full benchmark shapes on a CPU: centroids are drawn from their exact
    distribution (the mean of ``B`` standard-normal keys is ``N(0, 1/B)`` per coordinate, plus
    ``boost * u`` for hot blocks), queries are streamed in pieces through the same gate as the
    op (:func:`moba_cp.parallel.gate.select_global`, fp32), and each rank's request set is the
    remote blocks its queries selected. Random draws differ from the GPU run's (other
    generator), the statistics do not.
    """
    from moba_cp.parallel.gate import select_global
    from moba_cp.parallel.zigzag import local_chunks

    cp, hq, hkv, d = args.plan_cp, args.hq, args.hkv, args.d
    emit(f"## Exchange plan at full shapes, computed on CPU (CP={cp}, Hq={hq}, Hkv={hkv}, d={d}, bf16 bytes)")
    emit()
    emit("| S | B / topk | inputs | remote blocks needed, per rank | KV recv per rank (MiB) | full-KV ring (MiB) | "
         "recv / ring (max rank) | union blocks / NB |")
    emit("|---|---|---|---|---|---|---|---|")
    for s in args.seqs:
        for block, topk in args.configs:
            for boost in args.plan_boosts:
                nb, chunk = s // block, s // (2 * cp)
                nbc = chunk // block
                g = torch.Generator().manual_seed(s + block)
                u = torch.randn(hkv, d, generator=g)
                u = u / u.norm(dim=-1, keepdim=True)
                cent = torch.randn(nb, hkv, d, generator=g) / block ** 0.5
                hot = torch.linspace(0, nb - 1, args.n_hot).round().long().unique()
                if boost:
                    cent[hot] += boost * u
                width = min(topk, nb)
                need = []
                for r in range(cp):
                    want = torch.zeros(nb, dtype=torch.bool)
                    pos_all = zigzag_positions(2 * chunk, r, cp)
                    for a in range(0, 2 * chunk, args.plan_piece):
                        pos = pos_all[a:a + args.plan_piece]
                        q = torch.randn(pos.numel(), hq, d, generator=g)
                        if boost:
                            q += boost * u.repeat_interleave(hq // hkv, dim=0)
                        idx = select_global(q, pos, cent, block_size=block, topk=topk, width=width, backend="naive")
                        want[idx[idx >= 0].long().unique()] = True
                    for c in local_chunks(r, cp):
                        want[c * nbc:(c + 1) * nbc] = False
                    need.append(want)
                blk_bytes = 2 * block * hkv * d * 2
                ring = (cp - 1) * 2 * 2 * chunk * hkv * d * 2
                counts = [int(w.sum()) for w in need]
                union = int(torch.stack(need).any(0).sum())
                kind = "random" if not boost else f"structured ({args.n_hot} hot, boost {boost:g})"
                emit(f"| {s} | {block} / {topk} | {kind} | {counts} | "
                     f"{', '.join(f'{c * blk_bytes / 2**20:.1f}' for c in counts)} | {ring / 2**20:.1f} | "
                     f"{max(counts) * blk_bytes / ring:.3f} | {union} / {nb} |")
    emit()


def probe_dense(impls, dev, dtype):
    """Keep the ring kernels whose forward and backward run on every rank (no communication
    involved, so a kernel missing here cannot leave a ring step half-posted)."""
    from moba_cp.parallel.ring_attn import dense_bwd, dense_fwd

    keep = []
    for impl in impls:
        try:
            q, k, v = (torch.randn(256, h, 64, device=dev, dtype=dtype) for h in (4, 2, 2))
            pos = torch.arange(256, device=dev)
            o, lse = dense_fwd(q, k, v, pos, pos, causal=True, scale=0.125, impl=impl)
            dense_bwd(torch.randn_like(o), q, k, v, o, lse, pos, pos, causal=True, scale=0.125, impl=impl)
            ok, why = 1.0, ""
        except Exception as e:  # noqa: BLE001
            ok, why = 0.0, f"{type(e).__name__}: {str(e)[:160]}"
        if allmax(1.0 - ok) == 0:
            keep.append(impl)
        else:
            emit(f"- ring kernel `{impl}` does not run here, left out ({why or 'failed on another rank'})")
    return keep


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, naive kernels, tiny shapes")
    p.add_argument("--comm", default="ring", choices=["ring", "a2a", "a2a+ring"],
                   help="CP comm type of moba_attn_cp / ring_attn_cp (sections 1 and 2)")
    p.add_argument("--a2a-size", type=int, default=None, help="with --comm a2a+ring: ranks per all-to-all group")
    p.add_argument("--seqs", default="262144,1048576,2097152")
    p.add_argument("--configs", default="4096:12,128:8", help="block:topk,...")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--big-seq", type=int, default=1048576, help="from this S on: one timed call")
    p.add_argument("--no-warm-seq", type=int, default=2097152, help="from this S on: no warm-up call either")
    p.add_argument("--max-single-full", type=int, default=2097152)
    p.add_argument("--max-ring-seq", type=int, default=1048576)
    p.add_argument("--ring-impls", default="flash,cudnn")
    p.add_argument("--ring-long-seq", type=int, default=1 << 40, help="from this S on, ring only --ring-long-impls")
    p.add_argument("--ring-long-impls", default="cudnn")
    p.add_argument("--no-keep", dest="keep", action="store_false",
                   help="time only the default K/V re-fetch mode (no keep-vs-refetch comparison)")
    p.add_argument("--no-structured", dest="structured", action="store_false", help="random inputs only")
    p.add_argument("--profile", default=None,
                   help="S:block:topk: torch.profiler on one CP call and one single-GPU S/2 call (rank 0 table)")
    p.add_argument("--eq-seq", type=int, default=8192)
    p.add_argument("--eq-hq", type=int, default=8)
    p.add_argument("--eq-hkv", type=int, default=2)
    p.add_argument("--eq-configs", default="512:4,128:8")
    p.add_argument("--budget-s", type=float, default=400.0)
    p.add_argument("--skip-eq", action="store_true")
    p.add_argument("--eq-only", action="store_true", help="only section 1 (a quick correctness check)")
    p.add_argument("--boost", type=float, default=8.0, help="structured inputs: strength of the hot direction")
    p.add_argument("--plan-only", action="store_true", help="one CPU process: exchange bytes at full shapes")
    p.add_argument("--plan-cp", type=int, default=2)
    p.add_argument("--plan-boosts", default="0,3,8")
    p.add_argument("--plan-piece", type=int, default=8192)
    p.add_argument("--n-hot", type=int, default=16)
    args = p.parse_args()
    if args.smoke:
        args.seqs, args.configs, args.hq, args.hkv, args.d = "256,512", "16:3,8:2", 4, 2, 16
        args.eq_seq, args.eq_hq, args.eq_hkv, args.eq_configs = 128, 4, 2, "16:3,8:4"
        args.ring_impls, args.big_seq, args.max_ring_seq, args.reps = "math,flash", 512, 512, 2
        args.no_warm_seq = 512
    parse = lambda s: [tuple(int(x) for x in c.split(":")) for c in s.split(",")]  # noqa: E731
    args.seqs = [int(x) for x in str(args.seqs).split(",")]
    args.configs, args.eq_configs = parse(args.configs), parse(args.eq_configs)
    if args.plan_only:
        configure(out=args.out)
        args.plan_boosts = [float(x) for x in args.plan_boosts.split(",")]
        emit(f"- command: `PYTHONPATH=$PWD python benchmarks/bench_cp.py {' '.join(sys.argv[1:])}`")
        emit()
        plan_only(args)
        return
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    configure(rank=rank)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    configure(out=args.out)
    backend = "triton" if cuda else "naive"
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    emit(f"# moba_attn_cp / ring_attn_cp on {cp} x {gpu}")
    emit()
    emit(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; torch "
         f"{torch.__version__}; NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}; MoBA backend {backend}")
    emit(f"- command: `PYTHONPATH=$PWD torchrun --nproc_per_node {cp} benchmarks/bench_cp.py {' '.join(sys.argv[1:])}`")
    emit()
    ring_impls = probe_dense([i for i in args.ring_impls.split(",") if i], dev, args.dtype)
    if not args.skip_eq:
        ring_impls = equality(args, cp, rank, dev, backend, ring_impls)
    if args.profile and not args.eq_only:
        profile_calls(args, cp, rank, dev, backend)
    rows, ring_rows = ([], []) if args.eq_only else scaling(args, cp, rank, dev, backend, ring_impls)
    emit(f"_total wall time {time.time() - T0:.0f} s_")
    if rank == 0 and args.out:
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(dict(rows=rows, ring=ring_rows), f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
