"""The per-token log-probabilities' and entropy's autograd Functions: on logits (or a vocabulary shard of them),
and fused with the LM head. No loss math here: the kernels compute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from crossent._autograd.common import (
    batch_first,
    first_order_only,
    looped_and_first_order,
    register_transformable,
    whole_rows_only,
)
from crossent._modes import transforms_active
from crossent._options import LogProbRowOptions
from crossent.kernels import composite, logprob_ops
from crossent.kernels.collectives import sum_over_ranks_
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.shard import VocabShard


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


def _mark_outputs(ctx, output, opts: LogProbRowOptions) -> None:
    """The outputs ``(log_probs, entropy, lse, log_sum_sq_probs, mean_logits, is_top1)``: only the log-probs and an
    asked-for entropy carry gradients; the lse and the three statistics never do (nor the empty placeholders)."""
    ctx.mark_non_differentiable(*output[2:] if opts.entropy else output[1:])
    ctx.set_materialize_grads(False)


def _out_dims(opts: LogProbRowOptions):
    """vmap's output dims of the six outputs: 0, or None for an empty placeholder."""
    flags = (True, opts.entropy, True, opts.log_sum_sq_probs, opts.mean_logits, opts.is_top1)
    return tuple(0 if f else None for f in flags)


class TokenLogProbRows(torch.autograd.Function):
    """``(log_probs (..., K), entropy (...), lse (...) float64, log_sum_sq_probs (...), mean_logits (...), is_top1
    (..., K))`` of logits ``(..., C)`` (or of a vocabulary shard of them) at ids ``(..., K)``, the optional ones empty
    tensors when not asked (``logprob_ops``).

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
        _mark_outputs(ctx, output, call.opts)
        ctx.call = call

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_no_grads):
        logits, index, lse, entropy = ctx.saved_tensors
        c = ctx.call
        grad_entropy = _entropy_grad(c, grad_entropy)
        if not ctx.needs_input_grad[0] or (grad_log_probs is None and grad_entropy is None):
            return None, None, None
        if torch.is_grad_enabled() or transforms_active():  # the gradient must be differentiable itself
            whole_rows_only("vocab_parallel_token_log_probs", c.shard, "double backward and torch.func")
            return composite.log_probs_grad(logits, index, grad_log_probs, grad_entropy, c.opts), None, None
        grad = logprob_ops.logprob_backward(logits, index, lse, entropy, grad_log_probs, grad_entropy, c.opts, c.shard,
                                            c.impl)  # fmt: skip
        return grad, None, None


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
        _mark_outputs(ctx, output, call.opts)
        ctx.call = call

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_no_grads):
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
        dx, dw, db = first_order_only((dx, dw, db), (input, linear_weight, linear_bias), "linear_token_log_probs")
        return sum_over_ranks_(dx, c.shard.group_name), dw, db, None, None


class TokenLogProbRowsTransformable(TokenLogProbRows):
    """:class:`TokenLogProbRows` with a vmap rule (batch dims moved in front of the rows) and a jvp rule (the
    composite tangents)."""

    @staticmethod
    def vmap(info, in_dims, logits, index, call: LogProbCall):
        logits = batch_first(logits, in_dims[0], info.batch_size)
        index = batch_first(index, in_dims[1], info.batch_size)
        out = TokenLogProbRowsTransformable.apply(logits, index, call)
        return out, _out_dims(call.opts)

    @staticmethod
    def jvp(ctx, logits_tangent, _index_tangent, _call_tangent):
        logits, index = ctx.saved_tensors[:2]
        whole_rows_only("vocab_parallel_token_log_probs", ctx.call.shard, "forward-mode AD")
        if logits_tangent is None:
            return (None,) * 6
        lp_dot, h_dot = composite.log_probs_jvp(logits, index, logits_tangent, ctx.call.opts)
        return lp_dot, h_dot, None, None, None, None


register_transformable(TokenLogProbRows, TokenLogProbRowsTransformable)
register_transformable(LinearTokenLogProbs, looped_and_first_order(LinearTokenLogProbs, "linear_token_log_probs"))
