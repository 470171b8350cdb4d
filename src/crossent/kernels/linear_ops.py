"""Custom ops around the fused linear cross-entropy loops, so that ``torch.compile`` sees one opaque op each.

Eager implementations call :mod:`crossent.kernels.linear_chunks`; fake ones give the output shapes. A gradient
that is not asked for comes back as an empty tensor (custom ops cannot return None).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crossent._checks import check_target_range
from crossent.kernels import linear_chunks
from crossent.kernels.torch_rows import compute_dtype


def _args(ignore_index, label_smoothing, z_loss, softcap, rows, cols):
    return linear_chunks.LossOptions(ignore_index, label_smoothing, z_loss, softcap), linear_chunks.ChunkPlan(rows, cols)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("crossent::linear_ce_forward", mutates_args=())
def linear_ce_forward(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    grad_scale: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    rows: int,
    cols: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    accumulate: str,
    impl: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, dX, dW, db): per-row loss and lse (N,), and with ``grad_scale`` the asked-for gradients."""
    if input.device.type == "cpu":
        check_target_range(target, linear_weight.shape[0], ignore_index)
    opts, plan = _args(ignore_index, label_smoothing, z_loss, softcap, rows, cols)
    out = linear_chunks.linear_loss_and_grads(
        input, linear_weight, linear_bias, target, weight, opts, plan, grad_scale=grad_scale,
        needs=(need_input, need_weight, need_bias), accumulate=accumulate, kernels=linear_chunks.chunk_kernels(impl),
    )  # fmt: skip
    g = out.grads
    return out.loss, out.lse, _or_empty(g.input, input), _or_empty(g.weight, input), _or_empty(g.bias, input)


@linear_ce_forward.register_fake
def _(input, linear_weight, linear_bias, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
      softcap, rows, cols, need_input, need_weight, need_bias, accumulate, impl):  # fmt: skip
    loss = input.new_empty(input.shape[:1], dtype=compute_dtype(input.dtype))
    lse = input.new_empty(input.shape[:1], dtype=torch.float64)  # RowStats.lse is float64
    grads = grad_scale is not None
    return (loss, lse, *_fake_grads(input, linear_weight, linear_bias, grads and need_input, grads and need_weight,
                                    grads and need_bias))  # fmt: skip


def _fake_grads(input, linear_weight, linear_bias, need_input, need_weight, need_bias):
    """(dX, dW, db) shapes as the eager ops return them: empty for a gradient not asked for."""
    return (
        torch.empty_like(input) if need_input else input.new_empty(0),
        torch.empty_like(linear_weight) if need_weight else input.new_empty(0),
        torch.empty_like(linear_bias) if need_bias and linear_bias is not None else input.new_empty(0),
    )


@torch.library.custom_op("crossent::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    rows: int,
    cols: int,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    accumulate: str,
    impl: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) for the per-row upstream gradient, recomputing the logits block by block from ``lse``."""
    opts, plan = _args(ignore_index, label_smoothing, z_loss, softcap, rows, cols)
    g = linear_chunks.linear_grads(
        input, linear_weight, linear_bias, target, weight, lse, grad_loss, opts, plan,
        needs=(need_input, need_weight, need_bias), accumulate=accumulate, kernels=linear_chunks.chunk_kernels(impl),
    )  # fmt: skip
    return _or_empty(g.input, input), _or_empty(g.weight, input), _or_empty(g.bias, input)


@linear_ce_backward.register_fake
def _(input, linear_weight, linear_bias, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
      softcap, rows, cols, need_input, need_weight, need_bias, accumulate, impl):  # fmt: skip
    return _fake_grads(input, linear_weight, linear_bias, need_input, need_weight, need_bias)
