"""Loss options: one frozen dataclass, validated once where it is built (the public boundary)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, Optional

Reduction = Literal["none", "mean", "sum"]
Impl = Literal["auto", "torch", "triton"]

_REDUCTIONS = ("none", "mean", "sum")
_IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class CrossEntropyOptions:
    """Everything about a cross-entropy call that is not a tensor.

    Building one validates it: a bad value raises TypeError/ValueError naming the argument.
    """

    ignore_index: int = -100
    reduction: Reduction = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    inplace_backward: bool = False
    impl: Impl = "auto"

    def __post_init__(self):
        _check_int("ignore_index", self.ignore_index)
        _check_choice("reduction", self.reduction, _REDUCTIONS)
        _check_choice("impl", self.impl, _IMPLS)
        _check_real("label_smoothing", self.label_smoothing, "a float in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_real("z_loss", self.z_loss, "a finite float >= 0", lambda v: v >= 0.0)
        if self.softcap is not None:
            _check_real("softcap", self.softcap, "None or a finite float > 0", lambda v: v > 0.0)
        if not isinstance(self.inplace_backward, bool):
            raise TypeError(f"inplace_backward must be a bool, got {self.inplace_backward!r}")
        # Normalise numbers to plain Python floats (a numpy scalar or int would do but would not hash alike).
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))
        object.__setattr__(self, "z_loss", float(self.z_loss))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")


def _check_choice(name, value, choices):
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def _check_real(name, value, expected, ok):
    # numbers.Real admits Python and numpy ints/floats; bool, str and tensors are refused.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


AccumulateDtype = Literal["float32", "weight"]
_ACCUMULATE = ("float32", "weight")


@dataclass(frozen=True)
class LinearCrossEntropyOptions:
    """Everything about a :func:`crossent.linear_cross_entropy` call that is not a tensor.

    ``loss`` holds the cross-entropy options; the rest choose the chunking (``chunk_size`` token rows per
    block; ``memory_budget`` bytes of scratch) and where dW is summed across blocks (``"float32"``, or
    ``"weight"``: in the weight's own dtype). Building one validates it.
    """

    loss: CrossEntropyOptions = CrossEntropyOptions()
    chunk_size: Optional[int] = None
    memory_budget: Optional[int] = None
    accumulate_dtype: AccumulateDtype = "float32"

    def __post_init__(self):
        if not isinstance(self.loss, CrossEntropyOptions):
            raise TypeError(f"loss must be a CrossEntropyOptions, got {type(self.loss).__name__}")
        if self.loss.inplace_backward:
            raise ValueError("inplace_backward does not apply to linear_cross_entropy (its logits are never stored)")
        for name in ("chunk_size", "memory_budget"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
                if value <= 0:
                    raise ValueError(f"{name} must be None or an int > 0, got {value!r}")
        _check_choice("accumulate_dtype", self.accumulate_dtype, _ACCUMULATE)
