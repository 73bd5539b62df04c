"""Lesson 03: RoPE's properties, and equality with Hugging Face's Llama rotary embedding.

Run: python -m pytest tests/test_03_rope.py -q
"""

from importlib import import_module

import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

rope = import_module("03_rope.rope")

head_dims = st.integers(1, 16).map(lambda n: 2 * n)


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@given(head_dim=head_dims, T=st.integers(1, 40), start=st.integers(0, 60), seed=st.integers(0, 2**16))
def test_preserves_norm_of_every_head_vector(head_dim, T, start, seed):
    table = rope.precompute_rope(head_dim, 100)
    x = rand((2, T, 3, head_dim), seed)
    assert_close(rope.apply_rope(x, table, start).norm(dim=-1), x.norm(dim=-1))


@given(head_dim=head_dims, m=st.integers(0, 200), n=st.integers(0, 200), shift=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_score_depends_only_on_relative_position(head_dim, m, n, shift, seed):
    table = rope.precompute_rope(head_dim, 512)
    q, k = rand((2, 1, 1, 1, head_dim), seed)

    def score(a, b):
        return (rope.apply_rope(q, table, a) * rope.apply_rope(k, table, b)).sum()

    assert_close(score(m + shift, n + shift), score(m, n), atol=1e-4, rtol=1e-4)


@given(head_dim=head_dims, seed=st.integers(0, 2**16))
def test_position_zero_is_identity(head_dim, seed):
    x = rand((1, 1, 4, head_dim), seed)
    assert torch.equal(rope.apply_rope(x, rope.precompute_rope(head_dim, 8)), x)


@given(head_dim=head_dims, T=st.integers(2, 30), data=st.data())
def test_start_pos_equals_slicing_a_longer_sequence(head_dim, T, data):
    start = data.draw(st.integers(0, T - 1))
    table = rope.precompute_rope(head_dim, 64)
    x = rand((2, T, 3, head_dim), data.draw(st.integers(0, 2**16)))
    assert torch.equal(rope.apply_rope(x[:, start:], table, start), rope.apply_rope(x, table)[:, start:])


@given(B=st.integers(1, 4), T=st.integers(1, 20), head_dim=head_dims, seed=st.integers(0, 2**16))
def test_a_position_per_row_equals_each_rows_own_int_position(B, T, head_dim, seed):
    """start_pos as a (B,) tensor (lesson 12's continuous batching): row b equals apply_rope with int start_pos[b]."""
    g = torch.Generator().manual_seed(seed)
    table = rope.precompute_rope(head_dim, 64)
    x = torch.randn(B, T, 2, head_dim, generator=g)
    pos = torch.randint(0, 64 - T + 1, (B,), generator=g)
    got = rope.apply_rope(x, table, pos)
    for b in range(B):
        assert torch.equal(got[b:b + 1], rope.apply_rope(x[b:b + 1], table, int(pos[b])))


def test_rotates_interleaved_pairs_by_position_times_frequency():
    # Hand-worked: head_dim 4 -> frequencies 1 and 10000^(-1/2) = 0.01; position 3.
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    y = rope.apply_rope(x, rope.precompute_rope(4, 8), start_pos=3).flatten()
    a, b = torch.tensor(3.0), torch.tensor(0.03)
    assert_close(y, torch.stack([a.cos(), a.sin(), -b.sin(), b.cos()]))


@given(n_heads=st.integers(1, 4), head_dim=head_dims, T=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_equals_hugging_face_llama_rope_after_pair_permutation(n_heads, head_dim, T, seed):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=n_heads * head_dim, num_attention_heads=n_heads, max_position_embeddings=64, rope_theta=10000.0)
    hf_rope = LlamaRotaryEmbedding(config)
    q, k = rand((2, 2, T, n_heads, head_dim), seed)  # ours: (B, T, H, D)
    # HF rotates split halves (x_i, x_{i+D/2}); we rotate interleaved pairs (x_2i, x_2i+1).
    # perm lists, for each HF slot, which of our slots goes there: [0, 2, 4, ..., 1, 3, 5, ...].
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    cos, sin = hf_rope(q, torch.arange(T)[None].expand(2, T))
    hf_q, hf_k = apply_rotary_pos_emb(q[..., perm].transpose(1, 2), k[..., perm].transpose(1, 2), cos, sin)
    table = rope.precompute_rope(head_dim, 64)
    assert_close(hf_q.transpose(1, 2), rope.apply_rope(q, table)[..., perm], atol=1e-5, rtol=1e-5)
    assert_close(hf_k.transpose(1, 2), rope.apply_rope(k, table)[..., perm], atol=1e-5, rtol=1e-5)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(AssertionError, match="head_dim must be even"):
        rope.precompute_rope(7, 16)
    with pytest.raises(AssertionError, match="raise max_seq_len"):
        rope.apply_rope(torch.zeros(1, 10, 1, 8), rope.precompute_rope(8, 16), start_pos=8)
