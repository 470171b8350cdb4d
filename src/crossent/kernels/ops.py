"""Custom ops for the row kernels: eager implementations dispatch on ``impl``; fake ones give shapes."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crossent._checks import check_target_range
from crossent.kernels import torch_rows


def _backend(impl: str):
    if impl == "triton":
        from crossent.kernels import triton_rows  # imported only when asked for: Triton is optional

        return triton_rows
    return torch_rows


@torch.library.custom_op("crossent::ce_forward", mutates_args=())
def ce_forward(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    impl: str,
) -> Tuple[Tensor, Tensor]:
    """Per-position loss (fp32; fp64 for fp64 logits) and LSE (fp64, both backends), ``logits.shape[:-1]``.

    The LSE is kept in float64 because fp32 would round it at |lse| and the backward's ``exp(z − lse)``
    would inherit that error; per row it costs O(N) (torch_rows.RowStats.lse, triton_rows._store_lse).
    """
    if logits.device.type == "cpu" and not target.is_floating_point():
        check_target_range(target, logits.shape[-1], ignore_index)
    return _backend(impl).forward(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap)


@ce_forward.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, impl):
    cdt = torch_rows.compute_dtype(logits.dtype)
    return logits.new_empty(logits.shape[:-1], dtype=cdt), logits.new_empty(logits.shape[:-1], dtype=torch.float64)


@torch.library.custom_op("crossent::ce_backward", mutates_args=())
def ce_backward(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    impl: str,
) -> Tensor:
    """Gradient w.r.t. the logits in a new tensor of the logits' shape and dtype."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backend(impl).backward(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss, softcap, out)
    return out


@ce_backward.register_fake
def _(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss, softcap, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("crossent::ce_backward_inplace", mutates_args=("logits",))
def ce_backward_inplace(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    impl: str,
) -> None:
    """Gradient w.r.t. the logits written over the logits themselves (each chunk read before written)."""
    _backend(impl).backward(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss, softcap, logits)


@ce_backward_inplace.register_fake
def _(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss, softcap, impl):
    return None


@torch.library.custom_op("crossent::ce_target_grad", mutates_args=())
def ce_target_grad(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> Tensor:
    """Gradient w.r.t. probability targets (knowledge distillation with a trainable teacher)."""
    return torch_rows.probs_target_grad(logits, target, weight, lse, grad_loss, label_smoothing, z_loss, softcap)


@ce_target_grad.register_fake
def _(logits, target, weight, lse, grad_loss, label_smoothing, z_loss, softcap):
    return torch.empty_like(target, memory_format=torch.contiguous_format)
