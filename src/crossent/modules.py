"""nn.Module wrappers: store the options (validated once, at construction) and call the functional API."""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch
from torch import Tensor, nn

from crossent._options import AccumulateDtype, CrossEntropyOptions, Impl, LinearOptions, Reduction
from crossent.functional import LossOrStats, cross_entropy_with_options, linear_cross_entropy_with_options

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]


def _class_weight_buffer(module: nn.Module, weight) -> None:
    """``weight`` (class weights) as a buffer, so that it moves with ``.to()``, as in PyTorch."""
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    module.register_buffer("weight", weight)


class _Option:
    """A module attribute for one of its options, as ``nn.CrossEntropyLoss`` has ``ignore_index``, ``reduction`` and
    ``label_smoothing``: read from the validated options; assigned, the options are built again with the new value
    (so a bad value raises the same TypeError/ValueError as in the constructor, at the assignment)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        options = module.options
        return getattr(options.row if hasattr(options.row, self.name) else options, self.name)

    def __set__(self, module, value):
        options = module.options
        keywords = {f.name: getattr(options.row, f.name) for f in fields(options.row)}
        keywords.update({f.name: getattr(options, f.name) for f in fields(options) if f.name != "row"})
        module.options = type(options).build(**{**keywords, self.name: value})


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`crossent.cross_entropy`, a drop-in for :class:`torch.nn.CrossEntropyLoss`.

    ``weight`` is registered as a buffer (it moves with ``.to()``), as in PyTorch. Every other argument is
    keyword-only (PyTorch's deprecated positional ``size_average``/``reduce`` slots are not taken by
    accident) and has the meaning it has in :func:`crossent.cross_entropy`; with ``return_stats=True`` the
    module returns :class:`crossent.CrossEntropyStats`. Each option is an attribute of the same name, as
    ``nn.CrossEntropyLoss``'s ``ignore_index``, ``reduction`` and ``label_smoothing`` are: assigning one
    validates it and the next call uses it.

    Example:
        >>> import torch, crossent
        >>> loss_fn = crossent.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> loss_fn(torch.randn(8, 10), torch.randint(0, 10, (8,))).shape
        torch.Size([])
        >>> loss_fn.ignore_index, loss_fn.reduction, loss_fn.label_smoothing
        (-100, 'mean', 0.1)
        >>> loss_fn.reduction = "none"
        >>> loss_fn(torch.randn(8, 10), torch.randint(0, 10, (8,))).shape
        torch.Size([8])
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]  # nn.CrossEntropyLoss's
    ignore_index = _Option()
    reduction = _Option()
    label_smoothing = _Option()
    z_loss = _Option()
    softcap = _Option()
    inplace_backward = _Option()
    impl = _Option()
    return_stats = _Option()

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        *,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        inplace_backward: bool = False,
        impl: Impl = "auto",
        return_stats: bool = False,
    ):
        super().__init__()
        _class_weight_buffer(self, weight)
        self.options = CrossEntropyOptions.build(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, inplace_backward=inplace_backward, impl=impl, return_stats=return_stats,
        )  # fmt: skip

    def forward(self, input: Tensor, target: Tensor) -> LossOrStats:
        return cross_entropy_with_options(input, target, self.weight, self.options)

    def extra_repr(self) -> str:
        return self.options.describe()


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`crossent.linear_cross_entropy`: ``loss_fn(input, linear_weight, target, linear_bias)``.

    Holds the options only (the linear layer's parameters stay with the model, e.g. its output
    embedding); ``weight`` (class weights) is a buffer, as in :class:`CrossEntropyLoss`. Every other
    argument is keyword-only and has the meaning it has in :func:`crossent.linear_cross_entropy`, and is an
    attribute of the same name (assigning one validates it), as in :class:`CrossEntropyLoss`.

    Example:
        >>> import torch, crossent
        >>> head = torch.nn.Linear(16, 50, bias=False)
        >>> loss_fn = crossent.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4)
        >>> loss_fn(torch.randn(2, 5, 16), head.weight, torch.randint(0, 50, (2, 5))).shape
        torch.Size([])
        >>> loss_fn.chunk_size, loss_fn.label_smoothing
        (4, 0.1)
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]  # as CrossEntropyLoss's
    ignore_index = _Option()
    reduction = _Option()
    label_smoothing = _Option()
    z_loss = _Option()
    softcap = _Option()
    chunk_size = _Option()
    memory_budget = _Option()
    accumulate_dtype = _Option()
    impl = _Option()
    return_stats = _Option()
    logit_scale = _Option()

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        *,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        accumulate_dtype: AccumulateDtype = "float32",
        impl: Impl = "auto",
        return_stats: bool = False,
        logit_scale: Optional[float] = None,
    ):
        super().__init__()
        _class_weight_buffer(self, weight)
        self.options = LinearOptions.build(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, chunk_size=chunk_size, memory_budget=memory_budget, accumulate_dtype=accumulate_dtype,
            impl=impl, return_stats=return_stats, logit_scale=logit_scale,
        )  # fmt: skip

    def forward(
        self, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor] = None
    ) -> LossOrStats:
        return linear_cross_entropy_with_options(input, linear_weight, target, linear_bias, self.weight, self.options)

    def extra_repr(self) -> str:
        return self.options.describe()
