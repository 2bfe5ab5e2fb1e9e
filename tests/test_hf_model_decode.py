"""The exported transformers model on random weights (no Megatron): KV-cache decoding, token by
token and in prefill chunks, gives the full forward's logits at every position, for all-MoBA,
all-full and hybrid models, across block boundaries, with the naive prefill and with the Triton
prefill (interpreter on CPU)."""

import pytest
import torch

pytest.importorskip("transformers", reason="the 'export' extra is not installed")

from moba_cp.hf.modeling_moba import MoBAConfig, MoBAForCausalLM  # noqa: E402

def _model(kinds, backend="auto", tie=True, norm="RMSNorm", act="swiglu"):
    torch.manual_seed(0)
    cfg = MoBAConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=len(kinds),
                     num_attention_heads=4, num_key_value_heads=2, attention_kinds=kinds, moba_block_size=16,
                     moba_topk=3, moba_backend=backend, tie_word_embeddings=tie, normalization=norm,
                     mlp_activation=act, initializer_range=0.2)
    return MoBAForCausalLM(cfg).eval()


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def _decode(model, tokens, chunks):
    """Logits of feeding ``tokens`` in pieces of the given sizes through one cache."""
    out, cache, start, logits = None, None, 0, []
    for n in chunks:
        kw = {} if cache is None else {"cache" if hasattr(out, "cache") else "past_key_values": cache}
        out = model(tokens[:, start:start + n], use_cache=True, **kw)
        cache = _cache_of(out)
        logits.append(out.logits)
        start += n
    return torch.cat(logits, 1)


@pytest.mark.parametrize("kinds", [["moba", "moba"], ["full", "full"], ["moba", "full", "moba"]],
                         ids=["moba", "full", "hybrid"])
@pytest.mark.parametrize("chunks", [[1] * 75, [21, 1, 1, 30, 5, 17]], ids=["token-by-token", "prefill-chunks"])
def test_cached_decoding_equals_the_full_forward(kinds, chunks):
    model = _model(kinds)
    tokens = torch.randint(0, 300, (2, 75), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        dec = _decode(model, tokens, chunks)
    torch.testing.assert_close(dec, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm,act,tie", [("LayerNorm", "gelu", False), ("RMSNorm", "swiglu", False)])
def test_other_norms_mlps_and_an_untied_head_decode_alike(norm, act, tie):
    model = _model(["moba", "full"], tie=tie, norm=norm, act=act)
    assert (model.lm_head is None) == tie
    tokens = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_decode(model, tokens, [7] + [1] * 43), model(tokens, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)


def test_triton_prefill_then_cached_decoding_equals_the_naive_full_forward():
    """moba_backend='triton' (interpreter on CPU): the prefill runs the Triton kernels, decoding the
    pure-torch decode op; both follow the naive model's full forward."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    naive, triton = _model(["moba", "full"], backend="naive"), _model(["moba", "full"], backend="triton")
    triton.load_state_dict(naive.state_dict())
    naive, triton = naive.to(dev), triton.to(dev)
    tokens = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(3)).to(dev)
    with torch.no_grad():
        ref = naive(tokens, use_cache=False).logits
        whole = triton(tokens, use_cache=False).logits
        dec = _decode(triton, tokens, [37] + [1] * 23)
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dec, ref, rtol=1e-4, atol=1e-4)


def test_sampled_generation_with_and_without_cache_agree():
    model = _model(["moba", "full"])
    prompt = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=40, do_sample=True, top_p=0.9, temperature=1.0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(5)
    mask = torch.ones_like(prompt)  # (else generate derives one from pad_token_id, which the prompt may hold)
    a = model.generate(prompt, attention_mask=mask, use_cache=True, **kw)
    torch.manual_seed(5)
    b = model.generate(prompt, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(a, b) and a.shape == (1, 60)


def test_a_cropped_cache_decodes_a_new_continuation_like_the_full_forward():
    """Assisted decoding rolls the cache back: crop 55 -> 35 (blocks 2 and 3 of 16 tokens are cut), then
    decode another continuation; the running centroids follow."""
    model = _model(["moba", "moba"])
    g = torch.Generator().manual_seed(6)
    first, second = torch.randint(0, 300, (1, 55), generator=g), torch.randint(0, 300, (1, 70), generator=g)
    second[:, :35] = first[:, :35]
    with torch.no_grad():
        out = model(first[:, :20], use_cache=True)
        cache = _cache_of(out)
        name = "cache" if hasattr(out, "cache") else "past_key_values"
        for t in range(20, 55):
            model(first[:, t:t + 1], use_cache=True, **{name: cache})
        try:  # transformers < 5.2x: crop(n) keeps n tokens; later: crop(-r) removes r
            cache.crop(35)
        except ValueError:
            cache.crop(35 - cache.get_seq_length())
        assert cache.get_seq_length() == 35
        dec = [model(second[:, t:t + 1], use_cache=True, **{name: cache}).logits for t in range(35, 70)]
        full = model(second, use_cache=False).logits[:, 35:]
    torch.testing.assert_close(torch.cat(dec, 1), full, rtol=1e-4, atol=1e-4)
