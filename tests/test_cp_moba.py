"""moba_attn_cp on gloo processes equals the single-process MoBA on the global sequence.

Each spawn runs several configurations (spawning costs seconds, the math milliseconds) and
returns per-config max errors of o, lse, dq, dk, dv against the naive oracle run on the
unsharded sequence; the assertions run here in the test process.
"""

import pytest
import torch
import torch.distributed as dist

from moba_cp.ops.moba import naive
from moba_cp.parallel import last_stats, moba_attn_cp, ring_attn_cp, zigzag_shard
from tests.distributed_harness import run_distributed

TOL = 2e-5  # fp64 inputs; the CP merge and partial gradients are fp32 by contract


def _inputs(seed, s, hq, hkv, d=16, batch=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    mk = lambda h: torch.randn(*lead, s, h, d, generator=g, dtype=dtype)  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv), mk(hq)


def _reference(q, k, v, do, block_size, topk):
    """Naive MoBA on the global sequence (batch rows as separate sequences) + autograd grads."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    if q.dim() == 3:
        o, lse = naive.moba_attn_naive(q, k, v, block_size=block_size, topk=topk)
    else:
        outs = [naive.moba_attn_naive(q[b], k[b], v[b], block_size=block_size, topk=topk) for b in range(q.shape[0])]
        o, lse = torch.stack([x[0] for x in outs]), torch.stack([x[1] for x in outs])
    (o * do).sum().backward()
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def _errors(rank, ws, got, ref, seq_dim):
    names = ("o", "lse", "dq", "dk", "dv")
    return {n: (a - zigzag_shard(b, rank, ws, seq_dim=seq_dim)).abs().max().item() for n, a, b in zip(names, got, ref)}


def _run_cp(rank, ws, op, q, k, v, do, seq_dim, **kw):
    ql, kl, vl = (zigzag_shard(x, rank, ws, seq_dim=seq_dim).requires_grad_() for x in (q, k, v))
    o, lse = op(ql, kl, vl, cp_group=dist.group.WORLD, return_lse=True, **kw)
    (o * zigzag_shard(do, rank, ws, seq_dim=seq_dim)).sum().backward()
    return o.detach(), lse, ql.grad, kl.grad, vl.grad


# (S_global per rank-count factor, block, topk, Hq, Hkv, batch, keep_kv)
CONFIGS = [
    dict(chunk=16, block=8, topk=3, hq=4, hkv=2, batch=None, keep_kv=True),  # GQA
    dict(chunk=16, block=8, topk=100, hq=2, hkv=2, batch=None, keep_kv=False),  # topk >= n_blocks
    dict(chunk=8, block=8, topk=2, hq=4, hkv=1, batch=None, keep_kv=False),  # 1 block/chunk: rank 0 has no past
    dict(chunk=16, block=4, topk=5, hq=2, hkv=1, batch=2, keep_kv=True),  # batch dim, finer blocks
]


def _moba_worker(rank, ws, configs):
    out = []
    for i, c in enumerate(configs):
        s = 2 * ws * c["chunk"]
        q, k, v, do = _inputs(100 + i, s, c["hq"], c["hkv"], batch=c["batch"])
        seq_dim = 0 if c["batch"] is None else 1
        ref = _reference(q, k, v, do, c["block"], c["topk"])
        got = _run_cp(rank, ws, moba_attn_cp, q, k, v, do, seq_dim, block_size=c["block"], topk=c["topk"],
                      backend="naive", keep_kv=c["keep_kv"])
        out.append(_errors(rank, ws, got, ref, seq_dim))
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_moba_cp_equals_single_process(world_size):
    results = run_distributed(_moba_worker, world_size, args=(CONFIGS,))
    for rank, per_cfg in enumerate(results):
        for cfg, errs in zip(CONFIGS, per_cfg):
            bad = {n: e for n, e in errs.items() if not e <= TOL}
            assert not bad, f"world {world_size} rank {rank} config {cfg}: errors {bad}"


def _full_attention_worker(rank, ws):
    """MoBA with topk >= n_blocks, ring attention (oracle and flash-style CPU kernels) and the
    naive full attention all agree."""
    s, out = 2 * ws * 16, {}
    q, k, v, do = _inputs(7, s, 4, 2)
    ref = _reference(q, k, v, do, 8, 10_000)  # MoBA, every block: causal full attention
    out["moba_all_blocks"] = _errors(rank, ws, _run_cp(rank, ws, moba_attn_cp, q, k, v, do, 0, block_size=8,
                                                       topk=10_000, backend="naive"), ref, 0)
    out["ring_math"] = _errors(rank, ws, _run_cp(rank, ws, ring_attn_cp, q, k, v, do, 0, impl="math"), ref, 0)
    stats = last_stats("ring_attn_cp").as_dict()
    f32 = [x.float() for x in (q, k, v, do)]
    out["ring_flash_cpu_fp32"] = _errors(rank, ws, _run_cp(rank, ws, ring_attn_cp, *f32, 0, impl="flash"), ref, 0)
    qb, kb, vb, dob = _inputs(8, s, 4, 2, batch=2)
    refb = _reference(qb, kb, vb, dob, s, 10_000)
    out["ring_batched"] = _errors(rank, ws, _run_cp(rank, ws, ring_attn_cp, qb, kb, vb, dob, 1, impl="math"), refb, 1)
    return out, stats


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_attention_equals_full_attention(world_size):
    results = run_distributed(_full_attention_worker, world_size)
    for rank, (per_case, stats) in enumerate(results):
        for case, errs in per_case.items():
            tol = 2e-5 if "fp32" not in case else 5e-5
            bad = {n: e for n, e in errs.items() if not e <= tol}
            assert not bad, f"world {world_size} rank {rank} {case}: errors {bad}"
        # ring attention moves at most the full-KV ring's bytes (less: earlier ranks send half)
        assert 0 < stats["kv_bytes_recv"] <= stats["full_ring_kv_bytes"]


def _bytes_worker(rank, ws, structured):
    """Run moba_attn_cp and compare its traffic with what the selection says must move."""
    chunk, block, hq, hkv, d, topk = 32, 8, 2, 2, 16, 2
    s = 2 * ws * chunk
    nb = s // block
    q, k, v, do = _inputs(3, s, hq, hkv, d)
    if structured:
        # Keys of block j all equal c_j * e0, queries have q[..., 0] > 0: the gate score is
        # c_j * q0, so every query's best past block is the "hottest" one before it. Hot
        # blocks: 0 and nb//2 + 1; every other block is cold (c = -10) and is never selected.
        hot = {0: 10.0, nb // 2 + 1: 20.0}
        c = torch.tensor([hot.get(j, -10.0) for j in range(nb)], dtype=q.dtype)
        k = torch.zeros_like(k)
        k[..., 0] = c.repeat_interleave(block)[:, None]
        q[..., 0] = q[..., 0].abs() + 1.0
    ref = _reference(q, k, v, do, block, topk)
    got = _run_cp(rank, ws, moba_attn_cp, q, k, v, do, 0, block_size=block, topk=topk, backend="naive")
    stats = last_stats().as_dict()
    # what the single-process selection says this rank's queries need from other ranks
    sel = naive.select_blocks(q, k, block_size=block, topk=topk)
    mine = zigzag_shard(sel, rank, ws)
    local = set(zigzag_shard(torch.arange(nb).repeat_interleave(block), rank, ws).tolist())
    needed = sorted(set(mine[mine >= 0].tolist()) - local)
    # and what every rank needs (the union of blocks that must leave their owner)
    union = set()
    for r in range(ws):
        m = zigzag_shard(sel, r, ws)
        loc_r = set(zigzag_shard(torch.arange(nb).repeat_interleave(block), r, ws).tolist())
        union |= set(m[m >= 0].tolist()) - loc_r
    return stats, needed, sorted(union), _errors(rank, ws, got, ref, 0)


@pytest.mark.parametrize("world_size,structured", [(2, True), (4, True), (3, False)])
def test_only_selected_blocks_move(world_size, structured):
    results = run_distributed(_bytes_worker, world_size, args=(structured,))
    total_sent = total_recv = 0
    for rank, (st, needed, union, errs) in enumerate(results):
        assert all(e <= TOL for e in errs.values()), errs
        # exactly the blocks this rank's queries selected on other ranks arrived, nothing else
        assert st["recv_block_ids"] == needed
        assert st["kv_bytes_recv"] == len(needed) * st["block_bytes"]
        assert st["block_bytes"] == 2 * 8 * 2 * 16 * 8  # K+V, B=8, Hkv=2, D=16, fp64
        assert st["global_union_blocks"] == len(union)
        # backward: the gradients of exactly those blocks went back (fp32 dK and dV)
        assert st["grad_bytes_sent"] == len(needed) * 8 * 2 * 16 * 4 * 2
        assert st["kv_bytes_recv"] <= st["full_ring_kv_bytes"]
        total_sent += st["kv_bytes_sent"]
        total_recv += st["kv_bytes_recv"]
        if structured:
            # two hot blocks in the whole sequence: at most 2 blocks ever travel, a small
            # fraction of the full-KV ring
            assert len(union) <= 2
            assert st["kv_bytes_recv"] <= 2 * st["block_bytes"]
            assert st["kv_bytes_recv"] <= st["full_ring_kv_bytes"] / (4 * (world_size - 1))
    assert total_sent == total_recv  # every byte sent was received by someone


def _bad_layout_worker(rank, ws, case):
    g = dist.group.WORLD
    s_local, h, d = 24, 2, 16
    q = torch.randn(s_local, h, d)
    k = torch.randn(s_local, h, d)
    v = torch.randn(s_local, h, d)
    kw = dict(block_size=8, topk=2, cp_group=g, backend="naive")
    try:
        if case == "partial_blocks":  # chunk of 12 tokens cannot hold blocks of 8
            moba_attn_cp(q, k, v, **kw)
        elif case == "length_mismatch":  # the last rank holds a shard of another length
            n = 32 if rank == ws - 1 else 16
            moba_attn_cp(q[:n] if n <= s_local else torch.randn(n, h, d), *(torch.randn(n, h, d) for _ in range(2)), **kw)
        elif case == "one_rank_bad_dtype":
            moba_attn_cp(q, k.double() if rank == 0 else k, v, **{**kw, "block_size": 4})
        elif case == "ring_heads_mismatch":
            ring_attn_cp(q, k[:, :1] if rank == 1 else k, v[:, :1] if rank == 1 else v, cp_group=g)
        return None
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("case,match", [
    ("partial_blocks", "must hold whole MoBA blocks"),
    ("length_mismatch", "disagree on S_local"),
    ("one_rank_bad_dtype", "rank 0: moba_attn_cp: q, k, v dtypes differ"),
    ("ring_heads_mismatch", "disagree on Hkv"),
])
def test_bad_layouts_fail_on_every_rank(case, match):
    msgs = run_distributed(_bad_layout_worker, 3, args=(case,), timeout=90)
    for rank, m in enumerate(msgs):
        assert m is not None and match in m, f"rank {rank}: {m!r}"


# Tiling overrides that change every kernel of a CP call: the gate's loop, the gathered rows'
# copy with dQ summed there, the sub-tile order and sizes of dK/dV.
KERNEL = "gate.split_edges=true,gate.bm=16,gate.bn=16,bwd.bnb=16,bwd.bm=16,bwd.gather_rows=true,bwd.dq_rows=true," \
         "bwd.sub_major=true"
# Each block's dQ of a row stored in its own slot (the default at blocks of 65-128 keys), here on
# blocks of one 16-key sub-tile, summed into the fp32 dq the CP backward accumulates over its steps.
SLOTS = "bwd.bnb=16,bwd.bm=16,bwd.dq_slots=true"
# dK/dV programs cut at 8 rows (bwd.max_rows), so every block chosen by more rows is summed from
# several programs in the fp32 scratch, in each source's partial backward
CUT = ",bwd.max_rows=8"


def _triton_worker(rank, ws):
    """The CP protocol with the Triton partial kernels and gate (interpreter on CPU), with the
    default tiling and with overrides (ring and all-to-all)."""
    s, block, topk = 2 * ws * 32, 16, 3
    q, k, v, do = _inputs(5, s, 2, 1, d=16, dtype=torch.float32)
    ref = _reference(q.double(), k.double(), v.double(), do.double(), block, topk)
    out = {}
    for name, kw in {"default": {}, "kernel ring": {"kernel": KERNEL}, "kernel a2a": {"kernel": KERNEL, "comm": "a2a"},
                     "dq slots ring": {"kernel": SLOTS}, "dq slots a2a": {"kernel": SLOTS, "comm": "a2a"},
                     "dq slots cut ring": {"kernel": SLOTS + CUT}, "kernel cut a2a": {"kernel": KERNEL + CUT, "comm": "a2a"},
                     }.items():
        got = _run_cp(rank, ws, moba_attn_cp, q, k, v, do, 0, block_size=block, topk=topk, backend="triton", **kw)
        out[name] = _errors(rank, ws, got, ref, 0)
    try:  # refused on every rank before any exchange: the naive backend has no tiling
        moba_attn_cp(q[:s // ws], k[:s // ws], v[:s // ws], block_size=block, topk=topk, cp_group=dist.group.WORLD,
                     backend="naive", kernel="bwd.bnb=16")
        out["naive refusal"] = None
    except ValueError as e:
        out["naive refusal"] = str(e)
    return out


def test_moba_cp_with_triton_kernels():
    pytest.importorskip("moba_cp.ops.moba.triton_backend")
    results = run_distributed(_triton_worker, 2)
    for rank, res in enumerate(results):
        assert "kernel='bwd.bnb=16' sets the Triton kernels' tiling" in (res.pop("naive refusal") or ""), rank
        for name, errs in res.items():
            assert all(e <= 1e-4 for e in errs.values()), f"rank {rank} {name}: {errs}"  # fp32 kernels


def test_gate_fallback_is_logged_once_per_width_not_per_call(caplog):
    """A gate wider than the Triton gate's limit falls back to the torch gate; the fallback is
    said once per process and width (it would otherwise repeat in every layer of every step),
    and the fallback's selection is the contract's."""
    from moba_cp.ops.moba import triton_gate
    from moba_cp.parallel import gate

    width = triton_gate.MAX_GATE_WIDTH + 2
    nb, bs, hq, d = width, 2, 2, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, hq, d, generator=g)
    q_pos = torch.arange(nb * bs - 4, nb * bs)
    cents = torch.randn(nb, hq, d, generator=g)
    gate._WARNED_WIDTHS.discard(width)
    with caplog.at_level("WARNING", logger=gate.__name__):
        outs = [gate.select_global(q, q_pos, cents, block_size=bs, topk=width, width=width, backend="triton")
                for _ in range(3)]
    said = [r for r in caplog.records if "exceeds the Triton gate" in r.getMessage()]
    assert len(said) == 1 and str(width) in said[0].getMessage()
    assert all(torch.equal(o, outs[0]) for o in outs)
    ref = gate.select_global(q, q_pos, cents, block_size=bs, topk=width, width=width, backend="naive")
    assert torch.equal(outs[0], ref)
