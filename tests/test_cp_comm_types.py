"""Every comm type of moba_attn_cp and ring_attn_cp equals the single-process op (CPU, gloo).

``"a2a"`` (head-parallel all-to-all) and ``"a2a+ring"`` (all-to-all in groups, ring across) at
cp = 2 and 4: o, lse, dq, dk, dv against the naive oracle on the global sequence; GQA with
cp > KV heads (replicated KV heads), batch rows as separate documents, one block per zigzag
chunk (rank 0's early chunk has no past block), topk >= n_blocks. One spawn per world size runs
every case (spawning costs seconds, the math milliseconds); assertions run in the test process.
"""

import pytest
import torch
import torch.distributed as dist

from moba_cp.parallel import last_stats, moba_attn_cp, ring_attn_cp
from tests.distributed_harness import run_distributed
from tests.test_cp_moba import TOL, _errors, _inputs, _reference, _run_cp

# chunk: tokens per zigzag chunk (S = 2 * cp * chunk)
MOBA_CONFIGS = [
    dict(chunk=16, block=8, topk=3, hq=4, hkv=2, batch=None),  # GQA; cp=4: one KV head per 2 ranks
    dict(chunk=16, block=8, topk=100, hq=4, hkv=4, batch=None),  # topk >= n_blocks: causal full attention
    dict(chunk=8, block=8, topk=2, hq=4, hkv=1, batch=None),  # 1 block per chunk, KV head replicated on all
    dict(chunk=16, block=4, topk=5, hq=4, hkv=2, batch=2),  # batch rows = separate documents
]


def _comm_cases(ws):
    cases = [("a2a", None)]
    cases.append(("a2a+ring", 2))  # cp=2: one group (ring of 1); cp=4: 2 groups of 2
    return cases


def _expected_a2a_bytes(c, ws, a, elem, with_lse):
    """Forward bytes one rank sends in the all-to-all: q, k, v pieces to the other a-1 members,
    o (and lse) pieces back; KV heads go to every member that reads them."""
    b = c["batch"] or 1
    s_loc, d = 2 * c["chunk"], 16
    hq_piece = c["hq"] // a
    kv_piece = max(1, c["hkv"] // a)
    row = b * s_loc * d * elem
    fwd = (a - 1) * (row * hq_piece + 2 * row * kv_piece + row * hq_piece)
    if with_lse:
        fwd += (a - 1) * b * s_loc * hq_piece * 4
    bwd = (a - 1) * (row * hq_piece + 2 * row * kv_piece + row * hq_piece)
    return fwd, bwd


def _comm_worker(rank, ws):
    out = {}
    for comm, a2a_size in _comm_cases(ws):
        a = ws if comm == "a2a" else a2a_size
        for i, c in enumerate(MOBA_CONFIGS):
            s = 2 * ws * c["chunk"]
            q, k, v, do = _inputs(200 + i, s, c["hq"], c["hkv"], batch=c["batch"])
            seq_dim = 0 if c["batch"] is None else 1
            ref = _reference(q, k, v, do, c["block"], c["topk"])
            got = _run_cp(rank, ws, moba_attn_cp, q, k, v, do, seq_dim, block_size=c["block"], topk=c["topk"],
                          backend="naive", comm=comm, a2a_size=a2a_size)
            st = last_stats().as_dict()
            out[(comm, "moba", i)] = (_errors(rank, ws, got, ref, seq_dim), st,
                                      _expected_a2a_bytes(c, ws, a, 8, with_lse=True))
        # full attention: ring_attn_cp's comm types (the math oracle locally)
        q, k, v, do = _inputs(9, 2 * ws * 16, 4, 2, batch=2)
        ref = _reference(q, k, v, do, 2 * ws * 16, 10_000)
        got = _run_cp(rank, ws, ring_attn_cp, q, k, v, do, 1, impl="math", comm=comm, a2a_size=a2a_size)
        out[(comm, "ring_attn", 0)] = (_errors(rank, ws, got, ref, 1), last_stats("ring_attn_cp").as_dict(), None)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_comm_types_equal_single_process(world_size):
    results = run_distributed(_comm_worker, world_size)
    for rank, per_case in enumerate(results):
        assert len(per_case) == 2 * (len(MOBA_CONFIGS) + 1)
        for (comm, op, i), (errs, st, expected) in per_case.items():
            tag = f"cp={world_size} rank {rank} {op} comm={comm} config {i}"
            bad = {n: e for n, e in errs.items() if not e <= TOL}
            assert not bad, f"{tag}: errors {bad}"
            assert st["comm"] == comm
            a = world_size if comm == "a2a" else 2
            assert st["a2a_size"] == a
            if expected is not None:
                fwd, bwd = expected
                assert (st["a2a_bytes_sent"], st["a2a_bytes_recv"]) == (fwd, fwd), tag
                assert (st["a2a_grad_bytes_sent"], st["a2a_grad_bytes_recv"]) == (bwd, bwd), tag
                hkv = MOBA_CONFIGS[i]["hkv"]
                assert st["kv_heads_replicated"] == max(1, a // hkv), tag
            if comm == "a2a":
                assert st["kv_bytes_recv"] == 0  # whole sequences after the exchange: no ring
            elif world_size == 4:
                assert st["kv_bytes_recv"] > 0  # the ring across the 2 groups moved K/V


def _bad_comm_worker(rank, ws):
    g = dist.group.WORLD
    msgs = {}

    def attempt(name, fn):
        try:
            fn()
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)

    x = lambda h: torch.randn(32, h, 16)  # noqa: E731
    kw = dict(block_size=8, topk=2, cp_group=g, backend="naive")
    attempt("kv_heads", lambda: moba_attn_cp(x(12), x(3), x(3), comm="a2a", **kw))  # 3 KV heads over 4 ranks
    attempt("q_heads", lambda: moba_attn_cp(x(2), x(1), x(1), comm="a2a", **kw))  # 2 query heads over 4
    attempt("a2a_size", lambda: moba_attn_cp(x(4), x(2), x(2), comm="a2a+ring", a2a_size=3, **kw))
    attempt("unknown", lambda: ring_attn_cp(x(4), x(2), x(2), cp_group=g, comm="alltoall"))
    attempt("disagree", lambda: moba_attn_cp(x(4), x(2), x(2), comm="a2a" if rank == 1 else "ring", **kw))
    return msgs


def test_bad_comm_combinations_fail_on_every_rank():
    msgs = run_distributed(_bad_comm_worker, 4, timeout=120)
    expect = {
        "kv_heads": "splits the 3 KV heads (per tensor-parallel rank) over 4 ranks",
        "q_heads": "splits the 2 query heads (per tensor-parallel rank) over 4 ranks",
        "a2a_size": "a2a_size=3 does not divide the CP size 4",
        "unknown": "comm='alltoall' is unknown",
        "disagree": "disagree on comm",
    }
    for rank, per_case in enumerate(msgs):
        for case, match in expect.items():
            assert per_case[case] is not None and match in per_case[case], f"rank {rank} {case}: {per_case[case]!r}"


def _triton_comm_worker(rank, ws):
    """The all-to-all forms with the Triton kernels (interpreter on CPU): the local op is the
    single-device Triton MoBA ('a2a') or the Triton partial kernels of the ring ('a2a+ring')."""
    s, block, topk = 2 * ws * 32, 16, 3
    q, k, v, do = _inputs(5, s, 2, 1, d=16, dtype=torch.float32)
    ref = _reference(q.double(), k.double(), v.double(), do.double(), block, topk)
    out = {}
    for comm, size in (("a2a", None), ("a2a+ring", 2)):
        got = _run_cp(rank, ws, moba_attn_cp, q, k, v, do, 0, block_size=block, topk=topk, backend="triton",
                      comm=comm, a2a_size=size)
        out[comm] = _errors(rank, ws, got, ref, 0)
    return out


@pytest.mark.slow  # ~70 s of Triton interpreter; the forms are tested with the naive kernels above
def test_all_to_all_forms_with_triton_kernels():
    pytest.importorskip("moba_cp.ops.moba.triton_backend")
    for rank, per_comm in enumerate(run_distributed(_triton_comm_worker, 2)):
        for comm, errs in per_comm.items():
            assert all(e <= 1e-4 for e in errs.values()), f"rank {rank} comm={comm}: {errs}"  # fp32 kernels
