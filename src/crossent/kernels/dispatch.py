"""Which kernel backend runs a call: decided per call from the tensors' device, never at import.

The one place that maps ``impl`` to code: :func:`resolve_impl` turns the user's ``"auto"`` into a backend
name at the public boundary (a string the custom ops carry), and :func:`row_kernels` /
:func:`chunk_kernels` turn that name into the row kernels' module or the fused loop's chunk step.
Triton's modules are imported only when asked for: Triton is optional.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from crossent.kernels import distill_rows, linear_step, logprob_rows, torch_rows


def triton_available() -> bool:
    """Triton is installed (its kernels run on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``)."""
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"auto"`` → ``"triton"`` for CUDA tensors when Triton is importable, else ``"torch"``.

    ``"triton"`` on a CPU tensor needs ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests).
    """
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("impl='triton' needs the triton package (pip install triton); use impl='torch' or 'auto'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); got a {device.type} tensor"
        )
    return "triton"


def row_kernels(impl: str):
    """The row kernels' module for a resolved ``impl``: :mod:`torch_rows` or :mod:`triton_rows` (same contract)."""
    if impl == "triton":
        from crossent.kernels import triton_rows

        return triton_rows
    return torch_rows


def chunk_kernels(impl: str) -> linear_step.ChunkKernels:
    """The fused loop's chunk step for a resolved ``impl``: torch ops, or Triton's (:mod:`triton_linear`)."""
    if impl == "triton":
        from crossent.kernels.triton_linear import TRITON_KERNELS

        return TRITON_KERNELS
    return linear_step.TORCH_KERNELS


def logprob_kernels(impl: str):
    """The per-token log-prob row kernels for a resolved ``impl``: :mod:`logprob_rows` or :mod:`triton_logprobs`."""
    if impl == "triton":
        from crossent.kernels import triton_logprobs

        return triton_logprobs
    return logprob_rows


def logprob_chunk_kernels(impl: str) -> logprob_rows.LogProbChunkKernels:
    """The fused log-prob loops' chunk step for a resolved ``impl``: torch ops, or Triton's."""
    if impl == "triton":
        from crossent.kernels.triton_logprobs import TRITON_LOGPROB_KERNELS

        return TRITON_LOGPROB_KERNELS
    return logprob_rows.TORCH_LOGPROB_KERNELS


def no_autocast(device: torch.device):
    """A context in which ``torch.autocast`` is off for ``device``'s type: the kernels keep their own precision.
    A null context where it is off already (entering ``torch.autocast`` costs ~4 µs, a tenth of a small call)."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def distill_step(impl: str):
    """Distillation's whole-row block step for a resolved ``impl``: :func:`distill_rows.block_step_` or its
    Triton version (:mod:`triton_distill`, same contract; it runs the torch step for what it does not cover)."""
    if impl == "triton":
        from crossent.kernels.triton_distill import block_step_

        return block_step_
    return distill_rows.block_step_
