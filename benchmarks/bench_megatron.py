"""Megatron-Core GPTModel with moba_cp attention on 2 GPUs: CP=2 equality at bf16, and step time.

Usage (2 GPUs, one node):
    PYTHONPATH=$PWD torchrun --nproc_per_node 2 benchmarks/bench_megatron.py --out $OUT/megatron.md
CPU smoke test of the script itself (gloo, naive kernels, tiny shapes):
    PYTHONPATH=$PWD torchrun --nproc_per_node 2 benchmarks/bench_megatron.py --smoke

Sections (markdown, printed by rank 0 and saved to ``--out`` as they complete):
1. Equality: a hybrid GPTModel (MoBA layers + one full-attention layer) at bf16 with CP=2 against
   the same weights at CP=1 (whole sequence on each GPU): loss and every parameter gradient
   (relative L2 error per tensor, the worst one reported), next to the bf16-vs-fp32 error of the
   CP=1 model itself, which is the scale bf16 allows.
2. Step time: a ~0.5B model (24 layers, hidden 1024, 16 heads, 4 query groups, SwiGLU, vocab
   32K) at ``--seq`` tokens with CP=2, bf16: forward+backward of the model (loss over all
   tokens, no optimizer step, no DP all-reduce: there is no DP), all-MoBA against all-full
   attention (ring attention). CUDA-synchronised wall time per step, max over ranks,
   median of ``--reps`` steps after one warm-up step (which includes Triton compilation).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from report import configure, emit, sync  # benchmarks/report.py (the script's folder is on sys.path)

from moba_cp.config import AttentionConfig, ModelConfig, MoBAConfig, ParallelConfig

def build(mcfg, moba, attn, cp, precision, seed=1234):
    from megatron.core import parallel_state

    from moba_cp.megatron.model import build_gpt_model
    from moba_cp.megatron.parallel_init import init_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    pcfg = ParallelConfig(tp=1, cp=cp)
    init_parallel(pcfg, seed=seed)
    return build_gpt_model(mcfg, moba, attn, pcfg, vocab_size=mcfg.vocab_size, precision=precision)


def shard(x):
    from moba_cp.megatron.cp_batch import shard_batch_for_cp

    return shard_batch_for_cp({"t": x})["t"]


def rank_loss(model, tokens):
    """This rank's share of the global mean loss (local sum / global token count)."""
    inp, lab = tokens[:, :-1], tokens[:, 1:]
    return model(shard(inp), None, None, labels=shard(lab)).float().sum() / lab.numel()


def loss_and_grads(model, tokens, cp_group):
    loss = rank_loss(model, tokens)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp_group)
    grads = {}
    for n, p in model.named_parameters():
        g = (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).float().clone()
        dist.all_reduce(g, group=cp_group)
        grads[n] = g
    return total.item(), grads


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def equality(args, dev):
    from megatron.core import parallel_state as ps

    s = args.eq_seq
    mcfg = ModelConfig(num_layers=4, hidden_size=args.eq_hidden, num_attention_heads=8, num_query_groups=2,
                       seq_length=s, vocab_size=1024, share_embeddings=False)
    moba = MoBAConfig(block_size=args.eq_block, topk=4, backend=args.backend)
    attn = AttentionConfig(pattern="hybrid", full_last_n=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1024, (1, s + 1), generator=g).to(dev)
    emit(f"## 1. CP=2 vs CP=1, bf16 (hybrid: 3 MoBA layers block {args.eq_block} top-k 4 + 1 full; "
         f"hidden {args.eq_hidden}, S={s})")
    t0 = time.time()
    res = {}
    state = None
    for name, cp, prec in (("cp1_fp32", 1, "fp32"), ("cp1_bf16", 1, "bf16"), ("cp2_bf16", 2, "bf16")):
        # the fp32 reference runs MoBA through the naive oracle (no fp32 Triton compile needed)
        m = MoBAConfig(block_size=moba.block_size, topk=moba.topk, backend="naive") if prec == "fp32" else moba
        model = build(mcfg, m, attn, cp, prec)
        if state is None:
            state = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n].to(p.dtype))
        res[name] = loss_and_grads(model, tokens, ps.get_context_parallel_group())
        del model
    emit("| comparison | loss rel err | worst grad rel L2 err (tensor) | median grad rel L2 err |")
    emit("|---|---|---|---|")
    for a, b in (("cp2_bf16", "cp1_bf16"), ("cp1_bf16", "cp1_fp32"), ("cp2_bf16", "cp1_fp32")):
        la, ga = res[a]
        lb, gb = res[b]
        errs = {n: rel(ga[n], gb[n]) for n in gb}
        worst = max(errs, key=errs.get)
        emit(f"| {a} vs {b} | {abs(la - lb) / abs(lb):.2e} | {errs[worst]:.2e} ({worst}) | "
             f"{statistics.median(errs.values()):.2e} |")
    emit(f"losses: " + ", ".join(f"{k} {v[0]:.6f}" for k, v in res.items()) + f"  ({time.time() - t0:.0f} s)")
    emit()


def timing(args, dev):
    s = args.seq
    mcfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=16, num_query_groups=4,
                       seq_length=s, vocab_size=32768, share_embeddings=False)
    moba = MoBAConfig(block_size=args.block, topk=args.topk, backend=args.backend)
    emit(f"## 2. Step time, CP=2, bf16: {args.layers} layers, hidden {args.hidden}, 16 heads / 4 KV groups, "
         f"S={s} ({s // 2} tokens per GPU), micro-batch 1")
    emit("| attention | params | fwd+bwd ms/step (median, max over ranks) | steps timed | peak GiB | tokens/s |")
    emit("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32768, (1, s + 1), generator=g).to(dev)
    for pattern in args.patterns.split(","):
        label = f"MoBA block {args.block} top-k {args.topk}" if pattern == "moba" else "full (ring attention)"
        try:
            model = build(mcfg, moba, AttentionConfig(pattern=pattern), 2, "bf16")
            n_params = sum(p.numel() for p in model.parameters())
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(1 + args.reps):
                sync()
                t = time.perf_counter()
                rank_loss(model, tokens).backward()
                sync()
                dt = torch.tensor([time.perf_counter() - t], device=dev)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if i > 0:
                    times.append(dt.item())
                else:
                    emit(f"<!-- {pattern}: warm-up step {dt.item() * 1e3:.0f} ms -->")
                for p in model.parameters():
                    p.grad = None
                    if hasattr(p, "main_grad"):
                        p.main_grad = None
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
            med = statistics.median(times)
            emit(f"| {label} | {n_params / 1e6:.0f}M | {med * 1e3:.0f} | {len(times)} | {peak:.1f} | {s / med:,.0f} |")
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except torch.OutOfMemoryError as e:
            emit(f"| {label} | | OOM: {str(e).splitlines()[0][:120]} | | | |")
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny shapes, naive kernels")
    ap.add_argument("--skip-equality", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--patterns", default="moba,full")
    ap.add_argument("--eq-seq", type=int, default=8192)
    ap.add_argument("--eq-hidden", type=int, default=512)
    ap.add_argument("--eq-block", type=int, default=128)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    if args.smoke:
        args.seq, args.layers, args.hidden, args.block, args.topk, args.reps = 512, 2, 128, 32, 3, 1
        args.eq_seq, args.eq_hidden, args.eq_block, args.backend = 512, 128, 32, "naive"
    configure(out=args.out)
    on_gpu = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if on_gpu else "gloo")
    configure(rank=dist.get_rank())
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(dev)
    import megatron.core

    gpu = torch.cuda.get_device_name() if on_gpu else "CPU"
    emit(f"# Megatron-Core GPTModel with moba_cp attention, CP=2 ({dist.get_world_size()} x {gpu})")
    emit(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
         f"{datetime.date.today()}; command: `torchrun --nproc_per_node {dist.get_world_size()} "
         f"benchmarks/bench_megatron.py {' '.join(sys.argv[1:])}`")
    emit()
    if not args.skip_equality:
        equality(args, dev)
    if not args.skip_timing:
        timing(args, dev)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
