"""The training loop on Megatron-Core: parallel state, model, DDP, optimizer, schedule, data,
checkpoints and logs, driven by one recipe.

    moba-cp train RECIPE.yaml [--a.b=value ...]          (also: python -m moba_cp.train ...)
    torchrun --nproc_per_node N -m moba_cp.train RECIPE.yaml ...

Data order is a pure function of the step (sample ``step * global_batch + i``), so a resumed
run sees exactly the samples the uninterrupted run would, whatever its data-parallel size.
Loss: the mean over every loss-masked token of the global batch, computed exactly under CP and
DP (per-token loss: each rank returns its loss *sum*, Megatron divides the gradients by the
global token count).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moba_cp.config import RecipeConfig, dump, to_dict, validate
from moba_cp.train.distributed import DistEnv, init_distributed, shutdown_distributed, world_size_from_env
from moba_cp.train.flops import flops_per_step

__all__ = ["train", "preflight", "TrainResult", "TrainingError"]

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


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


class _StopRequest:
    """SIGTERM / SIGUSR1 (preemption, SLURM's --signal) and a first SIGINT (Ctrl-C) -> finish the
    step, save, exit cleanly; a second SIGINT aborts at once, without saving.

    The handlers only record the signal; at each step boundary the ranks agree (one all-reduce
    of a flag), so every rank saves the same step even when only some received the signal.

    Arrival times come from a thread reading the signal wakeup fd, not from the Python handler
    (which runs only when the main thread returns from a long C++ call). A SIGINT within
    ``SAME_INTERRUPT_S`` of the first counts as the same Ctrl-C: a launcher may deliver one
    key press twice (the terminal signals its process group, and the launcher forwards).

    A worker whose launcher died (torchrun killed with SIGKILL: its workers run in their own
    sessions and would train on, writing into the run directory a relaunch then uses) stops the
    same way: its parent process changed.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
    SAME_INTERRUPT_S = 1.0

    def __init__(self, on_abort: str = ""):
        import os
        import signal
        import threading

        self.received: str | None = None
        self.device = torch.device("cpu")
        self._parent = os.getppid()
        self.on_abort = on_abort  # printed (rank 0) when a second Ctrl-C aborts
        self._first_interrupt: float | None = None
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        self._rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        self._wfd = wfd
        self._old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="moba-cp-signals", daemon=True).start()

    def _handle(self, signum, frame):  # the watcher thread does the work
        pass

    def _watch(self):
        import os
        import signal

        while True:
            try:
                data = os.read(self._rfd, 64)
            except OSError:
                return
            if not data:  # restore() closed the write end
                os.close(self._rfd)
                return
            now = time.monotonic()
            for signum in data:
                try:
                    name = signal.Signals(signum).name
                except ValueError:
                    continue
                if name not in self.SIGNALS:
                    continue
                if name == "SIGINT":
                    if self._first_interrupt is None:
                        self._first_interrupt = now
                    elif now - self._first_interrupt > self.SAME_INTERRUPT_S:
                        self._abort()
                self.received = self.received or name

    def _abort(self):
        import os
        import sys

        if os.environ.get("RANK", "0") == "0":
            print(f"moba-cp train: second Ctrl-C: aborting now, without saving. {self.on_abort}",
                  file=sys.stderr, flush=True)
        os._exit(130)

    def agreed(self) -> bool:
        import torch.distributed as dist

        import os

        if self.received is None and os.getppid() != self._parent:
            self.received = "the launcher (parent process) exited"
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        import os
        import signal

        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._wfd)  # the watcher's read returns empty and it ends


def _microbatch_indices(step: int, gbs: int, mbs: int, dp: int, dp_rank: int) -> list[list[int]]:
    """Sample indices of each micro-batch this dp rank processes at ``step`` (step-determined)."""
    base = step * gbs
    n_micro = gbs // (mbs * dp)
    out = []
    for m in range(n_micro):
        start = base + m * mbs * dp + dp_rank * mbs
        out.append(list(range(start, start + mbs)))
    return out


def _to_batch(dataset, indices: list[int], device: torch.device) -> dict:
    from moba_cp.megatron.cp_batch import shard_batch_for_cp

    items = [dataset[i] for i in indices]
    batch = {}
    for key in _BATCH_KEYS:
        batch[key] = torch.stack([torch.as_tensor(it[key]) for it in items]).to(device, non_blocking=True)
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    batch["position_ids"] = batch["position_ids"].long()
    return shard_batch_for_cp(batch)  # zigzag: chunks r and 2cp-1-r of every sequence


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(per_token_loss: torch.Tensor):
        mask = batch["loss_mask"].float()
        loss_sum = (per_token_loss.float() * mask).sum()
        count = mask.sum()
        return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}

    return output, loss_func


def _reduce_loss(losses_reduced: list[dict]) -> float:
    """Mean loss over every token of the global batch (sums all-reduced over dp x cp)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not losses_reduced:
        return float("nan")
    total = torch.stack([x["lm loss"].float() for x in losses_reduced]).sum(0)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1].clamp_min(1)).item()


def _run_steps(model, batches: list[dict], *, forward_only: bool, env: DistEnv, seq_length: int, mbs: int):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moba_cp.megatron import compat_cpu

    fwd_bwd = get_forward_backward_func()
    with compat_cpu.cuda_to_cpu():
        return fwd_bwd(
            forward_step_func=_forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=seq_length // env.cp, micro_batch_size=mbs,
            forward_only=forward_only,
        )


def _build(cfg: RecipeConfig, env: DistEnv, tokenizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from moba_cp.megatron.model import build_gpt_model
    from moba_cp.megatron.optimizer import build_optimizer, wrap_ddp
    from moba_cp.megatron.training_hooks import attach_training_hooks
    from moba_cp.megatron.transformer_config import transformer_config_from_recipe

    t = cfg.train
    config = transformer_config_from_recipe(
        cfg.model, cfg.parallel, precision=t.precision, recompute=t.recompute, calculate_per_token_loss=True
    )
    gpt = build_gpt_model(cfg.model, cfg.moba, cfg.attention, cfg.parallel,
                          vocab_size=tokenizer.vocab_size, config=config)
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
    return gpt, ddp, optimizer, scheduler


def preflight(cfg: RecipeConfig, world_size: int, device: str):
    """Every check that needs no process group, in the order a user should hear about them:
    the recipe (for ``world_size`` processes on ``device``), the run directory, data paths and
    tokenizer. Returns ``(tokenizer, RunDirState)``; raises the first error (RecipeError,
    RunDirError, DataConfigError, TokenizerError). Writes nothing but ``data.cache_dir``, and
    that only when the run may go ahead."""
    from moba_cp.data.datasets import validate_data_paths
    from moba_cp.data.tokenizers import build_tokenizer
    from moba_cp.train.run_dir import inspect_run_dir

    validate(cfg, world_size=world_size, device=device)
    state = inspect_run_dir(cfg)
    validate_data_paths(cfg.data)
    return build_tokenizer(cfg.data.tokenizer), state


def complete_message(cfg: RecipeConfig, state) -> str:
    return (f"moba-cp train: {cfg.logging.dir} is complete: {state.checkpoint} is at step {state.step} "
            f"(train.steps={cfg.train.steps}); nothing to do, nothing changed. To train longer, raise "
            f"--train.steps; to start over, use a new --logging.dir.")


def train(cfg: RecipeConfig) -> TrainResult:
    """Run the recipe's training to ``train.steps`` (resuming from its checkpoint if present).

    Before any process group exists: the recipe, data and run directory are checked
    (:func:`preflight`); a finished run returns at once without touching anything.
    """
    from moba_cp.train.run_dir import checkpoint_dir_of

    main_rank = int(os.environ.get("RANK", "0")) == 0
    tokenizer, state = preflight(cfg, world_size_from_env(), "cuda" if torch.cuda.is_available() else "cpu")
    run_dir = Path(cfg.logging.dir)
    ckpt_dir = checkpoint_dir_of(cfg)
    if state.complete:
        if main_rank:
            print(complete_message(cfg, state), flush=True)
        return TrainResult(last_step=state.step, losses=[], run_dir=str(run_dir), complete=True)
    stop = _StopRequest(on_abort=f"Checkpoints in {ckpt_dir} are intact; rerun the same command to resume "
                                 f"from the newest.")
    try:
        env = init_distributed(cfg.parallel, cfg.train.seed)
        stop.device = env.device
        return _train(cfg, env, tokenizer, state, stop, run_dir, ckpt_dir)
    finally:
        stop.restore()
        shutdown_distributed()


def _train(cfg, env, tokenizer, state, stop, run_dir, ckpt_dir) -> TrainResult:
    from moba_cp.data.datasets import DataConfigError, build_train_valid_datasets
    from moba_cp.megatron import compat_cpu
    from moba_cp.megatron.hybrid_switch import set_attention_mode, switch_step
    from moba_cp.train import checkpoint as ckpt
    from moba_cp.train.metrics import MetricsLogger, format_eta, peak_memory_gib
    from moba_cp.train.run_dir import describe

    t = cfg.train
    if env.is_main:
        print(f"moba-cp train: world {env.world_size} = tp {env.tp} x cp {env.cp} x dp {env.dp} "
              f"on {env.device.type}; {describe(state, cfg)}; resolved recipe:\n{dump(cfg)}", flush=True)
    train_ds, valid_ds = build_train_valid_datasets(
        cfg.data, seq_length=cfg.model.seq_length, seed=t.seed,
        num_train_samples=t.steps * t.global_batch_size,
        num_valid_samples=cfg.eval.iters * t.global_batch_size if cfg.eval.interval else 0,
        tokenizer=tokenizer, builtin_budget_bytes=cfg.data.builtin_budget_bytes,
    )
    if cfg.eval.interval and valid_ds is None:
        raise DataConfigError(f"eval.interval={cfg.eval.interval} asks for validation, but data.split="
                              f"{cfg.data.split!r} gives no validation documents. Fix: give the split a "
                              f"validation share (e.g. 98,2,0) or set eval.interval=0.")
    gpt, ddp, optimizer, scheduler = _build(cfg, env, tokenizer)
    start_step = 0
    if state.checkpoint is not None:
        meta = ckpt.load_checkpoint(state.checkpoint, ddp, optimizer, scheduler)
        start_step = int(meta["step"])
        if env.is_main:
            print(f"moba-cp train: resumed from {state.checkpoint} (step {start_step})", flush=True)
    if env.is_main:  # only now: the check passed and the checkpoint (if any) loaded
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump(cfg))
    logger = MetricsLogger(run_dir, enabled=env.is_main, tensorboard=cfg.logging.tensorboard,
                           resume_step=start_step)
    switch_at = switch_step(t.steps, cfg.attention.switch_to_full_at)
    flops_step = flops_per_step(cfg, tokenizer.vocab_size)
    tokens_step = t.global_batch_size * cfg.model.seq_length
    mbs, gbs = t.micro_batch_size, t.global_batch_size
    losses: list[float] = []
    step_times: list[float] = []
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)

    def save(step) -> Path:
        return ckpt.save_checkpoint(
            ckpt_dir, step, ddp, optimizer, scheduler, consumed_samples=step * gbs,
            meta={"recipe": cfg.name, "tp": env.tp, "cp": env.cp, "dp": env.dp,
                  "distributed_optimizer": cfg.parallel.distributed_optimizer, "config": to_dict(cfg)},
            keep_last=cfg.checkpoint.keep_last)

    switched = False
    last_done = start_step
    try:
        for step in range(start_step, t.steps):
            if step == start_step and stop.agreed():  # interrupted while starting up: nothing new to save
                if env.is_main:
                    print(f"moba-cp train: {stop.received or 'a stop signal on another rank'} before the first "
                          f"step: stopped; nothing new to save" + (f" ({state.checkpoint} is intact)"
                                                                  if state.checkpoint else ""), flush=True)
                return TrainResult(last_step=last_done, losses=losses, run_dir=str(run_dir), stopped=True)
            if switch_at is not None and step >= switch_at and not switched:
                switched = True  # also right after a resume past the switch point
                n = set_attention_mode(ddp, "full")
                if env.is_main:
                    print(f"moba-cp train: step {step}: MoBA layers switched to full attention ({n} layers; "
                          f"two-stage schedule, switch_to_full_at={cfg.attention.switch_to_full_at})", flush=True)
            t0 = time.perf_counter()
            batches = [_to_batch(train_ds, idx, env.device)
                       for idx in _microbatch_indices(step, gbs, mbs, env.dp, env.dp_rank)]
            with compat_cpu.cuda_to_cpu():
                ddp.zero_grad_buffer()
                optimizer.zero_grad()
            reduced = _run_steps(ddp, batches, forward_only=False, env=env,
                                 seq_length=cfg.model.seq_length, mbs=mbs)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
            with compat_cpu.cuda_to_cpu():
                _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            loss = _reduce_loss(reduced)
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            done = step + 1
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {done}; stopping without saving "
                                    f"(the last checkpoint in {ckpt_dir} is intact).")
            if done % cfg.logging.interval == 0 or done == t.steps:
                recent = step_times[-10:]
                avg = sum(recent) / len(recent)
                gn = float(grad_norm) if grad_norm is not None else float("nan")
                rec = {"step": done, "loss": loss, "lr": lr, "grad_norm": gn, "step_time_s": dt,
                       "tokens": done * tokens_step, "tokens_per_s": tokens_step / dt,
                       "tflops_per_gpu": flops_step / dt / env.world_size / 1e12,
                       "mem_gib": peak_memory_gib(env.device)}
                losses.append(loss)
                logger.log(rec, f"step {done:>6}/{t.steps} | loss {loss:.4f} | lr {lr:.2e} | grad {gn:.3f} | "
                                f"{rec['tokens_per_s']:,.0f} tok/s | {rec['tflops_per_gpu']:.3g} TFLOP/s/GPU | "
                                f"mem {rec['mem_gib']:.2f} GiB | ETA {format_eta(avg * (t.steps - done))}")
            if cfg.eval.interval and done % cfg.eval.interval == 0:
                vloss = evaluate(ddp, valid_ds, cfg, env)
                logger.log({"step": done, "valid_loss": vloss}, f"step {done:>6} | valid loss {vloss:.4f}")
            last_done = done
            if done < t.steps and stop.agreed():
                saved = save(done) if cfg.checkpoint.save else None
                if env.is_main:
                    print(f"moba-cp train: {stop.received or 'a stop signal on another rank'}: stopped after step "
                          f"{done}" + (f", checkpoint saved in {saved}; rerun the same command to resume"
                                       if saved else " (checkpoint.save=false: nothing saved)"), flush=True)
                return TrainResult(last_step=last_done, losses=losses, run_dir=str(run_dir), stopped=True)
            if cfg.checkpoint.save and cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and done < t.steps:
                save(done)
        if cfg.checkpoint.save and last_done == t.steps:
            saved = save(t.steps)
            if env.is_main:
                print(f"moba-cp train: done: step {t.steps}/{t.steps}, checkpoint {saved}", flush=True)
        return TrainResult(last_step=last_done, losses=losses, run_dir=str(run_dir))
    finally:
        logger.close()


def evaluate(ddp, valid_ds, cfg: RecipeConfig, env: DistEnv) -> float:
    """Mean validation loss over ``eval.iters`` global batches (forward only)."""
    t = cfg.train
    ddp.eval()
    try:
        reduced = []
        with torch.no_grad():
            for it in range(cfg.eval.iters):
                batches = [_to_batch(valid_ds, [i % len(valid_ds) for i in idx], env.device)
                           for idx in _microbatch_indices(it, t.global_batch_size, t.micro_batch_size, env.dp, env.dp_rank)]
                reduced += _run_steps(ddp, batches, forward_only=True, env=env,
                                      seq_length=cfg.model.seq_length, mbs=t.micro_batch_size)
        return _reduce_loss(reduced)
    finally:
        ddp.train()
