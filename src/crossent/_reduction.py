"""Reductions of per-position losses, in plain PyTorch: shared by every loss, backend and vocab-parallel form.

``"none"`` keeps the per-position losses, ``"sum"`` adds them, ``"mean"`` divides by PyTorch's weighted
denominator (``Σ_i w_{t_i}`` over non-ignored positions for class indices, the number of positions for
probabilities); a mean over zero total weight is 0 with a zero gradient (docs/math.md, "Reductions").
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent._options import LossOptions
from crossent._modes import plain_eager


def reduce_rows(loss: Tensor, target: Tensor, class_weight: Optional[Tensor], kind: str, opts: LossOptions):
    """``none`` / ``sum`` / PyTorch's weighted ``mean``; a mean over zero total weight is 0."""
    if opts.reduction == "none":
        return loss
    total = loss.sum()
    if opts.reduction == "sum":
        return total
    if kind == "probs":
        return total / max(loss.numel(), 1)
    denom = index_mean_denominator(target, class_weight, opts.row.ignore_index, loss.dtype)
    if denom.device.type == "cpu" and plain_eager(loss, denom):  # a free host read: one autograd node, not three
        d = float(denom)
        return total / d if d != 0.0 else total * 0.0  # as the traced path's where/div, but for NaN rows at d = 0
    return torch.where(denom == 0, 0.0, total / torch.where(denom == 0, 1.0, denom))


def scaled_sum(loss: Tensor, row_scale: Tensor) -> Tensor:
    """``Σ_i row_scale · loss_i`` summed in float64 and returned in the loss's dtype (an fp32 sum of N losses
    rounds at the size of the sum: 1e-6 of a mean over 4096 rows of ~10, as much as the rest of its error); the
    fused Functions' reduction with the row scale their gradients used."""
    return (loss.sum(dtype=torch.float64) * row_scale.double()).to(loss.dtype)


def host_row_scale(opts: LossOptions, total_weight: float) -> Optional[float]:
    """:func:`reduction_row_scale` from a class-index mean's denominator already on the host: 1 for ``"sum"``,
    ``1 / Σ_i w_{t_i}`` for ``"mean"`` (0 when that sum is 0), None for ``"none"`` (per-row losses)."""
    if opts.reduction == "none":
        return None
    if opts.reduction == "sum":
        return 1.0
    return 1.0 / total_weight if total_weight != 0.0 else 0.0


def host_total(total: float, row_scale: float, dtype: torch.dtype) -> Tensor:
    """``row_scale · Σ_i loss_i`` (a float64 sum on the host, the kernel's) as a 0-d loss of ``dtype``."""
    return torch.scalar_tensor(total * row_scale, dtype=dtype)


def index_mean_denominator(
    target: Tensor, class_weight: Optional[Tensor], ignore_index: int, dtype: torch.dtype
) -> Tensor:
    """PyTorch's weighted-mean denominator for class indices: ``Σ_i w_{t_i}`` over non-ignored positions."""
    return index_row_weight(target, class_weight, ignore_index, dtype).sum()


def index_row_weight(target: Tensor, class_weight: Optional[Tensor], ignore_index: int, dtype: torch.dtype) -> Tensor:
    """``w_{t_i}`` per position (1 without class weights), 0 where the target is ignored; no gradient."""
    valid = target != ignore_index
    if class_weight is None:
        return valid.to(dtype)
    w = class_weight.detach().to(dtype)
    return torch.where(valid, w[target.clamp(0, w.numel() - 1)], 0.0)


def reduction_row_scale(target: Tensor, class_weight: Optional[Tensor], opts: LossOptions, dtype) -> Tensor:
    """``∂(reduced loss)/∂loss_i``, the same for every row: 1 for ``"sum"``, ``1 / Σ_i w_{t_i}`` for ``"mean"``
    (0 when that sum is 0, as :func:`reduce_rows`). A 0-d tensor: no host sync."""
    if opts.reduction == "sum":
        return torch.ones((), dtype=dtype, device=target.device)
    denom = index_mean_denominator(target, class_weight, opts.row.ignore_index, dtype)
    return torch.where(denom == 0, 0.0, 1.0 / torch.where(denom == 0, 1.0, denom))
