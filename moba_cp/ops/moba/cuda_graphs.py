"""CUDA graphs for short MoBA calls: one replay instead of ~30 enqueued operations.

Why: on short sequences the host takes longer to *enqueue* a MoBA forward+backward (Python
around ~11 Triton launches and ~15 torch ops) than the GPU takes to run it (4 x 8K tokens, 6
heads, d=64, H200: 2.3 ms of host time against 1.6 ms of kernels, ``benchmarks/profile_moba.py
--host``), so the GPU idles between kernels and MoBA lost to a single cuDNN call. A graph
replays the same kernels with one launch.

How: :class:`GraphedCall` wraps a function of CUDA tensors whose every allocation and launch
depends only on the shapes (true of the Triton backend: no host syncs, tables sized by static
bounds). A shape's first call runs eagerly (it compiles the kernels and is the warm-up); its
second call captures a graph on static input buffers; later calls copy their inputs into those
buffers, replay, and *clone* the outputs (several layers call before any backward, so a replay
must not overwrite what an earlier call returned). Each captured shape keeps a private memory
pool for its intermediates and a reference to everything it reads outside its inputs.

Which calls: see :func:`graphs_enabled` (CUDA, not while ``torch.compile`` traces, up to
``GRAPH_MAX_TOKEN_HEADS`` query rows x heads, offsets that live as long as the graph). Turn
them off with ``MOBA_CP_CUDA_GRAPHS=0``; ``MOBA_CP_CUDA_GRAPHS=index`` graphs only the selection
and its index; the default, ``shared``, lets the backward's graph read the forward graph's buffers,
``1`` gives each graph its own (:data:`GRAPH_MODES`).
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Callable, Sequence

import torch

__all__ = ["GraphedCall", "graphs_enabled", "graph_mode", "GRAPH_MODES", "GRAPH_MAX_TOKEN_HEADS", "static_offsets",
           "calls_eager"]

#: Largest ``T * Hq`` a call is graphed at. Above it a call's kernels run long enough that the
#: enqueue time hides behind them, while the graph's input copies and output clones grow with the
#: call (and its private pool holds large intermediates). Measured in training on one H200
#: (``benchmarks/bench_train.py``, 2026-12-03, 2 alternating pairs each): 32K tokens x 16 heads
#: (2^19) trains 3% faster eager (114.8K vs 111.2K tok/s), 4 x 8K tokens x 6 heads (~2^17.6)
#: needs the graph (eager 0.87x full attention, graphed 1.02-1.03x).
GRAPH_MAX_TOKEN_HEADS = 1 << 18

#: Graphs kept per :class:`GraphedCall` (least recently used dropped; a dropped graph frees its pool).
MAX_GRAPHS = 8

#: ``cu_seqlens`` tensors that live for the whole process and are never written
#: (``api.batch_cu_seqlens``): a graph may read them by address. Keyed by ``id``; the tensors
#: are held here, so an id is never reused.
_STATIC_OFFSETS: dict[int, torch.Tensor] = {}


def static_offsets(cu: torch.Tensor) -> torch.Tensor:
    """Mark ``cu`` as process-lifetime, read-only offsets (graphs may read it); returns it."""
    _STATIC_OFFSETS[id(cu)] = cu
    return cu


#: ``MOBA_CP_CUDA_GRAPHS`` values: ``0`` no graphs; ``1`` the whole forward and the whole
#: backward, each one graph on its own static buffers; ``index`` only the selection and the gather
#: index (the ~20 small operations) in a graph, the attention kernels eager. ``index`` copies q and
#: k into the graph instead of q, k, v (forward) and do, q, k, v, o (backward), and clones no o, dq,
#: dk, dv. ``shared`` (the default since session 27): as ``1``, but the backward's graph reads q, k,
#: v, o and the saved state in the forward graph's own buffers, so it holds a static copy of do
#: alone and copies nothing else when the forward replayed last for the same call (with selective
#: recomputation, every backward: its forward is recomputed just before it). In 8K training on one
#: H200 (session 25, ``train_h200_2026-12-05_session25_8k.md``, two alternating pairs a setting) it
#: lowered the peak in both micro-batch-4 settings (3.9 / 4.3 GiB allocated / reserved against 4.0 /
#: 4.5; equal at micro-batch 16), and its speed did not separate from the pairs' +-15% spread (MoBA /
#: full per pair: 1.09, 0.97 against 1.09, 0.85 with recomputation; 1.32, 0.86 against 1.00, 0.89
#: without; 1.12, 1.12 against 1.13, 1.12 at micro-batch 16): the default for the memory.
GRAPH_MODES = {"0": "off", "1": "call", "index": "index", "shared": "shared"}


def graph_mode() -> str:
    """``'off'``, ``'call'``, ``'index'`` or ``'shared'`` (the default) from ``MOBA_CP_CUDA_GRAPHS``
    (see :data:`GRAPH_MODES`)."""
    value = os.environ.get("MOBA_CP_CUDA_GRAPHS", "shared")
    mode = GRAPH_MODES.get(value)
    if mode is None:
        raise ValueError(f"MOBA_CP_CUDA_GRAPHS={value!r}: choose 0 (no CUDA graphs), 1 (the whole MoBA call, "
                         f"each graph on its own buffers), index (only the selection and its index) or shared (the "
                         f"default: the whole call, "
                         f"the backward reading the forward graph's buffers).")
    return mode


#: Open :func:`calls_eager` blocks (process-wide: a backward runs on autograd's own threads).
_EAGER_BLOCKS = 0


@contextlib.contextmanager
def calls_eager():
    """No call inside the block takes a graphed path. For the warm-up of a capture of a whole
    training step (``train/graphed_step.py``): inside the capture the calls run eagerly (a graph
    is not captured inside another), so the warm-up runs, and compiles, that same path, and keeps
    no per-call graph it would never replay."""
    global _EAGER_BLOCKS
    _EAGER_BLOCKS += 1
    try:
        yield
    finally:
        _EAGER_BLOCKS -= 1


def graphs_enabled(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> bool:
    """Whether a call on ``q [T, Hq, D]`` with ``cu_seqlens`` takes a graphed path."""
    if not q.is_cuda or graph_mode() == "off" or _EAGER_BLOCKS:
        return False
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False
    if q.shape[0] * q.shape[1] > GRAPH_MAX_TOKEN_HEADS:
        return False
    return cu_seqlens is None or _STATIC_OFFSETS.get(id(cu_seqlens)) is cu_seqlens


class _Captured:
    """One shape's graph: static inputs, static outputs, the objects it reads. ``bound``:
    tensors ``fn`` reads in place after the inputs (another graph's buffers, which their owner
    keeps current), never copied."""

    def __init__(self, fn: Callable, inputs: Sequence[torch.Tensor], keep: object,
                 bound: Sequence[torch.Tensor] = (), pool_of: "_Captured | None" = None):
        # contiguous static buffers: copy_ takes any source layout (an expanded gradient too)
        self.inputs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in inputs]
        for s, x in zip(self.inputs, inputs):
            s.copy_(x)
        self.bound = tuple(bound)
        self.keep = keep  # tables and offsets the graph reads by address stay alive with it
        # one run on the static buffers on a side stream first: any kernel specialisation these
        # buffers need is compiled and loaded before the capture (loading is not capturable)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self.inputs, *self.bound)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the backward's capture runs on the autograd engine's thread
        # pool_of: capture into that graph's memory pool (see GraphedCall)
        pool = pool_of.graph.pool() if pool_of is not None else None
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs, *self.bound)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for s, x in zip(self.inputs, inputs):
            s.copy_(x)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


class GraphedCall:
    """``fn(*tensors) -> tuple of tensors`` run eagerly on a key's first call, captured on its
    second, replayed after. ``key`` must determine every shape, dtype and constant ``fn``
    depends on (the caller builds it), and ``fn``'s result must not depend on its inputs'
    strides (the graph sees contiguous copies); ``keep`` is held with the graph. ``bound``:
    tensors passed to ``fn`` after ``inputs`` and read in place, not copied (the caller keeps them
    holding this call's data, and the same tensors for a key). After each replay the graph's
    ``holds`` is a new token: whoever kept it knows the graph's buffers still hold its call.
    ``pool_of``: a graph whose private memory pool this key's graph is captured into. Safe when
    the two replay one at a time on one stream, each clones its outputs right after its replay,
    and neither needs the other's intermediates: what one graph leaves in the pool is dead when
    the other replays (the pool's live blocks, such as the first graph's static outputs, are never
    handed to the second's capture)."""

    def __init__(self, name: str):
        self.name = name
        self._seen: set = set()
        self._graphs: "OrderedDict[tuple, _Captured]" = OrderedDict()

    def graph(self, key: tuple):
        """The captured graph of ``key``, or None (not captured yet, or dropped)."""
        return self._graphs.get(key)

    def __call__(self, key: tuple, fn: Callable, inputs: Sequence[torch.Tensor], keep: object = None,
                 bound: Sequence[torch.Tensor] = (), pool_of: "_Captured | None" = None):
        g = self._graphs.get(key)
        if g is not None:
            self._graphs.move_to_end(key)
        elif key not in self._seen:  # first sighting: eager (compiles kernels, warms the allocator)
            self._seen.add(key)
            return fn(*inputs, *bound)
        else:
            g = _Captured(fn, inputs, keep, bound, pool_of)
            self._graphs[key] = g
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        out = g(inputs)
        g.holds = object()
        return out

    def clear(self) -> None:
        self._seen.clear()
        self._graphs.clear()
