"""Small inputs: PyTorch's own fused ``log_softmax`` + ``nll_loss``, with crossent's semantics layered on.

Below ``MATERIALIZED_MAX_ELEMENTS`` logits on the CPU the fixed cost of the O(N) path (the autograd Function,
per-row bookkeeping, the reduction's nodes: ~150 µs) outweighs its work, so ``cross_entropy`` (``impl="auto"``, class-index targets) — where
``crossent._small_cpu`` (the C kernels' one pass, tried first) does not take the call — runs PyTorch's fused
``log_softmax`` and ``nll_loss`` on the fp32 (fp64) log-probabilities instead, which saves the N×C
log-probabilities for backward — at most a few MiB at this size. Not on CUDA, not while compiling or under
a ``torch.func`` transform (the host reads below cannot be traced): the O(N) path then. Everything crossent
promises still holds: a float32 loss for 16-bit input, z-loss and softcap, a mean over zero total weight is 0
with a zero gradient, a ValueError for a class index out of range, ignored all −inf rows get a zero gradient
(such calls take the O(N) path), and ``return_stats``. tests/test_materialized.py holds the paths equal over the
option grid.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from crossent._checks import check_target_range
from crossent._modes import plain_eager
from crossent._options import CrossEntropyOptions
from crossent._precision import compute_dtype
from crossent._reduction import index_row_weight, reduce_rows
from crossent._results import loss_result

# Chosen on the 2-core x86 VM (forward+backward, fp32 and bf16, docs/benchmarks.md "Small shapes") when the O(N)
# kernels' fixed cost was ~0.7 ms and PyTorch's fused path cost ~1 ns per logit: 2^20 logits is where they met.
# The O(N) path's fixed cost is ~150 µs now (C kernels, eager fast path); the limit stays as the bound on what the
# small paths keep for backward (4 MiB of fp32 at most), and crossent._small_cpu shares it.
MATERIALIZED_MAX_ELEMENTS = 1 << 20


def applies(input: Tensor, target: Tensor, weight: Optional[Tensor], kind: str, opts: CrossEntropyOptions) -> bool:
    """Whether a checked ``cross_entropy`` call takes this path: small class-index inputs on the CPU (on CUDA
    PyTorch's nll_loss would assert on an out-of-range class instead of crossent's NaN row, and the host reads
    below would be syncs), plain eager mode (``_modes.plain_eager``: a compiled graph, a vmap, FakeTensorMode or a
    tensor subclass cannot read values on the host)."""
    return (kind == "index" and opts.impl == "auto" and input.device.type == "cpu"
            and input.numel() <= MATERIALIZED_MAX_ELEMENTS
            and plain_eager(input, target, weight))  # fmt: skip


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], opts: CrossEntropyOptions):
    """The loss (or :class:`~crossent.CrossEntropyStats`) of checked inputs in PyTorch's layout (class dim 1),
    int64 class indices; None when the call must take the O(N) path instead (ignored all −inf rows)."""
    row = opts.row
    cdt = compute_dtype(input.dtype)
    some_ignored = _some_ignored(target, row.ignore_index)
    x = input if row.softcap is None else row.softcap * torch.tanh(input.to(cdt) / row.softcap)
    class_dim = 0 if x.dim() == 1 else 1
    logp = torch.log_softmax(x, class_dim, dtype=cdt)  # 16-bit logits: cast to the compute dtype first
    if some_ignored and row.softcap is None and bool(logp.detach().select(class_dim, 0).isnan().any()):
        # an all −inf row has NaN log-probabilities; if it is ignored, PyTorch's backward gives it a NaN gradient,
        # crossent 0 (one column read, not a pass over the logits; NaN input rows take that path too, alike)
        return None
    lse = None
    if opts.return_stats or row.z_loss:
        lse = torch.logsumexp(x.to(cdt) if row.z_loss else x.detach().to(cdt), class_dim)
    try:  # nll_loss checks every class index on the CPU: the range check costs nothing when it passes
        if logp.dim() == 2 and opts.reduction != "none" and not row.z_loss:
            loss = _reduced_rows(logp, target, weight, row, opts.reduction, some_ignored)
        else:
            loss = reduce_rows(_rows(logp, target, weight, lse, row, class_dim), target, weight, "index", opts)
    except IndexError:
        check_target_range(target, logp.shape[class_dim], row.ignore_index)  # raises the ValueError
        raise
    return loss_result(loss, lse, target, weight, "index", opts, input.dtype) if opts.return_stats else loss


def _some_ignored(target: Tensor, ignore_index: int) -> bool:
    """Whether some target may be ``ignore_index`` (CPU, one reduction; a negative id below it, out of range,
    also answers yes: nll_loss then raises)."""
    if target.numel() == 0:
        return False
    if ignore_index < 0:
        return int(target.min()) <= ignore_index
    return bool((target == ignore_index).any())


def _reduced_rows(logp: Tensor, target: Tensor, weight: Optional[Tensor], row, reduction: str, some_ignored: bool) -> Tensor:
    """``"sum"`` / ``"mean"`` of (N, C) log-probabilities in a few fused ops (CPU): one ``nll_loss`` gives
    ``Σ_i w_t (−log p_t)`` and the mean's denominator ``Σ_i w_t`` over non-ignored rows; smoothing adds
    ``(ε / C) Σ_i Σ_c w_c (−log p_ic)`` over the same rows. A mean over zero total weight is 0 (zero gradient)."""
    w = None if weight is None else weight.to(logp.dtype)
    if reduction == "mean" and not row.label_smoothing:  # PyTorch's own mean, unless its denominator is 0
        mean, total_weight = torch.ops.aten.nll_loss_forward(logp, target, w, 1, row.ignore_index)  # 1: "mean"
        if float(total_weight) != 0.0:  # CPU: a free host read
            return mean
    total, total_weight = torch.ops.aten.nll_loss_forward(logp, target, w, 2, row.ignore_index)  # 2: "sum"
    if row.label_smoothing:
        eps, num_classes = row.label_smoothing, logp.shape[1]
        smooth = -(logp.sum(1) if w is None else logp @ w)
        if some_ignored:
            smooth = smooth.masked_fill(target == row.ignore_index, 0.0)
        total = (1.0 - eps) * total + (eps / num_classes) * smooth.sum()
    if reduction == "sum":
        return total
    denominator = float(total_weight)  # CPU: a free host read
    return total * 0.0 if denominator == 0.0 else total / denominator


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
