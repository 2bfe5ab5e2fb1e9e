"""Load a trained checkpoint for evaluation and expose it as plain callables.

``moba-cp eval loss|needle CHECKPOINT ...`` runs under torchrun like training (tp x cp ranks
from the recipe saved beside the checkpoint, or ``--parallel.cp=N`` overrides); every rank
calls the callables together, each holding its zigzag shard of the sequence, and every rank
gets the full result back:

- ``logits_fn(tokens LongTensor[1, S]) -> logits [1, S, V]`` (fp32, vocabulary unpadded);
- ``loss_fn(tokens [S], labels [S]) -> per-token losses [S]``.

Sequences whose length does not split into ``2 * cp`` chunks of whole MoBA blocks are padded
on the *right*; causal attention means padding never changes the real tokens' results, and it
is cut off again.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from moba_cp.config import RecipeConfig, RecipeError, apply_overrides, from_dict, load_recipe, to_dict, validate
from moba_cp.data.tokenizers import build_tokenizer
from moba_cp.megatron.cp_batch import shard_batch_for_cp
from moba_cp.megatron.model import build_gpt_model
from moba_cp.parallel.zigzag import zigzag_unshard
from moba_cp.train.checkpoint import latest_checkpoint, quiet_known_load_warnings
from moba_cp.train.distributed import DistEnv, init_distributed, world_size_from_env

__all__ = ["EvalModel", "resolve_checkpoint", "read_trained_recipe", "load_eval_model"]


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint_dir, recipe_yaml)`` from a run dir, a checkpoints dir or one ``iter_*`` dir.

    ``recipe_yaml`` is the run's ``recipe.yaml`` (None when there is none; checkpoints that hold
    their recipe in ``meta.json`` do not need it).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist. Fix: pass a run directory "
                                f"(e.g. runs/quickstart) or one of its checkpoints/iter_* folders.")
    if (p / "meta.json").is_file():
        ckpt = p
    else:
        ckpt = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint (iter_*/meta.json) under {str(p)!r}.")
    for parent in [ckpt, *ckpt.parents]:
        if (parent / "recipe.yaml").is_file():
            return ckpt, parent / "recipe.yaml"
    return ckpt, None


def read_trained_recipe(checkpoint: str | Path, overrides: list[str] | None = None) -> tuple[Path, RecipeConfig, dict]:
    """``(checkpoint_dir, recipe, meta)``: the recipe the checkpoint was trained with, plus overrides.

    The recipe comes from the checkpoint's own ``meta.json`` (so a later run that rewrote the run
    directory's ``recipe.yaml`` cannot change what is evaluated), else from ``recipe.yaml``.
    No process group is needed.
    """
    ckpt, recipe_yaml = resolve_checkpoint(checkpoint)
    meta = json.loads((ckpt / "meta.json").read_text())
    if isinstance(meta.get("config"), dict):
        data = apply_overrides(copy.deepcopy(meta["config"]), list(overrides or []))
        cfg = from_dict(RecipeConfig, data)
        validate(cfg)
    elif recipe_yaml is not None:
        cfg = load_recipe(recipe_yaml, list(overrides or []))
    else:
        raise FileNotFoundError(f"no recipe for {str(ckpt)!r}: neither its meta.json nor a recipe.yaml beside "
                                f"or above it (training writes both).")
    return ckpt, cfg, meta


@dataclass
class EvalModel:
    cfg: RecipeConfig
    env: DistEnv
    model: torch.nn.Module
    tokenizer: object
    unit: int  # sequence lengths are padded to a multiple of this
    checkpoint: Path | None = None

    def share(self, obj):
        """``obj`` of rank 0 on every rank (e.g. which cells an interrupted run finished)."""
        if self.env.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _pad(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        s = tokens.shape[-1]
        padded = -(-s // self.unit) * self.unit
        if padded != s:
            fill = torch.full((*tokens.shape[:-1], padded - s), self.tokenizer.eod, dtype=tokens.dtype)
            tokens = torch.cat([tokens, fill], dim=-1)
        return tokens, s

    def _gather_sequence(self, local: torch.Tensor) -> torch.Tensor:
        """All-gather ``[b, s_local, ...]`` zigzag shards over CP into ``[b, S, ...]`` on every rank."""
        if self.env.cp == 1:
            return local
        group = parallel_state.get_context_parallel_group()
        parts = [torch.empty_like(local) for _ in range(self.env.cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return zigzag_unshard(parts, seq_dim=1)

    def _shard(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        s = tokens.shape[-1]
        batch = {"tokens": tokens, "position_ids": torch.arange(s)[None].expand_as(tokens).contiguous()}
        if labels is not None:
            batch["labels"] = labels
        batch = {k: v.to(self.env.device) for k, v in batch.items()}
        return shard_batch_for_cp(batch)

    @torch.no_grad()
    def logits_fn(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [1, S]`` -> fp32 logits ``[1, S, vocab]`` on CPU (collective over tp x cp)."""
        tokens, s = self._pad(tokens.long().cpu())
        b = self._shard(tokens)
        logits = self.model(b["tokens"], b["position_ids"], None)  # [b, s_local, V/tp]
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits.float())
        full = self._gather_sequence(logits)
        return full[:, :s, : self.tokenizer.vocab_size].cpu()

    @torch.no_grad()
    def loss_fn(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy ``[S]`` of ``labels`` given ``tokens`` (collective over tp x cp)."""
        t, s = self._pad(tokens.long().cpu()[None])
        lab, _ = self._pad(labels.long().cpu()[None])
        b = self._shard(t, lab)
        losses = self.model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [1, s_local]
        return self._gather_sequence(losses.float())[0, :s].cpu()


def load_eval_model(checkpoint: str | Path, seq_length: int, overrides: list[str] | None = None) -> EvalModel:
    """Build the recipe's model for sequences up to ``seq_length`` and load the checkpoint's weights."""
    ckpt, base, _ = read_trained_recipe(checkpoint, overrides)
    p = base.parallel
    unit = 2 * p.cp * base.moba.block_size if p.cp > 1 else 1
    padded = -(-seq_length // unit) * unit
    cfg = from_dict(RecipeConfig, apply_overrides(to_dict(base), [
        f"--model.seq_length={padded}", "--train.global_batch_size=1", "--train.micro_batch_size=1",
        "--parallel.dp=null", "--train.recompute=none",
    ]))
    validate(cfg, world_size=world_size_from_env(), device="cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    env = init_distributed(cfg.parallel, cfg.train.seed)
    if env.dp != 1:
        raise RecipeError(f"eval runs with dp=1: launch tp*cp = {p.tp * p.cp} processes, not {env.world_size} "
                          f"(or set --parallel.cp={env.world_size // p.tp}).")
    model = build_gpt_model(cfg.model, cfg.moba, cfg.attention, cfg.parallel, vocab_size=tokenizer.vocab_size,
                            precision=cfg.train.precision)
    with quiet_known_load_warnings():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
    model.load_state_dict(state["model"])
    model.eval()
    if env.is_main:
        print(f"eval: loaded {ckpt}; tp {env.tp} x cp {env.cp}; sequences padded to multiples of {unit}", flush=True)
    return EvalModel(cfg=cfg, env=env, model=model, tokenizer=tokenizer, unit=unit, checkpoint=ckpt)
