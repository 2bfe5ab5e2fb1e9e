"""The training loop on Megatron-Core: parallel state, model, DDP, optimizer, schedule, data,
checkpoints and logs, driven by one recipe.

    moba-cp train RECIPE.yaml [--a.b=value ...]          (also: python -m moba_cp.train ...)
    torchrun --nproc_per_node N -m moba_cp.train RECIPE.yaml ...

Reading order: :func:`train` sets a run up step by step (checks, process group, datasets, model,
resume, logs) and always tears it down in its ``finally``; :func:`_train_steps` is the loop, one
named function per thing a step does (train, log, validate, switch attention, save, stop).

Data order is a pure function of the step (:mod:`moba_cp.train.batches`), so a resumed run
sees exactly the samples the uninterrupted run would, whatever its data-parallel size.
Loss: the mean over every loss-masked token of the global batch, computed exactly under CP and
DP (per-token loss: each rank returns its loss *sum*, Megatron divides the gradients by the
global token count).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from moba_cp.config import RecipeConfig, cuda_graph_applies, dump, parse_profile_steps, to_dict
from moba_cp.data.datasets import DataConfigError, build_train_valid_datasets, corpus_record
from moba_cp.megatron import compat_cpu
from moba_cp.megatron.fused_layers import resolve_fused_norm, resolve_fused_ops
from moba_cp.megatron.hybrid_switch import set_attention_mode, switch_step
from moba_cp.megatron.model import build_gpt_model
from moba_cp.megatron.optimizer import build_optimizer, wrap_ddp
from moba_cp.megatron.specs import resolve_transformer_impl
from moba_cp.megatron.training_hooks import attach_training_hooks
from moba_cp.megatron.transformer_config import transformer_config_from_recipe
from moba_cp.train.batches import collate, host_batch, microbatch_indices, to_device
from moba_cp.train.checkpoint import load_checkpoint, save_checkpoint
from moba_cp.train.distributed import DistEnv, init_distributed, shutdown_distributed, world_size_from_env
from moba_cp.train.flops import flops_per_step
from moba_cp.train.graphed_step import GraphedForwardBackward
from moba_cp.train.loss import masked_loss_sums
from moba_cp.train.metrics import MetricsLogger, format_eta, peak_memory_gib, peak_reserved_gib
from moba_cp.train.preflight import complete_message, preflight
from moba_cp.train.run_dir import RunDirState, checkpoint_dir_of, describe
from moba_cp.train.step_profiler import StepProfiler
from moba_cp.train.stop_request import StopRequest

__all__ = ["train", "evaluate", "TrainResult", "TrainingError"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    last_step: int
    losses: list[float]  # per logged step, in order
    run_dir: str
    complete: bool = False  # the run directory already held the finished run: nothing ran
    stopped: bool = False  # a signal stopped the run before train.steps


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says why and what is intact."""


@dataclass
class _Model:
    """The Megatron pieces a step updates."""

    gpt: torch.nn.Module  # the GPTModel
    ddp: torch.nn.Module  # its DDP wrapper (what runs forward and backward)
    optimizer: object  # Megatron optimizer (plain or distributed)
    scheduler: OptimizerParamScheduler
    graphed: GraphedForwardBackward | None = None  # train.cuda_graph (config.cuda_graph_applies)


@dataclass
class _Run:
    """Everything the steps of one run share."""

    cfg: RecipeConfig
    env: DistEnv
    model: _Model
    train_ds: object
    valid_ds: object | None
    logger: MetricsLogger
    stop: StopRequest
    ckpt_dir: Path
    flops_per_step: float
    losses: list[float] = field(default_factory=list)  # per logged step
    step_times: list[float] = field(default_factory=list)  # seconds, every step
    prefetched: tuple[int, list[dict]] | None = None  # (step, its micro-batches on the host), made during the step before

    def result(self, last_step: int, *, stopped: bool = False) -> TrainResult:
        return TrainResult(last_step=last_step, losses=self.losses, run_dir=str(Path(self.cfg.logging.dir)),
                           stopped=stopped)

    def say(self, line: str) -> None:
        """A console line from rank 0."""
        if self.env.is_main:
            print(f"moba-cp train: {line}", flush=True)


@dataclass
class _StepStats:
    loss: float  # mean over the global batch's loss-masked tokens
    lr: float  # the rate this step's update used
    grad_norm: float  # nan when the optimizer reports none
    seconds: float


# --------------------------------------------------------------------------------------------
# The run: set up, loop, tear down
# --------------------------------------------------------------------------------------------

def moba_env_note(environ) -> str:
    """The ``MOBA_CP_*`` switches set in ``environ`` (CUDA graph mode, selection reuse, exchange
    timeout), for the run's first line: they change a run's speed, memory or patience, never its
    results, and a throughput figure is read with them."""
    set_ = sorted(f"{k}={v}" for k, v in environ.items() if k.startswith("MOBA_CP_"))
    return f"environment {', '.join(set_)}" if set_ else ""

def train(cfg: RecipeConfig) -> TrainResult:
    """Run the recipe's training to ``train.steps`` (resuming from its checkpoint if present).

    Before any process group exists: the recipe, data and run directory are checked
    (:func:`~moba_cp.train.preflight.preflight`); a finished run returns at once without touching
    anything. Whatever happens after, the signal handlers, the log files and the process groups
    are released.
    """
    tokenizer, state = preflight(cfg, world_size_from_env(), "cuda" if torch.cuda.is_available() else "cpu")
    ckpt_dir = checkpoint_dir_of(cfg)
    if state.complete:
        if int(os.environ.get("RANK", "0")) == 0:
            print(complete_message(cfg, state), flush=True)
        return TrainResult(last_step=state.step, losses=[], run_dir=str(Path(cfg.logging.dir)), complete=True)
    stop = StopRequest(on_abort=f"Checkpoints in {ckpt_dir} are intact; rerun the same command to resume "
                                f"from the newest.")
    logger = None
    try:
        env = init_distributed(cfg.parallel, cfg.train.seed)
        stop.device = env.device
        graphed_step = cuda_graph_applies(cfg, env.world_size, env.device.type)
        if env.is_main:
            note = moba_env_note(os.environ)
            fused = resolve_fused_ops(cfg.model.fused_ops, resolve_transformer_impl("auto"))
            ops = "RoPE, SwiGLU: " + ("fused Triton kernels" if fused else "unfused")
            norm = resolve_fused_norm(cfg.model.fused_norm, fused, cfg.model.normalization)
            ops += f"; {cfg.model.normalization}: " + ("fused Triton kernel" if norm else "torch's")
            ops += (f"; training step: {'replayed from a CUDA graph after one eager step' if graphed_step else 'eager'} "
                    f"(train.cuda_graph={cfg.train.cuda_graph})")
            print(f"moba-cp train: world {env.world_size} = tp {env.tp} x cp {env.cp} x dp {env.dp} "
                  f"on {env.device.type}; {describe(state, cfg)}; {ops}{'; ' + note if note else ''}; "
                  f"resolved recipe:\n{dump(cfg)}", flush=True)
        train_ds, valid_ds = _build_datasets(cfg, tokenizer)
        model = _build_model(cfg, tokenizer, env, graphed_step)
        start_step = _resume(state, model, env)
        if env.is_main:  # only now: the checks passed and the checkpoint (if any) loaded
            _write_recipe(cfg)
            _write_data_record(cfg, tokenizer)
        logger = MetricsLogger(cfg.logging.dir, enabled=env.is_main, tensorboard=cfg.logging.tensorboard,
                               resume_step=start_step)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        run = _Run(cfg=cfg, env=env, model=model, train_ds=train_ds, valid_ds=valid_ds, logger=logger, stop=stop,
                   ckpt_dir=ckpt_dir, flops_per_step=flops_per_step(cfg, tokenizer.vocab_size))
        return _train_steps(run, start_step, state)
    finally:
        if logger is not None:
            logger.close()
        stop.restore()
        shutdown_distributed()


def _build_datasets(cfg: RecipeConfig, tokenizer):
    """``(train, valid or None)`` datasets sized for the whole run."""
    t = cfg.train
    train_ds, valid_ds = build_train_valid_datasets(
        cfg.data, seq_length=cfg.model.seq_length, seed=t.seed,
        num_train_samples=t.steps * t.global_batch_size,
        num_valid_samples=cfg.eval.iters * t.global_batch_size if cfg.eval.interval else 0,
        tokenizer=tokenizer, builtin_budget_bytes=cfg.data.builtin_budget_bytes, announce=False,
    )
    if cfg.eval.interval and valid_ds is None:
        raise DataConfigError(f"eval.interval={cfg.eval.interval} asks for validation, but data.split="
                              f"{cfg.data.split!r} gives no validation documents. Fix: give the split a "
                              f"validation share (e.g. 98,2,0) or set eval.interval=0.")
    return train_ds, valid_ds


def _build_model(cfg: RecipeConfig, tokenizer, env: DistEnv, graphed_step: bool) -> _Model:
    """GPTModel, DDP, optimizer and learning-rate schedule of the recipe, wired together;
    ``graphed_step``: the step is replayed from a CUDA graph (``config.cuda_graph_applies``)."""
    t = cfg.train
    config = transformer_config_from_recipe(
        cfg.model, cfg.parallel, precision=t.precision, recompute=t.recompute, calculate_per_token_loss=True
    )
    gpt = build_gpt_model(cfg.model, cfg.moba, cfg.attention, cfg.parallel,
                          vocab_size=tokenizer.vocab_size, config=config)
    graphed = GraphedForwardBackward() if graphed_step else None
    if graphed is None:
        ddp = wrap_ddp(gpt, cfg.parallel)
    else:
        # DDP keeps each parameter's gradient-accumulation node for the run, and autograd runs a
        # node on the stream current when it was made: on the capture stream, the gradient adds
        # are part of the captured step (on the default stream they would break the capture).
        with graphed.on_capture_stream():
            ddp = wrap_ddp(gpt, cfg.parallel)
    optimizer = build_optimizer(
        ddp, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, clip_grad=t.clip_grad, distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.steps, t.warmup_steps + 1), lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
        # The run-directory check already refused every schedule change except train.steps (the
        # decay end); let the recipe's values win over the checkpoint's so that one may change.
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )
    attach_training_hooks(ddp, optimizer)
    return _Model(gpt, ddp, optimizer, scheduler, graphed)


def _resume(state: RunDirState, model: _Model, env: DistEnv) -> int:
    """Load the run directory's newest checkpoint, if any; the step to start from."""
    if state.checkpoint is None:
        return 0
    meta = load_checkpoint(state.checkpoint, model.ddp, model.optimizer, model.scheduler)
    step = int(meta["step"])
    if env.is_main:
        print(f"moba-cp train: resumed from {state.checkpoint} (step {step})", flush=True)
    return step


def _write_recipe(cfg: RecipeConfig) -> None:
    """The resolved recipe as ``RUN_DIR/recipe.yaml`` (what ``moba-cp eval`` and a rerun read)."""
    run_dir = Path(cfg.logging.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump(cfg))


def _write_data_record(cfg: RecipeConfig, tokenizer) -> None:
    """``RUN_DIR/data.json`` and one printed line: what the run trains on (corpus, sizes, epochs
    drawn; sweeps read the file). Computed once, here (the dataset builder is told not to)."""
    t = cfg.train
    rec = corpus_record(cfg.data, tokenizer=tokenizer, builtin_budget_bytes=cfg.data.builtin_budget_bytes,
                        seq_length=cfg.model.seq_length, num_train_samples=t.steps * t.global_batch_size)
    if rec:
        print(f"[data] {rec['summary']}", flush=True)
    (Path(cfg.logging.dir) / "data.json").write_text(json.dumps(rec, indent=1) + "\n")


def _train_steps(run: _Run, start_step: int, state: RunDirState) -> TrainResult:
    """Steps ``start_step .. train.steps - 1``; stops (saving) when any rank is asked to."""
    cfg, steps = run.cfg, run.cfg.train.steps
    switch_at = switch_step(steps, cfg.attention.switch_to_full_at)
    profiler = StepProfiler(parse_profile_steps(cfg.logging.profile), Path(cfg.logging.dir) / "profile",
                            run.env.rank, run.env.device)
    for step in range(start_step, steps):
        if step == start_step and run.stop.agreed():  # interrupted while starting up: nothing new to save
            intact = f" ({state.checkpoint} is intact)" if state.checkpoint else ""
            run.say(f"{run.stop.reason()} before the first step: stopped; nothing new to save{intact}")
            return run.result(start_step, stopped=True)
        if switch_at is not None and step == max(start_step, switch_at):  # also right after a resume past it
            _switch_to_full_attention(run, step)
        done = step + 1
        profiler.before_step(done)
        stats = _train_step(run, step)
        _say_profile(run, profiler, done, profiler.after_step(done))
        if not math.isfinite(stats.loss):
            raise TrainingError(f"loss is {stats.loss} at step {done}; stopping without saving "
                                f"(the last checkpoint in {run.ckpt_dir} is intact).")
        if done % cfg.logging.interval == 0 or done == steps:
            _log_step(run, done, stats)
        if cfg.eval.interval and done % cfg.eval.interval == 0:
            _log_validation(run, done)
        if done < steps and run.stop.agreed():
            _say_profile(run, profiler, done, profiler.after_step(done, stopping=True))  # the steps it profiled
            _stop_after(run, done)
            return run.result(done, stopped=True)
        if cfg.checkpoint.save and cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and done < steps:
            _save(run, done)
    last = max(start_step, steps)
    if cfg.checkpoint.save and last == steps:
        run.say(f"done: step {steps}/{steps}, checkpoint {_save(run, steps)}")
    return run.result(last)


# --------------------------------------------------------------------------------------------
# What a step does
# --------------------------------------------------------------------------------------------
def _train_step(run: _Run, step: int) -> _StepStats:
    """Forward, backward and optimizer update over the global batch of ``step``."""
    m, env, t = run.model, run.env, run.cfg.train
    t0 = time.perf_counter()
    host = run.prefetched[1] if run.prefetched and run.prefetched[0] == step else _host_batches(run, step)
    run.prefetched = None
    batches = [to_device(b, env.device) for b in host]
    with compat_cpu.cuda_to_cpu():
        m.ddp.zero_grad_buffer()
        m.optimizer.zero_grad()
    capturing = m.graphed is not None and m.graphed.captures_next
    reduced = _forward_backward(m.ddp, batches, forward_only=False, cfg=run.cfg, env=env, graphed=m.graphed)
    if capturing:
        run.say(f"step {step + 1}: forward and backward captured as one CUDA graph (train.cuda_graph="
                f"{t.cuda_graph}); every later step replays it")
    if t.prefetch and step + 1 < t.steps:
        # The next step's samples, made now: every kernel of this step is queued and the GPU works
        # through them while the host reads and stacks, and the optimizer's grad-norm sync below
        # would leave the host idle anyway. Otherwise the GPU waits at the next step's start while
        # the host collates (~1.2-1.7 ms a micro-batch in session 22's 8K trace, in a host-bound step).
        run.prefetched = (step + 1, _host_batches(run, step + 1))
    lr = m.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    with compat_cpu.cuda_to_cpu():
        _, grad_norm, _ = m.optimizer.step()
    m.scheduler.step(increment=1)
    loss = _reduce_loss(reduced)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    seconds = time.perf_counter() - t0
    run.step_times.append(seconds)
    return _StepStats(loss=loss, lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      seconds=seconds)


def _host_batches(run: _Run, step: int) -> list[dict]:
    """This rank's micro-batches of ``step`` on the host (pinned where the device is a GPU)."""
    t, env = run.cfg.train, run.env
    return [host_batch(run.train_ds, idx, pin=env.device.type == "cuda")
            for idx in microbatch_indices(step, t.global_batch_size, t.micro_batch_size, env.dp, env.dp_rank)]


def _log_step(run: _Run, done: int, s: _StepStats) -> None:
    """One metrics record and console line: loss, lr, throughput, memory, ETA."""
    steps, env = run.cfg.train.steps, run.env
    tokens_step = run.cfg.train.global_batch_size * run.cfg.model.seq_length
    recent = run.step_times[-10:]
    eta = format_eta(sum(recent) / len(recent) * (steps - done))
    rec = {"step": done, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "step_time_s": s.seconds,
           "tokens": done * tokens_step, "tokens_per_s": tokens_step / s.seconds,
           "tflops_per_gpu": run.flops_per_step / s.seconds / env.world_size / 1e12,
           "mem_gib": peak_memory_gib(env.device), "mem_reserved_gib": peak_reserved_gib(env.device)}
    run.losses.append(s.loss)
    run.logger.log(rec, f"step {done:>6}/{steps} | loss {s.loss:.4f} | lr {s.lr:.2e} | grad {s.grad_norm:.3f} | "
                        f"{rec['tokens_per_s']:,.0f} tok/s | {rec['tflops_per_gpu']:.3g} TFLOP/s/GPU | "
                        f"mem {rec['mem_gib']:.2f} GiB | ETA {eta}")


def _log_validation(run: _Run, done: int) -> None:
    vloss = evaluate(run.model.ddp, run.valid_ds, run.cfg, run.env)
    run.logger.log({"step": done, "valid_loss": vloss}, f"step {done:>6} | valid loss {vloss:.4f}")


def _switch_to_full_attention(run: _Run, step: int) -> None:
    """The two-stage schedule's switch: every MoBA layer computes full attention from ``step`` on."""
    n = set_attention_mode(run.model.ddp, "full")
    if run.model.graphed is not None:
        run.model.graphed.invalidate()  # the captured step computes MoBA: capture the new one
    run.say(f"step {step}: MoBA layers switched to full attention ({n} layers; two-stage schedule, "
            f"switch_to_full_at={run.cfg.attention.switch_to_full_at})")


def _save(run: _Run, step: int) -> Path:
    """A checkpoint of ``step`` (collective), with the layout and recipe it was trained with."""
    cfg, env, m = run.cfg, run.env, run.model
    return save_checkpoint(
        run.ckpt_dir, step, m.ddp, m.optimizer, m.scheduler, consumed_samples=step * cfg.train.global_batch_size,
        meta={"recipe": cfg.name, "tp": env.tp, "cp": env.cp, "dp": env.dp,
              "distributed_optimizer": cfg.parallel.distributed_optimizer, "config": to_dict(cfg)},
        keep_last=cfg.checkpoint.keep_last)


def _say_profile(run: _Run, profiler: StepProfiler, done: int, table: Path | None) -> None:
    if table is not None:
        run.say(f"profile of steps {profiler.steps[0]}-{done}: {table} (and the trace beside it)")


def _stop_after(run: _Run, done: int) -> None:
    """A requested stop after step ``done``: save (if checkpoints are on) and say how to resume."""
    saved = _save(run, done) if run.cfg.checkpoint.save else None
    run.say(f"{run.stop.reason()}: stopped after step {done}"
            + (f", checkpoint saved in {saved}; rerun the same command to resume" if saved
               else " (checkpoint.save=false: nothing saved)"))


# --------------------------------------------------------------------------------------------
# Forward / backward through Megatron's schedule
# --------------------------------------------------------------------------------------------
def _loss_step(data_iterator, model, normalization: str = "token"):
    """Megatron's ``forward_step_func``: one micro-batch's per-token losses and their reduction
    (``train.loss_normalization``: per token or per sample, :mod:`moba_cp.train.loss`)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(per_token_loss: torch.Tensor):
        cp_group = parallel_state.get_context_parallel_group() if normalization == "sample" else None
        loss_sum, count = masked_loss_sums(per_token_loss, batch["loss_mask"], normalization, cp_group)
        return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float()])}

    return output, loss_func


def _forward_backward(ddp, batches: list[dict], *, forward_only: bool, cfg: RecipeConfig, env: DistEnv,
                      graphed: GraphedForwardBackward | None = None):
    """Megatron's forward-backward schedule over ``batches`` (the micro-batches of one step).
    Training reduces its loss as ``train.loss_normalization`` says; validation always per token,
    so a validation loss means the same thing whatever a run trained with. ``graphed``: the
    training schedule runs through it (warm-up, capture, then replays)."""
    normalization = "token" if forward_only else cfg.train.loss_normalization

    def schedule(micro_batches: list[dict]):
        with compat_cpu.cuda_to_cpu():
            return get_forward_backward_func()(
                forward_step_func=partial(_loss_step, normalization=normalization), data_iterator=iter(micro_batches),
                model=[ddp], num_microbatches=len(micro_batches), seq_length=cfg.model.seq_length // env.cp,
                micro_batch_size=cfg.train.micro_batch_size, forward_only=forward_only,
            )

    if graphed is not None and not forward_only:
        return graphed(schedule, batches)
    return schedule(batches)


def _reduce_loss(losses_reduced: list[dict]) -> float:
    """Mean loss over every token of the global batch (sums all-reduced over dp x cp)."""
    if not losses_reduced:
        return float("nan")
    total = torch.stack([x["lm loss"].float() for x in losses_reduced]).sum(0)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1].clamp_min(1)).item()


def evaluate(ddp, valid_ds, cfg: RecipeConfig, env: DistEnv) -> float:
    """Mean validation loss over ``eval.iters`` global batches (forward only)."""
    t = cfg.train
    ddp.eval()
    try:
        reduced = []
        with torch.no_grad():
            for it in range(cfg.eval.iters):
                batches = [collate(valid_ds, [i % len(valid_ds) for i in idx], env.device)
                           for idx in microbatch_indices(it, t.global_batch_size, t.micro_batch_size,
                                                         env.dp, env.dp_rank)]
                reduced += _forward_backward(ddp, batches, forward_only=True, cfg=cfg, env=env)
        return _reduce_loss(reduced)
    finally:
        ddp.train()
