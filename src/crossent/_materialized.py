"""Small inputs: PyTorch's own fused ``log_softmax`` + ``nll_loss``, with crossent's semantics layered on.

Below ``MATERIALIZED_MAX_ELEMENTS`` logits the fixed cost of the O(N) path (options, custom ops, a few dozen
per-row torch ops) outweighs its work, so ``cross_entropy`` (``impl="auto"``, class-index targets) runs
``torch.nn.functional.cross_entropy`` on the fp32 (fp64) logits instead, which saves the N×C log-probabilities
for backward — at most a few MiB at this size. Everything crossent promises still holds: a float32 loss for
16-bit input, z-loss and softcap, a mean over zero total weight is 0 with a zero gradient, a ValueError for a
class index out of range (CPU), ignored all −inf rows get a zero gradient (such calls take the O(N) path), and
``return_stats``. tests/test_materialized.py holds the two paths equal over the option grid.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from crossent._checks import check_target_range
from crossent._options import CrossEntropyOptions
from crossent._precision import compute_dtype
from crossent._reduction import index_row_weight, reduce_rows
from crossent._results import loss_result

# Measured on the 2-core x86 VM (forward+backward, fp32 and bf16, docs/benchmarks.md "Small shapes"): the
# O(N) kernels' fixed cost is ~0.7 ms, PyTorch's fused path costs ~1 ns per logit; 2^20 logits is where they
# meet within noise (and 4 MiB of fp32 log-probabilities is what the relaxed saving costs at most).
MATERIALIZED_MAX_ELEMENTS = 1 << 20


def applies(input: Tensor, kind: str, opts: CrossEntropyOptions) -> bool:
    """Whether a checked ``cross_entropy`` call takes this path."""
    return kind == "index" and opts.impl == "auto" and input.numel() <= MATERIALIZED_MAX_ELEMENTS


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], opts: CrossEntropyOptions):
    """The loss (or :class:`~crossent.CrossEntropyStats`) of checked inputs in PyTorch's layout (class dim 1),
    int64 class indices; None when the call must take the O(N) path instead (ignored all −inf rows)."""
    row = opts.row
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    on_cpu = input.device.type == "cpu"
    some_ignored, any_valid = True, target.numel() > 0  # known without reading the target (CUDA: no host sync)
    if on_cpu and target.numel():
        lo, hi = (int(v) for v in torch.aminmax(target))  # one pass answers the common case
        if lo == row.ignore_index and 0 <= hi < num_classes:  # ignored ids below the classes: the rest in range?
            lo_valid = int(torch.where(target == lo, hi, target).min())
            if lo_valid < 0:
                check_target_range(target, num_classes, row.ignore_index)
        elif not (0 <= lo and hi < num_classes):
            check_target_range(target, num_classes, row.ignore_index)
        some_ignored = lo <= row.ignore_index <= hi
        any_valid = not (lo == hi == row.ignore_index)
    cdt = compute_dtype(input.dtype)
    if row.softcap is not None:
        x = row.softcap * torch.tanh(input.to(cdt) / row.softcap)
    elif on_cpu and some_ignored and input.numel() and float(input.detach().min()) == -math.inf:  # one reduction
        return None  # an ignored row may be all −inf: PyTorch's backward gives it NaN, crossent 0
    else:
        x = input
    class_dim = 0 if x.dim() == 1 else 1
    logp = torch.log_softmax(x, class_dim, dtype=cdt)  # 16-bit logits: upcast inside the kernel, no copy
    lse = None
    if opts.return_stats or row.z_loss:
        lse = torch.logsumexp(x.to(cdt) if row.z_loss else x.detach().to(cdt), class_dim)
    if opts.reduction == "none" or weight is not None or row.z_loss or row.label_smoothing or not on_cpu:
        loss = reduce_rows(_rows(logp, target, weight, lse, row, class_dim), target, weight, "index", opts)
    else:  # the common case in one fused call; a mean over no valid target is the (zero) sum instead of NaN
        empty_mean = opts.reduction == "mean" and not any_valid
        loss = F.nll_loss(logp, target, ignore_index=row.ignore_index, reduction="sum" if empty_mean else opts.reduction)
    return loss_result(loss, lse, target, weight, "index", opts, input.dtype) if opts.return_stats else loss


def _rows(logp, target, weight, lse, row, class_dim):
    """Per-position loss from the log-probabilities, PyTorch's formula with crossent's z-loss:
    ``(1 − ε) w_t (−log p_t) + (ε / C) Σ_c w_c (−log p_c) + s w_t lse²``, 0 where ignored."""
    w = None if weight is None else weight.to(logp.dtype)
    rows = F.nll_loss(logp, target, w, ignore_index=row.ignore_index, reduction="none")
    if row.label_smoothing:
        eps, num_classes = row.label_smoothing, logp.shape[class_dim]
        w_c = 1.0 if w is None else w.view([-1] + [1] * (logp.dim() - class_dim - 1))
        smooth = -(logp * w_c).sum(class_dim)
        rows = (1.0 - eps) * rows + torch.where(target != row.ignore_index, (eps / num_classes) * smooth, 0.0)
    if row.z_loss:
        rows = rows + row.z_loss * index_row_weight(target, weight, row.ignore_index, logp.dtype) * lse * lse
    return rows
