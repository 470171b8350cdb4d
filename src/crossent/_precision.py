"""The precision rule every layer follows: which dtype sums, statistics and losses are formed in.

Inputs of any floating dtype are accumulated in float32, float64 in float64 (the oracle's precision).
Per-row losses come out in that compute dtype (so a 16-bit input gives a float32 loss), gradients in the
input's own dtype, and the per-row log-sum-exp is kept in float64 inside the library (see
docs/math.md, "Precision") and handed to users (``return_stats``) in the compute dtype.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (the oracle's precision); every other dtype is accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

