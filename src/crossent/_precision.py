"""The precision rule every layer follows: which dtype sums, statistics and losses are formed in.

Inputs of any floating dtype are accumulated in float32, float64 in float64 (the oracle's precision).
Per-row losses come out in that compute dtype (so a 16-bit input gives a float32 loss), gradients in the
input's own dtype, and the per-row log-sum-exp is kept in float64 inside the library (see
docs/math.md, "Precision") and handed to users (``return_stats``) in the compute dtype.
"""

from __future__ import annotations

import functools

import torch

from crossent import _cpu_level

HALF_DTYPES = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (the oracle's precision); every other dtype is accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def fast_half_products(device_type: str, dtype: torch.dtype) -> bool:
    """Whether products of 16-bit ``dtype`` operands run at the 16-bit rate on this kind of device: always on
    CUDA (tensor cores, fp32 accumulation inside); on the CPU where oneDNN reports support for the dtype's
    matrix instructions (bf16: AVX512-BF16 / AMX-BF16; fp16: AVX512-FP16 / AMX-FP16). Elsewhere the 16-bit
    product is emulated and slower than fp32 (float16 on the AVX512-BF16 VM of docs/benchmarks.md, "16-bit
    inputs": 0.001 TFLOP/s against fp32's 0.15) — and on a CPU held below its own level by
    ``CROSSENT_CPU_CAPABILITY`` (``crossent._cpu_level``: no lesser level has those units)."""
    if dtype not in HALF_DTYPES:
        return False
    if device_type != "cpu":
        return True
    if _cpu_level.lowered():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
