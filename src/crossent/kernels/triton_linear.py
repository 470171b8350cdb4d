"""linear_cross_entropy's chunk kernels on Triton: the swappable :class:`ChunkKernels` for ``impl="triton"``.

Fused: per block of whole-vocabulary rows, the LSE pass, the loss and the finished gradient, in one kernel.
Never materialized: anything beyond the loop's own block buffer; no row factors are left for the loop to apply.
Written in place: that block buffer (the loop's scratch, never a caller's tensor), turned into the block's gradient.

Which block runs where. The forward step on a block holding whole rows of the head (``vocab_start`` 0, all C
columns, no stats hook) in float32 runs :func:`crossent.kernels.triton_rows.chunk_loss_and_grad_`; the
recompute step on any float32 block (whole rows, a vocabulary-split piece or a vocab-parallel slice: its
gradient needs only the full rows' saved LSE) runs the row backward kernel in place. Both return
:data:`FINISHED` factors, so the loop's products take the gradient as it is. The forward step on a piece or
slice (whose row statistics need the other pieces or ranks before any gradient exists), float64 blocks, and
the first pass of a split (``stats``) run the torch chunk kernels of :mod:`crossent.kernels.linear_step`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent._options import RowOptions
from crossent.kernels import linear_step, triton_rows
from crossent.kernels.linear_step import FINISHED, ChunkGrad, ChunkKernels, GradFactors
from crossent.kernels.shard import VocabShard


def loss_and_grad_(logits: Tensor, target: Tensor, class_weight, grad_scale, opts: RowOptions, *, vocab_start=0,
                   num_classes=None, combine=None, recompute=None) -> ChunkGrad:  # fmt: skip
    """The forward chunk step (contract of :func:`linear_step.chunk_loss_and_grad_`) on Triton."""
    if not _whole_rows(logits, vocab_start, num_classes, combine):
        return linear_step.chunk_loss_and_grad_(
            logits, target, class_weight, grad_scale, opts,
            vocab_start=vocab_start, num_classes=num_classes, combine=combine, recompute=recompute,
        )  # fmt: skip
    loss, lse = triton_rows.chunk_loss_and_grad_(logits, target, class_weight, grad_scale, opts)
    return ChunkGrad(loss, lse, FINISHED)


def grad_(logits: Tensor, target: Tensor, class_weight, lse, grad_scale, opts: RowOptions, *, vocab_start=0,
          num_classes=None) -> GradFactors:  # fmt: skip
    """The recompute chunk step (contract of :func:`linear_step.chunk_grad_`) on Triton: any float32 block,
    also a vocabulary piece (its gradient needs only the full rows' ``lse``), written finished in place."""
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        return linear_step.chunk_grad_(
            logits, target, class_weight, lse, grad_scale, opts, vocab_start=vocab_start, num_classes=num_classes
        )
    shard = VocabShard(vocab_start, logits.shape[-1] if num_classes is None else num_classes)
    triton_rows.backward(logits, target, class_weight, lse, grad_scale, opts, logits, shard)
    return FINISHED


def _whole_rows(logits: Tensor, vocab_start: int, num_classes: Optional[int], combine) -> bool:
    """Whether the block is whole float32 rows of the head, all its statistics in this block."""
    whole = vocab_start == 0 and (num_classes is None or num_classes == logits.shape[-1]) and combine is None
    return whole and logits.dtype == torch.float32 and logits.stride(-1) == 1


TRITON_KERNELS = ChunkKernels(loss_and_grad_, grad_, linear_step.chunk_stats)
