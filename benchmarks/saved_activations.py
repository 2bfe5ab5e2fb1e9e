"""What one transformer layer keeps for its backward, per token, with the layer ops fused
(``model.fused_ops=triton``) and unfused (``torch``): counted, not timed, so it runs on any machine.

Usage (CPU: fp32, the fused kernels in the Triton interpreter; GPU: bf16):
    python benchmarks/saved_activations.py                       # the 1gpu-32k model's layer
    python benchmarks/saved_activations.py --seq 512 --recompute none

How: the model of the ``1gpu-32k`` recipe (hidden 1024, 16/4 heads, SwiGLU FFN 2752) is built with
1 and with 2 layers (full attention: the layer ops do not depend on the attention kind), one
forward runs under ``torch.autograd.graph.saved_tensors_hooks``, and the distinct storages saved
for the backward are added up (parameters excluded). Two layers minus one is one layer's share.
Each storage is charged to the layer submodule whose forward saved it (a second table). Bytes
are scaled to bf16 training and multiplied out to the recipe's token counts. On CPU the unfused
torch operations decompose differently from their CUDA kernels (the CPU RMSNorm keeps an extra
normalised copy, the CPU SwiGLU an extra intermediate), so the CPU count of the unfused layer is an
upper bound of the GPU's: run it on a GPU for the training figure.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moba_cp.config import AttentionConfig, ModelConfig, MoBAConfig, ParallelConfig  # noqa: E402


def saved_bytes(model, tokens) -> tuple[int, dict]:
    """Distinct non-parameter storages saved for backward by one forward: their total bytes, and
    bytes by the last layer's submodule (``input_layernorm``, ``mlp.activation_func``, ...) that saved them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, by_module, where = {}, {}, ["outside the last layer"]
    hooks = []
    for name, mod in model.decoder.layers[-1].named_modules():
        if name and name.count(".") <= 1:
            hooks.append(mod.register_forward_pre_hook(lambda m, i, name=name: where.append(name)))
            hooks.append(mod.register_forward_hook(lambda m, i, o: where.pop() and None))  # None: keep the output

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in params and key not in seen:
            seen[key] = st.nbytes()
            by_module[where[-1]] = by_module.get(where[-1], 0) + st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens[:, :-1], None, None, labels=tokens[:, 1:])
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values()), by_module


def build(layers: int, fused: str, seq: int, recompute: str):
    from megatron.core import parallel_state

    from moba_cp.megatron.model import build_gpt_model
    from moba_cp.megatron.parallel_init import init_parallel
    from moba_cp.megatron.transformer_config import transformer_config_from_recipe

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    mcfg = ModelConfig(num_layers=layers, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                       seq_length=seq, vocab_size=256, rotary_base=500000, fused_ops=fused)
    pcfg = ParallelConfig()
    init_parallel(pcfg, seed=1)
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    config = transformer_config_from_recipe(mcfg, pcfg, precision=precision, recompute=recompute)
    return build_gpt_model(mcfg, MoBAConfig(), AttentionConfig(pattern="full"), pcfg, vocab_size=256, config=config)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=256, help="tokens of the measured forward (per-token bytes do not depend on it)")
    ap.add_argument("--recompute", default="selective", choices=("none", "selective"))
    args = ap.parse_args(argv)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, 256, (1, args.seq + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    per_layer, modules = {}, {}
    for fused in ("torch", "triton"):
        counts = {}
        for layers in (1, 2):
            model = build(layers, fused, args.seq, args.recompute)
            counts[layers] = saved_bytes(model, tokens)
            del model
        per_layer[fused] = counts[2][0] - counts[1][0]
        modules[fused] = {k: v for k, v in counts[2][1].items() if k != "outside the last layer"}
    scale = 1.0 if torch.cuda.is_available() else 0.5  # CPU runs fp32: activations are half that in bf16
    print(f"# saved for backward by one layer of the 1gpu-32k model, train.recompute={args.recompute}, "
          f"{args.seq} tokens measured on {dev} ({'bf16' if scale == 1.0 else 'fp32, scaled x0.5 to bf16'})")
    print("| layer ops | bytes per token | GB per layer at 32K tokens | GB over 24 layers at 32K | at 128K |")
    print("|---|---|---|---|---|")
    for fused, total in per_layer.items():
        b = total * scale / args.seq
        print(f"| {fused} | {b:,.0f} | {b * 32768 / 1e9:.2f} | {24 * b * 32768 / 1e9:.1f} | {24 * b * 131072 / 1e9:.1f} |")
    print("\n| submodule of the layer | unfused bytes per token | fused bytes per token |")
    print("|---|---|---|")
    for name in sorted(set(modules["torch"]) | set(modules["triton"])):
        u, f = (modules[k].get(name, 0) * scale / args.seq for k in ("torch", "triton"))
        print(f"| {name} | {u:,.0f} | {f:,.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
