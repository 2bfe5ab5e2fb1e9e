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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moba_cp.config import RecipeConfig, dump, validate
from moba_cp.train.distributed import DistEnv, init_distributed, shutdown_distributed, world_size_from_env
from moba_cp.train.flops import flops_per_step

__all__ = ["train", "TrainResult"]

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    last_step: int
    losses: list[float]  # per logged step, in order
    run_dir: str


class _StopRequest:
    """SIGTERM / SIGUSR1 (preemption, SLURM's --signal) -> finish the step, save, exit cleanly.

    The handler only sets a flag; at each step boundary the ranks agree (one all-reduce of a
    flag), so every rank saves the same step even when only some received the signal.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, device: torch.device):
        import signal

        self.received: str | None = None
        self.device = device
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
    )
    attach_training_hooks(ddp, optimizer)
    return gpt, ddp, optimizer, scheduler


def train(cfg: RecipeConfig) -> TrainResult:
    """Run the recipe's training to ``train.steps`` (resuming from its checkpoint if present)."""
    from moba_cp.data.datasets import DataConfigError, build_train_valid_datasets, validate_data_paths
    from moba_cp.data.tokenizers import build_tokenizer
    from moba_cp.megatron import compat_cpu
    from moba_cp.megatron.hybrid_switch import set_attention_mode, switch_step
    from moba_cp.train import checkpoint as ckpt
    from moba_cp.train.metrics import MetricsLogger, format_eta, peak_memory_gib

    validate(cfg, world_size=world_size_from_env())  # before any process group exists
    validate_data_paths(cfg.data)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    env = init_distributed(cfg.parallel, cfg.train.seed)
    try:
        t = cfg.train
        run_dir = Path(cfg.logging.dir)
        ckpt_dir = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
        if env.is_main:
            print(f"moba-cp train: world {env.world_size} = tp {env.tp} x cp {env.cp} x dp {env.dp} "
                  f"on {env.device.type}; resolved recipe:\n{dump(cfg)}", flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "recipe.yaml").write_text(dump(cfg))
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
        latest = ckpt.latest_checkpoint(ckpt_dir) if cfg.checkpoint.resume else None
        if latest is not None:
            meta = ckpt.load_checkpoint(latest, ddp, optimizer, scheduler)
            start_step = int(meta["step"])
            if env.is_main:
                print(f"moba-cp train: resumed from {latest} (step {start_step})", flush=True)
        logger = MetricsLogger(run_dir, enabled=env.is_main, tensorboard=cfg.logging.tensorboard,
                               resume=start_step > 0)
        switch_at = switch_step(t.steps, cfg.attention.switch_to_full_at)
        flops_step = flops_per_step(cfg, tokenizer.vocab_size)
        tokens_step = t.global_batch_size * cfg.model.seq_length
        mbs, gbs = t.micro_batch_size, t.global_batch_size
        losses: list[float] = []
        step_times: list[float] = []
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)

        def save(step):
            ckpt.save_checkpoint(ckpt_dir, step, ddp, optimizer, scheduler, consumed_samples=step * gbs,
                                 meta={"recipe": cfg.name, "tp": env.tp, "cp": env.cp, "dp": env.dp,
                                       "distributed_optimizer": cfg.parallel.distributed_optimizer},
                                 keep_last=cfg.checkpoint.keep_last)

        switched = False
        stop = _StopRequest(env.device)
        last_done = start_step
        for step in range(start_step, t.steps):
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
                raise FloatingPointError(f"moba-cp train: loss is {loss} at step {done}; stopping "
                                         f"(last checkpoint in {ckpt_dir} is intact).")
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
            if stop.agreed() and done < t.steps:
                if cfg.checkpoint.save:
                    save(done)
                if env.is_main:
                    print(f"moba-cp train: {stop.received or 'a stop signal on another rank'}: stopped after step "
                          f"{done}" + (f", checkpoint saved in {ckpt_dir}; rerun the same command to resume"
                                       if cfg.checkpoint.save else " (checkpoint.save=false: nothing saved)"),
                          flush=True)
                break
            if cfg.checkpoint.save and cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0 and done < t.steps:
                save(done)
        stop.restore()
        if cfg.checkpoint.save and start_step < t.steps and last_done == t.steps:
            save(t.steps)
        logger.close()
        return TrainResult(last_step=last_done, losses=losses, run_dir=str(run_dir))
    finally:
        shutdown_distributed()


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
