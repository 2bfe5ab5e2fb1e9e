"""Diagnosis of ``bwd.acc_red`` with 8-warp dK/dV programs (session 37: dK changed at d=128, block
512, 32/8 heads on an H100 and the option was refused there; session 38 found one fp32 rounding).

Runs the GPU test's call (16,384 tokens in two documents, top-3, bf16, the GQA group split into one
query head a launch) with the backward's dK/dV captured in fp32 before any cast, for:
  off / on          acc_red off and on at the default tiling (8 warps at d=128)
  unsplit           one launch a KV head (the sums in registers, no adds across launches)
  off4 / on4        the same with num_warps=4
and prints, for each pair, how many fp32 elements differ and by how much (absolute, and relative to
the largest element), plus the same for the bf16 casts. An fp32 difference of a few ulps of the
partial sums is rounding (e.g. an FFMA contracted in one path and not the other); a difference
near the size of the elements is a lost or doubled add.

Needs a CUDA GPU (session 38's run, at 71e8bad, still had to lift session 37's refusal of the
option with 8-warp programs; this diagnosis is why it was removed):
    python benchmarks/diag_acc_red.py [--d 128 --block 512 --hq 32 --hkv 8]
"""
from __future__ import annotations

import argparse

import torch

import moba_cp.ops.moba.triton_backend as tbk
from moba_cp.ops.moba.triton_config import choose_config

DOCS = [5000, 11384]  # the GPU tests' two documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("diag_acc_red needs a CUDA GPU")
    d, b, hq, hkv = a.d, a.block, a.hq, a.hkv
    t = sum(DOCS)
    g = torch.Generator().manual_seed(d + b + a.seed)
    q, k, v = (torch.randn(t, h, d, generator=g).to("cuda", torch.bfloat16) for h in (hq, hkv, hkv))
    do = torch.randn(t, hq, d, generator=torch.Generator().manual_seed(5 + a.seed)).to("cuda", torch.bfloat16)
    cu = torch.tensor([0, DOCS[0], t], dtype=torch.int32, device="cuda")
    idx = tbk.select_blocks(q, k, block_size=b, topk=3, cu_seqlens=cu)
    base = choose_config(b, d, hq // hkv, t, True).replace(bwd={"dq_chunk_bytes": 1})
    print(f"d={d} block={b} heads {hq}/{hkv}, tokens {t}; base bwd: {base.bwd}")

    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    real_bwd = tbk.sparse_attn_bwd

    def grads(name: str, **bwd):
        def fp32_kv(*args, **kw):
            kw["kv_grad_dtype"] = torch.float32
            dq, dk, dv = real_bwd(*args, **kw)
            captured[name] = (dk.clone(), dv.clone())
            return dq, dk.to(torch.bfloat16), dv.to(torch.bfloat16)

        tbk.sparse_attn_bwd = fp32_kv
        try:
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            o, _ = tbk.block_attn(qq, kk, vv, idx, block_size=b, cu_seqlens=cu, softmax_scale=d ** -0.5,
                                  config=base.replace(bwd=bwd))
            (o * do).sum().backward()
        finally:
            tbk.sparse_attn_bwd = real_bwd
        torch.cuda.synchronize()

    grads("off", acc_red=False)
    grads("on", acc_red=True)
    grads("unsplit", acc_red=False, dq_chunk_bytes=1 << 40)
    grads("off4", acc_red=False, num_warps=4)
    grads("on4", acc_red=True, num_warps=4)

    def compare(x: str, y: str) -> None:
        for i, name in enumerate(("dk", "dv")):
            a32, b32 = captured[x][i], captured[y][i]
            diff = (a32 - b32).abs()
            big = b32.abs().max().item()
            n = int((diff > 0).sum())
            rel = diff / b32.abs().clamp_min(1e-30)
            a16, b16 = a32.to(torch.bfloat16).float(), b32.to(torch.bfloat16).float()
            n16 = int((a16 != b16).sum())
            d16 = (a16 - b16).abs().max().item()
            where = diff.flatten().argmax().item()
            key, rem = divmod(where, hkv * d)
            print(f"{x:>7} vs {y:<7} {name}: fp32 differ at {n} of {diff.numel()}, max |diff| {diff.max().item():.3e} "
                  f"(largest |{name}| {big:.3e}; max elementwise rel {rel.max().item():.3e}; at key {key}, "
                  f"KV head {rem // d}); bf16 casts differ at {n16}, max {d16:.3e}")

    for x, y in (("on", "off"), ("off", "unsplit"), ("on", "unsplit"), ("on4", "off4"), ("off4", "unsplit"),
                 ("off", "off4")):
        compare(x, y)


if __name__ == "__main__":
    main()
