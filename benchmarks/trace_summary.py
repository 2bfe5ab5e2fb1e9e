"""Summaries of torch.profiler traces (``moba-cp train --logging.profile=[A,B]`` writes them):
GPU busy and idle time, device time by kind, and the kernels where two traces differ most.

Usage:
    python benchmarks/trace_summary.py RUN/profile/rank0_steps9-10.trace.json [OTHER.trace.json]

One trace: its span (first kernel start to last kernel end), the time the GPU ran anything
(the union of kernel, memcpy and memset intervals), the idle rest, and device time by kind
(moba_cp's Triton attention kernels, whose names start with ``_``; its fused layer ops, RoPE,
SwiGLU and RMSNorm, which both attentions run; cuDNN; memcpy; everything else). With a
second trace, also the kernels by the difference in their total time (first minus second):
where one step's extra device time goes. ``--gaps N``: the idle time split by gap length (short
gaps are launch latency between queued kernels; long ones mean the host fell behind or waited
on a sync) and the N longest gaps with the device event that ended each.
"""

from __future__ import annotations

import argparse
import collections
import json

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_events(path: str) -> list[dict]:
    """The device-side events of a Chrome trace, by start time."""
    with open(path) as fh:
        events = json.load(fh)["traceEvents"]
    return sorted((e for e in events if e.get("cat") in GPU_CATS and "dur" in e), key=lambda e: e["ts"])


def busy_idle_ms(events: list[dict]) -> tuple[float, float, float]:
    """``(span, busy, idle)`` in ms: busy is the union of the events' intervals."""
    if not events:
        return 0.0, 0.0, 0.0
    span = max(e["ts"] + e["dur"] for e in events) - events[0]["ts"]
    busy, start, end = 0.0, None, None
    for e in events:
        s, t = e["ts"], e["ts"] + e["dur"]
        if end is None or s > end:
            if end is not None:
                busy += end - start
            start, end = s, t
        else:
            end = max(end, t)
    busy += end - start
    return span / 1e3, busy / 1e3, (span - busy) / 1e3


def idle_gaps(events: list[dict]) -> list[tuple[float, float, str]]:
    """Intervals with nothing on the device between the first and last event: ``(length us,
    start us, name of the event that ends the gap)``, longest first."""
    gaps, end = [], None
    for e in events:
        if end is not None and e["ts"] > end:
            gaps.append((e["ts"] - end, end, e["name"]))
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
    return sorted(gaps, key=lambda g: -g[0])


#: Gap lengths (µs) the ``--gaps`` histogram splits at.
GAP_EDGES = (5, 20, 100, 1000)


def gap_histogram(gaps: list[tuple[float, float, str]]) -> str:
    """``"<5 us: n gaps, t ms; ..."`` over :data:`GAP_EDGES`."""
    parts, lo = [], 0.0
    for hi in (*GAP_EDGES, float("inf")):
        sel = [g[0] for g in gaps if lo <= g[0] < hi]
        label = f"{lo:g}-{hi:g} us" if hi != float("inf") else f">={lo:g} us"
        parts.append(f"{label}: {len(sel)} gaps, {sum(sel) / 1e3:.2f} ms")
        lo = hi
    return "; ".join(parts)


#: moba_cp's Triton kernels outside attention (``model.fused_ops``): both attentions run them, so
#: they are a kind of their own, not counted with MoBA's kernels.
LAYER_OP_KERNELS = ("_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_rms_norm_fwd_kernel",
                    "_rms_norm_bwd_kernel")


def kind(e: dict) -> str:
    if e["cat"] != "kernel":
        return e["cat"].replace("gpu_", "")
    name = e["name"]
    if name.startswith(LAYER_OP_KERNELS):
        return "moba_cp layer ops"
    return "moba_cp triton" if name.startswith("_") else "cudnn" if "cudnn" in name else "other"


def by_name(events: list[dict], width: int = 90) -> tuple[collections.Counter, collections.Counter]:
    """Total µs and count per (truncated) kernel name."""
    time, count = collections.Counter(), collections.Counter()
    for e in events:
        time[e["name"][:width]] += e["dur"]
        count[e["name"][:width]] += 1
    return time, count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+", help="one or two .trace.json files")
    ap.add_argument("--top", type=int, default=15, help="kernels listed in the difference")
    ap.add_argument("--gaps", type=int, default=0, help="also list idle time by gap length and the N longest gaps")
    args = ap.parse_args()
    if len(args.traces) > 2:
        ap.error("give one trace, or two to compare")
    evs = [gpu_events(p) for p in args.traces]
    for path, ev in zip(args.traces, evs):
        span, busy, idle = busy_idle_ms(ev)
        kinds = collections.Counter()
        for e in ev:
            kinds[kind(e)] += e["dur"]
        by_kind = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in kinds.most_common())
        print(f"{path}: span {span:.1f} ms, GPU busy {busy:.1f} ms, idle {idle:.1f} ms; by kind (ms): {by_kind}")
        if args.gaps:
            gaps = idle_gaps(ev)
            print(f"  idle by gap length: {gap_histogram(gaps)}")
            for length, start, name in gaps[:args.gaps]:
                print(f"  {length / 1e3:8.3f} ms idle at +{(start - ev[0]['ts']) / 1e3:.1f} ms, before {name[:80]}")
    if len(evs) == 2:
        (ta, na), (tb, nb) = by_name(evs[0]), by_name(evs[1])
        rows = sorted(((ta[k] - tb[k]) / 1e3, k) for k in set(ta) | set(tb))
        print(f"\nkernels by total time, first minus second (ms; counts first/second), top {args.top}:")
        for diff, k in sorted(rows, key=lambda r: -abs(r[0]))[:args.top]:
            print(f"{diff:+9.2f}  {na[k]:>5}/{nb[k]:<5}  {k}")


if __name__ == "__main__":
    main()
