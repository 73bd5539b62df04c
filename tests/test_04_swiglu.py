"""Lesson 04: SwiGLU equals its formula; the hidden-size rule.

Run: python -m pytest tests/test_04_swiglu.py -q
"""

import math
from importlib import import_module

import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

swiglu = import_module("04_swiglu.swiglu")


@given(dim=st.integers(1, 48), hidden=st.integers(1, 96), lead=st.lists(st.integers(1, 5), max_size=2), seed=st.integers(0, 2**16))
def test_equals_formula_by_hand(dim, hidden, lead, seed):
    torch.manual_seed(seed)
    ffn = swiglu.SwiGLU(dim, hidden)
    x = torch.randn(*lead, dim)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight  # (hidden, dim), (dim, hidden), (hidden, dim)
    gate = x @ w1.T
    expected = ((gate / (1 + torch.exp(-gate))) * (x @ w3.T)) @ w2.T  # silu(z) = z * sigmoid(z)
    with torch.no_grad():
        assert_close(ffn(x), expected)
    assert all(layer.bias is None for layer in (ffn.w1, ffn.w2, ffn.w3))


def test_seed_hidden_size():
    assert swiglu.ffn_hidden_dim(512, multiple_of=128) == 1408


@given(dim=st.integers(1, 4096), multiple_of=st.sampled_from([1, 8, 64, 128, 256]))
def test_hidden_size_rule(dim, multiple_of):
    hidden = swiglu.ffn_hidden_dim(dim, multiple_of)
    two_thirds = int(8 * dim / 3)
    assert hidden % multiple_of == 0 and two_thirds <= hidden < two_thirds + multiple_of
    assert hidden == multiple_of * math.ceil(two_thirds / multiple_of)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(AssertionError, match="must be positive"):
        swiglu.SwiGLU(0, 8)
    with pytest.raises(AssertionError, match="must be positive"):
        swiglu.ffn_hidden_dim(512, multiple_of=0)
