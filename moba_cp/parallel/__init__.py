"""Context parallelism for MoBA and full attention: the only package that talks to torch.distributed.

- :mod:`.zigzag`: Megatron's load-balancing layout (``zigzag_shard``/``zigzag_unshard``).
- :mod:`.gate`: centroid all-gather and top-k over the global causal candidates.
- :mod:`.exchange`: shape handshake, request bitmasks, the symmetric P2P ring, byte accounting.
- :mod:`.head_parallel`: the all-to-all of the ``"a2a"`` and ``"a2a+ring"`` comm types.
- :mod:`.failure`: bounded waits; a failing rank brings its CP group down with one message.
- :mod:`.traffic`: the bytes each comm type moves (arithmetic for the dry run and the analysis).
- :mod:`.moba_attn`: ``moba_attn_cp`` (``comm="ring"``: only the selected K/V blocks travel).
- :mod:`.ring_attn`: ``ring_attn_cp``, full causal attention on the same layout.
"""

from moba_cp.parallel.exchange import CPStats, last_stats  # noqa: F401
from moba_cp.parallel.failure import CPGroupFailure, exchange_timeout, set_exchange_timeout  # noqa: F401
from moba_cp.parallel.head_parallel import COMM_TYPES, comm_problem  # noqa: F401
from moba_cp.parallel.moba_attn import moba_attn_cp  # noqa: F401
from moba_cp.parallel.ring_attn import ring_attn_cp  # noqa: F401
from moba_cp.parallel.zigzag import zigzag_positions, zigzag_shard, zigzag_unshard  # noqa: F401

__all__ = ["moba_attn_cp", "ring_attn_cp", "zigzag_shard", "zigzag_unshard", "zigzag_positions", "CPStats",
           "last_stats", "COMM_TYPES", "comm_problem", "CPGroupFailure", "exchange_timeout", "set_exchange_timeout"]
