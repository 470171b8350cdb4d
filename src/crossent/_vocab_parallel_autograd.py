"""autograd.Functions for vocab-parallel (linear) cross-entropy: save tensors, call the shard kernels. No math.

Logits version: the forward runs the vocabulary-shard pieces of :mod:`crossent.kernels.torch_rows` in order —
``shard_stats`` → ``combine`` (the caller's all-reduce) → ``lse`` → ``index_loss`` — and saves the
logits (no copy), target, weight and the global LSE (float64, O(N)). The backward is local: ``shard_backward``
with the global LSE needs nothing from the other ranks. Fused linear version: the chunk loops of
:mod:`crossent.kernels.linear_chunks` with the same all-reduce as their stats hook, and one all-reduce
of the input gradient in backward.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from crossent._autograd import claim_forward_grads
from crossent._options import CrossEntropyOptions
from crossent.kernels import linear_chunks, torch_rows
from crossent.kernels.torch_rows import RowStats


class Shard(NamedTuple):
    """This rank's columns ``[start, start + size)`` of the ``num_classes`` global classes."""

    start: int
    size: int
    num_classes: int


Combine = Callable[[RowStats], RowStats]


class VocabParallelRows(torch.autograd.Function):
    """Per-position loss (full, identical on every rank) from this rank's logits ``(..., V_local)``."""

    @staticmethod
    def forward(ctx, logits, target, weight, shard: Shard, opts: CrossEntropyOptions, combine: Combine):
        local = torch_rows.shard_stats(logits, target, weight, shard.start, opts.label_smoothing != 0.0, opts.softcap)
        loss, lse = _combined_loss(local, combine, target, weight, shard, opts)
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.shard, ctx.opts = shard, opts
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logits, target, weight, lse = ctx.saved_tensors
        o, s = ctx.opts, ctx.shard
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            torch_rows.shard_backward(
                logits, target, weight, s.start, lse, grad_loss, o.ignore_index, o.label_smoothing,
                o.z_loss, o.softcap, s.num_classes, grad_logits,
            )  # fmt: skip
        return grad_logits, None, None, None, None, None


class VocabParallelLinearFused(torch.autograd.Function):
    """``"mean"``/``"sum"`` of the vocab-parallel fused linear CE, on the chunk loop of
    :func:`crossent.kernels.linear_chunks.linear_loss_and_grads` with the cross-rank ``combine`` as its
    stats hook (once per token block, the same blocks on every rank). The gradients are formed during
    forward for the per-row scale ``row_scale``; backward multiplies them by grad_output and sums this
    rank's share of dX over the ranks (``reduce_input_grad``). Returns the reduced loss, as
    :class:`crossent._autograd.LinearCrossEntropyFused` does."""

    @staticmethod
    def forward(ctx, x, w, b, target, weight, row_scale, shard: Shard, loss_opts, plan, accumulate, needs,
                combine: Combine, reduce_input_grad):  # fmt: skip
        out = linear_chunks.linear_loss_and_grads(
            x, w, b, target, weight, loss_opts, plan, grad_scale=row_scale if any(needs) else None, needs=needs,
            accumulate=accumulate, vocab_start=shard.start, num_classes=shard.num_classes, combine=combine,
        )  # fmt: skip
        ctx.save_for_backward(*(g if need else None for g, need in zip(out.grads, needs)))
        ctx.reduce_input_grad = reduce_input_grad
        return out.loss.sum() * row_scale  # Σ_i row_scale · loss_i: the scale the gradients were formed with

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        claim_forward_grads(ctx, "vocab_parallel_linear_cross_entropy")  # a second pass would all-reduce dX again
        dx, dw, db = (None if g is None else g.mul_(grad_out) for g in ctx.saved_tensors)
        if dx is not None:
            dx = ctx.reduce_input_grad(dx)
        return dx, dw, db, *(None,) * 10


class VocabParallelLinearRecompute(torch.autograd.Function):
    """``"none"`` of the vocab-parallel fused linear CE: forward combines the stats (per token block) and
    saves x, W, b (no copies), target, weight and the global LSE; backward, given the per-row upstream
    gradient, recomputes the logits block by block (:func:`~crossent.kernels.linear_chunks.linear_grads`,
    no communication) and sums this rank's share of dX over the ranks."""

    @staticmethod
    def forward(ctx, x, w, b, target, weight, shard: Shard, loss_opts, plan, accumulate, combine: Combine,
                reduce_input_grad):  # fmt: skip
        out = linear_chunks.linear_loss_and_grads(
            x, w, b, target, weight, loss_opts, plan, needs=(False, False, False), accumulate=accumulate,
            vocab_start=shard.start, num_classes=shard.num_classes, combine=combine,
        )  # fmt: skip
        ctx.save_for_backward(x, w, b, target, weight, out.lse)
        ctx.args = (shard, loss_opts, plan, accumulate, reduce_input_grad)
        return out.loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x, w, b, target, weight, lse = ctx.saved_tensors
        shard, loss_opts, plan, accumulate, reduce_input_grad = ctx.args
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        dx, dw, db = linear_chunks.linear_grads(
            x, w, b, target, weight, lse, grad_loss, loss_opts, plan, needs=needs, accumulate=accumulate,
            vocab_start=shard.start, num_classes=shard.num_classes,
        )  # fmt: skip
        if dx is not None:
            dx = reduce_input_grad(dx)
        return dx, dw, db, *(None,) * 8


def _combined_loss(local, combine, target, weight, shard, opts):
    """This rank's stats → all ranks' stats (``combine``) → (per-row loss, global LSE)."""
    stats = combine(local)
    lse = stats.lse()
    loss = torch_rows.index_loss(lse, stats.target_logit, stats.dot, target, weight, opts.ignore_index,
                                 opts.label_smoothing, opts.z_loss, shard.num_classes)  # fmt: skip
    return loss, lse
