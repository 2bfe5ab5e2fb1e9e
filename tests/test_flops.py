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
