"""autograd.Function classes: save what backward needs, call the kernels. No math, no validation."""

from __future__ import annotations

import torch

from crossent import kernels
from crossent._options import CrossEntropyOptions


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
