"""The fused linear CE's chunk step in torch ops: one block of logits → its loss, lse and gradient factors.

Fused: per (rows, V_s) block of logits, the softmax (or exp), the loss and the gradient's row factors.
Never materialized: anything beyond the block buffer the loop hands in; the gradient is left factored.
Written in place: only that block buffer (the loop's scratch), turned into the block's factored gradient ``Q``.

The step is swappable per backend (:class:`ChunkKernels`; Triton's is in ``triton_linear``); the loops
that call it are in ``linear_loop``, the block shape in ``linear_plan``. The notation is that of
docs/linear_cross_entropy.md: the block gradient is ``G = diag(scale) Q − target_coef ⊙ onehot(t) −
smooth_coef ⊗ w``, so the loop applies the row factors after its products, at O(rows · D).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from crossent._options import RowOptions
from crossent.kernels.torch_rows import (
    RowStats,
    StatsHook,
    index_grad_factors,
    index_loss,
    index_masks,
    local_targets,
    shard_backward,
    shard_stats,
    shard_weight,
    weighted_sum,
)

# One (rows, V_s) block of logits of the vocabulary columns [v0, v0 + V_s) of a C-class head, in a buffer
# the step may overwrite. Per row, with ω = w_t (0 when ignored), W = Σ_c w_c, g the upstream gradient
# (torch_rows and docs/math.md derive it):
#   ∂loss/∂z_c = g ((ω (1 − ε + 2 s lse) + ε W / C) p_c − ω (1 − ε) [c = t] − ε w_c / C)
# i.e. scale · p_c − target_coef · [c = t] − smooth_coef · w_c: torch_rows.index_grad_factors, applied here
# as the three GradFactors below. A stats hook (vocab-parallel) is called once per block of rows, on every rank.

class GradFactors(NamedTuple):
    """The block gradient is ``diag(scale) Q − target_coef ⊙ onehot(t − v0) − smooth_coef ⊗ w[v0 : v0 + V_s]``.

    ``Q`` is the block buffer after the step. A None ``scale`` means 1, a None coefficient 0; so a step that
    writes the finished gradient into the buffer returns ``GradFactors(None, None, None)``. ``target_coef``
    is 0 on rows whose target lies outside the block's columns. All per-row, in the compute dtype.
    """

    scale: Optional[Tensor]
    target_coef: Optional[Tensor]
    smooth_coef: Optional[Tensor]


FINISHED = GradFactors(None, None, None)


class ChunkGrad(NamedTuple):
    """What the forward chunk step returns: per-row loss (compute dtype), global lse (float64), the factors."""

    loss: Tensor
    lse: Tensor
    factors: GradFactors


# Below this the fp32 target probability has lost bits (normal floats end at 2^-126): the loss is then
# above ~69 and the CPU fast path recomputes the block and takes the max-first path instead.
_TINY_PROB = 2.0**-100


def chunk_loss_and_grad_(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    grad_scale: Optional[Tensor],
    opts: RowOptions,
    *,
    vocab_start: int = 0,
    num_classes: Optional[int] = None,
    combine: Optional[StatsHook] = None,
    recompute: Optional[Callable[[], None]] = None,
) -> ChunkGrad:
    """The forward chunk step: per-row loss and lse of a logits block, and its gradient written in place.

    Args:
        logits: (rows, V_s) logits of the columns [vocab_start, vocab_start + V_s), in the compute dtype
            (float32, or float64), contiguous; ours: it is overwritten (with ``Q`` of :class:`GradFactors`).
        target: (rows,) int64 global class ids in [0, C) or ``ignore_index``.
        class_weight: None or (C,) global class weights.
        grad_scale: (rows,) upstream gradient per row (may be stride-0), or None for the loss alone
            (then the buffer's content afterwards is unspecified and ``factors`` is ``FINISHED``).
        opts: the row options (``ignore_index``, ``label_smoothing``, ``z_loss``, ``softcap``).
        vocab_start, num_classes: where the block's columns sit in the C-class head (default: all of it).
        combine: :data:`StatsHook` from this block's stats to the global ones (None: the block is all).
        recompute: refills ``logits`` with the block's raw logits. With it, and on the CPU with the whole
            vocabulary in the block, the step takes a one-pass softmax path; without it, the max-first path.

    Returns:
        :class:`ChunkGrad`; ``lse`` is the global log-sum-exp of every row (ignored ones too).
    """
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    args = (logits, target, class_weight, grad_scale, opts)
    if opts.softcap is not None:
        return _capped_loss_and_grad_(*args, vocab_start, num_classes, combine)
    whole = vocab_start == 0 and logits.shape[-1] == num_classes and combine is None
    if whole and recompute is not None and logits.device.type == "cpu":
        done = _softmax_loss_and_grad_(*args)
        if done is not None:
            return done
        recompute()
    return _exp_loss_and_grad_(*args, vocab_start, num_classes, combine)


def chunk_grad_(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    lse: Tensor,
    grad_scale: Tensor,
    opts: RowOptions,
    *,
    vocab_start: int = 0,
    num_classes: Optional[int] = None,
) -> GradFactors:
    """The recompute chunk step: the block's gradient in place, from the global per-row ``lse``.

    Same arguments as :func:`chunk_loss_and_grad_`, with ``lse`` (rows,) the global log-sum-exp saved by
    the forward step. Used by the ``"none"`` reduction's backward and by vocabulary-split blocks.
    """
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    if opts.softcap is not None:
        shard_backward(logits, target, class_weight, vocab_start, lse, grad_scale, opts, num_classes, logits)
        return FINISHED
    factors = _grad_factors(target, class_weight, lse, grad_scale, opts, vocab_start, logits.shape[-1], num_classes,
                            logits.dtype)  # fmt: skip
    if vocab_start == 0 and logits.shape[-1] == num_classes:
        _softmax_(logits)  # p itself: one fused pass (the softmax recomputes this very lse)
    else:  # p = exp(z − lse); rows without gradient get shift +inf, so exactly 0 (no inf · 0)
        shift = lse.masked_fill(factors.scale == 0, math.inf)
        torch.sub(logits, shift.unsqueeze(-1), out=logits).exp_()
    return factors


def chunk_stats(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    opts: RowOptions,
    *,
    vocab_start: int = 0,
) -> RowStats:
    """Per-row stats of one vocabulary block (first pass of a vocabulary-split block); reads ``logits`` only."""
    return shard_stats(logits, target, class_weight, vocab_start, opts.label_smoothing != 0.0, opts.softcap)


class ChunkKernels(NamedTuple):
    """The elementwise work of the loops, swappable per backend: the three functions above."""

    loss_and_grad_: Callable[..., ChunkGrad]
    grad_: Callable[..., GradFactors]
    stats: Callable[..., RowStats]


TORCH_KERNELS = ChunkKernels(chunk_loss_and_grad_, chunk_grad_, chunk_stats)


def _softmax_(x: Tensor) -> None:
    """``x ← softmax(x)`` along the last dim, in place: one fused kernel that reads each row before writing it."""
    torch._softmax(x, -1, False, out=x)


def _softmax_loss_and_grad_(x, target, class_weight, grad_scale, opts):
    """CPU fast path, whole rows: ``Q = softmax(z)`` in place, ``lse = z_t − log p_t`` (no separate max pass).

    Ignored rows use the column their index is clamped to. Returns None, touching nothing but ``x``, if
    some row's ``p_t`` underflows (its loss is > ~69): the caller then recomputes the block.
    """
    num_classes = x.shape[-1]
    _, t_safe, _ = index_masks(target, opts.ignore_index, num_classes)
    column = t_safe.unsqueeze(-1)
    z_t = x.gather(-1, column).squeeze(-1)
    dot = weighted_sum(x, shard_weight(class_weight, 0, num_classes, x.dtype)) if opts.label_smoothing else None
    _softmax_(x)
    p_t = x.gather(-1, column).squeeze(-1)
    if bool((p_t < _TINY_PROB).any()):  # CPU only: a free host check
        return None
    lse = z_t.double() - p_t.double().log()  # float64, as RowStats.lse()
    loss = index_loss(lse, z_t, dot, target, class_weight, opts, num_classes)
    factors = FINISHED if grad_scale is None else _grad_factors(target, class_weight, lse, grad_scale, opts, 0,
                                                                 num_classes, num_classes, x.dtype)  # fmt: skip
    return ChunkGrad(loss, lse, factors)


def _exp_loss_and_grad_(x, target, class_weight, grad_scale, opts, vocab_start, num_classes, combine):
    """Max-first path, any block: ``Q = exp(z − m)`` in place; stats as :func:`shard_stats` gives them."""
    local, t_local = local_targets(target, vocab_start, x.shape[-1])
    z_t = torch.where(local, x.gather(-1, t_local.unsqueeze(-1)).squeeze(-1), 0.0)
    w_shard = shard_weight(class_weight, vocab_start, x.shape[-1], x.dtype)
    dot = weighted_sum(x, w_shard) if opts.label_smoothing else None
    row_max = x.amax(-1).clamp_(min=torch.finfo(x.dtype).min)  # an all −inf row: sumexp 0, not NaN
    torch.sub(x, row_max.unsqueeze(-1), out=x).exp_()
    local = RowStats(row_max, x.sum(-1), z_t, dot)
    stats = local if combine is None else combine(local)
    lse = stats.lse()
    loss = index_loss(lse, stats.target_logit, stats.dot, target, class_weight, opts, num_classes)
    if grad_scale is None:
        return ChunkGrad(loss, lse, FINISHED)
    # p = Q · exp(m − lse): the normalisation folds into the row scale
    factors = _grad_factors(target, class_weight, lse, grad_scale, opts, vocab_start, x.shape[-1], num_classes,
                            x.dtype, rescale=torch.exp(row_max - lse))  # fmt: skip
    return ChunkGrad(loss, lse, factors)


def _capped_loss_and_grad_(x, target, class_weight, grad_scale, opts, vocab_start, num_classes, combine):
    """Softcap: the tanh chain rule is elementwise, so the torch row kernels write the finished gradient."""
    local = shard_stats(x, target, class_weight, vocab_start, opts.label_smoothing != 0.0, opts.softcap)
    stats = local if combine is None else combine(local)
    lse = stats.lse()
    loss = index_loss(lse, stats.target_logit, stats.dot, target, class_weight, opts, num_classes)
    if grad_scale is not None:
        shard_backward(x, target, class_weight, vocab_start, lse, grad_scale, opts, num_classes, x)
    return ChunkGrad(loss, lse, FINISHED)


def _grad_factors(target, class_weight, lse, grad_scale, opts, vocab_start, shard_size, num_classes, dtype,
                  rescale=None):  # fmt: skip
    """:func:`torch_rows.index_grad_factors` (float64, O(rows)) in the block's ``dtype``, the scale times
    ``rescale`` when the block holds ``exp(z − m)`` rather than ``p``."""
    f = index_grad_factors(target, class_weight, lse, grad_scale, opts, vocab_start, shard_size, num_classes)
    scale = f.scale if rescale is None else torch.where(f.scale == 0, 0.0, f.scale * rescale)  # not 0 · inf
    smooth = None if f.smooth_coef is None else f.smooth_coef.to(dtype)
    return GradFactors(scale.to(dtype), f.target_coef.to(dtype), smooth)
