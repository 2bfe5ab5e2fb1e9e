"""Core-attention modules for Megatron-Core's ``SelfAttentionSubmodules.core_attention`` slot.

``MoBACoreAttention`` runs Mixture of Block Attention, ``FullCoreAttention`` causal full
attention; both take :class:`~megatron.core.transformer.dot_product_attention.DotProductAttention`'s
constructor (as megatron-core 0.16.1 and 0.19.x call it) and forward contract:

    query  [s_local, b, heads_per_tp, d]          (RoPE applied; s_local = S / cp, zigzag shard)
    key    [s_local, b, kv_heads_per_tp, d]       (GQA groups not expanded)
    value  [s_local, b, kv_heads_per_tp, d]
    ->     [s_local, b, heads_per_tp * d]

or, with THD ``packed_seq_params`` (``qkv_format='thd'``), ``[t, h, d] -> [t, h * d]`` with the
documents given by ``cu_seqlens_q`` (``cu_seqlens_q_padded`` when set).

Where the work goes:

=================  ========================================  ==================================
layer / mode        cp == 1                                   cp > 1 (zigzag shard)
=================  ========================================  ==================================
MoBA                ``moba_cp.ops.moba.moba_attn``            ``moba_cp.parallel.moba_attn_cp``
full (torch)        ``F.scaled_dot_product_attention``        ``moba_cp.parallel.ring_attn_cp``
full (te)           Megatron's ``TEDotProductAttention`` (its own CP), only where TE is installed
=================  ========================================  ==================================

The tensor-parallel head split needs nothing here: each TP rank sees its own heads (and the
KV heads of their groups), and attention is independent per head. The CP group comes from
``pg_collection.cp`` (or ``parallel_state``); the layout is Megatron's zigzag one
(``megatron.core.utils.get_batch_on_this_cp_rank``), which is also the layout RoPE assumes.

Softmax scale: the ``softmax_scale`` argument (Megatron passes ``config.softmax_scale``), else
``1/sqrt(head_dim)``. ``apply_query_key_layer_scaling`` divides the scale by the layer number and
multiplies the fp32 softmax input back by it in ``DotProductAttention``: the product is the same,
so it is a no-op for these fp32-softmax kernels and is ignored.

Both modules carry an ``attention_mode`` flag (``'moba'`` / ``'full'``): a MoBA layer set to
``'full'`` runs full attention with the same weights (the two-stage schedule,
:mod:`moba_cp.megatron.hybrid_switch`). A layer built as full attention stays full.

Attention dropout is not supported by the MoBA and ring kernels: a config asking for it is an
error at construction (moba_cp's model builder sets ``attention_dropout=0``).

Under selective recomputation (core attention runs twice a step) a MoBA layer on one device keeps
its first pass's block selection for the recomputation (:mod:`moba_cp.megatron.selection_memo`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from moba_cp.megatron.key_conv import KeyConv
from moba_cp.megatron.selection_memo import INDEX_MAX_BYTES, SelectionMemo, reuse_enabled
from moba_cp.ops.moba.api import block_attn, gather_index, moba_attn, select_blocks, takes_graphed_path
from moba_cp.ops.moba.triton_config import compact_selection_dtype
from moba_cp.ops.moba.validate import check_block_args, check_qkv
from moba_cp.parallel import moba_attn_cp, ring_attn_cp

__all__ = ["MoBACoreAttention", "FullCoreAttention", "te_available", "MODES"]

MODES = ("moba", "full")

FULL_BACKENDS = ("auto", "torch", "te")
#: Megatron's ``cp_comm_type`` names -> moba_cp's ``comm=`` (moba_cp's own names map to themselves)
CP_COMM_FROM_MEGATRON = {"p2p": "ring", "a2a": "a2a", "a2a+p2p": "a2a+ring", "ring": "ring", "a2a+ring": "a2a+ring"}
#: the recipe's ``parallel.cp_comm`` -> Megatron's ``TransformerConfig.cp_comm_type``
MEGATRON_CP_COMM = {"ring": "p2p", "a2a": "a2a", "a2a+ring": "a2a+p2p"}


def _cp_comm(cp_comm_type, config) -> tuple[str, int | None]:
    """moba_cp's ``(comm, a2a_size)`` for a Megatron ``cp_comm_type`` and config."""
    comm = CP_COMM_FROM_MEGATRON.get(cp_comm_type or "p2p")
    if comm is None:
        raise ValueError(
            f"cp_comm_type={cp_comm_type!r} is not supported by moba_cp's attention; choose one of "
            f"{', '.join(sorted(CP_COMM_FROM_MEGATRON))} (recipe: parallel.cp_comm = ring | a2a | a2a+ring).")
    sizes = getattr(config, "hierarchical_context_parallel_sizes", None)
    if comm != "a2a+ring":
        return comm, None
    if not sizes:
        raise ValueError(f"cp_comm_type={cp_comm_type!r} needs config.hierarchical_context_parallel_sizes = "
                         f"[a2a_size, cp // a2a_size] (recipe: parallel.a2a_size).")
    return comm, int(sizes[0])


def te_available() -> bool:
    """Whether Megatron's Transformer Engine attention can be built here."""
    try:  # optional dependency: transformer-engine
        from megatron.core.extensions.transformer_engine import TEDotProductAttention  # noqa: F401
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or TE failing to load its CUDA libraries
        return False
    return True


class _CoreAttentionBase(MegatronModule):
    """Shared constructor, shape handling and the full-attention paths.

    Args (as ``DotProductAttention``):
        config: the layer's ``TransformerConfig``.
        layer_number: 1-based layer index.
        attn_mask_type: must be ``AttnMaskType.causal`` (or ``padding_causal`` with THD).
        attention_type: ``'self'`` (cross attention is not supported).
        attention_dropout: overrides ``config.attention_dropout``; must be 0.
        softmax_scale: default ``1/sqrt(kv_channels)``.
        cp_comm_type: the CP comm type of moba_cp's ops (:data:`CP_COMM_FROM_MEGATRON`): Megatron's
            ``'p2p'`` / ``'a2a'`` / ``'a2a+p2p'`` (= moba_cp's ``'ring'`` / ``'a2a'`` / ``'a2a+ring'``,
            which are accepted too; ``a2a_size`` from ``config.hierarchical_context_parallel_sizes[0]``);
            None = ``'ring'``. The TE full backend forwards it (default ``'p2p'``).
        pg_collection: process groups; ``.tp`` and ``.cp`` are read when present.
    Keyword args from the spec's ``params``:
        full_backend: ``'auto'`` (= ``'torch'``), ``'torch'`` or ``'te'``.
        moba_block_size, moba_topk, moba_backend: the MoBA parameters (MoBA layers only).
        moba_key_conv: width of the key convolution (:mod:`moba_cp.megatron.key_conv`; MoBA layers
            only, 0 = none).
        moba_kernel: Triton tiling overrides (``moba.kernel``; '' = the defaults).
        mode: the initial ``attention_mode``.
    """

    #: which kind the layer was built as; only 'moba' layers may switch modes
    base_kind = "full"

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        *,
        full_backend: str = "auto",
        moba_block_size: Optional[int] = None,
        moba_topk: Optional[int] = None,
        moba_backend: str = "auto",
        moba_kernel: str = "",
        mode: Optional[str] = None,
        model_comm_pgs=None,  # older megatron-core name of pg_collection
        **unused_kwargs,  # future DotProductAttention arguments: accepted, documented as ignored
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = model_comm_pgs
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if attention_type != "self":
            raise ValueError(f"{type(self).__name__}: attention_type={attention_type!r}; only 'self' is supported.")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"{type(self).__name__}: attention dropout {dropout} is not supported by the MoBA and "
                f"ring-attention kernels. Fix: set TransformerConfig.attention_dropout=0."
            )
        kv_channels = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(kv_channels)

        self.tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
        self.cp_group = cp_group
        self.cp_comm, self.a2a_size = _cp_comm(cp_comm_type, config)
        self.cp_size = cp_group.size() if cp_group is not None else 1
        if self.cp_size != config.context_parallel_size:
            raise ValueError(
                f"{type(self).__name__}: the CP group has {self.cp_size} ranks but "
                f"config.context_parallel_size={config.context_parallel_size}."
            )

        if full_backend not in FULL_BACKENDS:
            raise ValueError(f"full_backend={full_backend!r}; choose one of {', '.join(FULL_BACKENDS)}.")
        self.full_backend = "torch" if full_backend == "auto" else full_backend
        self._te = None
        if self.full_backend == "te":
            if not te_available():
                raise RuntimeError(
                    "attention.full_backend='te' asks for Transformer Engine attention, but "
                    "transformer-engine is not installed (or fails to load). Fix: pip install "
                    "'moba-cp[te]', or set attention.full_backend=torch (SDPA / moba_cp ring attention)."
                )
            from megatron.core.extensions.transformer_engine import TEDotProductAttention  # optional: TE

            # A submodule without parameters: TE's fused attention (and its own CP) for full mode.
            self._te = TEDotProductAttention(
                config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type=attention_type, attention_dropout=attention_dropout,
                softmax_scale=softmax_scale, cp_comm_type=cp_comm_type or "p2p", pg_collection=pg_collection,
            )

        self.moba_block_size = moba_block_size
        self.moba_topk = moba_topk
        self.moba_backend = moba_backend
        self.moba_kernel = moba_kernel
        self.attention_mode = mode or self.base_kind
        self.set_mode(self.attention_mode)

    # ------------------------------------------------------------------ mode

    def set_mode(self, mode: str) -> None:
        """Switch between ``'moba'`` and ``'full'`` (only layers built as MoBA can run MoBA)."""
        if mode not in MODES:
            raise ValueError(f"attention mode {mode!r}; choose one of {', '.join(MODES)}.")
        if mode == "moba" and self.base_kind != "moba":
            raise ValueError(
                f"layer {self.layer_number} was built as full attention; it has no MoBA parameters "
                f"and cannot switch to 'moba'."
            )
        self.attention_mode = mode

    def extra_repr(self) -> str:
        s = f"mode={self.attention_mode}, cp={self.cp_size}, cp_comm={self.cp_comm}, full_backend={self.full_backend}"
        if self.base_kind == "moba":
            s += f", block_size={self.moba_block_size}, topk={self.moba_topk}, backend={self.moba_backend}"
        return s

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        *,
        memo_inputs: Optional[tuple] = None,
        **unused_kwargs,
    ) -> torch.Tensor:
        """Causal attention of one layer; see the module docstring for shapes.

        ``attention_mask`` is not read: masking is causal by construction (and per document
        with THD ``cu_seqlens``); an arbitrary mask or an attention bias is an error.
        ``memo_inputs``: the tensors whose identity keys a MoBA layer's selection kept for the
        recomputation (:mod:`moba_cp.megatron.selection_memo`; None: no reuse).
        """
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__}: attention_bias is not supported.")
        thd = packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "thd") == "thd"
        allowed = (AttnMaskType.causal, AttnMaskType.padding_causal) if thd else (AttnMaskType.causal,)
        if mask_type not in allowed:
            raise ValueError(
                f"{type(self).__name__}: attn_mask_type={mask_type}; only causal masking is supported "
                f"(documents are separated with THD packed_seq_params)."
            )
        if self.attention_mode == "full" and self._te is not None:
            return self._te(query, key, value, attention_mask, attn_mask_type=mask_type,
                            attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if thd:
            return self._forward_thd(query, key, value, packed_seq_params, memo_inputs)
        return self._forward_sbhd(query, key, value, memo_inputs)

    def _moba(self, q, k, v, cu, memo_inputs):
        """``moba_attn`` on one device, ``[T, H, D]`` (``cu``: documents or None). Under selective
        recomputation (``memo_inputs`` set) the checkpointed pass keeps its selection (and its
        gather index when small) and the recomputation reuses them
        (:mod:`moba_cp.megatron.selection_memo`). Calls that replay CUDA graphs select inside the
        graph (one replay is cheaper on the host) and keep nothing."""
        kw = dict(block_size=self.moba_block_size, cu_seqlens=cu, backend=self.moba_backend, kernel=self.moba_kernel)
        if memo_inputs is None or takes_graphed_path(q, cu, self.moba_backend):
            return moba_attn(q, k, v, topk=self.moba_topk, softmax_scale=self.softmax_scale, **kw)
        # (the key is made only here: graphed calls, host-bound, skip its cost)
        memo_key = self._selection_memo.key(memo_inputs, extra=(self.moba_block_size, self.moba_topk))
        if torch.is_grad_enabled():  # the recomputation in the backward pass
            kept = self._selection_memo.take(memo_key)
            if kept is None:  # not kept by this layer's first pass: select again
                return moba_attn(q, k, v, topk=self.moba_topk, softmax_scale=self.softmax_scale, **kw)
            selection, index = kept  # index None: not kept (too large), block_attn builds it
        else:  # the checkpointed forward: select, keep the ids in 1-2 bytes (exact) and a small index
            selection = select_blocks(q, k, topk=self.moba_topk, **kw)
            index = gather_index(q, k, selection, **kw)  # None on the naive backend
            small = index is not None and index.numel() * index.element_size() <= INDEX_MAX_BYTES
            compact = selection.to(compact_selection_dtype(q.shape[0], self.moba_block_size))
            self._selection_memo.put(memo_key, (compact, index if small else None))
        return block_attn(q, k, v, selection, softmax_scale=self.softmax_scale, index=index, **kw)[0]

    def _forward_sbhd(self, q, k, v, memo_inputs=None):
        """``[s, b, h, d]`` in, ``[s, b, h*d]`` out."""
        check_qkv(q, k, v, op=type(self).__name__, layouts=("[s, b, H, D]",))
        s, b, hq, d = q.shape
        if self.cp_size > 1:
            # The CP ops take this rank's zigzag shard of the sequences.
            if b == 1:
                o = self._attend_cp(q[:, 0], k[:, 0], v[:, 0]).unsqueeze(1)
            else:
                # both CP ops also take a batch, [b, S_local, H, D]: one exchange for all rows
                o = self._attend_cp(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
        elif self.attention_mode == "moba":
            # Batch rows as heads: [s, b, h, d] -> [s, b*h, d] (row i, head h -> head i*h + h, so
            # query head i*Hq + h still reads KV head i*Hkv + h // g). It is a view of Megatron's
            # layout (also of the k/v slices of its fused QKV output), where packing rows as
            # documents ([b*s, h, d]) copied q, k, v and o in every layer and their gradients back
            # (one H200, 4 x 8K rows, 6 layers: ~8 ms of copies per step, the whole gap between
            # MoBA and full attention's step there).
            fold = lambda t: t.reshape(s, b * t.shape[2], d)  # noqa: E731
            o = self._moba(fold(q), fold(k), fold(v), None, memo_inputs)
        else:
            # SDPA wants [b, h, s, d]; GQA through enable_gqa (no expanded copies of k/v).
            o = F.scaled_dot_product_attention(
                q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                is_causal=True, scale=self.softmax_scale, enable_gqa=hq != k.shape[2],
            ).permute(2, 0, 1, 3)
        return o.reshape(s, b, hq * d)

    def _attend_cp(self, q, k, v):
        """Zigzag-sharded ``[S_local, H, D]`` or ``[b, S_local, H, D]`` under CP."""
        comm = dict(comm=self.cp_comm, a2a_size=self.a2a_size)
        if self.attention_mode == "moba":
            return moba_attn_cp(
                q, k, v, block_size=self.moba_block_size, topk=self.moba_topk, cp_group=self.cp_group,
                softmax_scale=self.softmax_scale, backend=self.moba_backend, kernel=self.moba_kernel, **comm,
            )
        return ring_attn_cp(q, k, v, cp_group=self.cp_group, softmax_scale=self.softmax_scale, **comm)

    def _forward_thd(self, q, k, v, packed_seq_params, memo_inputs=None):
        """``[t, h, d]`` packed documents in, ``[t, h*d]`` out."""
        if q.dim() == 4:  # Megatron squeezes the dummy batch dim before core attention; be lenient
            q, k, v = q.squeeze(1), k.squeeze(1), v.squeeze(1)
        check_qkv(q, k, v, op=type(self).__name__, layouts=("[t, H, D]",))
        if self.cp_size > 1:
            raise NotImplementedError(
                "THD (packed documents) under context parallelism is not supported by moba_cp's "
                "attention yet (it shards each sequence as one zigzag document). Fix: use cp=1 for "
                "packed batches, or the BSHD layout with one sequence per row."
            )
        cu = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        cu = cu.to(device=q.device, dtype=torch.int32)
        t, hq, d = q.shape
        if self.attention_mode == "moba":
            o = self._moba(q, k, v, cu, memo_inputs)
        else:
            o = torch.empty_like(q)
            bounds = cu.tolist()
            for a, z in zip(bounds[:-1], bounds[1:]):
                if z > a:  # one causal SDPA call per document
                    o[a:z] = F.scaled_dot_product_attention(
                        q[a:z].transpose(0, 1), k[a:z].transpose(0, 1), v[a:z].transpose(0, 1),
                        is_causal=True, scale=self.softmax_scale, enable_gqa=hq != k.shape[1],
                    ).transpose(0, 1)
            if bounds[-1] < t:
                o[bounds[-1]:] = 0  # padding past the last document
        return o.reshape(t, hq * d)


class MoBACoreAttention(_CoreAttentionBase):
    """MoBA in the ``core_attention`` slot (``moba_attn_cp`` under CP, ``moba_attn`` otherwise).

    Build it through a spec, so the MoBA parameters travel with it::

        ModuleSpec(module=MoBACoreAttention,
                   params={"moba_block_size": 128, "moba_topk": 8, "moba_backend": "auto",
                           "full_backend": "auto"})

    ``attention_mode = 'full'`` (see :func:`moba_cp.megatron.hybrid_switch.set_attention_mode`)
    makes it run full causal attention with the same projections.
    """

    base_kind = "moba"

    def __init__(self, *args, moba_key_conv: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        # the spec's params moba_block_size / moba_topk, by the op's own rule
        check_block_args(self.moba_block_size, self.moba_topk, op="MoBACoreAttention spec params")
        # moba.key_conv: the keys of this layer (gate and attention, either mode) are convolved first
        self.key_conv = (KeyConv(self.config, int(moba_key_conv), self.tp_group, self.layer_number)
                         if moba_key_conv else None)
        # Megatron checkpoints core attention (runs it twice a step) exactly when this holds
        # (``Attention.checkpoint_core_attention``); the selection is then kept between the passes.
        self._recomputed = (getattr(self.config, "recompute_granularity", None) == "selective"
                            and "core_attn" in (getattr(self.config, "recompute_modules", None) or ["core_attn"]))
        self._selection_memo = SelectionMemo()

    def _memo_inputs(self, query, key, cu) -> Optional[tuple]:
        """The tensors whose identity keys this call's kept selection when the recomputation can
        reuse it (training, one device, selective recomputation; ``MOBA_CP_REUSE_SELECTION``), else
        None. ``key`` is the layer's input, before the key convolution (which the recomputation runs
        again into a new tensor); the convolution's weights are part of the identity."""
        if not (self.training and self._recomputed and self.attention_mode == "moba" and self.cp_size == 1
                and reuse_enabled()):
            return None
        if torch.is_inference_mode_enabled() or query.is_inference() or key.is_inference():
            return None  # inference tensors have no version counter (and no backward to reuse for)
        conv = tuple(self.key_conv.parameters()) if self.key_conv is not None else ()
        return (query, key, cu, *conv)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        thd = packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "thd") == "thd"
        cu = None
        if thd:
            cu = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        memo_inputs = self._memo_inputs(query, key, cu)
        if self.key_conv is not None:
            key = self.key_conv(key, cp_group=self.cp_group if self.cp_size > 1 else None, cu_seqlens=cu)
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                               memo_inputs=memo_inputs, **kwargs)


class FullCoreAttention(_CoreAttentionBase):
    """Causal full attention: ``ring_attn_cp`` under CP, SDPA otherwise, TE when asked.

    Spec::

        ModuleSpec(module=FullCoreAttention, params={"full_backend": "auto"})
    """

    base_kind = "full"
