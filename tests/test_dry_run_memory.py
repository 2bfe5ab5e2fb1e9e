"""The dry run's memory estimate of what MoBA layers keep for their backward."""

from moba_cp.config import load_recipe
from moba_cp.train.dry_run import estimate_memory

_128K = ["--model.seq_length=131072", "--moba.block_size=1024", "--moba.topk=12", "--train.recompute=none"]


def test_keep_index_off_shrinks_the_saved_moba_state_to_one_byte_per_id():
    keep = estimate_memory(load_recipe("recipes/1gpu-32k.yaml", _128K), vocab_size=50304, dp=1)
    drop = estimate_memory(load_recipe("recipes/1gpu-32k.yaml", _128K + ["--moba.kernel=bwd.keep_index=false"]),
                           vocab_size=50304, dp=1)
    # 131072 tokens x 16 heads x top-12 x 24 layers: int32 ids (4 bytes) against int8 (128 blocks per call)
    assert keep.moba_extra == 131072 * 16 * 12 * 4 * 24
    assert drop.moba_extra == keep.moba_extra / 4
    assert drop.activations == keep.activations and drop.total < keep.total
    # micro-batch rows fold into heads: a call still holds one 128-block sequence, so still int8
    two = estimate_memory(load_recipe("recipes/1gpu-32k.yaml", _128K + ["--moba.kernel=bwd.keep_index=false",
                                                                        "--train.micro_batch_size=2",
                                                                        "--train.global_batch_size=2"]),
                          vocab_size=50304, dp=1)
    assert two.moba_extra == 2 * drop.moba_extra


def test_keep_index_off_uses_int16_past_128_blocks_and_nothing_changes_under_cp():
    cfg = load_recipe("recipes/1gpu-32k.yaml", _128K + ["--moba.block_size=512", "--moba.kernel=bwd.keep_index=false"])
    assert estimate_memory(cfg, vocab_size=50304, dp=1).moba_extra == 131072 * 16 * 12 * 2 * 24  # 256 blocks
    cp = load_recipe("recipes/2gpu-128k.yaml", ["--moba.kernel=bwd.keep_index=false"])
    ref = load_recipe("recipes/2gpu-128k.yaml")
    # the CP slot form keeps its index whatever keep_index says (the option is the single-device op's)
    assert estimate_memory(cp, 50304, 1).moba_extra == estimate_memory(ref, 50304, 1).moba_extra


def test_recomputation_keeps_one_index_and_every_layers_selection():
    ids = 131072 * 16 * 12  # tokens x heads x top-12 of one layer
    sel = estimate_memory(load_recipe("recipes/1gpu-32k.yaml", _128K[:-1] + ["--train.recompute=selective"]), 50304, 1)
    # one layer's int32 gather index (recomputed forward to backward) + 24 layers' int8 selections (the memo)
    assert sel.moba_extra == ids * 4 + ids * 1 * 24
    full = estimate_memory(load_recipe("recipes/1gpu-32k.yaml", _128K[:-1] + ["--train.recompute=full"]), 50304, 1)
    assert full.moba_extra == ids * 4  # whole layers run again: nothing is kept between the passes
    # at 32K (top-3) a layer's gather index is small (~6 MB): every layer keeps it with its selection
    ids = 32768 * 16 * 3
    at32k = estimate_memory(load_recipe("recipes/1gpu-32k.yaml", ["--train.recompute=selective"]), 50304, 1)
    assert at32k.moba_extra == ids * 4 + (ids * 1 + ids * 4) * 24


def test_the_fused_swiglu_keeps_two_ffn_rows_a_token_less():
    fused = estimate_memory(load_recipe("recipes/1gpu-32k.yaml"), 50304, 1)  # model.fused_ops=auto
    unfused = estimate_memory(load_recipe("recipes/1gpu-32k.yaml", ["--model.fused_ops=torch"]), 50304, 1)
    # 32768 tokens x 24 layers x 2 x FFN 2752 x 2 bytes: what the unfused SwiGLU keeps beyond fc1's
    # output (counted on an H100 by saved_activations.py: 22,016 against 11,008 bytes a token)
    assert unfused.activations - fused.activations == 32768 * 24 * 2 * 2752 * 2
    # against the H100's training peaks at 32K, micro-batch 1 (session 29): 37.3 GiB unfused, 28.9 fused
    gib = lambda cfg: estimate_memory(cfg, 384, 1).total / 2**30  # noqa: E731  (the byte tokenizer's vocab)
    assert abs(gib(load_recipe("recipes/1gpu-32k.yaml", ["--model.fused_ops=torch"])) - 37.3) < 1.0
    assert abs(gib(load_recipe("recipes/1gpu-32k.yaml")) - 28.9) < 1.0
    gelu = [load_recipe("recipes/1gpu-32k.yaml", ["--model.swiglu=false", f"--model.fused_ops={ops}"])
            for ops in ("auto", "torch")]
    assert estimate_memory(gelu[0], 50304, 1).activations == estimate_memory(gelu[1], 50304, 1).activations
