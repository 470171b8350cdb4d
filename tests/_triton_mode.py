"""Where this test process runs crossent's Triton kernels: compiled on CUDA, or interpreted on CPU tensors.

Triton fixes interpreter vs compiler once per process, when ``triton.language`` is first imported (its own
helpers such as ``tl.sum`` are jit-decorated then). So this module, imported by the test modules that launch
Triton kernels before anything imports Triton, sets ``TRITON_INTERPRET=1`` where there is no CUDA device,
and leaves it alone where there is one (there the kernels run compiled, on the GPU, for every test).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreting() -> bool:
    """Whether Triton in this process runs kernels through its interpreter."""
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


def kernel_device() -> torch.device:
    """The device the Triton kernel tests use, decided when the test runs: CUDA (compiled kernels) when
    there is one and Triton compiles; else CPU, which needs the interpreter (a clear failure otherwise)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    if not interpreting():
        pytest.fail(
            "Triton was imported in compiled mode before TRITON_INTERPRET=1 was set and there is no GPU; "
            "run with TRITON_INTERPRET=1 in the environment"
        )
    return torch.device("cpu")


@contextlib.contextmanager
def launches(*modules) -> Iterator[list]:
    """``[n]``: how many times the jitted kernels of ``modules`` ran within the block (Triton's pre-run hooks),
    so a test can tell ``impl="triton"`` from a silent fallback to the torch kernels."""
    counter = [0]

    def hook(*args, **kwargs):
        counter[0] += 1

    kernels = [k for m in modules for k in vars(m).values() if isinstance(getattr(k, "pre_run_hooks", None), list)]
    for kernel in kernels:
        kernel.add_pre_run_hook(hook)
    try:
        yield counter
    finally:
        for kernel in kernels:
            kernel.pre_run_hooks.remove(hook)
