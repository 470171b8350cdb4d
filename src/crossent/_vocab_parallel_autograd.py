"""autograd.Functions for vocab-parallel (linear) cross-entropy: save tensors, call the shard kernels. No math.

The forward runs the vocabulary-shard pieces of :mod:`crossent.kernels.torch_rows` in order —
``shard_stats`` → ``combine`` (the caller's all-reduce) → ``lse`` → ``index_loss`` — and saves the
logits (no copy), target, weight and the global fp32 LSE. The backward is local: ``shard_backward``
with the global LSE needs nothing from the other ranks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from crossent import _vocab_parallel_linear as linear_chunks
from crossent._options import CrossEntropyOptions
from crossent.kernels import torch_rows
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


class VocabParallelLinearRows(torch.autograd.Function):
    """Per-position loss of ``x Wᵀ + b`` with this rank's rows W ``(V_local, D)``; x ``(N, D)`` replicated.

    ``"mean"``/``"sum"`` with a gradient wanted: forward forms the gradients for a unit upstream gradient
    in the same pass (``linear_chunks.loss_and_grads``, one combine per token chunk) and backward scales
    them by the upstream gradient, which is then one number for every row. ``"none"`` (a per-row
    upstream gradient): forward combines once and saves x, W, b (no copies), target, weight and the
    global LSE; backward recomputes each chunk's logits. Either way backward returns this rank's dW, db
    and the FULL dX (``reduce_input_grad``: the caller's sum over ranks of each rank's share).
    """

    @staticmethod
    def forward(ctx, x, w, b, target, weight, shard: Shard, opts: CrossEntropyOptions, rows: int,
                combine: Combine, reduce_input_grad: Callable[[torch.Tensor], torch.Tensor]):  # fmt: skip
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        ctx.grads = None
        if opts.reduction != "none" and any(need):
            loss, lse, ctx.grads = linear_chunks.loss_and_grads(
                x, w, b, target, weight, shard.start, opts.ignore_index, opts.label_smoothing, opts.z_loss,
                opts.softcap, shard.num_classes, rows, combine, need,
            )  # fmt: skip
        else:
            local = linear_chunks.stats(x, w, b, target, weight, shard.start, opts.label_smoothing != 0.0,
                                        opts.softcap, rows)  # fmt: skip
            loss, lse = _combined_loss(local, combine, target, weight, shard, opts)
        ctx.save_for_backward(x, w, b, target, weight, lse)
        ctx.shard, ctx.opts, ctx.rows, ctx.reduce_input_grad = shard, opts, rows, reduce_input_grad
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        x, w, b, target, weight, lse = ctx.saved_tensors
        o, s = ctx.opts, ctx.shard
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        if ctx.grads is not None and _uniform(grad_loss):
            g = grad_loss.reshape(-1)[:1].reshape(())  # the one upstream value (a tensor: no host sync)
            dx, dw, db = (None if t is None else t.mul_(g.to(t.dtype)) for t in ctx.grads)
            dw = None if dw is None else dw.to(w.dtype)
            db = None if db is None else db.to(b.dtype)
        else:  # a per-row upstream gradient: recompute the chunks' logits
            dx, dw, db = linear_chunks.grads(
                x, w, b, target, weight, s.start, lse, grad_loss, o.ignore_index, o.label_smoothing, o.z_loss,
                o.softcap, s.num_classes, ctx.rows, need,
            )  # fmt: skip
        ctx.grads = None
        if dx is not None:
            dx = ctx.reduce_input_grad(dx)
        return dx, dw, db, None, None, None, None, None, None, None


def _combined_loss(local, combine, target, weight, shard, opts):
    """This rank's stats → all ranks' stats (``combine``) → (per-row loss, global LSE)."""
    stats = combine(local)
    lse = stats.lse()
    loss = torch_rows.index_loss(lse, stats.target_logit, stats.dot, target, weight, opts.ignore_index,
                                 opts.label_smoothing, opts.z_loss, shard.num_classes)  # fmt: skip
    return loss, lse


def _uniform(grad: torch.Tensor) -> bool:
    """Whether every row gets the same upstream gradient: the expanded scalar that ``sum``/``mean`` send."""
    return grad.numel() <= 1 or all(st == 0 for st in grad.stride())
