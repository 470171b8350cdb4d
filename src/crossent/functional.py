"""Functional API: validate the call once, pick the backend, run the autograd Function, reduce in torch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent._autograd import CrossEntropyRows
from crossent._checks import check_logits, check_weight, target_kind
from crossent._dispatch import resolve_impl
from crossent._options import CrossEntropyOptions, Impl, Reduction

__all__ = ["cross_entropy"]


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    inplace_backward: bool = False,
    impl: Impl = "auto",
) -> Tensor:
    r"""Softmax cross-entropy, a drop-in for :func:`torch.nn.functional.cross_entropy`.

    Per position ``i`` with logits ``z_i`` (C classes), ``lse_i = m + log Σ_c exp(z_ic − m)``::

        class index t:   loss_i = w_t (1 − ε)(lse_i − z_it) + (ε / C) Σ_c w_c (lse_i − z_ic) + s w_t lse_i²
        probabilities y: loss_i = Σ_c w_c ((1 − ε) y_ic + ε / C)(lse_i − z_ic) + s (Σ_c w_c y_ic) lse_i²

    with class weights ``w`` (default 1), ``ε = label_smoothing``, ``s = z_loss``; with ``softcap = κ`` the
    logits are first replaced by ``κ tanh(z / κ)``. Positions whose target is ``ignore_index`` give 0.
    ``"mean"`` divides the sum by ``Σ_i w_{t_i}`` over non-ignored positions (class indices, PyTorch's
    weighted mean) or by the number of positions (probabilities).

    Differences from PyTorch, on purpose: a ``"mean"`` over zero total weight (e.g. every target ignored)
    is 0 with a zero gradient, not NaN; for float16/bfloat16 input the loss is float32 (gradients stay in
    the input's dtype). Only O(N) is saved for backward: the input itself (no copy), the target and one
    fp32 log-sum-exp per position, instead of the N×C log-probabilities.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ..., dK); any floating dtype, CPU or CUDA.
        target: class indices (), (N) or (N, d1, ..., dK) of an integer dtype, in [0, C) or
            ``ignore_index``; or class probabilities of the input's shape and a floating dtype.
        weight: optional (C,) floating class weights on the input's device (no gradient flows to it).
        ignore_index: class-index value to skip (any int, also one inside [0, C)). With probability
            targets it must be negative (as in PyTorch).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        label_smoothing: ε in [0, 1], PyTorch's formula (also with weights and probability targets).
        z_loss: s ≥ 0, the coefficient of ``lse²`` (PaLM's z-loss; ``lse_square_scale`` elsewhere).
        softcap: κ > 0 caps the logits as ``κ tanh(z / κ)`` (Gemma 2), or None.
        inplace_backward: write the gradient over ``input``'s storage in backward, saving one (N, C)
            buffer. Only when ``input`` is not used after the loss's backward.
        impl: ``"auto"`` (Triton on CUDA when installed, else torch ops), ``"torch"`` or ``"triton"``.

    Returns:
        Tensor: () for ``"mean"``/``"sum"``; the target's batch shape, (N) or (N, d1, ..., dK), for
        ``"none"``. float32 for 16-bit and float32 input, float64 for float64 input.

    Raises:
        TypeError: non-tensor or non-floating ``input``; option of the wrong type.
        ValueError: target of neither kind, class index out of range (checked on CPU; on CUDA that row's
            loss and gradient are NaN instead, without a host sync), bad option value, bad ``weight``.

    Example:
        >>> import torch, crossent
        >>> logits = torch.zeros(2, 4, requires_grad=True)
        >>> loss = crossent.cross_entropy(logits, torch.tensor([1, 3]))
        >>> round(loss.item(), 6)  # uniform logits: log 4
        1.386294
        >>> loss.backward()
        >>> logits.grad[0]  # (softmax − onehot) / N
        tensor([ 0.1250, -0.3750,  0.1250,  0.1250])
    """
    opts = CrossEntropyOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        inplace_backward=inplace_backward,
        impl=impl,
    )
    return cross_entropy_with_options(input, target, weight, opts)


def cross_entropy_with_options(input: Tensor, target: Tensor, weight: Optional[Tensor], opts: CrossEntropyOptions):
    """:func:`cross_entropy` with validated options (the module form builds them once)."""
    check_logits("input", input)
    kind = target_kind(input, target, opts.ignore_index)
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    check_weight(weight, num_classes, input)
    impl = resolve_impl(opts.impl, input.device)
    logits, target = _classes_last(input, target, kind)
    loss = CrossEntropyRows.apply(logits, target, weight, opts, impl)
    return _reduce(loss, target, weight, kind, opts)


def _classes_last(input: Tensor, target: Tensor, kind: str):
    """Move the class dim of (N, C, d1, ..., dK) last, as a view; (C,) and (N, C) are unchanged."""
    if input.dim() <= 2:
        return input, target
    if kind == "probs":
        target = target.movedim(1, -1)
    return input.movedim(1, -1), target


def _reduce(loss: Tensor, target: Tensor, weight: Optional[Tensor], kind: str, opts: CrossEntropyOptions):
    """``none`` / ``sum`` / PyTorch's weighted ``mean``; a mean over zero total weight is 0."""
    if opts.reduction == "none":
        return loss
    total = loss.sum()
    if opts.reduction == "sum":
        return total
    if kind == "probs":
        return total / max(loss.numel(), 1)
    valid = target != opts.ignore_index
    if weight is None:
        denom = valid.sum().to(loss.dtype)
    else:
        w = weight.detach().to(loss.dtype)
        denom = torch.where(valid, w[target.clamp(0, w.numel() - 1)], 0.0).sum()
    return torch.where(denom == 0, 0.0, total / torch.where(denom == 0, 1.0, denom))
