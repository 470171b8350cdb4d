"""autograd.Function classes: call the kernels' custom ops, save what backward needs, hand gradients back.

No loss math and no input validation here: the kernels compute, ``functional`` validates and reduces. What
is here: which tensors are saved, which gradients are asked for, and, for vocab-parallel calls, the one
communication autograd itself must do (the sum of each rank's share of the input gradient). One Function per
algorithm, the same for one process and for vocab-parallel ranks: the ``shard`` argument is the only
difference. The fused linear Function forms its gradients in forward, so it returns the reduced loss
``Σ_i row_scale · loss_i`` with the row scale those gradients used (``_reduction.reduction_row_scale``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from crossent._options import DistillRowOptions, LogProbRowOptions, RowOptions
from crossent._precision import compute_dtype
from crossent._reduction import host_total, scaled_sum
from crossent.kernels import composite, cpu_rows, distill_ops, linear_ops, logprob_ops, ops
from crossent.kernels.collectives import sum_over_ranks_
from crossent._modes import forward_ad_active, transforms_active
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


def _batch_first(x, dim, size):
    """``x`` with its vmap batch dim first (an unbatched ``x`` expanded, without a copy)."""
    return x.expand(size, *x.shape) if dim is None else x.movedim(dim, 0)


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
    if call.shard.group_name is not None:
        raise RuntimeError(f"vocab_parallel_cross_entropy does not support {what}; gather the logits and use "
                           "crossent.cross_entropy")  # fmt: skip
    return call.opts


def _vmap_by_loop(function, info, in_dims, args):
    """A vmap rule that runs ``function`` once per batch element and stacks the outputs (dim 0): the fused
    loops take one (N, D) batch of rows, and each element's dW is its own."""
    outputs = []
    for i in range(info.batch_size):
        outputs.append(function.apply(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims))))
    stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
    return stacked, (0,) * len(stacked)


_MATERIALIZED = {  # what a fused function's refusal names as the alternative (it holds the N×V logits)
    "linear_cross_entropy": "crossent.cross_entropy(torch.nn.functional.linear(input, linear_weight, linear_bias), "
    "target, ...)",
    "linear_token_log_probs": "crossent.token_log_probs(torch.nn.functional.linear(input, linear_weight, "
    "linear_bias), index, ...)",
}


def _refuse_linear_transform(what: str, name: str = "linear_cross_entropy"):
    raise RuntimeError(
        f"{name} does not support {what}: its gradients come from fused loops that are not differentiable "
        f"themselves. Use {_MATERIALIZED[name]} for this (it holds the N×V logits)."
    )


class _FirstOrderOnly(torch.autograd.Function):
    """A fused linear gradient returned where autograd records a graph (``create_graph=True``, ``torch.func``):
    the value itself, tied to the forward's inputs so that differentiating it again raises a clear error
    instead of giving a silently zero (or missing) second derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, name, *inputs):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[1]

    @staticmethod
    def backward(ctx, *_):
        _refuse_linear_transform("second derivatives (double backward, hessian, jacrev of jacrev)", ctx.name)

    @staticmethod
    def jvp(ctx, *_):
        _refuse_linear_transform("second derivatives (double backward, hessian, jacrev of jacrev)", ctx.name)


def _first_order_only(grads, inputs, name: str = "linear_cross_entropy"):
    """The gradients as they are, or, where autograd records a graph, tied to ``inputs`` by :class:`_FirstOrderOnly`
    (``name``: the fused function a refusal names)."""
    if not torch.is_grad_enabled():
        return grads
    attach = [t for t in inputs if t is not None and t.requires_grad]
    return tuple(None if g is None else _FirstOrderOnly.apply(g, name, *attach) for g in grads)


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


def scale_forward_grads(ctx, grad_out, name: str):
    """(dX, dW, db) formed in forward (saved first, then the inputs they are tied to), times ``grad_out``; dX
    summed over the ranks of a vocabulary shard. ``ctx.call`` has ``needs`` and ``shard``."""
    if grad_out is None:  # no gradient reached the loss (grads are not materialized)
        return None, None, None
    saved = ctx.saved_tensors
    grads = [g if need else None for g, need in zip(saved[:3], ctx.call.needs)]
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or transforms_active():
        # traced, recorded or transformed: no host check, no in-place on our gradients
        grads = _first_order_only([None if g is None else g * grad_out for g in grads], saved[3:])
    else:
        claim_forward_grads(ctx, name)  # a second pass would scale (and all-reduce) again
        if grad_out.device.type != "cpu" or bool(grad_out != 1):  # on CPU, skip a pass over dW for 1
            grads = [None if g is None else g.mul_(grad_out) for g in grads]
    dx, dw, db = grads
    return sum_over_ranks_(dx, ctx.call.shard.group_name), dw, db


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
        dx, dw, db = _first_order_only((dx, dw, db), (input, linear_weight, linear_bias))
        return sum_over_ranks_(dx, c.shard.group_name), dw, db, None, None, None


# --- distillation: the student's gradient only (the teacher's tensors come detached) -----------------------


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
            grad = _first_order_only((grad,), (input,))[0]
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
        dx, dw, db = _first_order_only(tuple(grads), saved[:3])
        return sum_over_ranks_(dx, c.shard.group_name), dw, db, None, None, None, None, None


# --- the same Functions with the rules torch.func and forward-mode AD need --------------------------------------
# Kept apart because torch.compile cannot trace a Function that defines ``vmap`` or ``jvp``: the public
# functions pick these (``with_transform_rules``) only while a transform or a forward-AD level is active.


class CrossEntropyRowsTransformable(CrossEntropyRows):
    """:class:`CrossEntropyRows` with a vmap rule (batch dims moved in front of the rows) and a jvp rule
    (``Σ_c ∂loss/∂z_c ż_c`` from the composite gradient)."""

    @staticmethod
    def vmap(info, in_dims, logits, target, class_weight, call: RowCall):
        if in_dims[2] is not None:
            raise RuntimeError("cross_entropy under torch.func.vmap: the class weights must not be batched")
        logits = _batch_first(logits, in_dims[0], info.batch_size)
        target = _batch_first(target, in_dims[1], info.batch_size)
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


def _looped_and_first_order(function, name: str = "linear_cross_entropy"):
    """``function`` with a vmap rule (one call per batch element: a fused loop takes one batch of rows) and a
    jvp rule that refuses clearly, naming the public function ``name`` (its gradients are not differentiable)."""

    class Transformable(function):
        @staticmethod
        def vmap(info, in_dims, *args):
            return _vmap_by_loop(Transformable, info, in_dims, args)

        @staticmethod
        def jvp(ctx, *tangents):
            _refuse_linear_transform("forward-mode AD (torch.func.jvp, jacfwd, hessian)", name)

    Transformable.__name__ = Transformable.__qualname__ = f"{function.__name__}Transformable"
    return Transformable


# --- per-token log-probabilities and entropy ------------------------------------------------------------------


class LogProbCall(NamedTuple):
    """How :class:`TokenLogProbRows` runs: the row options, the shard, the backend."""

    opts: LogProbRowOptions
    shard: VocabShard
    impl: str


class LinearLogProbCall(NamedTuple):
    """How :class:`LinearTokenLogProbs` runs: row options, shard, block loop settings, backend."""

    opts: LogProbRowOptions
    shard: VocabShard
    loop: LoopArgs
    impl: str


def _entropy_grad(call, grad_entropy):
    """The entropy's upstream gradient, or None where the call has no entropy output (an empty placeholder)."""
    return grad_entropy if call.opts.entropy else None


class TokenLogProbRows(torch.autograd.Function):
    """``(log_probs (..., K), entropy (...) or an empty tensor, lse (...) float64)`` of logits ``(..., C)`` (or of a
    vocabulary shard of them) at ids ``(..., K)``.

    Saves the logits (no copy), the ids, the float64 LSE and the entropy: O(N·K) beyond the input. The LSE carries
    no gradient; unused outputs' gradients arrive as None (no zero tensors are made). Where the gradient must be
    differentiable itself, or under ``torch.func``, the same formulas run as plain torch ops (:mod:`composite`).
    """

    @staticmethod
    def forward(logits, index, call: LogProbCall):
        return logprob_ops.logprob_forward(logits, index, call.opts, call.shard, call.impl)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, index, call = inputs
        ctx.save_for_backward(logits, index, output[2], output[1])
        ctx.save_for_forward(logits, index)
        ctx.mark_non_differentiable(*output[2:] if call.opts.entropy else output[1:])
        ctx.set_materialize_grads(False)
        ctx.call = call

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, _grad_lse):
        logits, index, lse, entropy = ctx.saved_tensors
        c = ctx.call
        grad_entropy = _entropy_grad(c, grad_entropy)
        if not ctx.needs_input_grad[0] or (grad_log_probs is None and grad_entropy is None):
            return None, None, None
        if torch.is_grad_enabled() or transforms_active():  # the gradient must be differentiable itself
            _whole_rows_only_for("vocab_parallel_token_log_probs", c.shard, "double backward and torch.func")
            return composite.log_probs_grad(logits, index, grad_log_probs, grad_entropy, c.opts), None, None
        grad = logprob_ops.logprob_backward(logits, index, lse, entropy, grad_log_probs, grad_entropy, c.opts, c.shard,
                                            c.impl)  # fmt: skip
        return grad, None, None


def _whole_rows_only_for(name: str, shard: VocabShard, what: str) -> None:
    if shard.group_name is not None:
        raise RuntimeError(f"{name} does not support {what}; gather the logits and use the single-process function")


class LinearTokenLogProbs(torch.autograd.Function):
    """Log-probabilities and entropy of ``input · linear_weightᵀ + linear_bias`` at ids ``(N, K)``, fused: forward
    runs one logits product per block and keeps the float64 lse and the entropy (O(N)); backward, given the
    upstream gradients, recomputes the logits block by block (4 products per block in all) and, for a vocabulary
    shard, sums dX over the ranks. Nothing of size N×V is saved or held."""

    @staticmethod
    def forward(input, linear_weight, linear_bias, index, call: LinearLogProbCall):
        return logprob_ops.linear_logprob_forward(input, linear_weight, linear_bias, index, call.opts, call.shard,
                                                  call.loop, call.impl)  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, linear_weight, linear_bias, index, call = inputs
        ctx.save_for_backward(input, linear_weight, linear_bias, index, output[2], output[1])
        ctx.mark_non_differentiable(*output[2:] if call.opts.entropy else output[1:])
        ctx.set_materialize_grads(False)
        ctx.call = call

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, _grad_lse):
        input, linear_weight, linear_bias, index, lse, entropy = ctx.saved_tensors
        c = ctx.call
        grad_entropy = _entropy_grad(c, grad_entropy)
        wanted = ctx.needs_input_grad
        needs = GradNeeds(wanted[0], wanted[1], wanted[2] and linear_bias is not None)
        if not any(needs) or (grad_log_probs is None and grad_entropy is None):
            return None, None, None, None, None
        with torch.no_grad():
            dx, dw, db = logprob_ops.linear_logprob_backward(
                input, linear_weight, linear_bias, index, lse, entropy, grad_log_probs, grad_entropy, c.opts, c.shard,
                c.loop, needs, c.impl,
            )  # fmt: skip
        dx, dw, db = _first_order_only((dx, dw, db), (input, linear_weight, linear_bias), "linear_token_log_probs")
        return sum_over_ranks_(dx, c.shard.group_name), dw, db, None, None


class TokenLogProbRowsTransformable(TokenLogProbRows):
    """:class:`TokenLogProbRows` with a vmap rule (batch dims moved in front of the rows) and a jvp rule (the
    composite tangents)."""

    @staticmethod
    def vmap(info, in_dims, logits, index, call: LogProbCall):
        logits = _batch_first(logits, in_dims[0], info.batch_size)
        index = _batch_first(index, in_dims[1], info.batch_size)
        out = TokenLogProbRowsTransformable.apply(logits, index, call)
        return out, (0, 0 if call.opts.entropy else None, 0)

    @staticmethod
    def jvp(ctx, logits_tangent, _index_tangent, _call_tangent):
        logits, index = ctx.saved_tensors[:2]
        _whole_rows_only_for("vocab_parallel_token_log_probs", ctx.call.shard, "forward-mode AD")
        if logits_tangent is None:
            return None, None, None
        lp_dot, h_dot = composite.log_probs_jvp(logits, index, logits_tangent, ctx.call.opts)
        return lp_dot, h_dot, None


_TRANSFORMABLE = {
    CrossEntropyRows: CrossEntropyRowsTransformable,
    LinearCrossEntropyFused: _looped_and_first_order(LinearCrossEntropyFused),
    LinearCrossEntropyRecompute: _looped_and_first_order(LinearCrossEntropyRecompute),
    TokenLogProbRows: TokenLogProbRowsTransformable,
    LinearTokenLogProbs: _looped_and_first_order(LinearTokenLogProbs, "linear_token_log_probs"),
}


def apply_function(function, *args):
    """``with_transform_rules(function).apply(*args)``; in plain eager mode without ``Function.apply``'s per-call
    ``inspect.signature`` binding of the arguments (~15 µs, a quarter of a 64 × 1000 cross-entropy step): every
    argument here is positional, so there are no defaults to bind."""
    function = with_transform_rules(function)
    # the same test Function.apply makes before its own plain branch, which this repeats without the binding
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*torch._functorch.utils.unwrap_dead_wrappers(args))


def with_transform_rules(function):
    """``function``, or its subclass with vmap/jvp rules while a ``torch.func`` transform or a forward-mode AD
    level (``torch.autograd.forward_ad.dual_level``) is active."""
    if transforms_active() or forward_ad_active():
        return _TRANSFORMABLE[function]
    return function
