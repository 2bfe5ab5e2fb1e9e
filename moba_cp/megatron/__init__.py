"""Megatron-Core glue, one job per module (``docs/design.md`` section 3):

- :mod:`.core_attention`: ``MoBACoreAttention`` / ``FullCoreAttention`` for the ``core_attention`` slot;
- :mod:`.selection_memo`: a MoBA layer's selection kept from its forward for its recomputation;
- :mod:`.specs`: per-layer GPT block specs (MoBA / full / hybrid / explicit);
- :mod:`.hybrid_switch`: the MoBA -> full two-stage schedule;
- :mod:`.transformer_config`: a recipe as a ``TransformerConfig``;
- :mod:`.model`: ``build_gpt_model``;
- :mod:`.parallel_init`: parallel state and seeds (and the one switch-on of the CPU compat);
- :mod:`.optimizer`: DDP wrap and ``get_megatron_optimizer``;
- :mod:`.training_hooks`: the schedule wired to DDP and the optimizer;
- :mod:`.cp_batch`: a batch's zigzag CP shard;
- :mod:`.compat_cpu`: Megatron-Core on a machine without a GPU.

Submodules import megatron-core; import them explicitly (``from moba_cp.megatron.model import
build_gpt_model``), so that ``import moba_cp`` alone never needs it.
"""
