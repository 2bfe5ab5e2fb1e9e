"""Run Megatron-Core on a machine without a GPU (CPU + gloo), for tests and the quickstart.

Everything moba_cp does to get Megatron-Core past its CUDA assumptions lives in this one
file (``docs/design.md`` section 4). Nothing here is ever active where a GPU is present:
:func:`activate` returns ``False`` and changes nothing when ``torch.cuda.is_available()``, and
:func:`cuda_to_cpu` is then a no-op context.

Two layers:

1. :func:`activate` (idempotent): patches that are cheap and safe for the whole process. It is
   called in exactly one place, :func:`moba_cp.megatron.parallel_init.init_parallel`, which
   every use of Megatron-Core goes through first.

   - ``torch.cuda.current_device()`` returns ``torch.device('cpu')`` (RoPE's ``inv_freq``
     move, ``GlobalMemoryBuffer``, DDP's param/grad buffers all allocate on "the current CUDA
     device"); ``torch.cuda.current_stream/default_stream`` return a null stream (0.19's DDP
     ``start_grad_sync``); ``torch.cuda.synchronize`` is a no-op.
   - A CPU RNG tracker replaces Megatron's ``CudaRNGStatesTracker`` (``model_parallel_cuda_
     manual_seed`` reads CUDA RNG states): its named states are CPU generator states, and
     ``fork()`` swaps the CPU default generator, so "model-parallel" dropout/initialisation
     streams behave as on GPU.
   - ``get_pos_emb_on_this_cp_rank`` (RoPE under CP) without ``pin_memory().cuda()``.

2. :func:`cuda_to_cpu` (a context manager): a ``TorchFunctionMode`` that rewrites CUDA device
   arguments to CPU, makes ``Tensor.cuda()``/``pin_memory()`` identity and reports CPU float
   tensors as ``torch.cuda.*Tensor`` from a no-argument ``Tensor.type()`` (the optimizer, grad
   scaler, ``clip_grads`` and ``schedules.py`` hard-code ``device='cuda'`` and check tensor type
   names). It dispatches every torch call through Python, so wrap only the calls that need it:
   ``get_megatron_optimizer``, ``optimizer.step()``, the ``forward_backward_func`` call (which
   counts tokens on ``device='cuda'``) and checkpoint save/load. It activates nothing: used on
   a GPU-less machine before :func:`activate`, it raises.

Not patched, handled by the model build instead: ``use_cpu_initialization=True`` (set by
:func:`moba_cp.megatron.transformer_config.transformer_config_from_recipe` when there is no
GPU), ``get_default_causal_mask`` (hard-codes ``device='cuda'``; moba_cp's core attentions
never call it) and 0.16.1's per-layer ``cp_comm_type`` list bug (not CPU-specific: moba_cp
leaves ``cp_comm_type`` unset, its attentions do their own CP communication, and
``transformer_config_from_recipe`` refuses a per-layer list on megatron-core < 0.19).

Example (the training loop on CPU)::

    init_parallel(cfg.parallel, seed=...)      # switches the compat on (no-op on GPU machines)
    ... build model, DDP ...
    with compat_cpu.cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_cfg, [model])
    with compat_cpu.cuda_to_cpu():
        losses = forward_backward_func(...)
        optimizer.step()
"""

from __future__ import annotations

import contextlib
import importlib
import logging

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode

__all__ = ["activate", "is_active", "cuda_to_cpu", "CpuRNGStatesTracker", "NullStream"]

log = logging.getLogger(__name__)

_ACTIVE = False


def is_active() -> bool:
    """True once :func:`activate` has patched this (GPU-less) process."""
    return _ACTIVE


# ----------------------------------------------------------------------------- streams

class NullStream:
    """Stands in for ``torch.cuda.Stream`` on CPU: every synchronisation is already implied."""

    def wait_stream(self, *_a, **_k):
        return None

    def wait_event(self, *_a, **_k):
        return None

    def record_event(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- RNG tracker

class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """Megatron's named-RNG-state tracker, on the CPU default generator.

    ``add(name, seed)`` records a CPU generator state seeded with ``seed``;
    ``fork(name)`` installs it as the CPU default generator's state for the block and
    saves the advanced state back on exit (what the CUDA tracker does with CUDA states).
    """

    def __init__(self, *args, **kwargs):
        kwargs.pop("use_cudagraphable_rng", None)  # CUDA graphs do not exist on CPU
        super().__init__(*args, **kwargs)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _install_rng_tracker():
    original_init = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(*args, **kwargs):
        # Megatron (re)creates its tracker lazily; replace whatever it made with the CPU one.
        original_init(*args, **kwargs)
        if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
            inference = bool(kwargs.get("inference_rng_tracker", args[1] if len(args) > 1 else False))
            if inference:  # Megatron's inference tracker never touches the RNG: keep it
                return
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    # Activation checkpointing saves/restores "the CUDA RNG state" beside the CPU one; on CPU the
    # CPU state (saved separately by Megatron) is the whole story.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    initialize_rng_tracker(force_reset=True)


# ----------------------------------------------------------------------------- RoPE under CP

def _get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """Megatron's zigzag slice of the RoPE table (chunks r and 2cp-1-r), on pos_emb's device."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size = cp_group.size()
    cp_rank = cp_group.rank()
    cp_idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, cp_idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def _patch_rope():
    # By name: the function moved between megatron-core versions.
    for name in ("megatron.core.models.common.embeddings.rope_utils",
                 "megatron.core.models.common.embeddings.rotary_pos_embedding",
                 "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding"):
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - module moved in another version
            continue
        if hasattr(mod, "get_pos_emb_on_this_cp_rank"):
            mod.get_pos_emb_on_this_cp_rank = _get_pos_emb_on_this_cp_rank


# ----------------------------------------------------------------------------- activate

def activate() -> bool:
    """Patch this process so Megatron-Core runs on CPU; returns True when active.

    Does nothing (returns False) when a GPU is available. Idempotent. Called by
    :func:`moba_cp.megatron.parallel_init.init_parallel` (the one place), before the parallel
    state is built.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    null = NullStream()
    torch.cuda.current_stream = lambda *a, **k: null
    torch.cuda.default_stream = lambda *a, **k: null
    torch.cuda.synchronize = lambda *a, **k: None
    _install_rng_tracker()
    _patch_rope()
    _ACTIVE = True
    log.info("moba_cp.megatron.compat_cpu: Megatron-Core CPU compatibility active (no GPU found)")
    return True


# ----------------------------------------------------------------------------- cuda -> cpu mode

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int64: "torch.cuda.LongTensor",
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.split(":")[0] == "cuda"
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            t = args[0]
            if t.device.type == "cpu" and t.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[t.dtype]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu():
    """Context in which CUDA device requests become CPU ones (no-op where a GPU is present).

    Wrap Megatron calls that hard-code ``device='cuda'``: ``get_megatron_optimizer``,
    ``optimizer.step()``, ``forward_backward_func(...)``, checkpoint save/load.

    Raises:
        RuntimeError: no GPU and :func:`activate` has not run in this process.
    """
    if not _ACTIVE:
        if torch.cuda.is_available():
            yield
            return
        raise RuntimeError(
            "compat_cpu.cuda_to_cpu: Megatron-Core's CPU compat is not active in this GPU-less "
            "process, so Megatron's CUDA-only code would fail. Fix: initialise the parallel state "
            "first with moba_cp.megatron.parallel_init.init_parallel (it calls compat_cpu.activate())."
        )
    with _CudaToCpuMode():
        yield
