"""Shared test setup: seeded RNGs, the hypothesis profile, an assert_close that reports differences.

Run the whole suite from the repository root: python -m pytest
"""

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

# CI (and the default run) draws a fixed, modest set of examples so that the suite is repeatable
# and fits a few minutes on 2 CPU cores. HYPOTHESIS_PROFILE=dev explores more, randomly.
settings.register_profile("ci", deadline=None, derandomize=True, max_examples=25, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def seed_everything():
    """Every test starts from the same RNG state in Python, NumPy and torch."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny models: a second intra-op thread gains nothing on tensors this small, and on a busy
    2-core machine OpenMP threads that spin-wait for a core another process holds make a file up to ten
    times slower. torchrun already gives each worker one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tolerances):
    """torch.testing.assert_close, with the max and mean absolute difference in the failure message."""
    diff = (actual.double() - expected.double()).abs()
    torch.testing.assert_close(
        actual, expected, **tolerances,
        msg=lambda m: f"{m}\nmax |diff| = {diff.max().item():.3e}, mean |diff| = {diff.mean().item():.3e}",
    )
