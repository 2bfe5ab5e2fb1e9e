"""Public MoBA entry points: validation, backend choice, the packed and batched forms."""

from __future__ import annotations

import functools
import logging
import os

import torch

from moba_cp.ops.moba import naive
from moba_cp.ops.moba.cuda_graphs import graphs_enabled, static_offsets
from moba_cp.ops.moba.triton_config import parse_overrides
from moba_cp.ops.moba.validate import check_block_args, check_cu_seqlens, check_qkv

try:  # the one place a missing triton is handled: 'naive' then serves every call ('auto' picks it)
    from moba_cp.ops.moba import triton_backend
except ImportError as e:
    triton_backend = None
    _TRITON_MISSING = f"the Triton backend cannot be imported ({e}). Fix: pip install triton"

log = logging.getLogger(__name__)

BACKENDS = ("naive", "triton")
_announced: set[tuple[str, str]] = set()


def backend_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    device = torch.device(device)
    if name == "naive":
        return None
    if name == "triton":
        if triton_backend is None:
            return _TRITON_MISSING
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            return (
                f"Triton kernels need a CUDA device (got {device}); on CPU they run only in the "
                f"interpreter (TRITON_INTERPRET=1)"
            )
        return None
    return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"


def kernel_on_naive_problem(kernel: str, backend: str, device_type: str) -> str:
    """The refusal of tiling overrides (``kernel``) for a call that runs the naive oracle."""
    return (f"kernel={kernel!r} sets the Triton kernels' tiling, but backend={backend!r} runs the naive oracle "
            f"on {device_type}, which has none. Fix: drop kernel, or use backend='triton' (a CUDA GPU, or "
            f"TRITON_INTERPRET=1 on CPU)")


def choose_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` ("auto" or an explicit name) for ``device``.

    "auto" takes Triton on CUDA when available, else the naive oracle, and logs its choice
    once per device type. An explicit backend that cannot run raises, never falls back.
    """
    device = torch.device(device)
    if backend == "auto":
        chosen = "triton" if (device.type == "cuda" and backend_unavailable_reason("triton", device) is None) else "naive"
        if (device.type, chosen) not in _announced:
            _announced.add((device.type, chosen))
            log.info("moba_attn backend='auto' chose %r on %s", chosen, device.type)
        return chosen
    if backend not in BACKENDS:
        raise ValueError(
            f"moba_attn: backend={backend!r} is unknown; choose one of "
            f"{', '.join(repr(b) for b in BACKENDS)} or 'auto'."
        )
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(
            f"moba_attn: backend={backend!r} was requested but is unavailable: {reason}. "
            f"Fix: install what it needs, or pass backend='auto' (which picks the best available)."
        )
    return backend


def moba_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    kernel: str = "",
):
    """Mixture of Block Attention over packed documents.

    Args:
        q: ``[T, Hq, D]`` queries (RoPE applied); k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0``.
        block_size: tokens per block ``B`` (cut per document; the last block may be short).
        topk: blocks per query *including its own block*; ``topk >= n_blocks`` is causal
            full attention, ``topk = 1`` block-local causal attention.
        cu_seqlens: int32 ``[n_docs + 1]`` document offsets (documents never see each other);
            None means one document.
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return the fp32 natural-log LSE ``[T, Hq]``.
        backend: "naive", "triton" or "auto" (see :func:`choose_backend`).
        kernel: Triton tiling overrides on top of the shape's default, e.g.
            ``"bwd.dq_rows=true,gate.split_edges=true"`` (``triton_config.parse_overrides``);
            an error with the naive backend, which has no tiling.
    Returns:
        ``o [T, Hq, D]`` in q's dtype, and ``lse [T, Hq]`` fp32 when ``return_lse``.

    Algorithm (``docs/design.md`` section 1):
        1. centroid of each complete block = mean of its keys (fp32);
        2. gate: ``q_i . centroid_j`` for complete past blocks ``j < i // B`` (no gradient);
        3. select the own block plus the ``topk - 1`` best past blocks, per token and head;
        4. softmax attention over the selected blocks' keys, own block causally.

    Example:
        >>> q = torch.randn(1000, 8, 64); k = v = torch.randn(1000, 2, 64)
        >>> o = moba_attn(q, k, v, block_size=128, topk=3)
    """
    check_qkv(q, k, v)
    check_block_args(block_size, topk)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    name = choose_backend(backend, q.device)
    config = _triton_config(q, k, block_size, kernel, backend, name, "moba_attn")
    if name == "naive":
        o, lse = naive.moba_attn_naive(
            q, k, v, block_size=block_size, topk=topk, cu_seqlens=cu_seqlens, softmax_scale=scale
        )
    else:
        o, lse = triton_backend.moba_attn(
            q, k, v, block_size=block_size, topk=topk, cu_seqlens=cu_seqlens, softmax_scale=scale, config=config
        )
    return (o, lse) if return_lse else o


@functools.lru_cache(maxsize=16)
def batch_cu_seqlens(b: int, s: int, device: torch.device) -> torch.Tensor:
    """``[b + 1]`` int32 offsets of ``b`` rows of ``s`` tokens packed as documents (read-only).

    One tensor per (b, s, device), reused by every call: ``check_cu_seqlens`` reads a new
    tensor's values on the host (a device sync) and the Triton backend caches its block tables
    per tensor, so a fresh tensor in every layer would stall the stream and rebuild the tables
    each time. Callers must not write to it.
    """
    # process-lifetime and never written: a CUDA graph may read it by address (cuda_graphs)
    return static_offsets(torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device))


def moba_attn_bshd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False, **kwargs
):
    """Batched convenience: ``q [B, S, Hq, D]``, ``k/v [B, S, Hkv, D]`` -> ``o [B, S, Hq, D]``.

    A thin wrapper: each batch row becomes one document of a packed call to :func:`moba_attn`
    (same keyword arguments; ``cu_seqlens`` is built here). ``lse`` comes back ``[B, S, Hq]``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"moba_attn_bshd: expected 4-D [B, S, H, D] inputs, got q{tuple(q.shape)}, "
            f"k{tuple(k.shape)}, v{tuple(v.shape)}. Fix: use moba_attn for packed [T, H, D]."
        )
    if "cu_seqlens" in kwargs:
        raise ValueError("moba_attn_bshd: cu_seqlens is built from the batch; use moba_attn for packed documents.")
    b, s = q.shape[:2]
    if k.shape[:2] != (b, s) or v.shape[:2] != (b, s):
        raise ValueError(
            f"moba_attn_bshd: batch/sequence dims differ: q{tuple(q.shape[:2])}, "
            f"k{tuple(k.shape[:2])}, v{tuple(v.shape[:2])}; they must match."
        )
    cu = batch_cu_seqlens(b, s, q.device)
    out = moba_attn(
        q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]),
        cu_seqlens=cu, return_lse=True, **kwargs,
    )
    o, lse = out
    o = o.reshape(b, s, *q.shape[2:])
    return (o, lse.reshape(b, s, q.shape[2])) if return_lse else o


def _triton_config(q, k, block_size: int, kernel: str, backend: str, name: str, op: str):
    """The Triton tiling for ``kernel``'s overrides (None: the shape's default); an error when
    the call runs the naive oracle, which has no tiling."""
    if not kernel:
        return None
    parse_overrides(kernel)  # malformed overrides are an error whatever the backend
    if name == "naive":
        raise ValueError(f"{op}: {kernel_on_naive_problem(kernel, backend, q.device.type)}.")
    return triton_backend.call_config(q, k, block_size, kernel)


def select_blocks(q, k, *, block_size: int, topk: int, cu_seqlens=None, backend: str = "auto", kernel: str = ""):
    """Validated MoBA selection: ``[T, Hq, W]`` int32 document-local block ids (see ``naive``).
    ``kernel``: Triton tiling overrides, as :func:`moba_attn` takes them (the gate's part applies)."""
    check_qkv(q, k, k, op="select_blocks")
    check_block_args(block_size, topk, op="select_blocks")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, op="select_blocks")
    name = choose_backend(backend, q.device)
    config = _triton_config(q, k, block_size, kernel, backend, name, "select_blocks")
    if name == "naive":
        return naive.select_blocks(q, k, block_size=block_size, topk=topk, cu_seqlens=cu_seqlens)
    return triton_backend.select_blocks(q, k, block_size=block_size, topk=topk, cu_seqlens=cu_seqlens, config=config)


def gather_index(q, k, indices, *, block_size: int, cu_seqlens=None, backend: str = "auto", kernel: str = ""):
    """The Triton backend's gather index of ``indices [T, Hq, W]`` (int32, what
    :func:`block_attn` builds before its kernels), for :func:`block_attn`'s ``index``: built
    once, it serves every call on that selection with the same arguments. None for the naive
    backend, which has none."""
    check_qkv(q, k, k, op="gather_index")
    check_block_args(block_size, 1, op="gather_index")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, op="gather_index")
    name = choose_backend(backend, q.device)
    config = _triton_config(q, k, block_size, kernel, backend, name, "gather_index")
    if name == "naive":
        return None
    return triton_backend.gather_index(q, k, indices.to(torch.int32), block_size=block_size, cu_seqlens=cu_seqlens,
                                       config=config)


def block_attn(q, k, v, indices, *, block_size: int, cu_seqlens=None, softmax_scale=None, backend: str = "auto",
               kernel: str = "", index: torch.Tensor | None = None):
    """Validated attention over given block ``indices`` ``[T, Hq, W]``; returns ``(o, lse)``.

    ``indices`` hold ids of blocks of each token's own document (``-1`` = none), as
    :func:`select_blocks` returns them (any integer dtype). Their shape is checked; their values
    are not (that would cost a device sync), and an id outside the token's document gives
    undefined results. ``kernel``: Triton tiling overrides, as :func:`moba_attn` takes them.
    ``index``: the :func:`gather_index` of the same arguments (Triton only; None: built here).
    ``moba_attn`` is :func:`select_blocks` then this, bit for bit, except where it replays CUDA
    graphs (:func:`takes_graphed_path`), whose kernels are the same."""
    check_qkv(q, k, v, op="block_attn")
    check_block_args(block_size, 1, op="block_attn")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, op="block_attn")
    if indices.dim() != 3 or indices.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"block_attn: indices has shape {tuple(indices.shape)}; expected [T, Hq, W] = "
            f"[{q.shape[0]}, {q.shape[1]}, W] (from select_blocks)."
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    name = choose_backend(backend, q.device)
    config = _triton_config(q, k, block_size, kernel, backend, name, "block_attn")
    if indices.dtype != torch.int32:
        indices = indices.to(torch.int32)  # a compacted selection (1-2 bytes an id) is widened here
    if name == "naive":
        if index is not None:
            raise ValueError(f"block_attn: an index was given, but backend={backend!r} runs the naive oracle on "
                             f"{q.device.type}, which uses none. Fix: pass index=None (gather_index returns None "
                             f"for the naive backend).")
        return naive.block_attn(q, k, v, indices, block_size=block_size, cu_seqlens=cu_seqlens, softmax_scale=scale)
    return triton_backend.block_attn(
        q, k, v, indices, block_size=block_size, cu_seqlens=cu_seqlens, softmax_scale=scale, config=config,
        index=index,
    )


def takes_graphed_path(q: torch.Tensor, cu_seqlens=None, backend: str = "auto") -> bool:
    """Whether :func:`moba_attn` on ``q [T, Hq, D]`` (and ``cu_seqlens``) replays CUDA graphs:
    short calls of the Triton backend on a GPU (``cuda_graphs.graphs_enabled``), where the
    selection runs inside the forward's graph and one replay costs less host time than calling
    :func:`select_blocks` and :func:`block_attn` apart."""
    return choose_backend(backend, q.device) == "triton" and graphs_enabled(q, cu_seqlens)
