"""GPU time of a call's kernels, as ``torch.profiler`` records them: what the call costs a step
whose GPU is busy, without the host's launch cost that CUDA events around a short call include.
Used by ``profile_moba.py`` and ``bench_layer_ops.py``."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_ms(fn, iters: int = 10, warmup: int = 1) -> float:
    """Device time of ``fn``'s kernels (and memcpys/memsets) per call: the profiler's device self
    time summed over ``iters`` calls after ``warmup`` unprofiled ones, divided by ``iters``. GPU only."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for e in prof.key_averages():
        total_us += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total_us / iters / 1e3
