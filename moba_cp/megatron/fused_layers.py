"""Fused Triton kernels for the parts of a layer outside attention: RoPE and SwiGLU (and, when
asked, RMSNorm).

Why: Megatron-Core without Transformer Engine or apex runs these as chains of torch operations
(RoPE ~10 a tensor, SwiGLU 3).
On one H200, 8K training of the 6-layer model spent ~38 of its ~113 ms of device time per two
steps in such kernels (``mul``, ``cat``, ``neg``, ``silu``, ``add``, the RMSNorm backward), ~2.7
times the linear layers' 14 ms (``benchmarks/results/profile_train8k_h200_2026-12-03/*_full.kernels.txt``);
and every one of them is a launch in a step whose host is the bound at 8K. MoBA and full
attention share this part of the step, so it bounds both; at equal savings MoBA's shorter step
gains more.

What (``model.fused_ops``, :func:`resolve_fused_ops`): with the local (torch) layer spec on a GPU,
``auto`` (the default) and ``triton`` put

- :class:`FusedSwiGLU` in the MLP's activation slot (Megatron's ``use_te_activation_func`` hook:
  the module gets fc1's whole ``[s, b, 2F]`` output);
- :func:`megatron_fused_rope` in Megatron's fused-RoPE slot (``apply_rope_fusion``; the slot TE
  would fill, :func:`install_fused_rope`).

The norms are :class:`FusedRMSNorm` (``moba_cp.ops.rms_norm``) wherever the other ops are fused
and the norm is RMSNorm (``model.fused_norm``: null, the default; true requires it, false keeps
torch's). Per call that kernel is slower than torch's RMSNorm in wall time (its launches: 0.77
against 0.34 ms forward+backward at 32K x 1024 on an H100) but faster on the GPU (0.13 against
0.24 ms), which is what a GPU-bound training step pays: ~10 ms a step less at 32K and 128K
(``benchmarks/results/layer_ops_h100_2026-12-05_session30.md``).
``torch`` keeps Megatron's unfused operations.
Each kernel computes in fp32 and rounds once, so results differ from the unfused path (which
rounds after every operation) in the last bits.
Transformer Engine's layer spec brings its own fused layers; this module is for the local spec.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings import rope_utils

from moba_cp.ops.rms_norm import rms_norm
from moba_cp.ops.rope import apply_rope, rope_tables
from moba_cp.ops.swiglu import swiglu

__all__ = ["FUSED_OPS", "resolve_fused_ops", "resolve_fused_norm", "FusedRMSNorm", "FusedSwiGLU",
           "megatron_fused_rope", "install_fused_rope"]

#: ``model.fused_ops`` values.
FUSED_OPS = ("auto", "triton", "torch")


def resolve_fused_ops(setting: str, transformer_impl: str) -> bool:
    """Whether a model built with the resolved ``transformer_impl`` (``'local'`` or ``'te'``) uses
    the fused kernels under ``model.fused_ops = setting``. ``auto``: on a GPU with the local spec.
    ``triton``: required (a GPU, or the Triton interpreter on CPU); refused with TE's spec."""
    if setting not in FUSED_OPS:
        raise ValueError(f"model.fused_ops={setting!r}: choose auto (Triton kernels on a GPU), triton or torch "
                         f"(Megatron's unfused torch operations).")
    if setting == "torch":
        return False
    if setting == "auto":
        return transformer_impl == "local" and torch.cuda.is_available()
    if transformer_impl != "local":
        raise ValueError(f"model.fused_ops=triton with transformer_impl={transformer_impl!r}: Transformer Engine's "
                         f"layers bring their own fused RoPE, SwiGLU and norms. Fix: model.fused_ops=auto.")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("model.fused_ops=triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels in "
                         "Triton's interpreter on CPU, for tests). Fix: model.fused_ops=auto or torch.")
    return True


def resolve_fused_norm(fused_norm: bool | None, fused_ops: bool, normalization: str) -> bool:
    """Whether the norms are :class:`FusedRMSNorm`: ``model.fused_norm``, given whether the other
    layer ops resolved to the fused kernels (``fused_ops``, from :func:`resolve_fused_ops`).
    ``None`` (the default) follows them where the norm is RMSNorm; ``True`` asks for it, and asking
    where they did not resolve to the fused kernels (``fused_ops=auto`` on CPU, or TE's spec) or
    with LayerNorm is an error; ``False`` keeps torch's norm."""
    if fused_norm is None:
        return bool(fused_ops) and normalization == "RMSNorm"
    if not fused_norm:
        return False
    if normalization != "RMSNorm":
        raise ValueError(f"model.fused_norm=true with normalization={normalization!r}: the fused norm is RMSNorm "
                         f"only. Fix: model.fused_norm=null (the default: fused where it can run) or false.")
    if not fused_ops:
        raise ValueError("model.fused_norm=true, but model.fused_ops resolves to the unfused torch operations here "
                         "(auto on CPU or with Transformer Engine's spec, or torch). Fix: model.fused_norm=null (the "
                         "default: fused where it can run) or false, or run on a GPU with the local spec (or "
                         "model.fused_ops=triton with TRITON_INTERPRET=1).")
    return True


class FusedRMSNorm(torch.nn.Module):
    """RMSNorm through one Triton kernel each way (:func:`moba_cp.ops.rms_norm.rms_norm`).

    Same constructor as Megatron's norm slots (``config, hidden_size, eps``) and the same
    parameter as ``torch.nn.RMSNorm`` (``weight [hidden]``, ones, in ``config.params_dtype``;
    so checkpoints load either way), tagged ``sequence_parallel`` like
    :class:`moba_cp.megatron.specs.TorchNorm`'s.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused_kwargs):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"FusedRMSNorm: normalization={config.normalization!r}; it is RMSNorm only.")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("FusedRMSNorm: layernorm_zero_centered_gamma is not supported.")
        dtype = getattr(config, "params_dtype", None) or torch.float32
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FusedSwiGLU(torch.nn.Module):
    """``silu(x[..., :F]) * x[..., F:]`` on fc1's whole output ``[s, b, 2F]`` -> ``[s, b, F]``
    (:func:`moba_cp.ops.swiglu.swiglu`), for the MLP's activation slot."""

    def __init__(self, config, **unused_kwargs):
        super().__init__()
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("FusedSwiGLU: the model's MLP is not SwiGLU (gated_linear_unit with F.silu).")
        if getattr(config, "activation_func_clamp_value", None) is not None or getattr(config, "glu_linear_offset", 0.0):
            raise ValueError("FusedSwiGLU: activation_func_clamp_value / glu_linear_offset are not supported.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


def megatron_fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **unused_kwargs):
    """Megatron's fused-RoPE slot: ``t [S, B, H, D]`` rotated by ``freqs [S, 1, 1, R]``."""
    if interleaved:
        raise ValueError("moba_cp's fused RoPE rotates halves (rotary_interleaved=False); set model.fused_ops=torch "
                         "for interleaved RoPE.")
    return apply_rope(t, *rope_tables(freqs))


def install_fused_rope() -> None:
    """Fill Megatron's fused-RoPE slot with :func:`megatron_fused_rope` when it is empty (no
    Transformer Engine; with TE, TE's fused RoPE stays). Megatron reads the slot at each call
    of a model whose config has ``apply_rope_fusion``, and checks it when such a config is made."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = megatron_fused_rope
