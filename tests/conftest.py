"""Shared fixtures: every test seeds its RNGs.

``_triton_mode`` is imported first: Triton fixes interpreter vs compiled mode once per process, at its
first import, so ``TRITON_INTERPRET=1`` must be set (where there is no GPU) before any test or doctest
module imports Triton.
"""

import _triton_mode  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
import numpy as np
import pytest
import torch

from crossent.kernels import dispatch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _rows_kernels_at_every_size(request, monkeypatch):
    """The kernel tests exercise the rows' kernels (the O(N) backend) at every size, though their shapes are small:
    below ``dispatch.ONE_PASS_MAX_ELEMENTS`` a CPU cross-entropy in eager mode would run a one-pass backend instead
    (``kernels/one_pass.py``), so the rows' kernels would go untested there. Both backends run under the same autograd
    Function, reduction and results; the one-pass backends are tested by the modules marked ``one_pass``, and what a
    user gets by default, with no switch, by tests/test_public_promises.py (marked ``one_pass`` as a whole)."""
    if request.node.get_closest_marker("one_pass") is None:
        monkeypatch.setattr(dispatch, "ONE_PASS_MAX_ELEMENTS", -1)
