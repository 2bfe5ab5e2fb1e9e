"""What to change when a training run runs out of device memory: the recipe's own levers, most
specific first, each as the override to paste.

A CUDA out-of-memory error names the allocation that failed, not the setting that would make
the run fit; this turns the recipe into that list. Pure (no device, no torch.distributed), so
it is tested on CPU.
"""

from __future__ import annotations

from moba_cp.config import RecipeConfig, cuda_graph_applies, layer_attention_kinds
from moba_cp.train.dry_run import keeps_gather_index

__all__ = ["oom_hints", "oom_message"]


def _with_kernel(cfg: RecipeConfig, override: str) -> str:
    """``--moba.kernel=...`` with ``override`` added to the recipe's own overrides."""
    own = (cfg.moba.kernel or "").strip()
    return f"--moba.kernel={own + ',' if own else ''}{override}"


def oom_hints(cfg: RecipeConfig, world_size: int = 1) -> list[str]:
    """The overrides that lower this recipe's peak memory, most specific first, for a run of
    ``world_size`` processes on GPUs.

    Each item is one line: the override, then what it trades. Levers that the recipe already
    uses at their limit are left out (e.g. no micro-batch advice at micro-batch 1)."""
    t, p = cfg.train, cfg.parallel
    moba_layers = layer_attention_kinds(cfg.model, cfg.attention).count("moba")
    hints = []
    # recomputation cannot be captured (config: train.cuda_graph): where the recipe asks for the
    # graph outright, its hints turn the graph off too (auto turns it off by itself)
    eager = "--train.cuda_graph=none " if t.cuda_graph == "full_iteration" else ""
    if t.recompute == "none" and moba_layers and p.cp == 1 and keeps_gather_index(cfg):
        # Measured on one H200 at 128K without recomputation: the default ran out of memory,
        # this trained (the index is ~4x the selection; the backward builds it again).
        hints.append(f"{_with_kernel(cfg, 'bwd.keep_index=false')}: MoBA layers keep their int8/int16 block "
                     "selection for the backward instead of the int32 gather index, which the backward then "
                     "builds again (~2% slower at 32K)")
    if cuda_graph_applies(cfg, world_size, "cuda"):
        # measured at 32K on one H100: reserved 30.2 GiB graphed against 29.1 eager (same allocated)
        hints.append("--train.cuda_graph=none: the step runs eagerly, without the graph's private memory pool "
                     "(about 1 GiB more reserved at 32K on the 0.27B model; slower where the host is the bound)")
    if cfg.model.fused_ops == "torch" and cfg.model.swiglu:
        hints.append("--model.fused_ops=auto: the fused SwiGLU keeps fc1's output alone, not SiLU's output "
                     "too (one FFN row a token and layer less)")
    if t.micro_batch_size > 1:
        hints.append(f"--train.micro_batch_size={max(1, t.micro_batch_size // 2)}: fewer sequences per "
                     "forward; the global batch stays (more gradient accumulation)")
    if t.recompute == "none":
        hints.append(f"{eager}--train.recompute=selective: core attention's forward runs again in the backward "
                     "instead of its activations being kept")
    if t.recompute in ("none", "selective"):
        hints.append(f"{eager}--train.recompute=full: whole layers run again in the backward (the most memory "
                     "saved, about a third more compute)")
    cp = 2 * p.cp
    hints.append(f"--parallel.cp={cp} (with as many more GPUs): each GPU holds 1/{cp} of the sequence")
    if not p.distributed_optimizer and (p.dp or 1) > 1:
        hints.append("--parallel.distributed_optimizer=true: optimizer state sharded over data-parallel ranks")
    return hints


def oom_message(cfg: RecipeConfig, recipe: str | None = None, world_size: int = 1) -> str:
    """The lines printed after an out-of-memory error: the hints and the dry run that sizes them."""
    lines = ["the run ran out of device memory; settings that lower the peak, most specific first:"]
    lines += [f"  {h}" for h in oom_hints(cfg, world_size)]
    where = recipe or "RECIPE.yaml"
    lines.append(f"  (`moba-cp train {where} --dry-run` with the same overrides prints the memory estimate)")
    return "\n".join(lines)
