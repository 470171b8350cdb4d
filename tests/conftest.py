"""Shared fixtures: every test seeds its RNGs.

``_triton_mode`` is imported first: Triton fixes interpreter vs compiled mode once per process, at its
first import, so ``TRITON_INTERPRET=1`` must be set (where there is no GPU) before any test or doctest
module imports Triton.
"""

import _triton_mode  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
import numpy as np
import pytest
import torch

from crossent import _materialized


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _o_n_path_at_every_size(request, monkeypatch):
    """The tests exercise crossent's O(N) kernels at every size (their shapes are small); the small-input paths
    (``crossent._small_cpu``'s one C pass and ``crossent._materialized``'s PyTorch ops, both below
    ``MATERIALIZED_MAX_ELEMENTS``) run only in tests marked ``materialized``."""
    if request.node.get_closest_marker("materialized") is None:
        monkeypatch.setattr(_materialized, "MATERIALIZED_MAX_ELEMENTS", -1)
