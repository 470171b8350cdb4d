"""autograd.Function classes: save what backward needs, call the kernels. No math, no validation."""

from __future__ import annotations

import torch

from crossent import kernels
from crossent._options import CrossEntropyOptions
from crossent.kernels import linear_ops


class CrossEntropyRows(torch.autograd.Function):
    """Per-position cross-entropy of logits ``(..., C)``; saves the logits (no copy), target, LSE."""

    @staticmethod
    def forward(ctx, logits, target, weight, opts: CrossEntropyOptions, impl: str):
        loss, lse = kernels.ce_forward(
            logits, target, weight, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap, impl
        )
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.opts, ctx.impl = opts, impl
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logits, target, weight, lse = ctx.saved_tensors
        o = ctx.opts
        grad_logits = grad_target = None
        if ctx.needs_input_grad[1]:  # probability targets that require grad: needs the logits intact
            grad_target = kernels.ce_target_grad(
                logits, target, weight, lse, grad_loss, o.label_smoothing, o.z_loss, o.softcap
            )
        if ctx.needs_input_grad[0]:
            args = (target, weight, lse, grad_loss, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap, ctx.impl)
            if o.inplace_backward:
                kernels.ce_backward_inplace(logits, *args)
                grad_logits = logits
            else:
                grad_logits = kernels.ce_backward(logits, *args)
        return grad_logits, grad_target, None, None, None


def _linear_args(opts, plan, impl, needs):
    """The non-tensor arguments of the linear CE custom ops, in their order."""
    o = opts.loss
    return (o.ignore_index, o.label_smoothing, o.z_loss, o.softcap, plan.rows, plan.cols, *needs,
            opts.accumulate_dtype, impl)  # fmt: skip


def _present(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs))


def claim_forward_grads(ctx, name: str) -> None:
    """Gradients formed in forward are handed out (and scaled in place) by the first backward only."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            f"{name} with reduction 'mean'/'sum' forms its gradients in forward and hands them to the first "
            "backward; backward through it a second time (retain_graph=True) is not supported"
        )
    ctx.consumed = True


class LinearCrossEntropyFused(torch.autograd.Function):
    """``"mean"``/``"sum"`` of the fused linear CE. The gradients are formed during forward (logits, dX and dW
    products per block), for the per-row scale ``row_scale`` = ∂loss/∂loss_i; backward multiplies them by
    grad_output (in place: they are ours). Saves dX, dW, db, nothing of size N×V."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, row_scale, opts, plan, impl, needs):
        grads_wanted = any(needs)
        loss_rows, _, *grads = linear_ops.linear_ce_forward(
            input, linear_weight, linear_bias, target, weight, row_scale if grads_wanted else None,
            *_linear_args(opts, plan, impl, needs),
        )  # fmt: skip
        ctx.save_for_backward(*_present(grads, needs))
        return loss_rows.sum() * row_scale  # Σ_i row_scale · loss_i: the same scale the gradients used

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grads = ctx.saved_tensors
        if torch.compiler.is_compiling():  # traced: no host check, no Python state
            return (*[None if g is None else g * grad_out for g in grads], None, None, None, None, None, None, None)
        claim_forward_grads(ctx, "linear_cross_entropy")
        if grad_out.device.type != "cpu" or bool(grad_out != 1):  # skip a pass over dW for loss.backward() on CPU
            grads = [None if g is None else g.mul_(grad_out) for g in grads]
        return (*grads, None, None, None, None, None, None, None)


class LinearCrossEntropyRecompute(torch.autograd.Function):
    """``"none"`` of the fused linear CE: forward keeps the per-row lse (O(N)); backward, given the per-row
    grad_output, recomputes the logits block by block (4 products per block in all)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, opts, plan, impl):
        loss_rows, lse, *_ = linear_ops.linear_ce_forward(
            input, linear_weight, linear_bias, target, weight, None, *_linear_args(opts, plan, impl, (False,) * 3)
        )
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse)
        ctx.opts, ctx.plan, ctx.impl = opts, plan, impl
        return loss_rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:2]) + (ctx.needs_input_grad[2] and linear_bias is not None,)
        grads = linear_ops.linear_ce_backward(
            input, linear_weight, linear_bias, target, weight, lse, grad_loss,
            *_linear_args(ctx.opts, ctx.plan, ctx.impl, needs),
        )  # fmt: skip
        return (*_present(grads, needs), None, None, None, None, None)
