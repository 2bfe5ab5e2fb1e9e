"""Run the points of one or more sweeps at once on a machine's GPUs (``moba-cp sweep --gpus``).

Every point needs ``nproc`` GPUs (its sweep's); points are started largest first (training FLOPs,
the longest-processing-time rule, so the last points to finish are short ones) whenever enough
GPUs are free, each with its own ``CUDA_VISIBLE_DEVICES`` and its own torchrun (``--standalone``
picks a free port, so jobs never meet). Data caches are shared safely: the builtin corpus and
Megatron's index caches are built under file locks (``moba_cp.data``).

``deadline_s`` bounds the whole run (a lease, a SLURM allocation): a point is not started when the
time it is predicted to take (:func:`predict_seconds`: its FLOPs at the rate of finished seeds of the
same point, else at the median rate of all finished points) would pass the deadline,
and at the deadline running points get SIGTERM: training finishes its step, saves a checkpoint
(when ``checkpoint.save``) and stops, so a later ``moba-cp sweep`` resumes it. Finished points are
exactly those with ``sweep_point.json``, as in the sequential runner.

``points_per_gpu`` > 1 shares each GPU between that many one-process points (slots are filled
across GPUs first). Small models leave a large GPU idle for much of a point (host time per step:
a third of a profiled 8K step of the 6-layer model on an H200; process start; evaluations), which
another point can fill; whether they finish sooner together is for the driver log's times to show.
Losses do not depend on it, throughput figures of such points do (the scheduler's start and done
lines show which points shared a GPU).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from moba_cp.experiments.sweep import (SweepError, SweepPoint, SweepSpec, _finish_point, _point_commands, _run,
                                       _with_extra, check_finished_points, collect_results, point_cost)

__all__ = ["run_sweeps_parallel", "parse_gpus", "predict_seconds"]


@dataclass
class _Job:
    spec: SweepSpec
    point: SweepPoint
    cost: float  # training FLOPs

    @property
    def label(self) -> str:
        return f"{self.spec.name}/{self.point.name}"


def _pair_round(job: _Job) -> int:
    """0, 1, ...: the position of the job's seed in its sweep's ``seeds`` when the sweep has a
    ``reference`` (paired differences need both sides of a seed), else 0."""
    seeds = job.spec.source.get("seeds") or []
    seed = job.point.labels.get("seed")
    if not job.spec.reference or seed is None or int(seed) not in seeds:
        return 0
    return seeds.index(int(seed))


def predict_seconds(job: _Job, rates: dict[tuple[str, str], list[float]]) -> float | None:
    """Seconds ``job`` should take from the seconds per training FLOP of finished points, keyed by
    (sweep, group): the median over the same group (the point's other seeds: same model, same
    cost) when any finished, else over every finished point, else None (nothing to go by).

    One rate for all points mispredicts: a MoBA point's fixed costs (start-up, evaluations) are a
    larger share of its time than a full-attention point's, so after a MoBA point finished the
    median predicted a full-attention point of a 32K sweep at 7 min where it took 2.1, and the
    deadline skipped it while time was left.
    """
    same = rates.get((job.spec.name, job.point.group))
    pool = same or [r for rs in rates.values() for r in rs]
    if not pool:
        return None
    return job.cost * sorted(pool)[len(pool) // 2]


def parse_gpus(text: str) -> list[str]:
    """``"0,1,2,3"`` or ``"4"`` (meaning 0..3) -> device ids for CUDA_VISIBLE_DEVICES."""
    text = str(text).strip()
    if text.isdigit() and "," not in text:
        n = int(text)
        if n < 1:
            raise SweepError(f"--gpus={text}: give a count >= 1 or a list such as 0,1,2,3.")
        return [str(i) for i in range(n)]
    ids = [x.strip() for x in text.split(",") if x.strip()]
    if not ids or len(set(ids)) != len(ids) or not all(x.isdigit() for x in ids):
        raise SweepError(f"--gpus={text!r}: give distinct device numbers such as 0,1,2,3 (or a count such as 4).")
    return ids


def gpu_slots(gpus: list[str], points_per_gpu: int, specs: list[SweepSpec]) -> list[str]:
    """The scheduler's slots: each GPU id ``points_per_gpu`` times, across GPUs first (``0,1,0,1``)."""
    if points_per_gpu < 1:
        raise SweepError(f"--points-per-gpu={points_per_gpu}: give 1 (a GPU per point) or more.")
    if points_per_gpu > 1:
        multi = [f"{s.name!r} (nproc={s.nproc})" for s in specs if s.nproc > 1]
        if multi:
            raise SweepError(f"--points-per-gpu={points_per_gpu} shares a GPU between one-process points, but "
                             f"{', '.join(multi)} run several processes per point. Fix: drop --points-per-gpu "
                             f"for those sweeps.")
    return [g for _ in range(points_per_gpu) for g in gpus]


def run_sweeps_parallel(specs: list[SweepSpec], gpus: list[str], *, deadline_s: float | None = None,
                        extra: list[str] | None = None, dry_run: bool = False, print_fn=print,
                        points_per_gpu: int = 1) -> dict[str, list[dict]]:
    """Run every unfinished point of ``specs`` on ``gpus``; returns ``{sweep name: finished summaries}``.

    Raises SweepError after all jobs ended if any point failed (the others still ran to the end).
    """
    specs = [_with_extra(s, extra or []) for s in specs]
    for s in specs:
        check_finished_points(s)
    for s in specs:
        if s.nproc > len(gpus):
            raise SweepError(f"sweep {s.name!r} needs nproc={s.nproc} GPUs per point, but --gpus gives {len(gpus)}.")
    slots = gpu_slots(gpus, points_per_gpu, specs)
    jobs: list[_Job] = []
    for s in specs:
        out = Path(s.out_dir)
        if not dry_run:
            out.mkdir(parents=True, exist_ok=True)
            (out / "sweep.yaml").write_text(yaml.safe_dump(dict(s.source, out_dir=str(out)), sort_keys=False))
        done = sum((out / pt.name / "sweep_point.json").is_file() for pt in s.points)
        todo = [pt for pt in s.points if not (out / pt.name / "sweep_point.json").is_file()]
        print_fn(f"sweep {s.name!r}: {len(s.points)} points, {done} already finished, {len(todo)} to run -> {out}")
        jobs += [_Job(s, pt, point_cost(s, pt)) for pt in todo]
    # Largest first, but a sweep with a reference and seeds runs seed by seed (its points are listed
    # seed-major), so a deadline that cuts the run leaves whole pairs rather than one side of each.
    jobs.sort(key=lambda j: (_pair_round(j), -j.cost))
    print_fn(f"{len(jobs)} points on GPUs {','.join(gpus)}"
             + (f" ({points_per_gpu} at a time on each)" if points_per_gpu > 1 else "") + ", largest first"
             + (" within each seed of a paired sweep" if any(_pair_round(j) for j in jobs) else "")
             + (f"; deadline {deadline_s / 60:.1f} min" if deadline_s else ""))
    if dry_run:
        for j in jobs:
            for cmd in _point_commands(j.spec, j.point, _launcher(j.spec.nproc), Path(j.spec.out_dir) / j.point.name):
                print_fn(f"  [{j.cost / 1e15:.1f} PFLOP] would run: " + " ".join(cmd))
        return {}

    t0 = time.time()
    free = list(slots)
    cond = threading.Condition()
    procs: dict = {}
    failures: list[str] = []
    rates: dict[tuple[str, str], list[float]] = {}  # (sweep, group) -> seconds per training FLOP (train + evals)
    print_lock = threading.Lock()

    def say(msg: str) -> None:
        with print_lock:
            print_fn(f"[{(time.time() - t0) / 60:5.1f} min] {msg}")

    def work(job: _Job, ids: list[str]) -> None:
        run_dir = Path(job.spec.out_dir) / job.point.name
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(ids))
        start = time.time()
        try:
            for cmd in _point_commands(job.spec, job.point, _launcher(job.spec.nproc), run_dir):
                _run(cmd, run_dir / "sweep.log", env=env, procs=procs)
            summary = _finish_point(job.spec, job.point, run_dir)
            took = time.time() - start
            with cond:
                rates.setdefault((job.spec.name, job.point.group), []).append(took / max(job.cost, 1.0))
            say(f"done {job.label} on GPU {','.join(ids)}: {job.spec.metric}={summary.get(job.spec.metric)} "
                f"in {took:.0f}s ({job.cost / 1e15 / took * 1e3:.0f} TFLOP/s incl. start-up and evals)")
        except Exception as e:  # noqa: BLE001 - one point's failure must not stop the others
            if stopping.is_set():
                say(f"stopped {job.label} at the deadline (resumes from its last checkpoint on the next run)")
                return
            with cond:
                failures.append(f"{job.label}: {e}")
            say(f"FAILED {job.label}: {e}")
        finally:
            with cond:
                free.extend(ids)
                cond.notify_all()

    stopper = None
    stopping = threading.Event()
    if deadline_s:
        stopper = threading.Timer(deadline_s, _stop_all, args=(procs, say, stopping))
        stopper.daemon = True
        stopper.start()
    threads: list[threading.Thread] = []
    skipped: list[str] = []
    for job in jobs:
        with cond:
            while len(free) < job.spec.nproc:
                cond.wait()
            elapsed = time.time() - t0
            predicted = predict_seconds(job, rates)
            if deadline_s and (elapsed >= deadline_s or (predicted and elapsed + predicted > deadline_s)):
                skipped.append(job.label)
                continue
            ids = [free.pop(0) for _ in range(job.spec.nproc)]
        say(f"start {job.label} on GPU {','.join(ids)} ({job.cost / 1e15:.1f} PFLOP"
            + (f", predicted {predicted / 60:.1f} min" if predicted else "") + ")")
        th = threading.Thread(target=work, args=(job, ids), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    if stopper is not None:
        stopper.cancel()
    if skipped:
        say(f"not started (would pass the deadline): {', '.join(skipped)}; rerun the same command to run them")
    results = {s.name: collect_results(s.out_dir) for s in specs}
    if failures:
        raise SweepError(f"{len(failures)} point(s) failed: " + "; ".join(failures))
    return results


def _launcher(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def _stop_all(procs: dict, say, stopping: threading.Event) -> None:
    """At the deadline: SIGTERM every running point's process group (training saves and stops)."""
    stopping.set()
    running = list(procs.values())
    if running:
        say(f"deadline: stopping {len(running)} running point(s) (SIGTERM: save and stop)")
    for proc in running:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
