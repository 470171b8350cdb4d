"""Shared fixtures: every test seeds its RNGs.

``_triton_mode`` is imported first: Triton fixes interpreter vs compiled mode once per process, at its
first import, so ``TRITON_INTERPRET=1`` must be set (where there is no GPU) before any test or doctest
module imports Triton.
"""

import _triton_mode  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
