"""Training end to end on CPU/gloo: falling loss under CP=2, exact resume after a real kill,
resume with another dp size, clear errors before training, dry runs of every recipe, and a
two-node launch through launch/multinode.sh (two torchrun agents meeting on localhost)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moba_cp.config import load_recipe
from tests.distributed_harness import run_cli, run_distributed

ROOT = Path(__file__).resolve().parents[1]

# A small, fast model; every test starts from it and changes what it checks.
SMALL = [
    "--model.num_layers=2", "--model.hidden_size=64", "--model.num_attention_heads=4",
    "--model.num_query_groups=2", "--model.seq_length=256", "--moba.block_size=32", "--moba.topk=3",
    "--train.lr=3e-3", "--train.min_lr=3e-4", "--train.warmup_steps=2", "--train.precision=fp32",
    "--logging.interval=1", "--logging.tensorboard=false",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _torchrun(nproc, args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "moba_cp.train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)


def _train_in_workers(nproc, args, timeout=400):
    """What ``_torchrun(nproc, args)`` computes, as ``moba-cp train ARGS`` in workers forked from the
    harness's preloaded server (run_cli: ~10 s of imports less per process); for the runs whose
    launcher is not what a test is about. Returns stdout and stderr together, as torchrun's pipe."""
    proc = run_cli(["train", *args], nproc=nproc, env=_env(), cwd=str(ROOT), timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def _metrics(run_dir):
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _train_worker(rank, world_size, overrides):
    from moba_cp.train.loop import train

    return train(load_recipe(str(ROOT / "recipes/quickstart.yaml"), overrides)).losses


def test_quickstart_recipe_trains_with_cp2_and_the_loss_falls(tmp_path, cache_dir):
    overrides = SMALL + ["--train.steps=16", "--parallel.cp=2", "--train.global_batch_size=2",
                         f"--logging.dir={tmp_path}/run", f"--data.cache_dir={cache_dir}",
                         "--eval.interval=8", "--eval.iters=1", "--checkpoint.interval=0"]
    losses = run_distributed(_train_worker, world_size=2, args=(overrides,), timeout=400)
    assert losses[0] == losses[1]  # the loss is reduced over dp x cp: every rank reports the same
    first, last = sum(losses[0][:3]) / 3, sum(losses[0][-3:]) / 3
    assert len(losses[0]) == 16 and last < first - 0.5, losses[0]
    records = _metrics(tmp_path / "run")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mem_gib", "mem_reserved_gib"} <= set(records[0])
    assert records[0]["mem_gib"] > 0 and records[0]["mem_reserved_gib"] is None  # CPU: peak RSS, no allocator cache
    assert any("valid_loss" in r for r in records)
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "iter_0000016" / "meta.json").is_file()


KILL_COMMON = SMALL + ["--train.steps=8", "--parallel.cp=2", "--checkpoint.interval=3"]


@pytest.fixture(scope="module")
def reference_8_steps(tmp_path_factory, cache_dir):
    """An uninterrupted CP=2 run of 8 steps: what interrupted runs must reproduce."""
    run = tmp_path_factory.mktemp("ref8") / "ref"
    _train_in_workers(2, ["recipes/quickstart.yaml", *KILL_COMMON, f"--data.cache_dir={cache_dir}", f"--logging.dir={run}"])
    return {r["step"]: r for r in _metrics(run)}


def _kill_tree(proc):
    """SIGKILL a launcher and every process below it (a crash: nobody gets to save)."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _wait_for(path_fn, proc, timeout=300):
    deadline = time.time() + timeout
    while not path_fn():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.1)


def _resume_and_compare(run, cache_dir, ref_by_step, after_step, extra=()):
    """The interrupted run continued (its launcher is not under test here: _train_in_workers)."""
    out = _train_in_workers(2, ["recipes/quickstart.yaml", *KILL_COMMON, *extra, f"--data.cache_dir={cache_dir}",
                                f"--logging.dir={run}"])
    assert "resumed from" in out
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, 9)), steps  # one row per step: the interrupted run's extra rows are gone
    got_by_step = {r["step"]: r for r in _metrics(run) if r["step"] > after_step}  # the resumed part
    assert sorted(got_by_step) == list(range(after_step + 1, 9))
    for step in got_by_step:
        assert got_by_step[step]["loss"] == ref_by_step[step]["loss"], step
        assert got_by_step[step]["grad_norm"] == ref_by_step[step]["grad_norm"], step


def test_killed_run_resumes_exactly(tmp_path, cache_dir, reference_8_steps):
    """SIGKILL a CP=2 run after its first checkpoint; the resumed run's losses equal (bitwise) the
    uninterrupted run's."""
    run = tmp_path / "run"
    victim = _torchrun(2, ["recipes/quickstart.yaml", *KILL_COMMON, f"--data.cache_dir={cache_dir}", f"--logging.dir={run}"])
    _wait_for(lambda: (run / "checkpoints" / "iter_0000003" / "meta.json").exists(), victim)
    _kill_tree(victim)  # torchrun's workers run in their own sessions: a process-group kill misses them
    victim.wait()
    assert not (run / "checkpoints" / "iter_0000008").exists(), "the run finished before the kill"
    _resume_and_compare(run, cache_dir, reference_8_steps, after_step=3)


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_resumes_exactly(tmp_path, cache_dir, reference_8_steps):
    """Preemption: SIGTERM (what SLURM and torchrun send) makes every rank finish its step, save,
    and stop; nothing finished is lost. Interval checkpoints are off here, so the only checkpoint
    before the end is the one the signal caused."""
    run = tmp_path / "run"
    no_interval = ["--checkpoint.interval=100"]  # checkpointing does not change the losses
    victim = _torchrun(2, ["recipes/quickstart.yaml", *KILL_COMMON, *no_interval, f"--data.cache_dir={cache_dir}",
                           f"--logging.dir={run}"])
    _wait_for(lambda: (run / "metrics.jsonl").exists() and any(r["step"] >= 2 for r in _metrics(run)), victim)
    os.killpg(victim.pid, signal.SIGTERM)
    out, _ = victim.communicate(timeout=120)
    assert "SIGTERM: stopped after step" in out, out
    stopped = int(out.split("SIGTERM: stopped after step ")[1].split(",")[0])
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("iter_???????") if (p / "meta.json").exists())
    assert saved == [stopped] and 2 <= stopped < 8, (saved, stopped)
    _resume_and_compare(run, cache_dir, reference_8_steps, after_step=stopped, extra=no_interval)


def _launch(nproc, args, env=None):
    """launch/torchrun.sh (moba_cp.train.launch) in its own process group, as a user runs it."""
    env = dict(env or _env(), NGPU=str(nproc), PYTHON=sys.executable)
    return subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, cache_dir, reference_8_steps):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it; torchrun forwards a
    second copy to its workers): every rank finishes its step and saves, one line names the
    checkpoint, no traceback; the rerun continues bitwise equal to the uninterrupted run."""
    run = tmp_path / "run"
    no_interval = ["--checkpoint.interval=100"]
    victim = _launch(2, ["recipes/quickstart.yaml", *KILL_COMMON, *no_interval, f"--data.cache_dir={cache_dir}",
                         f"--logging.dir={run}"])
    _wait_for(lambda: (run / "metrics.jsonl").exists() and any(r["step"] >= 2 for r in _metrics(run)), victim)
    os.killpg(victim.pid, signal.SIGINT)
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signal.SIGINT, out
    assert out.count("SIGINT: stopped after step") == 1 and "Traceback" not in out and "KeyboardInterrupt" not in out, out
    stopped = int(out.split("SIGINT: stopped after step ")[1].split(",")[0])
    assert f"checkpoint saved in {run}/checkpoints/iter_{stopped:07d}; rerun the same command to resume" in out
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("iter_???????") if (p / "meta.json").exists())
    assert saved == [stopped] and 2 <= stopped < 8, (saved, stopped)
    _resume_and_compare(run, cache_dir, reference_8_steps, after_step=stopped, extra=no_interval)


_BREAK_SAVE = """# Test stand-in for a failing disk: in the worker of rank $MOBA_TEST_BREAK_RANK, psutil is
# missing (Megatron's writer then hung before moba_cp wrote shards itself), and writing a
# checkpoint whose path contains $MOBA_TEST_BREAK_SAVE fails with ENOSPC.
import errno
import functools
import os

if os.environ.get("MOBA_TEST_BREAK_SAVE") and os.environ.get("RANK") == os.environ.get("MOBA_TEST_BREAK_RANK"):
    from megatron.core.dist_checkpointing.strategies import filesystem_async as _fa

    _fa.HAVE_PSUTIL = False
    _write_item = _fa._write_item

    @functools.wraps(_write_item)  # Megatron inspects its signature
    def _disk_full(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "name"))
        if os.environ["MOBA_TEST_BREAK_SAVE"] in str(stream.name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _write_item(*args, **kwargs)

    _fa._write_item = _disk_full
"""


def test_failed_save_stops_every_rank_and_the_last_checkpoint_resumes(tmp_path, cache_dir):
    """Rank 0 has no psutil (its step-2 save still works) and its disk is full at the step-4 save:
    both ranks stop within seconds, exit non-zero, one message names the cause and the last good
    checkpoint (step 2), nothing of the failed save is left. Rerun with more steps (an allowed change), the
    run resumes from step 2 and finishes with one metrics row per step."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BREAK_SAVE)
    run = tmp_path / "run"
    common = ["recipes/quickstart.yaml", *SMALL, "--parallel.cp=2", "--checkpoint.interval=2",
              f"--data.cache_dir={cache_dir}", f"--logging.dir={run}"]
    env = dict(_env(), PYTHONPATH=f"{site}:{ROOT}", MOBA_TEST_BREAK_SAVE="iter_0000004", MOBA_TEST_BREAK_RANK="0")
    proc = _launch(2, [*common, "--train.steps=4"], env=env)
    lines, t_step4 = [], None
    for line in proc.stdout:  # time from the last step to the exit
        lines.append(line)
        if "step      4/4" in line:
            t_step4 = time.monotonic()
    proc.wait(timeout=60)
    out, elapsed = "".join(lines), time.monotonic() - t_step4
    assert proc.returncode == 1, out
    assert elapsed < 20, f"took {elapsed:.0f}s to stop after the failed save:\n{out}"
    assert out.count("saving checkpoint step 4") == 1, out
    assert "rank 0: OSError: [Errno 28] No space left on device" in out
    assert f"The last good checkpoint, {run}/checkpoints/iter_0000002, is intact" in out
    assert "Traceback" not in out, out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000002", "latest"]
    out = _train_in_workers(2, [*common, "--train.steps=5"])  # the rerun (its launcher is tested above)
    assert f"resuming from {run}/checkpoints/iter_0000002 (step 2) with changed settings: train.steps: 4 -> 5" in out
    assert "FutureWarning" not in out, out  # Megatron's known load deprecations are silenced at the load
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5]
    assert (run / "checkpoints" / "iter_0000005" / "meta.json").is_file()
    assert "steps: 5" in (run / "recipe.yaml").read_text()


def test_user_errors_under_torchrun_are_printed_once_without_traceback(tmp_path, cache_dir):
    """A bad world size is refused by the launcher before any worker starts; a data error found by
    the workers (2 ranks) is printed once, by rank 0. No traceback, exit code 2."""
    t0 = time.monotonic()
    proc = _launch(2, ["recipes/quickstart.yaml", "--parallel.cp=4", f"--logging.dir={tmp_path}/a"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert out.count("world size 2 is not divisible by parallel.tp * parallel.cp = 4") == 1, out
    assert "--parallel.cp to one of [1, 2]" in out and "Traceback" not in out and "rank" not in out, out
    assert not (tmp_path / "a").exists() and time.monotonic() - t0 < 60
    proc = _launch(2, ["recipes/quickstart.yaml", *SMALL, "--train.steps=2", "--parallel.cp=2", "--eval.interval=1",
                       "--data.split=100,0,0", f"--data.cache_dir={cache_dir}", f"--logging.dir={tmp_path}/b"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert out.count("gives the valid split no documents") == 1, out
    assert "Traceback" not in out and "ChildFailedError" not in out, out
    assert "first rank" in out and "its message is above" in out


def test_workers_whose_launcher_died_save_and_stop(tmp_path, cache_dir):
    """torchrun SIGKILLed alone: its workers (in their own sessions) would train on into the run
    directory; they notice their launcher is gone, save at the step boundary and stop."""
    import psutil

    run = tmp_path / "run"
    victim = _torchrun(2, ["recipes/quickstart.yaml", *KILL_COMMON, "--checkpoint.interval=100",
                           f"--data.cache_dir={cache_dir}", f"--logging.dir={run}"])
    _wait_for(lambda: (run / "metrics.jsonl").exists() and any(r["step"] >= 2 for r in _metrics(run)), victim)
    workers = psutil.Process(victim.pid).children()
    os.kill(victim.pid, signal.SIGKILL)
    out, _ = victim.communicate(timeout=120)  # the pipe closes when the workers are gone too
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert "the launcher (parent process) exited: stopped after step" in out, out
    stopped = int(out.split("stopped after step ")[1].split(",")[0])
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("iter_???????") if (p / "meta.json").exists())
    assert saved == [stopped] and stopped < 8, (saved, out)


def _step3_common(cache_dir, extra):
    return SMALL + ["--train.steps=5", "--parallel.cp=1", "--train.global_batch_size=2",
                    f"--data.cache_dir={cache_dir}", "--checkpoint.interval=3", "--checkpoint.keep_last=5", *extra]


@pytest.fixture(scope="module")
def reference_5_steps(tmp_path_factory, cache_dir):
    """``ref(extra)``: the run directory of an uninterrupted 2-process run of 5 steps (checkpoint at
    step 3) with ``extra`` overrides; one run per ``extra`` for the whole module (the dp-resume and
    the distributed-optimizer tests resume from the same reference)."""
    runs = {}

    def ref(extra):
        key = tuple(extra)
        if key not in runs:
            run = tmp_path_factory.mktemp("ref5") / "ref"
            _train_in_workers(2, ["recipes/quickstart.yaml", *_step3_common(cache_dir, extra), f"--logging.dir={run}"])
            runs[key] = run
        return runs[key]

    return ref


def _resume_from_step3(tmp_path, cache_dir, reference_5_steps, extra, nproc_resume):
    """Resume a copy of the 2-process reference run's step-3 checkpoint with nproc_resume processes
    (both runs through run_cli, as torchrun's workers: what is tested is the resume, not the launcher);
    returns (reference losses, resumed losses, exit code, output)."""
    import shutil

    ref = reference_5_steps(extra)
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "iter_0000003", run / "checkpoints" / "iter_0000003")
    second = run_cli(["train", "recipes/quickstart.yaml", *_step3_common(cache_dir, extra), f"--logging.dir={run}"],
                     nproc=nproc_resume, env=_env(), cwd=str(ROOT), timeout=400)
    got = {r["step"]: r["loss"] for r in _metrics(run)} if (run / "metrics.jsonl").exists() else {}
    return {r["step"]: r["loss"] for r in _metrics(ref)}, got, second.returncode, second.stdout + second.stderr


# The ddp variant is slow-marked (~40 s): the distributed-optimizer variant runs the same resume with
# a dp-sharded optimizer state, the harder case.
@pytest.mark.parametrize("extra", [pytest.param([], marks=pytest.mark.slow), ["--parallel.distributed_optimizer=true"]],
                         ids=["ddp", "distributed_optimizer"])
def test_resume_with_another_data_parallel_size(tmp_path, cache_dir, reference_5_steps, extra):
    """A dp=2 run's step-3 checkpoint resumed with dp=1, plain DDP and with the distributed
    optimizer's dp-sharded state: the same global batches, so the same losses as the
    uninterrupted dp=2 run (up to the order of the gradient reduction)."""
    ref, got, rc, out = _resume_from_step3(tmp_path, cache_dir, reference_5_steps, extra, 1)
    assert rc == 0, out
    assert "resumed from" in out and "dp 1" in out
    assert sorted(got) == [4, 5]
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-5), (step, loss, ref[step])


def test_distributed_optimizer_resumes_exactly(tmp_path, cache_dir, reference_5_steps):
    ref, got, rc, out = _resume_from_step3(tmp_path, cache_dir, reference_5_steps, ["--parallel.distributed_optimizer=true"], 2)
    assert rc == 0, out
    assert sorted(got) == [4, 5] and all(got[s] == ref[s] for s in got), (got, ref)


def test_batches_read_at_each_step_start_continue_the_prefetching_run_bitwise(tmp_path, cache_dir, reference_5_steps):
    """The reference run read each step's batches during the step before (train.prefetch, the
    default); its step-3 checkpoint resumed with train.prefetch=false (read at each step's start)
    gives its losses bit for bit: the same samples either way, and the setting may change on resume."""
    import shutil

    extra = ["--parallel.distributed_optimizer=true"]  # the reference the test above builds too
    ref = reference_5_steps(extra)
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints" / "iter_0000003", run / "checkpoints" / "iter_0000003")
    out = _train_in_workers(2, ["recipes/quickstart.yaml", *_step3_common(cache_dir, extra), "--train.prefetch=false",
                                f"--logging.dir={run}"])
    assert "resumed from" in out
    got = {r["step"]: r["loss"] for r in _metrics(run)}
    want = {r["step"]: r["loss"] for r in _metrics(ref)}
    assert sorted(got) == [4, 5] and all(got[s] == want[s] for s in got), (got, want)


def test_tensor_parallel_training_matches_tp1(tmp_path, cache_dir):
    """The loop under tp=2 (vocab-parallel loss, split heads) gives tp=1's losses."""
    common = SMALL + ["--train.steps=3", "--parallel.cp=1", f"--data.cache_dir={cache_dir}",
                      "--checkpoint.save=false"]
    tp1 = run_distributed(_train_worker, world_size=1, args=(common + [f"--logging.dir={tmp_path}/tp1"],), timeout=400)
    tp2 = run_distributed(_train_worker, world_size=2,
                          args=(common + ["--parallel.tp=2", f"--logging.dir={tmp_path}/tp2"],), timeout=400)
    assert tp2[0] == tp2[1]
    assert tp2[0] == pytest.approx(tp1[0], rel=1e-4), (tp1[0], tp2[0])


def test_two_stage_schedule_switches_moba_layers_to_full(tmp_path, cache_dir):
    """attention.switch_to_full_at=0.5: MoBA for the first half of the steps, full attention after.
    The same run profiles steps 2-3 (logging.profile): each rank writes a trace and a table."""
    out = _train_in_workers(2, ["recipes/quickstart.yaml", *SMALL, "--train.steps=4", "--parallel.cp=2",
                                "--attention.switch_to_full_at=0.5", "--checkpoint.save=false", "--logging.profile=[2,3]",
                                f"--data.cache_dir={cache_dir}", f"--logging.dir={tmp_path}/run"])
    assert "step 2: MoBA layers switched to full attention" in out
    assert out.count("switched to full attention") == 1  # once, not every step
    assert "step      4/4" in out
    prof = tmp_path / "run" / "profile"
    assert out.count("profile of steps 2-3") == 1 and str(prof / "rank0_steps2-3.kernels.txt") in out
    for rank in (0, 1):
        table = (prof / f"rank{rank}_steps2-3.kernels.txt").read_text()
        assert table.startswith(f"steps 2-3 (2 steps) on rank {rank}: ")
        assert "aten::" in table  # the operators the steps ran, with their times
        trace = json.loads((prof / f"rank{rank}_steps2-3.trace.json").read_text())
        assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])


@pytest.mark.parametrize("args,message", [
    (["--data.source=indexed", "--data.paths=[/no/such/prefix]"], "missing /no/such/prefix.bin"),
    (["--model.seq_length=1000"], "model.seq_length=1000 is not divisible by 2 * parallel.cp * moba.block_size"),
    (["--moba.topk=-1"], "moba.topk=-1 must be >= 1"),
    (["--data.tokenizer=/no/tokenizer.json"], "tokenizer"),
    (["--parallel.cp=4"], "world size 2 is not divisible by parallel.tp * parallel.cp = 4"),
    (["--logging.profile=[3,2]"], "logging.profile=[3, 2]: expected [A, B] with 1 <= A <= B"),
    (["--logging.profile=five"], "logging.profile: expected a list"),
    (["--train.steps=4", "--logging.profile=[3,9]"], "logging.profile=[3, 9] ends after train.steps=4"),
])
def test_bad_recipe_or_data_fails_before_training(tmp_path, args, message, monkeypatch, capsys):
    """Checked before any process group exists (as a torchrun worker of a 2-process world)."""
    import torch.distributed as dist

    from moba_cp.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "recipes/quickstart.yaml", f"--logging.dir={tmp_path}/run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", sorted(glob.glob(str(ROOT / "recipes/*.yaml"))))
def test_every_shipped_recipe_passes_dry_run(recipe, capsys):
    from moba_cp.cli import main

    assert main(["train", recipe, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run OK" in out and "memory/GPU" in out and "FLOPs/step" in out


@pytest.mark.parametrize("args,step", [
    ([], "replayed from a CUDA graph after one eager step (train.cuda_graph=auto;"),
    (["--train.recompute=selective"], "eager (train.cuda_graph=auto)"),  # auto: eager where a graph cannot run
    (["--train.cuda_graph=none"], "eager (train.cuda_graph=none)"),
])
def test_dry_run_says_whether_the_step_is_replayed_from_a_graph(args, step, capsys):
    from moba_cp.cli import main

    assert main(["train", "recipes/1gpu-32k.yaml", "--dry-run", *args]) == 0
    assert f"  step        {step}" in capsys.readouterr().out


@pytest.mark.slow  # ~30 s; the SLURM test below runs launch/multinode.sh the same way, under sbatch
def test_multinode_launcher_two_agents_meet_through_c10d(tmp_path, cache_dir):
    """launch/multinode.sh for real: two torchrun agents (two 'nodes' of one process each) on
    localhost, c10d rendezvous, gloo, CP=2 across the 'nodes'."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), NNODES="2", NGPU="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               RDZV_ID=f"test{port}", PYTHON=sys.executable)
    args = ["recipes/quickstart.yaml", *SMALL, "--train.steps=2", "--parallel.cp=2",
            f"--logging.dir={tmp_path}/run", f"--data.cache_dir={cache_dir}"]
    nodes = [subprocess.Popen(["bash", "launch/multinode.sh", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]
    outs = []
    try:
        for n in nodes:
            outs.append(n.communicate(timeout=300)[0])
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    assert all(n.returncode == 0 for n in nodes), "\n".join(outs)
    log = "\n".join(outs)
    assert "world 2 = tp 1 x cp 2 x dp 1" in log and "step      2/2" in log


_FAKE_SRUN = """#!/usr/bin/env bash
# Test stand-in for SLURM's srun: one copy of the command per node (SLURM_NNODES), all on this
# machine, each with its SLURM_PROCID / SLURM_NODEID; exits non-zero if any copy failed.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_PROCID=$i SLURM_NODEID=$i "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

_FAKE_SCONTROL = """#!/usr/bin/env bash
# Test stand-in for `scontrol show hostnames NODELIST`: every node is this machine.
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: unsupported $*" >&2; exit 2; }
for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done
"""


def test_slurm_sbatch_script_runs_two_nodes_under_fake_srun(tmp_path, cache_dir):
    """launch/slurm.sbatch executed as SLURM would (its environment, srun, scontrol), with stand-ins
    that put both 'nodes' on this machine: the job trains CP=2 across them through multinode.sh."""
    import socket

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", SLURM_JOB_ID=f"4{port}",
               SLURM_JOB_NODELIST="node[0-1]", SLURM_SUBMIT_DIR=str(ROOT), NGPU="1", MASTER_PORT=str(port),
               PYTHON=sys.executable)
    args = ["recipes/quickstart.yaml", *SMALL, "--train.steps=2", "--parallel.cp=2",
            f"--logging.dir={tmp_path}/run", f"--data.cache_dir={cache_dir}"]
    # sbatch runs a copy of the script from its spool directory, so it must find the repo through
    # SLURM_SUBMIT_DIR, not through its own location: run it the same way.
    spool = tmp_path / "spool"
    spool.mkdir()
    script = spool / "slurm_script"
    script.write_text((ROOT / "launch" / "slurm.sbatch").read_text())
    proc = subprocess.run(["bash", str(script), *args], cwd=spool, env=env, capture_output=True,
                          text=True, timeout=300, start_new_session=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "world 2 = tp 1 x cp 2 x dp 1" in log and "step      2/2" in log

    # Outside an allocation the script refuses with a clear message instead of guessing.
    env.pop("SLURM_NNODES")
    proc = subprocess.run(["bash", str(script), *args], cwd=spool, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "run under sbatch" in proc.stderr


def test_the_first_line_names_the_moba_switches_set_in_the_environment():
    from moba_cp.train.loop import moba_env_note

    assert moba_env_note({"PATH": "/bin", "OMP_NUM_THREADS": "1"}) == ""
    note = moba_env_note({"MOBA_CP_REUSE_SELECTION": "0", "PATH": "/bin", "MOBA_CP_CUDA_GRAPHS": "shared"})
    assert note == "environment MOBA_CP_CUDA_GRAPHS=shared, MOBA_CP_REUSE_SELECTION=0"
