"""FLOPs accounting against a count done by hand (so logs and scaling axes are honest)."""

import pytest

from moba_cp.train.flops import attended_keys, gate_candidates, model_flops_per_sequence

KW = dict(num_layers=1, hidden_size=4, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=8,
          vocab_size=10, seq_length=6, swiglu=False, block_size=2, topk=2)


def test_attended_keys_by_hand():
    # S=6, B=2, topk=2: position i sees (i % 2 + 1) own-block keys + 2 * min(1, i // 2) past keys
    # -> 1, 2, 3, 4, 3, 4 = 17; full causal attention: 1 + ... + 6 = 21.
    assert attended_keys(6, 2, 2) == 17
    assert attended_keys(6) == 21
    assert attended_keys(6, 2, 99) == 21  # top-k covering every block is full attention
    assert gate_candidates(6, 2) == 0 + 0 + 1 + 1 + 2 + 2


def test_model_flops_by_hand():
    f = model_flops_per_sequence(layer_kinds=["moba"], **KW)
    # per token, per layer (d=2, kv width 2): QKV 2*4*(4+2+2)=64, out proj 2*4*4=32, MLP 2*2*4*8=128 -> 224;
    # logits 2*4*10=80; 6 tokens -> 1824 forward; x3 for training.
    assert f.dense == pytest.approx(3 * 6 * (224 + 80))
    assert f.attention == pytest.approx(3 * 4 * 2 * 2 * 17)  # 4 * d * heads * attended keys, x3
    assert f.gate == pytest.approx(2 * 2 * 2 * 6)  # 2 * d * heads * candidates, forward only
    full = model_flops_per_sequence(layer_kinds=["full"], **KW)
    assert full.attention == pytest.approx(3 * 4 * 2 * 2 * 21) and full.gate == 0
    assert f.total == f.dense + f.attention + f.gate


def test_moba_counts_far_less_attention_than_full_at_long_context():
    s = 1 << 20
    ratio = attended_keys(s, 4096, 12) / attended_keys(s)
    # 12 blocks of 4096 keys out of ~512K causal keys on average: ~9%.
    assert 0.08 < ratio < 0.10


def test_model_sizes_by_hand():
    from moba_cp.model_sizes import default_ffn_hidden_size, padded_vocab_size

    assert default_ffn_hidden_size(64, swiglu=False) == 256
    assert default_ffn_hidden_size(64, swiglu=True) == 192  # 8*64/3 = 170.7 -> 192 (multiple of 64)
    assert padded_vocab_size(256, tp=1) == 256
    assert padded_vocab_size(257, tp=1) == 384
    assert padded_vocab_size(257, tp=2) == 384  # lcm(128, 2) = 128: tp 1 and 2 share one vocabulary
    assert padded_vocab_size(400, tp=3) == 768  # lcm(128, 3) = 384


def test_flops_per_step_is_the_model_count_times_the_global_batch():
    """The step count the training log and sweeps use: the recipe's model with the padded
    vocabulary and the default MLP width, times global_batch_size sequences."""
    from moba_cp.config import load_recipe
    from moba_cp.train.flops import flops_per_step

    cfg = load_recipe("recipes/quickstart.yaml", ["--train.global_batch_size=3", "--model.swiglu=true",
                                                  "--model.ffn_hidden_size=null"])
    # quickstart: 2 MoBA layers, hidden 128, 4 heads / 2 KV groups, S=1024, block 64, top-k 3
    per_seq = model_flops_per_sequence(
        num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=384,  # SwiGLU default: 8 * 128 / 3 = 341.3 -> 384
        vocab_size=384,       # a 259-token vocabulary padded to a multiple of 128
        seq_length=1024, swiglu=True, layer_kinds=["moba", "moba"], block_size=64, topk=3)
    assert flops_per_step(cfg, 259) == pytest.approx(3 * per_seq.total)


def test_cost_arithmetic_does_not_import_megatron():
    """--dry-run, sweep cost estimates and the FLOP count run without Megatron-Core."""
    import subprocess
    import sys

    code = ("import sys, moba_cp.train.flops, moba_cp.train.dry_run, moba_cp.experiments.sweep, moba_cp.model_sizes; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
