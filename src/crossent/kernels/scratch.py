"""Scratch buffers handed out again within one fused call, instead of fresh allocations per block.

The fused loops call the row kernels once per block of rows, and each call used to allocate its chunk buffers
(tens of MiB): on the CPU every such allocation is a fresh ``mmap`` whose pages the kernel faults in and zeroes
on first touch (measured on the 2-core VM: 470 MiB of fresh pages cost ~115 ms more than touching the same
bytes again, i.e. ~5% of a no-grad log-probs call at (4096, 1024, 32768)). Inside :func:`reuse` (one fused call,
this thread), buffers given back with :func:`give_back` are handed out again by :func:`take`; when the outermost
:func:`reuse` ends, they are dropped: nothing is kept between calls, and peak memory is unchanged (a buffer is
only reused once its previous user is done with it).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

_STATE = threading.local()


@contextlib.contextmanager
def reuse() -> Iterator[None]:
    """Within this block, on this thread, :func:`take` hands out what :func:`give_back` received (nestable)."""
    outermost = getattr(_STATE, "free", None) is None
    if outermost:
        _STATE.free = []
    try:
        yield
    finally:
        if outermost:
            _STATE.free = None


def take(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 1-D buffer of at least ``numel`` elements (uninitialized): a given-back one that fits (the smallest),
    or a new one."""
    free: Optional[list] = getattr(_STATE, "free", None)
    if free:
        fits = [i for i, t in enumerate(free) if t.dtype == dtype and t.device == device and t.numel() >= numel]
        if fits:
            return free.pop(min(fits, key=lambda i: free[i].numel()))
    return _new(numel, dtype, device)


def _new(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(numel, dtype=dtype, device=device)


def give_back(*buffers: Tensor) -> None:
    """Buffers from :func:`take` whose user is done with them (ignored outside :func:`reuse`)."""
    free: Optional[list] = getattr(_STATE, "free", None)
    if free is not None:
        free.extend(buffers)


def reused(fn):
    """``fn`` run inside :func:`reuse` (the fused loops: one call, many blocks)."""

    @functools.wraps(fn)
    def within_reuse(*args, **kwargs):
        with reuse():
            return fn(*args, **kwargs)

    return within_reuse
