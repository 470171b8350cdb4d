"""Loss options: frozen dataclasses, validated once where they are built (the public boundary).

Three layers of options, each a part of the next:

- :class:`RowOptions` — what the per-row math reads (``ignore_index``, ``label_smoothing``, ``z_loss``,
  ``softcap``). It travels unchanged from the public boundary down to the kernels; the custom ops take it
  flattened (``crossent.kernels.op_args``, the one place that flattens and rebuilds it).
- :class:`LossOptions` — a row options object plus what the layers above the kernels read: the
  ``reduction``, the backend ``impl`` and whether statistics are returned.
- :class:`CrossEntropyOptions` and :class:`LinearOptions` — a loss's own extras (in-place backward; the
  fused loss's chunking, dW accumulation and ``logit_scale``).
- :class:`LogProbRowOptions` ⊂ :class:`LogProbOptions` ⊂ :class:`LinearLogProbOptions` — the same layering for
  the per-token log-probability family (no reduction: it returns per-token values).
- :class:`DistillRowOptions` ⊂ :class:`DistillOptions` — the distillation family (one options class for the
  plain, fused and sparse forms; only the fused form reads the chunking).

``LossOptions.build(**keywords)`` sorts the public keyword arguments into these parts, so no list of
option names is written out anywhere but in the dataclasses' fields (and in the public signatures).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal, Optional

import torch

Reduction = Literal["none", "mean", "sum"]
Impl = Literal["auto", "torch", "triton"]
AccumulateDtype = Literal["float32", "float32_products", "weight"]

_REDUCTIONS = ("none", "mean", "sum")
_IMPLS = ("auto", "torch", "triton")
_ACCUMULATE = ("float32", "float32_products", "weight")


@dataclass(frozen=True)
class RowOptions:
    """The options of the per-row cross-entropy math: everything a kernel reads besides tensors."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "ignore_index", _integer_like("ignore_index", self.ignore_index))
        _check_real("label_smoothing", self.label_smoothing, "a float in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_real("z_loss", self.z_loss, "a finite float >= 0", lambda v: v >= 0.0)
        if self.softcap is not None:
            _check_real("softcap", self.softcap, "None or a finite float > 0", lambda v: v > 0.0)
        # Plain Python numbers (a numpy scalar would do, but would not hash or print alike).
        object.__setattr__(self, "label_smoothing", float(self.label_smoothing))
        object.__setattr__(self, "z_loss", float(self.z_loss))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))


@dataclass(frozen=True)
class LogProbRowOptions:
    """The options of the per-token log-probability math (:func:`crossent.token_log_probs`): everything its
    kernels read besides tensors. The logits the math sees are ``κ tanh(z / κ) / T`` (softcap first). The flags say
    which outputs besides the log-probabilities to compute (each costs nothing when off)."""

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: Optional[float] = None
    entropy: bool = False
    log_sum_sq_probs: bool = False
    mean_logits: bool = False
    is_top1: bool = False

    def __post_init__(self):
        object.__setattr__(self, "ignore_index", _integer_like("ignore_index", self.ignore_index))
        _check_real("temperature", self.temperature, "a finite float > 0", lambda v: v > 0.0)
        if self.softcap is not None:
            _check_real("softcap", self.softcap, "None or a finite float > 0", lambda v: v > 0.0)
            object.__setattr__(self, "softcap", float(self.softcap))
        for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
            _check_bool(name, getattr(self, name))
        object.__setattr__(self, "temperature", float(self.temperature))


# computed at import: dataclasses.fields() is not traceable by torch.compile, and build() runs in traced code
_ROW_FIELDS = tuple(f.name for f in fields(RowOptions))
_FIELDS_OF = {RowOptions: _ROW_FIELDS, LogProbRowOptions: tuple(f.name for f in fields(LogProbRowOptions))}


class _BuiltFromKeywords:
    """``build(**keywords)``: the names of the row options type ``ROW`` go to ``row``, the rest to the class."""

    ROW: ClassVar[type] = RowOptions

    @classmethod
    def build(cls, **keywords):
        """The options from a public function's keyword arguments: the row options' names go to ``row``.

        Validated options are frozen, so a call with the same keyword values as a recent one gets the same
        object back (:func:`_built`; a training loop pays the validation once). Values that are tensors are
        never cached, and neither is anything while ``torch.compile`` traces.

        Raises:
            TypeError/ValueError naming the argument, for a bad value or an unknown name.
        """
        values = tuple(keywords.values())
        types = tuple(map(type, values))  # part of the key: 2 == 2.0 == True hash alike; only an int is an index
        plain = _PLAIN_TYPES.issuperset(types)  # the usual call: no tensor, everything hashable (checked in C)
        if torch.compiler.is_compiling() or not (plain or _cacheable(values)):
            return cls._validated(keywords)
        return _built(cls, tuple(keywords), values, types)

    @classmethod
    def _validated(cls, keywords):
        names = _FIELDS_OF[cls.ROW]
        row = cls.ROW(**{k: v for k, v in keywords.items() if k in names})
        return cls(row=row, **{k: v for k, v in keywords.items() if k not in names})


_PLAIN_TYPES = frozenset({int, float, bool, str, type(None)})


def _cacheable(values) -> bool:
    """No tensor among the values, and every value hashable (else validation decides what to say)."""
    if any(isinstance(v, torch.Tensor) for v in values):
        return False
    try:
        hash(values)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _built(cls, names, values, types):
    """``cls`` built from the keywords ``names`` = ``values`` (of ``types``), cached: see ``build``."""
    return cls._validated(dict(zip(names, values)))


@dataclass(frozen=True)
class LossOptions(_BuiltFromKeywords):
    """A loss call's options: the row math's (``row``) and how the rows are reduced and run."""

    row: RowOptions = field(default_factory=RowOptions)
    reduction: Reduction = "mean"
    impl: Impl = "auto"
    return_stats: bool = False

    def __post_init__(self):
        if not isinstance(self.row, RowOptions):
            raise TypeError(f"row must be a RowOptions, got {type(self.row).__name__}")
        _check_choice("reduction", self.reduction, _REDUCTIONS)
        _check_choice("impl", self.impl, _IMPLS)
        _check_bool("return_stats", self.return_stats)

    def describe(self) -> str:
        """``name=value, ...`` of every option, for a module's ``extra_repr``."""
        parts = [(name, getattr(self.row, name)) for name in _ROW_FIELDS]
        parts += [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "row"]
        return ", ".join(f"{name}={value!r}" for name, value in parts)


@dataclass(frozen=True)
class CrossEntropyOptions(LossOptions):
    """:func:`crossent.cross_entropy`'s options: the loss options and an opt-in in-place backward."""

    inplace_backward: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_bool("inplace_backward", self.inplace_backward)


@dataclass(frozen=True)
class LinearOptions(LossOptions):
    """:func:`crossent.linear_cross_entropy`'s options: the loss options, the chunking (``chunk_size`` token
    rows per block, ``memory_budget`` bytes of scratch), where dW is summed across blocks, and ``logit_scale``
    (logits ``s · (X Wᵀ + b)`` before ``softcap``; applied in the functional layer, the kernels never see it)."""

    chunk_size: Optional[int] = None
    memory_budget: Optional[int] = None
    accumulate_dtype: AccumulateDtype = "float32"
    logit_scale: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        _check_chunking(self)
        if self.logit_scale is not None:
            _check_real("logit_scale", self.logit_scale, "None or a finite float > 0", lambda v: v > 0.0)
            object.__setattr__(self, "logit_scale", float(self.logit_scale))


@dataclass(frozen=True)
class LogProbOptions(_BuiltFromKeywords):
    """:func:`crossent.token_log_probs`'s options: the row math's (``row``) and the backend ``impl``."""

    ROW: ClassVar[type] = LogProbRowOptions
    row: LogProbRowOptions = field(default_factory=LogProbRowOptions)
    impl: Impl = "auto"

    def __post_init__(self):
        if not isinstance(self.row, LogProbRowOptions):
            raise TypeError(f"row must be a LogProbRowOptions, got {type(self.row).__name__}")
        _check_choice("impl", self.impl, _IMPLS)


@dataclass(frozen=True)
class LinearLogProbOptions(LogProbOptions):
    """:func:`crossent.linear_token_log_probs`'s options: the log-prob options and the fused loop's chunking,
    as :class:`LinearOptions`."""

    chunk_size: Optional[int] = None
    memory_budget: Optional[int] = None
    accumulate_dtype: AccumulateDtype = "float32"

    def __post_init__(self):
        super().__post_init__()
        _check_chunking(self)


@dataclass(frozen=True)
class DistillRowOptions:
    """The options of the per-row distillation math (docs/math.md, "Distillation"): the mixture ``beta`` β in
    [0, 1], the ``temperature`` T > 0 dividing both logits, the weight α = ``hard_weight`` in [0, 1] of the
    hard cross-entropy, ``softcap`` (both heads' logits, before T), whether the teacher comes as
    log-probabilities, the ``ignore_index`` of the targets, and for the sparse (top-K) teacher whether the mass
    outside its K ids is one more outcome (``tail``) or both sides are renormalized over the K ids."""

    ignore_index: int = -100
    beta: float = 0.0
    temperature: float = 1.0
    hard_weight: float = 0.0
    softcap: Optional[float] = None
    teacher_log_probs: bool = False
    tail: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ignore_index", _integer_like("ignore_index", self.ignore_index))
        _check_bool("tail", self.tail)
        _check_real("beta", self.beta, "a float in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_real("temperature", self.temperature, "a finite float > 0", lambda v: v > 0.0)
        _check_real("hard_weight", self.hard_weight, "a float in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        if self.softcap is not None:
            _check_real("softcap", self.softcap, "None or a finite float > 0", lambda v: v > 0.0)
            object.__setattr__(self, "softcap", float(self.softcap))
        _check_bool("teacher_is_log_probs", self.teacher_log_probs)
        for name in ("beta", "temperature", "hard_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))


_FIELDS_OF[DistillRowOptions] = tuple(f.name for f in fields(DistillRowOptions))


@dataclass(frozen=True)
class DistillOptions(_BuiltFromKeywords):
    """A distillation call's options: the row math's (``row``), the reduction, the backend and, for the fused
    form, the loops' chunking and dW accumulation (as :class:`LinearOptions`)."""

    ROW: ClassVar[type] = DistillRowOptions
    row: DistillRowOptions = field(default_factory=DistillRowOptions)
    reduction: Reduction = "mean"
    impl: Impl = "auto"
    chunk_size: Optional[int] = None
    memory_budget: Optional[int] = None
    accumulate_dtype: AccumulateDtype = "float32"

    def __post_init__(self):
        if not isinstance(self.row, DistillRowOptions):
            raise TypeError(f"row must be a DistillRowOptions, got {type(self.row).__name__}")
        _check_choice("reduction", self.reduction, _REDUCTIONS)
        _check_choice("impl", self.impl, _IMPLS)
        _check_chunking(self)

    @classmethod
    def build(cls, **keywords):
        """As :meth:`_BuiltFromKeywords.build`; the public ``teacher_is_log_probs`` is the row's
        ``teacher_log_probs``."""
        if "teacher_is_log_probs" in keywords:
            keywords["teacher_log_probs"] = keywords.pop("teacher_is_log_probs")
        return super().build(**keywords)


def _check_chunking(opts) -> None:
    """``chunk_size`` and ``memory_budget`` None or ints > 0; ``accumulate_dtype`` one of the choices."""
    for name in ("chunk_size", "memory_budget"):
        value = getattr(opts, name)
        if value is not None:
            _check_int(name, value)
            if value <= 0:
                raise ValueError(f"{name} must be None or an int > 0, got {value!r}")
    _check_choice("accumulate_dtype", opts.accumulate_dtype, _ACCUMULATE)


def _integer_like(name, value) -> int:
    """A Python int from what PyTorch accepts for an integer argument: int, numpy integer, 0-d integer tensor.

    A 0-d tensor is read on the host (as PyTorch's own argument parsing does); floats and bools are refused.
    """
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    ):
        return int(value.item())
    _check_int(name, value)
    return int(value)


def _check_int(name, value):
    # numbers.Integral admits Python and numpy integers; bool is refused.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")


def _check_choice(name, value, choices):
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def _check_real(name, value, expected, ok):
    # numbers.Real admits Python and numpy ints/floats; bool, str and tensors are refused.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}")
    if not (-math.inf < value < math.inf and ok(value)):  # comparisons, not math.isfinite: traceable (NaN fails)
        raise ValueError(f"{name} must be {expected}, got {value!r}")
