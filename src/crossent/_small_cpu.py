"""Small inputs on the CPU with the C row kernels: one pass forms the loss and, for a reduced loss, its gradient.

For (N, C) logits of at most ``_materialized.MATERIALIZED_MAX_ELEMENTS`` (the small-input size limit; fp32, bf16
or fp16, class dim contiguous, class-index targets, no softcap, no in-place backward) in plain eager mode without
forward-mode AD, with the C kernels built: the O(N) path's fixed cost (~150 µs: the custom ops' bookkeeping, a
separate range check, the reduction's autograd nodes) is several times its work at these sizes, and PyTorch's
fused ops need an fp32 copy of 16-bit logits. Here instead one read of the targets gives the range check and the
mean's denominator; one C pass per row gives its loss, lse and — when the logits need a gradient and the loss is
reduced — the gradient for grad_output 1, from the same exponentials (one exp per logit in all);
:class:`~crossent._autograd.cross_entropy.CrossEntropySmall` keeps that (N, C) gradient for backward (the size of the
log-probabilities PyTorch's loss keeps: the O(N) promise is relaxed below this size, as on the materialized path).
Every semantic is the O(N) path's, the results equal up to rounding (the gradient here is ``(scale / S) e_c``
where the O(N) backward computes ``scale · exp(z_c − lse)``): tests/test_small_cpu.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent import _materialized
from crossent._autograd.cross_entropy import CrossEntropySmall, SmallCall
from crossent._checks import check_target_range
from crossent._modes import forward_ad_active, plain_eager
from crossent._options import CrossEntropyOptions
from crossent._reduction import host_row_scale, host_total
from crossent._results import loss_result
from crossent.kernels import cpu_rows


def applies(input: Tensor, target: Tensor, weight: Optional[Tensor], kind: str, opts: CrossEntropyOptions) -> bool:
    """Whether a checked ``cross_entropy`` call takes this path (module docstring)."""
    return (kind == "index" and opts.impl == "auto" and input.dim() == 2 and input.device.type == "cpu"
            and input.numel() <= _materialized.MATERIALIZED_MAX_ELEMENTS and not opts.inplace_backward
            and cpu_rows.covers(input, None, opts.row) and plain_eager(input, target, weight)
            and not forward_ad_active())  # fmt: skip


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], opts: CrossEntropyOptions):
    """The loss (or :class:`~crossent.CrossEntropyStats`) of checked (N, C) logits and int64 class indices (N,)."""
    row = opts.row
    num_classes = input.shape[1]
    target = target.contiguous()
    weights = cpu_rows.class_weights(weight, num_classes)
    total_weight, out_of_range = cpu_rows.target_weight(target, weights, num_classes, row.ignore_index)
    if out_of_range:
        check_target_range(target, num_classes, row.ignore_index)  # raises the ValueError naming the index
    row_scale = host_row_scale(opts, total_weight)
    if torch.is_grad_enabled() and input.requires_grad:
        # old-style Function: its apply binds no arguments; never under a transform (applies)
        loss, lse = CrossEntropySmall.apply(input, target, weight, SmallCall(row, weights, row_scale))
    else:
        loss, lse, total = cpu_rows.forward(input, target, None, row, weights)
        loss = loss if row_scale is None else host_total(total, row_scale)
    return loss_result(loss, lse, target, weight, "index", opts, input.dtype) if opts.return_stats else loss
