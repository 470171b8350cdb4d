"""Small CPU inputs: one pass gives per-row loss, lse and — for a reduced loss whose logits need a gradient — that
gradient, formed in forward for the reduction's known row scale. Never materialized: nothing beyond the (N, C)
gradient that is kept for backward. Written in place: the logits, by :func:`backward`, for ``inplace_backward``
(forward then forms no gradient).

Two backends with one contract (:func:`forward`), chosen by ``dispatch.one_pass_backend``:

- ``"c"``: the C kernels' one pass (``cpu_rows.one_pass_rows``: one exp per logit for loss and gradient), for fp32 /
  bf16 / fp16 rows with the class dim contiguous;
- ``"aten"``: PyTorch's fused ``log_softmax`` and ``nll_loss`` (and their backward kernels for the gradient), for
  the rest, and for the shapes where PyTorch's kernel is the faster (``dispatch.PYTORCH_FASTER_FROM``).

Both run in plain eager mode only (they read values on the host) and only below ``dispatch.ONE_PASS_MAX_ELEMENTS``
logits, where the kept (N, C) gradient — the size of the log-probabilities PyTorch's own loss keeps — is small.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from crossent._checks import check_target_range
from crossent._options import RowOptions
from crossent._precision import compute_dtype
from crossent._reduction import index_mean_denominator, index_row_weight
from crossent.kernels import cpu_rows, torch_rows


class OnePass(NamedTuple):
    """A small call's one-pass plan (``dispatch.one_pass``): the backend (``"c"`` or ``"aten"``), the reduction's
    ``∂(reduced loss)/∂loss_i`` read on the host (None: per-row losses, ``"none"``), whether forward forms the
    gradient for it (the logits need one and it is not written in place), and the class weights as the C kernels
    take them (``cpu_rows.class_weights``)."""

    backend: str
    row_scale: Optional[float]
    form_grad: bool
    weights: tuple


def target_total_weight(target: Tensor, weights: tuple, num_classes: int, ignore_index: int) -> float:
    """``Σ_i w_{t_i}`` over the non-ignored class indices ``target`` (int64, (N,)) — the weighted mean's denominator
    — after checking that every index lies in [0, C) or is ``ignore_index`` (the ValueError names the first that
    does not). One read of the targets on the host (in C where the kernels are built)."""
    w64, _, _ = weights
    if cpu_rows.available():
        total, out_of_range = cpu_rows.target_weight(target.contiguous(), weights, num_classes, ignore_index)
        if out_of_range:
            check_target_range(target, num_classes, ignore_index)  # raises the ValueError naming the index
        return total
    check_target_range(target, num_classes, ignore_index)
    return float(index_mean_denominator(target, w64, ignore_index, torch.float64))


def forward(logits: Tensor, target: Tensor, class_weight: Optional[Tensor], opts: RowOptions, plan: OnePass):
    """Per-row loss (compute dtype, flat (N,); may be None where the plan has a row scale: the sum is what is
    wanted then), float64 lse (N,), the float64 sum of the losses, and the gradient ``row_scale · ∂loss/∂logits`` in
    the logits' dtype and shape where ``plan.form_grad`` (else None), of logits (N, C) and checked int64 class
    indices (N,)."""
    if plan.backend == "c":
        return _c_forward(logits, target, opts, plan)
    return _aten_forward(logits, target, class_weight, opts, plan)


def backward(logits: Tensor, target: Tensor, class_weight: Optional[Tensor], lse: Tensor, upstream, opts: RowOptions,
             plan: OnePass, out: Tensor) -> None:  # fmt: skip
    """Write ``upstream · ∂loss/∂logits`` into ``out`` (N, C) (may be the logits) from the float64 ``lse`` (N,);
    ``upstream`` a float for every row or a tensor (N,): the C gradient pass, or the rows' torch kernels for "aten"
    (they read PyTorch's own softmax kernels)."""
    if plan.backend == "c":
        cpu_rows.backward(logits, target, None, lse, upstream, opts, out, weights=plan.weights)
        return
    if isinstance(upstream, float):
        upstream = torch.full(lse.shape, upstream, dtype=compute_dtype(logits.dtype))
    torch_rows.backward(logits, target, class_weight, lse, upstream, opts, out)


def _c_forward(logits, target, opts, plan):
    formed = torch.empty(logits.shape, dtype=logits.dtype) if plan.form_grad else None
    # (a row scale: only the sum of the losses is wanted)
    loss, lse, total = cpu_rows.one_pass_rows(logits, target, opts, plan.weights, plan.row_scale or 0.0, formed,
                                              plan.row_scale is None)  # fmt: skip
    return loss, lse, total, formed


# PyTorch's kernels, per row (ω = w_t, 0 where ignored; W = Σ_c w_c; log p = log_softmax(z) in the compute dtype):
#   loss = (1 − ε) ω (−log p_t) + (ε / C) Σ_c w_c (−log p_c) + s ω lse²,   lse = z_t − log p_t (float64, z_t exact)
#   ∂loss/∂z_c = G_c − p_c Σ_c' G_c' + 2 s ω lse p_c,   G_c = ∂loss/∂log p_c = −(1 − ε) ω [c = t] − (ε / C) w_c [valid]
# The log-softmax backward kernel forms G − p ΣG; nll_loss's backward forms the target term of G.


def _aten_forward(logits, target, class_weight, opts, plan):
    cdt = compute_dtype(logits.dtype)
    num_classes, eps = logits.shape[-1], opts.label_smoothing
    logp = torch.log_softmax(logits, -1, dtype=cdt)
    w = None if class_weight is None else class_weight.detach().to(cdt)
    valid = target != opts.ignore_index
    t_safe = target.clamp(0, num_classes - 1)
    logp_t = logp.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1)
    lse = logits.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1).double() - logp_t.double()
    loss = F.nll_loss(logp, target, w, ignore_index=opts.ignore_index, reduction="none")
    if eps:
        smooth = -(logp.sum(-1) if w is None else logp @ w)
        loss = (1.0 - eps) * loss + torch.where(valid, (eps / num_classes) * smooth, 0.0)
    omega = index_row_weight(target, w, opts.ignore_index, cdt) if opts.z_loss else None
    if opts.z_loss:  # where(): an ignored all −inf row's lse² is inf, and 0 · inf would be NaN
        loss = loss + torch.where(valid, opts.z_loss * omega * (lse * lse).to(cdt), 0.0)
    total = float(loss.sum(dtype=torch.float64)) if plan.row_scale is not None else 0.0
    formed = _aten_grad(logits, logp, target, w, omega, lse, valid, opts, plan.row_scale) if plan.form_grad else None
    return loss, lse, total, formed


def _aten_grad(logits, logp, target, w, omega, lse, valid, opts, row_scale: float) -> Tensor:
    """``row_scale · ∂loss/∂z`` (formulas above) from PyTorch's backward kernels, in the logits' dtype."""
    cdt, eps = logp.dtype, opts.label_smoothing
    upstream = torch.full((), row_scale * (1.0 - eps), dtype=cdt)
    total_weight = torch.ones((), dtype=cdt)  # read only by the "mean" reduction, not used here
    g = torch.ops.aten.nll_loss_backward(upstream, logp, target, w, 2, opts.ignore_index, total_weight)  # 2: sum
    if eps:  # −(ε / C) w_c on every non-ignored row
        smooth = (row_scale * eps / logp.shape[-1]) * (torch.ones_like(logp[0]) if w is None else w)
        g = g - valid.unsqueeze(-1).to(cdt) * smooth
    grad = torch._log_softmax_backward_data(g, logp, -1, cdt)
    if opts.z_loss:
        grad = grad + (2.0 * opts.z_loss * row_scale) * (omega * lse.to(cdt)).unsqueeze(-1) * logp.exp()
    ignored = (~valid).nonzero().squeeze(-1)
    if ignored.numel():  # an ignored all −inf row: its p is NaN, its gradient 0 (as the rows' kernels give)
        grad.index_fill_(0, ignored, 0.0)
    return grad.to(logits.dtype)

