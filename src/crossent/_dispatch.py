"""Which kernel backend runs a call: decided per call from the tensors' device, never at import."""

from __future__ import annotations

import importlib.util
import os

import torch


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
