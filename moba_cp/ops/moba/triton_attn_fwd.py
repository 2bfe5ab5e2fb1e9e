"""Triton kernels: block-sparse MoBA attention forward (key-block-major, gathered queries).

Work unit: one tile of up to ``BM`` *entries* of one bucket (query head ``h``, key block
``g``), i.e. ``BM`` query rows that all selected block ``g``, gathered into a dense tile and
multiplied with the block's keys in sub-tiles of ``BN``. Every tile has the same size, so a
1-D grid is balanced however unevenly blocks are selected.

A query's blocks are spread over several programs, so the softmax over a row's blocks is
combined in one of three ways (``FwdConfig.method``, chosen from the shape by
``triton_config.choose_config``):

* ``partials``: each program streams its gathered rows over the block's keys with an online
  softmax (two products per key tile, like a dense flash kernel) and writes each entry's
  normalised partial output (fp32) and LSE; a merge kernel combines a row's ``W`` partials by
  LSE. The partials exist for one chunk of query heads at a time (bounded memory).
* ``two_pass``: pass 1 stores each entry's LSE, a small kernel reduces them per row, pass 2
  adds the normalised ``exp(s - lse) @ V`` into an fp32 ``o`` with atomics (three products per
  key tile, no partial buffer).
* ``one_pass``: a program owns a chunk of tokens of one head and walks the key blocks in order,
  keeping each row's online-softmax state in fp32 scratch (no atomics, no partials).

In the partials forward (and the backward's dQ kernel) key sub-tiles that every row of a tile
sees in full (all of a past block's) skip the causal mask; only the own block's diagonal (and
a short last block) pays for it.
