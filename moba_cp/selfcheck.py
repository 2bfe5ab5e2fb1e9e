"""``moba-cp selfcheck``: run MoBA on random data with each backend and compare with the fp64 oracle.

Prints one row per backend: forward/backward error relative to the fp64 naive run, time, and
how sparse the attention was (attended keys over the keys causal attention would see).
"""

from __future__ import annotations

import argparse
import time

import torch

from moba_cp.ops.moba import naive
from moba_cp.ops.moba.api import backend_unavailable_reason, moba_attn


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=2048, help="sequence length T (default 2048)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default="auto",
                   help="comma list of backends to check (default: every backend available on the device)")
    p.add_argument("--seed", type=int, default=0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(args) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    T, hq, hkv, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    q64, k64, v64 = (torch.randn(T, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    do64 = torch.randn(T, hq, d, generator=g, dtype=torch.float64)
    if args.backends == "auto":
        names = [b for b in ("naive", "triton") if backend_unavailable_reason(b, device) is None]
        if device.type == "cpu":
            names = ["naive"]  # the Triton interpreter is for tests at small shapes, not for this size
    else:
        names = args.backends.split(",")

    ref_in = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref_o, ref_lse = naive.moba_attn_naive(*ref_in, block_size=args.block_size, topk=args.topk)
    ref_grads = torch.autograd.grad(ref_o, ref_in, do64)
    idx = naive.select_blocks(q64, k64, block_size=args.block_size, topk=args.topk)
    n_blocks_attended = (idx >= 0).sum().item()
    causal_keys = hq * T * (T + 1) / 2
    attended = n_blocks_attended * args.block_size  # upper bound: the own block is causal
    print(f"selfcheck: T={T} Hq={hq} Hkv={hkv} D={d} block={args.block_size} topk={args.topk} "
          f"dtype={args.dtype} device={device}")
    print(f"attention sparsity: ~{attended / causal_keys:.1%} of the causal keys attended")
    print(f"{'backend':<8} {'o err':>9} {'lse err':>9} {'dq err':>9} {'dk err':>9} {'dv err':>9} {'fwd+bwd s':>10}")
    worst = 0.0
    for name in names:
        ins = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q64, k64, v64)]
        t0 = time.perf_counter()
        o, lse = moba_attn(*ins, block_size=args.block_size, topk=args.topk, return_lse=True, backend=name)
        grads = torch.autograd.grad(o, ins, do64.to(device=device, dtype=dtype))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        errs = [_rel(o.cpu(), ref_o), _rel(lse.cpu(), ref_lse)] + [_rel(a.cpu(), b) for a, b in zip(grads, ref_grads)]
        worst = max(worst, *errs)
        print(f"{name:<8} " + " ".join(f"{e:9.2e}" for e in errs) + f" {dt:10.2f}")
    limit = 1e-5 if dtype == torch.float32 else 2e-2
    ok = worst < limit
    print(f"selfcheck {'PASSED' if ok else 'FAILED'}: worst relative error {worst:.2e} (limit {limit:.0e} for {args.dtype})")
    return 0 if ok else 1
