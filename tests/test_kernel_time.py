"""benchmarks/kernel_time.py: the device time of a call counts device rows only, once."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from kernel_time import device_self_us  # noqa: E402


def _row(key, device_type, self_device_us):
    return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_device_us)


def test_an_autograd_rows_copy_of_its_kernels_time_is_not_counted_again():
    # As torch 2.11 reports a MoBA backward with CPU and CUDA activity: the autograd function's
    # host row carries its kernels' device time as "self" time as well.
    rows = [
        _row("_BlockAttnEagerBackward", DeviceType.CPU, 700.0),
        _row("_dkdv_kernel", DeviceType.CUDA, 500.0),
        _row("_dq_rows_sum_kernel", DeviceType.CUDA, 150.0),
        _row("Memset (Device)", DeviceType.CUDA, 50.0),
        _row("cudaLaunchKernel", DeviceType.CPU, 0.0),
    ]
    assert device_self_us(rows) == 700.0


def test_a_host_only_profile_has_no_device_time():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    events = prof.key_averages()
    assert any(e.key == "aten::mm" for e in events)
    assert device_self_us(events) == 0.0


def test_only_torchs_sync_warnings_count_as_host_synchronizations():
    from kernel_time import is_sync_warning

    # c10's warn_or_error_on_sync text, as a UserWarning carries it
    assert is_sync_warning(UserWarning("called a synchronizing CUDA operation (Triggered internally at ...)"))
    # the notice set_sync_debug_mode("warn") raises by itself: a 32K call read 1 sync from it
    assert not is_sync_warning(UserWarning("Synchronization debug mode is a prototype feature and does not yet "
                                           "detect all synchronizing operations"))
    assert not is_sync_warning("Profiler clears events at the end of each cycle.")
