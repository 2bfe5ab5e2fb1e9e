"""GPU time of a call's kernels, as ``torch.profiler`` records them: what the call costs a step
whose GPU is busy, without the host's launch cost that CUDA events around a short call include.
Used by ``profile_moba.py`` and ``bench_layer_ops.py``."""

from __future__ import annotations

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def device_self_us(events) -> float:
    """Device self time (us) of the profiler's ``key_averages()`` rows that ran on the device:
    kernels, memcpys and memsets. Rows of host operations are left out: with CPU activity
    recorded, torch 2.11 gives an autograd function's row (``_BlockAttnEagerBackward``) the device
    time of the kernels it launched as its own *self* time as well, so summing every row counted
    those kernels twice (a 32K MoBA call read 6.3 ms of kernels against 3.2 ms of device time)."""
    total = 0.0
    for e in events:
        if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CUDA:
            continue
        total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total


#: What torch's sync debug mode says at each synchronizing operation (c10's ``warn_or_error_on_sync``).
SYNC_WARNING = "called a synchronizing CUDA operation"


def is_sync_warning(message) -> bool:
    """Whether a warning raised under ``torch.cuda.set_sync_debug_mode("warn")`` reports a host
    synchronization. Turning the mode on warns once by itself ("Synchronization debug mode is a
    prototype feature ..."); counting that one read a 32K MoBA call as making a sync it does not."""
    return SYNC_WARNING in str(message)


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
    return device_self_us(prof.key_averages()) / iters / 1e3
