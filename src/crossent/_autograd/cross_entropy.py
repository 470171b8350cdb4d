"""The cross-entropy's autograd Functions: per-row loss of logits (or a vocabulary shard of them), and the small
CPU inputs' one-pass variant.

No loss math and no input validation here: the kernels compute, ``functional`` validates and reduces.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from crossent._autograd.common import batch_first, register_transformable, whole_rows_only
from crossent._modes import transforms_active
from crossent._options import RowOptions
from crossent._precision import compute_dtype
from crossent._reduction import host_total
from crossent.kernels import composite, cpu_rows, ops
from crossent.kernels.shard import VocabShard


class RowCall(NamedTuple):
    """How :class:`CrossEntropyRows` runs: the row options, the shard, the backend, in-place backward."""

    opts: RowOptions
    shard: VocabShard
    impl: str
    inplace_backward: bool = False



class CrossEntropyRows(torch.autograd.Function):
    """Per-position cross-entropy and log-sum-exp of logits ``(..., C)`` (or of a vocabulary shard of them).

    Saves the logits (no copy), the target, the class weights and the float64 LSE: O(N) beyond the input.
    The LSE output carries no gradient. Backward runs the fused kernels; where a transform needs the gradient
    to be differentiable itself (``create_graph=True``, a backward inside ``torch.func``) or a forward-mode
    tangent (``jvp``), the same formulas run as plain torch ops (:mod:`crossent.kernels.composite`), holding
    (..., C) temporaries. ``vmap`` moves the batch dims in front of the rows: the kernels take any batch shape.
    """

    @staticmethod
    def forward(logits, target, class_weight, call: RowCall):
        return ops.ce_forward(logits, target, class_weight, call.opts, call.shard, call.impl)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, class_weight, call = inputs
        ctx.save_for_backward(logits, target, class_weight, output[1])
        ctx.save_for_forward(logits, target, class_weight)
        ctx.mark_non_differentiable(output[1])
        ctx.call = call

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        logits, target, class_weight, lse = ctx.saved_tensors
        c = ctx.call
        grad_logits = grad_target = None
        if torch.is_grad_enabled() or transforms_active():  # the gradient must be differentiable itself
            opts = _whole_rows_only(c, "double backward (create_graph=True) and torch.func transforms")
            if ctx.needs_input_grad[0]:
                grad_logits = composite.logits_grad(logits, target, class_weight, grad_loss, opts)
            if ctx.needs_input_grad[1]:
                grad_target = composite.target_grad(logits, target, class_weight, grad_loss, opts)
            return grad_logits, grad_target, None, None
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


class SmallCall(NamedTuple):
    """How :class:`CrossEntropySmall` runs: the row options, the class weights as the C kernels take them
    (``cpu_rows.class_weights``), and the reduction's ∂loss/∂loss_i (None: per-row losses, ``"none"``)."""

    opts: RowOptions
    weights: tuple
    row_scale: Optional[float]


class CrossEntropySmall(torch.autograd.Function):
    """Small CPU inputs in plain eager mode (``crossent._small_cpu``): ``(loss, lse)`` of logits (N, C), the loss
    ``Σ_i row_scale · loss_i`` (or per row where ``row_scale`` is None).

    A reduced loss's gradient for grad_output 1 comes from the forward's C pass and is kept as ``ctx.formed`` (N×C in
    the logits' dtype; not a saved tensor, so that it can be handed out without a copy: the first backward with
    grad_output 1 — a host read: CPU — returns it and drops it). Any other backward (another grad_output, a second
    one with ``retain_graph=True``, per-row losses) runs the C gradient pass from the saved float64 lse, each
    element rounded once. Where the gradient must be differentiable itself (``create_graph=True``), the composite
    formulas run as for :class:`CrossEntropyRows`. Old-style (``forward(ctx, ...)``): ``_small_cpu`` calls it only in
    plain eager mode without forward-mode AD.
    """

    @staticmethod
    def forward(ctx, logits, target, class_weight, call: SmallCall):
        ctx.formed = None
        if call.row_scale is None:  # per-row losses: the upstream gradient comes in backward
            loss, lse, total = cpu_rows.forward(logits, target, None, call.opts, call.weights)
        else:
            ctx.formed = torch.empty(logits.shape, dtype=logits.dtype)
            loss, lse, total = cpu_rows.loss_and_grad(logits, target, None, call.row_scale, call.opts, ctx.formed,
                                                      weights=call.weights)  # fmt: skip
        ctx.save_for_backward(logits, target, class_weight, lse)
        ctx.mark_non_differentiable(lse)
        ctx.call = call
        return (loss if call.row_scale is None else host_total(total, call.row_scale)), lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        c, formed = ctx.call, ctx.formed
        ctx.formed = None  # handed out at most once: the caller may keep and modify it
        if formed is not None and not torch.is_grad_enabled() and float(grad_loss) == 1.0:
            return formed, None, None, None
        logits, target, class_weight, lse = ctx.saved_tensors
        if torch.is_grad_enabled() or transforms_active():  # the gradient must be differentiable itself
            rows = grad_loss if c.row_scale is None else (grad_loss * c.row_scale).expand(target.shape)
            return composite.logits_grad(logits, target, class_weight, rows, c.opts), None, None, None
        grad = torch.empty(logits.shape, dtype=logits.dtype)
        upstream = grad_loss if c.row_scale is None else float(grad_loss) * c.row_scale
        cpu_rows.backward(logits, target, None, lse, upstream, c.opts, grad, weights=c.weights)
        return grad, None, None, None



def _whole_rows_only(call: RowCall, what: str) -> RowOptions:
    """The row options, when the call holds whole rows; vocab-parallel shards support no transforms."""
    whole_rows_only("vocab_parallel_cross_entropy", call.shard, what, "crossent.cross_entropy")
    return call.opts


class CrossEntropyRowsTransformable(CrossEntropyRows):
    """:class:`CrossEntropyRows` with a vmap rule (batch dims moved in front of the rows) and a jvp rule
    (``Σ_c ∂loss/∂z_c ż_c`` from the composite gradient)."""

    @staticmethod
    def vmap(info, in_dims, logits, target, class_weight, call: RowCall):
        if in_dims[2] is not None:
            raise RuntimeError("cross_entropy under torch.func.vmap: the class weights must not be batched")
        logits = batch_first(logits, in_dims[0], info.batch_size)
        target = batch_first(target, in_dims[1], info.batch_size)
        return CrossEntropyRowsTransformable.apply(logits, target, class_weight, call), (0, 0)

    @staticmethod
    def jvp(ctx, logits_tangent, target_tangent, _weight_tangent, _call_tangent):
        logits, target, class_weight = ctx.saved_tensors[:3]
        opts = _whole_rows_only(ctx.call, "forward-mode AD (torch.func.jvp, jacfwd, hessian)")
        ones = torch.ones(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
        tangent = torch.zeros(logits.shape[:-1], dtype=torch.float64, device=logits.device)
        if logits_tangent is not None:
            tangent = tangent + (composite.logits_grad(logits, target, class_weight, ones, opts).double()
                                 * logits_tangent.double()).sum(-1)  # fmt: skip
        if target_tangent is not None and target.is_floating_point():
            tangent = tangent + (composite.target_grad(logits, target, class_weight, ones, opts).double()
                                 * target_tangent.double()).sum(-1)  # fmt: skip
        return tangent.to(compute_dtype(logits.dtype)), None



register_transformable(CrossEntropyRows, CrossEntropyRowsTransformable)
