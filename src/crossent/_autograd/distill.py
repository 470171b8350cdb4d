"""Distillation's autograd Functions: the student's gradient only (the teacher's tensors come detached), on logits
or fused with both LM heads. No loss math here: the kernels compute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from crossent._autograd.common import first_order_only, scale_forward_grads
from crossent._options import DistillRowOptions
from crossent._reduction import scaled_sum
from crossent.kernels import distill_ops
from crossent.kernels.collectives import sum_over_ranks_
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.shard import VocabShard


class DistillCall(NamedTuple):
    """How :class:`DistillRows` runs: the row options and the backend."""

    opts: DistillRowOptions
    impl: str


class LinearDistillCall(NamedTuple):
    """How the fused linear distillation Functions run: row options, shard, block loop, gradients wanted, backend."""

    opts: DistillRowOptions
    shard: VocabShard
    loop: LoopArgs
    needs: GradNeeds
    impl: str


class DistillRows(torch.autograd.Function):
    """Per-position distillation loss of student logits ``(N, V)`` against the teacher's (no gradient). Saves the
    two inputs (no copy) and the target; backward recomputes the rows with the upstream gradient."""

    @staticmethod
    def forward(input, teacher, target, call: DistillCall):
        return distill_ops.distill_forward(input, teacher, target, call.opts, call.impl)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, teacher, target, call = inputs
        ctx.save_for_backward(input, teacher, target)
        ctx.call = call

    @staticmethod
    def backward(ctx, grad_loss):
        input, teacher, target = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = distill_ops.distill_backward(input, teacher, target, grad_loss, ctx.call.opts, ctx.call.impl)
            grad = first_order_only((grad,), (input,))[0]
        return grad, None, None, None


class LinearDistillFused(torch.autograd.Function):
    """``"mean"``/``"sum"`` of the fused linear distillation: ``Σ_i row_scale · loss_i``, the student's gradients
    formed in forward (as :class:`LinearCrossEntropyFused`) and scaled by grad_output in backward."""

    @staticmethod
    def forward(input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target, row_scale,
                call: LinearDistillCall):  # fmt: skip
        scale = row_scale if any(call.needs) else None
        loss, grads = distill_ops.linear_distill(
            input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target, scale, call.opts,
            call.shard, call.loop, call.needs, call.impl,
        )  # fmt: skip
        return scaled_sum(loss, row_scale), *(loss.new_empty(0) if g is None else g for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[1:], *inputs[:3])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # as LinearCrossEntropyFused
        ctx.call = inputs[-1]

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        dx, dw, db = scale_forward_grads(ctx, grad_out, "linear_distill_loss")
        return dx, dw, db, None, None, None, None, None, None


class LinearDistillRecompute(torch.autograd.Function):
    """``"none"`` of the fused linear distillation: per-row loss; backward runs the loop again with the per-row
    upstream gradient (2 products per block in forward, 4 in backward)."""

    @staticmethod
    def forward(input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target,
                call: LinearDistillCall):  # fmt: skip
        loss, _ = distill_ops.linear_distill(
            input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target, None, call.opts,
            call.shard, call.loop, GradNeeds(False, False, False), call.impl,
        )  # fmt: skip
        return loss

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.call = inputs[-1]

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        c, wanted = ctx.call, ctx.needs_input_grad
        needs = GradNeeds(wanted[0], wanted[1], wanted[2] and saved[2] is not None)
        with torch.no_grad():
            _, grads = distill_ops.linear_distill(*saved, grad_loss, c.opts, c.shard, c.loop, needs, c.impl)
        dx, dw, db = first_order_only(tuple(grads), saved[:3])
        return sum_over_ranks_(dx, c.shard.group_name), dw, db, None, None, None, None, None
