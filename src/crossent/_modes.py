"""Which mode a call runs in: plain eager, compiling, under a ``torch.func`` transform or a Python dispatch mode.

Paths that read values on the host or skip a custom op's dispatch are taken only in plain eager mode.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is running around this call."""
    return torch._C._functorch.maybe_current_level() is not None


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is open around this call."""
    return torch.autograd.forward_ad._current_level >= 0


# plain_eager's test of its tensors' types: a set test in C (a generator over them costs ~0.3 µs a call)
_PLAIN_TYPES = frozenset({torch.Tensor, type(None)})


def plain_eager(*tensors) -> bool:
    """Whether this call runs in plain eager mode on plain tensors: not compiling or exporting, no ``torch.func``
    transform, no Python dispatch mode (FakeTensorMode, FlopCounterMode), no tensor subclass among ``tensors``
    (None entries allowed). There a custom op's body may run directly and a CPU value may be read on the host."""
    return (not torch.compiler.is_compiling() and not transforms_active() and _get_current_dispatch_mode() is None
            and _PLAIN_TYPES.issuperset(map(type, tensors)))  # fmt: skip
