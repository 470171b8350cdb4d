"""The fused linear cross-entropy's autograd Functions: gradients formed in forward (``"mean"``/``"sum"``), or the
per-row loss with the logits recomputed in backward (``"none"``).

The fused Function returns the reduced loss ``Σ_i row_scale · loss_i`` with the row scale its gradients used
(``_reduction.reduction_row_scale``). No loss math here: the kernels' loops compute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from crossent._autograd.common import (
    first_order_only,
    looped_and_first_order,
    register_transformable,
    scale_forward_grads,
)
from crossent._options import RowOptions
from crossent._reduction import scaled_sum
from crossent.kernels import linear_ops
from crossent.kernels.collectives import sum_over_ranks_
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.shard import VocabShard


class LinearCall(NamedTuple):
    """How the fused linear Functions run: row options, shard, block loop settings, gradients wanted, backend."""

    opts: RowOptions
    shard: VocabShard
    loop: LoopArgs
    needs: GradNeeds
    impl: str


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
        return scaled_sum(out.loss, row_scale), out.lse, *grads

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[2:], *inputs[:3])  # the inputs: only to tie a recorded gradient to them
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero "gradients" of dX, dW, db: a pass over V×D per backward
        ctx.call = inputs[-1]

    @staticmethod
    def backward(ctx, grad_out, *_unused):
        dx, dw, db = scale_forward_grads(ctx, grad_out, "linear_cross_entropy")
        return dx, dw, db, None, None, None, None


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
    def backward(ctx, grad_loss, _grad_lse):
        input, linear_weight, linear_bias, target, class_weight, lse = ctx.saved_tensors
        c = ctx.call
        wanted = ctx.needs_input_grad
        needs = GradNeeds(wanted[0], wanted[1], wanted[2] and linear_bias is not None)
        with torch.no_grad():
            dx, dw, db = linear_ops.linear_ce_backward(
                input, linear_weight, linear_bias, target, class_weight, lse, grad_loss, c.opts, c.shard, c.loop,
                needs, c.impl,
            )  # fmt: skip
        dx, dw, db = first_order_only((dx, dw, db), (input, linear_weight, linear_bias))
        return sum_over_ranks_(dx, c.shard.group_name), dw, db, None, None, None


register_transformable(LinearCrossEntropyFused, looped_and_first_order(LinearCrossEntropyFused))
register_transformable(LinearCrossEntropyRecompute, looped_and_first_order(LinearCrossEntropyRecompute))
