"""Lesson 05: grouped-query attention against SDPA, against MHA with repeated K/V, causality, KV cache.

Run: python -m pytest tests/test_05_gqa.py -q
"""

from importlib import import_module

import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

gqa = import_module("05_gqa.gqa")
rope = import_module("03_rope.rope")


@st.composite
def configs(draw):
    """(dim, n_heads, n_kv_heads) with n_kv_heads | n_heads and an even head_dim, MHA and MQA included."""
    n_heads = draw(st.integers(1, 8))
    n_kv_heads = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    head_dim = 2 * draw(st.integers(1, 8))
    return n_heads * head_dim, n_heads, n_kv_heads


def build(dim, n_heads, n_kv_heads, seed, max_seq_len=64):
    torch.manual_seed(seed)
    return gqa.GroupedQueryAttention(dim, n_heads, n_kv_heads).eval(), rope.precompute_rope(dim // n_heads, max_seq_len)


@given(cfg=configs(), B=st.integers(1, 3), T=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_by_hand_equals_sdpa(cfg, B, T, seed):
    attn, table = build(*cfg, seed)
    x = torch.randn(B, T, cfg[0])
    with torch.no_grad():
        assert_close(attn(x, table, by_hand=True), attn(x, table), atol=1e-5, rtol=1e-4)


@given(cfg=configs(), T=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_gqa_equals_mha_with_repeated_kv_heads(cfg, T, seed):
    dim, n_heads, n_kv_heads = cfg
    attn, table = build(*cfg, seed)
    mha = gqa.GroupedQueryAttention(dim, n_heads, n_heads).eval()
    hd, n_rep = dim // n_heads, n_heads // n_kv_heads
    with torch.no_grad():
        mha.wq.weight.copy_(attn.wq.weight)
        mha.wo.weight.copy_(attn.wo.weight)
        for ours, full in ((attn.wk, mha.wk), (attn.wv, mha.wv)):  # (Hkv*hd, dim) -> (H*hd, dim), K1,K1,K2,K2
            full.weight.copy_(ours.weight.view(n_kv_heads, hd, dim).repeat_interleave(n_rep, dim=0).reshape(-1, dim))
        x = torch.randn(2, T, dim)
        # Equal up to float32 rounding: x @ W_k then copying heads rounds differently from x @ repeated W_k.
        assert_close(attn(x, table, by_hand=True), mha(x, table, by_hand=True))
        assert_close(attn(x, table), mha(x, table))


def test_repeat_kv_interleaves_heads():
    kv = torch.arange(2.0).view(1, 2, 1, 1)  # heads K0, K1
    assert gqa.repeat_kv(kv, 3).flatten().tolist() == [0, 0, 0, 1, 1, 1]


@given(cfg=configs(), T=st.integers(2, 24), data=st.data())
def test_causal_future_tokens_never_change_the_past(cfg, T, data):
    attn, table = build(*cfg, data.draw(st.integers(0, 2**16)))
    t = data.draw(st.integers(0, T - 2))
    x = torch.randn(2, T, cfg[0])
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 10
    with torch.no_grad():
        for by_hand in (False, True):
            y, y2 = attn(x, table, by_hand=by_hand), attn(x2, table, by_hand=by_hand)
            assert_close(y[:, : t + 1], y2[:, : t + 1])
            assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@given(cfg=configs(), B=st.integers(1, 3), T=st.integers(2, 40), by_hand=st.booleans(), data=st.data())
def test_kv_cache_decoding_equals_full_forward(cfg, B, T, by_hand, data):
    """Prefill a prompt, then feed random-sized chunks (often one token): same outputs as one pass."""
    dim, n_heads, n_kv_heads = cfg
    attn, table = build(*cfg, data.draw(st.integers(0, 2**16)))
    x = torch.randn(B, T, dim)
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=6)))
    cache = gqa.KVCache(B + 1, 48, n_kv_heads, dim // n_heads)  # larger than needed: slices must be right
    with torch.no_grad():
        full = attn(x, table, by_hand=by_hand)
        pieces = [attn(x[:, a:b], table, a, cache, by_hand=by_hand) for a, b in zip([0, *cuts], [*cuts, T])]
    assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


def test_causal_mask_aligns_queries_to_the_last_positions():
    assert gqa.causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(gqa.causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())


@pytest.mark.parametrize(
    "dim, n_heads, n_kv_heads, message",
    [(64, 8, 3, "must be a multiple of n_kv_heads"), (60, 8, 4, "divisible by n_heads"), (48, 16, 8, "must be even"), (64, 4, 0, "multiple of n_kv_heads")],
)
def test_bad_arguments_say_what_is_wrong(dim, n_heads, n_kv_heads, message):
    with pytest.raises((AssertionError, ValueError), match=message):
        gqa.GroupedQueryAttention(dim, n_heads, n_kv_heads)
