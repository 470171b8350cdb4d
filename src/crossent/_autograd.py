"""autograd.Function classes: call the kernels' custom ops, save what backward needs, hand gradients back.

No loss math and no input validation here: the kernels compute, ``functional`` validates and reduces. What
is here: which tensors are saved, which gradients are asked for, and, for vocab-parallel calls, the one
communication autograd itself must do (the sum of each rank's share of the input gradient). One Function per
algorithm, the same for one process and for vocab-parallel ranks: the ``shard`` argument is the only
difference. The fused linear Function forms its gradients in forward, so it returns the reduced loss
``Σ_i row_scale · loss_i`` with the row scale those gradients used (``_reduction.reduction_row_scale``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from crossent._options import RowOptions
from crossent.kernels import linear_ops, ops
from crossent.kernels.collectives import sum_over_ranks_
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.shard import VocabShard


class RowCall(NamedTuple):
    """How :class:`CrossEntropyRows` runs: the row options, the shard, the backend, in-place backward."""

    opts: RowOptions
    shard: VocabShard
    impl: str
    inplace_backward: bool = False


class LinearCall(NamedTuple):
    """How the fused linear Functions run: row options, shard, block loop settings, gradients wanted, backend."""

    opts: RowOptions
    shard: VocabShard
    loop: LoopArgs
    needs: GradNeeds
    impl: str


class CrossEntropyRows(torch.autograd.Function):
    """Per-position cross-entropy and log-sum-exp of logits ``(..., C)`` (or of a vocabulary shard of them).

    Saves the logits (no copy), the target, the class weights and the float64 LSE: O(N) beyond the input.
    The LSE output carries no gradient.
    """

    @staticmethod
    def forward(logits, target, class_weight, call: RowCall):
        return ops.ce_forward(logits, target, class_weight, call.opts, call.shard, call.impl)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, class_weight, call = inputs
        ctx.save_for_backward(logits, target, class_weight, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.call = call

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_lse):
        logits, target, class_weight, lse = ctx.saved_tensors
        c = ctx.call
        grad_logits = grad_target = None
        if ctx.needs_input_grad[1]:  # probability targets that require grad: needs the logits intact
            grad_target = ops.ce_target_grad(logits, target, class_weight, lse, grad_loss, c.opts)
        if ctx.needs_input_grad[0]:
            args = (target, class_weight, lse, grad_loss, c.opts, c.shard, c.impl)
            if c.inplace_backward:
                ops.ce_backward_inplace(logits, *args)
                grad_logits = logits
            else:
                grad_logits = ops.ce_backward(logits, *args)
        return grad_logits, grad_target, None, None


def claim_forward_grads(ctx, name: str) -> None:
    """Gradients formed in forward are handed out (and scaled in place) by the first backward only."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            f"{name} with reduction 'mean'/'sum' forms its gradients in forward and hands them to the first "
            "backward; backward through it a second time (retain_graph=True) is not supported"
        )
    ctx.consumed = True


class LinearCrossEntropyFused(torch.autograd.Function):
    """``"mean"``/``"sum"`` of the fused linear CE: ``(Σ_i row_scale · loss_i, lse)``.

    The gradients are formed during forward (logits, dX and dW products per block) for the per-row scale
    ``row_scale`` = ∂loss/∂loss_i; backward multiplies them by grad_output (in place: they are ours) and, for
    a vocabulary shard, sums dX over the ranks. Saves dX, dW, db, nothing of size N×V.
    """

    @staticmethod
    def forward(input, linear_weight, linear_bias, target, class_weight, row_scale, call: LinearCall):
        scale = row_scale if any(call.needs) else None
        out = linear_ops.linear_ce_forward(
            input, linear_weight, linear_bias, target, class_weight, scale, call.opts, call.shard, call.loop,
            call.needs, call.impl,
        )  # fmt: skip
        grads = [out.lse.new_empty(0) if g is None else g for g in out.grads]  # outputs must be tensors
        return out.loss.sum() * row_scale, out.lse, *grads

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[2:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.call = inputs[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_unused):
        grads = [g if need else None for g, need in zip(ctx.saved_tensors, ctx.call.needs)]
        if torch.compiler.is_compiling():  # traced: no host check, no Python state
            grads = [None if g is None else g * grad_out for g in grads]
        else:
            claim_forward_grads(ctx, "linear_cross_entropy")  # a second pass would scale (and all-reduce) again
            if grad_out.device.type != "cpu" or bool(grad_out != 1):  # on CPU, skip a pass over dW for 1
                grads = [None if g is None else g.mul_(grad_out) for g in grads]
        dx, dw, db = grads
        return sum_over_ranks_(dx, ctx.call.shard.group_name), dw, db, None, None, None, None


class LinearCrossEntropyRecompute(torch.autograd.Function):
    """``"none"`` of the fused linear CE: per-row ``(loss, lse)``. Forward keeps the per-row lse (O(N));
    backward, given the per-row grad_output, recomputes the logits block by block (4 products per block in
    all) and, for a vocabulary shard, sums dX over the ranks."""

    @staticmethod
    def forward(input, linear_weight, linear_bias, target, class_weight, call: LinearCall):
        out = linear_ops.linear_ce_forward(
            input, linear_weight, linear_bias, target, class_weight, None, call.opts, call.shard, call.loop,
            GradNeeds(False, False, False), call.impl,
        )  # fmt: skip
        return out.loss, out.lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, linear_weight, linear_bias, target, class_weight, call = inputs
        ctx.save_for_backward(input, linear_weight, linear_bias, target, class_weight, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.call = call

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_lse):
        input, linear_weight, linear_bias, target, class_weight, lse = ctx.saved_tensors
        c = ctx.call
        wanted = ctx.needs_input_grad
        needs = GradNeeds(wanted[0], wanted[1], wanted[2] and linear_bias is not None)
        dx, dw, db = linear_ops.linear_ce_backward(
            input, linear_weight, linear_bias, target, class_weight, lse, grad_loss, c.opts, c.shard, c.loop, needs,
            c.impl,
        )  # fmt: skip
        return sum_over_ranks_(dx, c.shard.group_name), dw, db, None, None, None
