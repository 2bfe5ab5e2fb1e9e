"""A training step's forward and backward as one CUDA graph (``train.cuda_graph=full_iteration``).

Why: a small model at short sequences is bound by the host, not the GPU. At 8K tokens, 6 layers
and hidden 384 the host's Python (Megatron's layers, autograd, the DDP hooks, our ops) takes
~65 ms of a ~70 ms step for either attention while the GPU idles between kernels, so neither
MoBA's cheaper kernels nor anything else on the GPU shows in tokens/s. Replaying the step's
kernels from a graph takes the host out.

How: the first ``warmup`` calls run eagerly on the side stream the capture will use, so every
kernel is compiled and loaded, the allocator is warm, and autograd's gradient-accumulation nodes
(which live as long as the parameters: see :meth:`GraphedForwardBackward.on_capture_stream`) run
on that stream. The short MoBA calls' own graphs stand aside in the warm-up and in the capture
(``cuda_graphs.calls_eager``: a graph is not captured inside another), so the warm-up compiles
exactly the path the capture records. The next call captures the whole forward-backward of every
micro-batch, Megatron's gradient finalisation included, on static copies of the micro-batches,
and replays it; later calls copy their micro-batches into those buffers and replay. What the
schedule returned at capture (the loss sums and counts) lives in the graph's memory and holds
each replay's values.

Megatron-Core has a wrapper for the same job (``megatron.core.full_cuda_graph``), but its state
is class-wide, its warm-up runs on the default stream (0.19 works around the stale streams this
leaves with a torch hook that torch 2.11 does not have), and it differs between 0.16 and 0.19;
this one is ~100 lines that behave the same on both.

The caller guarantees what a replay cannot see (``config._cuda_graph_errors``): one process, no
recomputation, and the same shapes every step; :meth:`GraphedForwardBackward.invalidate` must
be called when the model's computation changes (the hybrid schedule's switch to full attention).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from moba_cp.ops.moba.cuda_graphs import calls_eager

__all__ = ["GraphedForwardBackward"]

ForwardBackward = Callable[[list[dict]], list]


class GraphedForwardBackward:
    """``fb(batches) -> losses`` run eagerly ``warmup`` times, then captured once and replayed.

    Args:
        warmup: eager calls before the capture (at least 1: the kernels must be loaded first).
    """

    def __init__(self, warmup: int = 1):
        if warmup < 1:
            raise ValueError(f"GraphedForwardBackward: warmup={warmup}; the capture needs at least one eager call "
                             f"first (it compiles and loads every kernel).")
        self.warmup = warmup
        self.stream = torch.cuda.Stream()  # the warm-up calls and the capture run on it
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the graph (its memory pool is freed with it): the next ``warmup`` calls run
        eagerly again and the one after captures anew."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[dict] = []
        self.result: list | None = None
        self.eager_calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    @property
    def captures_next(self) -> bool:
        """Whether the next call captures (and replays) the graph."""
        return self.graph is None and self.eager_calls >= self.warmup

    @contextlib.contextmanager
    def on_capture_stream(self):
        """Run the block on the capture stream, ordered after and before the current stream's work.
        Autograd runs a node on the stream current when the node was made, so whatever makes nodes
        that outlive a step (DDP's gradient-accumulation hooks) must run in here."""
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            yield
        main.wait_stream(self.stream)

    def __call__(self, fb: ForwardBackward, batches: list[dict]) -> list:
        if self.graph is None and self.eager_calls < self.warmup:
            self.eager_calls += 1
            # the MoBA calls' own graphs stand aside, as they must inside the capture: the warm-up
            # compiles the very path the capture records
            with self.on_capture_stream(), calls_eager():
                return fb(batches)
        if self.graph is None:
            self._capture(fb, batches)
        else:
            self._check_same_shapes(batches)
            for static, batch in zip(self.static, batches):
                for k, v in batch.items():
                    static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.result

    def _capture(self, fb: ForwardBackward, batches: list[dict]) -> None:
        self.static = [{k: v.clone() for k, v in b.items()} for b in batches]
        torch.cuda.synchronize()
        # the eager steps' freed blocks go back to the device, so the graph's own pool can take them
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        # newer torch (2.13 has it, the GPUs' 2.11 does not) can move an autograd node made on another
        # stream onto the capture stream (process-wide, so only for the capture); on_capture_stream
        # already made DDP's nodes here
        override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
        try:
            if override is not None:
                override(True)
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"), calls_eager():
                self.result = fb(self.static)
        except Exception as e:
            self.invalidate()
            raise RuntimeError(f"train.cuda_graph: capturing the training step failed ({e}). "
                               f"Something in the step synchronises with the host or changes from step to "
                               f"step. Fix: train.cuda_graph=none.") from e
        finally:
            if override is not None:
                override(False)
        torch.cuda.synchronize()
        self.graph = graph

    def _check_same_shapes(self, batches: list[dict]) -> None:
        """A replay reads the captured shapes: anything else would be silently wrong."""
        same = len(batches) == len(self.static) and all(
            b.keys() == s.keys() and all(b[k].shape == s[k].shape and b[k].dtype == s[k].dtype for k in b)
            for b, s in zip(batches, self.static))
        if not same:
            got = [{k: tuple(v.shape) for k, v in b.items()} for b in batches]
            want = [{k: tuple(v.shape) for k, v in s.items()} for s in self.static]
            raise RuntimeError(f"train.cuda_graph: this step's micro-batches {got} differ from the "
                               f"captured step's {want}; a replay would compute the captured shapes. Fix: "
                               f"train.cuda_graph=none for runs whose batches change shape.")
