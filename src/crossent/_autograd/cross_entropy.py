"""The cross-entropy's autograd Function: per-row loss of logits (or a vocabulary shard of them), whichever backend
runs it (the rows' kernels, or a small CPU input's one pass).

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
from crossent.kernels import composite, ops
from crossent.kernels.one_pass import OnePass
from crossent.kernels.shard import VocabShard


class RowCall(NamedTuple):
    """How :class:`CrossEntropyRows` runs: the row options, the shard, the rows' backend, in-place backward, and
    for a small CPU call the one-pass plan (``dispatch.one_pass``; None: the rows' forward) with the list its
    forward hands the lse and the formed gradient over in (:meth:`one_pass_call`)."""

    opts: RowOptions
    shard: VocabShard
    impl: str
    inplace_backward: bool = False
    one_pass: Optional[OnePass] = None
    handed_over: Optional[list] = None

    @staticmethod
    def one_pass_call(opts: RowOptions, shard: VocabShard, inplace_backward: bool, plan: OnePass) -> "RowCall":
        """A one-pass call (the rows' backend is ``"torch"``: ``impl="auto"`` on the CPU), with an empty
        ``handed_over`` list: after forward it holds the lse (the formed gradient is moved onto the context)."""
        return RowCall(opts, shard, "torch", inplace_backward, plan, [])


class CrossEntropyRows(torch.autograd.Function):
    """Per-position cross-entropy and log-sum-exp of logits ``(..., C)`` (or of a vocabulary shard of them); with a
    one-pass plan only the loss (below).

    Saves the logits (no copy), the target, the class weights and the float64 LSE: O(N) beyond the input.
    The LSE output carries no gradient. Backward runs the fused kernels; where a transform needs the gradient
    to be differentiable itself (``create_graph=True``, a backward inside ``torch.func``) or a forward-mode
    tangent (``jvp``), the same formulas run as plain torch ops (:mod:`crossent.kernels.composite`), holding
    (..., C) temporaries. ``vmap`` moves the batch dims in front of the rows: the kernels take any batch shape.

    With a one-pass plan (small CPU inputs in plain eager mode, ``kernels/one_pass.py``) forward runs that backend;
    where the plan has a row scale (``"mean"``/``"sum"``) the loss output is already ``Σ_i row_scale · loss_i``
    (``_reduction.host_total``), and where it forms the gradient (the logits need one, not in place) the gradient
    for grad_output 1 is kept on ``ctx`` — not saved, so the first backward with grad_output 1 hands it out without
    a copy. Every other backward (another grad_output, a second one, ``"none"``, in place) runs the backend's
    gradient pass from the saved lse, into a new tensor or (in place) the logits. The lse and the formed gradient
    are handed over in the call's list (``RowCall.handed_over``), not as outputs: the loss is the only output, as
    each further one costs autograd ~1.5 µs over forward and backward (a tenth of a 64 × 1000 call's fixed cost);
    plain eager mode, which a plan implies, reads them there.
    """

    @staticmethod
    def forward(logits, target, class_weight, call: RowCall):
        plan = call.one_pass
        if plan is None:
            return ops.ce_forward(logits, target, class_weight, call.opts, call.shard, call.impl)
        loss, lse, total, formed = ops.ce_one_pass(logits, target, class_weight, call.opts, plan)
        call.handed_over[:] = lse, formed
        return loss if plan.row_scale is None else host_total(total, plan.row_scale, compute_dtype(logits.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, class_weight, call = inputs
        ctx.call, ctx.formed = call, None
        if call.one_pass is None:
            ctx.save_for_backward(logits, target, class_weight, output[1])
            ctx.save_for_forward(logits, target, class_weight)
            ctx.mark_non_differentiable(output[1])
            return
        # eager, no forward-mode AD: the formed gradient moves onto ctx (the list keeps only the lse, so that the
        # first backward's hand-out is the gradient's only reference, which autograd then takes without a copy)
        ctx.save_for_backward(logits, target, class_weight, call.handed_over[0])
        ctx.formed = call.handed_over.pop()

    @staticmethod
    def backward(ctx, grad_loss, *_grad_lse):
        c, plan, formed = ctx.call, ctx.call.one_pass, ctx.formed
        ctx.formed = None  # handed out at most once: the caller may keep and modify it
        # formed: a one pass's, for grad_output 1 (CPU, plain eager: the host read is free)
        if formed is not None and not torch.is_grad_enabled() and float(grad_loss) == 1.0:
            return formed, None, None, None
        logits, target, class_weight, lse = ctx.saved_tensors
        differentiable = torch.is_grad_enabled() or transforms_active()  # the gradient must be differentiable itself
        if plan is not None and not differentiable:  # a one pass's gradient pass
            upstream = grad_loss
            if plan.row_scale is not None:  # the loss was reduced in forward: ∂loss/∂loss_i = row_scale
                upstream = float(grad_loss) * plan.row_scale
            return ops.ce_one_pass_backward(logits, target, class_weight, lse, upstream, c.opts, plan,
                                            c.inplace_backward), None, None, None  # fmt: skip
        if plan is not None and plan.row_scale is not None:
            grad_loss = (grad_loss * plan.row_scale).expand(target.shape)
        grad_logits = grad_target = None
        if differentiable:
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
