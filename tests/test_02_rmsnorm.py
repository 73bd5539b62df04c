"""Lesson 02: RMSNorm against torch.nn.RMSNorm and its defining properties.

Run: python -m pytest tests/test_02_rmsnorm.py -q
"""

from importlib import import_module

import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

RMSNorm = import_module("02_rmsnorm.rmsnorm").RMSNorm

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=2).flatmap(
    lambda lead: st.integers(1, 96).map(lambda dim: (*lead, dim))
)


@given(shape=shapes, dtype=st.sampled_from([torch.float32, torch.bfloat16]), eps=st.sampled_from([1e-6, 1e-5, 1e-2]), seed=st.integers(0, 2**16))
def test_matches_torch_rmsnorm(shape, dtype, eps, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    ours, ref = RMSNorm(shape[-1], eps), torch.nn.RMSNorm(shape[-1], eps=eps)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(shape[-1], generator=g))
        ref.weight.copy_(ours.weight)
    y = ours(x)
    assert y.dtype == dtype
    expected = ref(x.float()).to(dtype)  # the reference computed in float32, rounded once
    if dtype == torch.float32:
        assert_close(y, expected)
    else:  # ours rounds the normalized x to bf16 before the gain: one extra bf16 rounding (2^-8 relative)
        assert_close(y, expected, atol=2e-2, rtol=2e-2)


@given(shape=shapes, c=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_scale_invariant(shape, c, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + 0.1
    norm = RMSNorm(shape[-1], eps=1e-12)  # eps would break exact invariance for tiny c * x
    assert_close(norm(c * x), norm(x), atol=1e-5, rtol=1e-4)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_unit_weight_gives_unit_rms(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 5 + 1
    y = RMSNorm(shape[-1], eps=1e-12)(x)
    assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(shape[:-1]))


def test_weight_shape_and_half_precision_statistic():
    norm = RMSNorm(8)
    assert norm.weight.shape == (8,) and torch.equal(norm.weight, torch.ones(8))
    # Values whose squares overflow bfloat16's precision budget still normalize correctly.
    x = torch.full((1, 8), 300.0, dtype=torch.bfloat16)
    assert_close(norm(x).float(), torch.ones(1, 8))


@pytest.mark.parametrize("dim, eps", [(0, 1e-6), (-3, 1e-6), (8, 0.0)])
def test_bad_arguments_say_what_is_wrong(dim, eps):
    with pytest.raises(AssertionError, match="dim must be positive|eps must be positive"):
        RMSNorm(dim, eps)
