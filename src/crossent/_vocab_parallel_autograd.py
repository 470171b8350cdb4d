"""autograd.Function for vocab-parallel cross-entropy: save tensors, call the shard kernels. No math.

The forward runs the vocabulary-shard pieces of :mod:`crossent.kernels.torch_rows` in order —
``shard_stats`` → ``combine`` (the caller's all-reduce) → ``lse`` → ``index_loss`` — and saves the
logits (no copy), target, weight and the global fp32 LSE. The backward is local: ``shard_backward``
with the global LSE needs nothing from the other ranks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

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
        stats = combine(local)
        lse = stats.lse()
        loss = torch_rows.index_loss(
            lse, stats.target_logit, stats.dot, target, weight,
            opts.ignore_index, opts.label_smoothing, opts.z_loss, shard.num_classes,
        )  # fmt: skip
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
