"""The row gradients as differentiable torch ops, for autograd transforms the fused kernels cannot serve.

Fused: nothing; every step is an ordinary torch op, so autograd, forward-mode AD and vmap see through it.
Never materialized: nothing is avoided either: softmax and the gradient exist as (..., C) tensors.
Written in place: nothing.

The kernels (``torch_rows``, ``triton_rows``) compute the gradient ``∂loss/∂z`` with in-place chunked passes and
custom ops: exact and memory-frugal, but opaque to a second differentiation. These functions give the same
values from plain torch ops — the formulas of docs/math.md, "Every option as one weighted target vector" —
so that the gradient is itself differentiable. ``_autograd.CrossEntropyRows`` uses them only where a
transform needs that: a backward with ``create_graph=True`` (double backward, Hessian-vector products), a
backward inside ``torch.func`` transforms (``jacrev``, ``vmap`` over ``grad``, ``hessian``), and forward-mode AD
(``jvp``). Whole rows only (a vocabulary shard's gradient needs the other ranks' statistics).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent._options import RowOptions
from crossent._precision import compute_dtype


def _capped(z: Tensor, softcap: Optional[float]):
    """``(x, chain)``: the logits the loss sees, ``κ tanh(z / κ)``, and ``dx/dz = 1 − tanh²(z / κ)`` (None: 1)."""
    if softcap is None:
        return z, None
    th = torch.tanh(z / softcap)
    return softcap * th, 1.0 - th * th


def logits_grad(logits: Tensor, target: Tensor, class_weight: Optional[Tensor], grad_loss: Tensor, opts: RowOptions):
    """``grad_loss[i] · ∂loss_i/∂logits_i`` for logits ``(..., C)``, class indices ``(...)`` or probabilities
    ``(..., C)``, in the logits' dtype; differentiable in the logits, the targets and ``grad_loss``::

        class index t:   g ((ω (1 − ε + 2 s lse) + ε W / C) p_c − ω (1 − ε) [c = t] − ε w_c / C)
        probabilities y: g ((U + 2 s ω lse) p_c − u_c),   u_c = w_c ((1 − ε) y_c + ε / C), U = Σ u, ω = Σ w y

    times ``1 − tanh²(z / κ)`` with a softcap. Ignored positions give 0, out-of-range class indices NaN rows.
    """
    cdt = compute_dtype(logits.dtype)
    z = logits.to(cdt)
    x, chain = _capped(z, opts.softcap)
    num_classes = x.shape[-1]
    lse = torch.logsumexp(x, -1)
    p = torch.softmax(x, -1)
    g = grad_loss.to(cdt).expand(lse.shape)
    eps, s = opts.label_smoothing, opts.z_loss
    w = None if class_weight is None else class_weight.to(cdt)
    if target.is_floating_point():
        y = target.to(cdt)
        wy = y if w is None else y * w
        u = (1.0 - eps) * wy + (eps / num_classes) * (1.0 if w is None else w)
        grad = g.unsqueeze(-1) * ((u.sum(-1) + 2.0 * s * wy.sum(-1) * lse).unsqueeze(-1) * p - u)
    else:
        valid = target != opts.ignore_index
        bad = valid & ((target < 0) | (target >= num_classes))
        t_safe = torch.where(valid, target, 0).clamp(0, max(num_classes - 1, 0))
        omega = valid.to(cdt) if w is None else torch.where(valid, w[t_safe], 0.0)
        total_weight = num_classes if w is None else w.sum()
        scale = g * (omega * (1.0 - eps + 2.0 * s * lse) + eps * total_weight / num_classes)
        onehot = torch.zeros_like(p).scatter(-1, t_safe.unsqueeze(-1), 1.0)
        grad = scale.unsqueeze(-1) * p - (g * omega * (1.0 - eps)).unsqueeze(-1) * onehot
        if eps:
            grad = grad - (g * eps / num_classes).unsqueeze(-1) * (1.0 if w is None else w)
        grad = torch.where(valid.unsqueeze(-1), grad, 0.0)  # exactly 0, also where p is NaN (all −inf rows)
        grad = torch.where(bad.unsqueeze(-1), torch.nan, grad)
    if chain is not None:
        grad = grad * chain
    return grad.to(logits.dtype)


def target_grad(logits: Tensor, target: Tensor, class_weight: Optional[Tensor], grad_loss: Tensor, opts: RowOptions):
    """``grad_loss[i] · ∂loss_i/∂y_i`` for probability targets: ``g w_c (s lse² − (1 − ε) log p_c)``, in the
    target's dtype; differentiable in the logits and ``grad_loss``."""
    cdt = compute_dtype(logits.dtype)
    x, _ = _capped(logits.to(cdt), opts.softcap)
    lse = torch.logsumexp(x, -1, keepdim=True)
    grad = opts.z_loss * lse * lse - (1.0 - opts.label_smoothing) * (x - lse)
    if class_weight is not None:
        grad = grad * class_weight.to(cdt)
    return (grad * grad_loss.to(cdt).expand(lse.shape[:-1]).unsqueeze(-1)).to(target.dtype)


# --- per-token log-probabilities and entropy (docs/math.md, "Per-token log-probabilities and entropy") ---------


def _log_softmax_parts(logits: Tensor, opts):
    """``(log p, p, dx/dz)`` for ``x = κ tanh(z / κ) / T`` in the compute dtype; ``log p`` clamped to the lowest
    finite value, so that ``p log p`` is 0 (not NaN) where ``p = 0``, also when differentiated again."""
    cdt = compute_dtype(logits.dtype)
    x, chain = _capped(logits.to(cdt), opts.softcap)
    x = x / opts.temperature
    chain = 1.0 / opts.temperature if chain is None else chain / opts.temperature
    logp = torch.log_softmax(x, -1)
    return logp.clamp(min=torch.finfo(cdt).min), torch.exp(logp), chain


def _id_masks(index: Tensor, opts, num_classes: int):
    """(valid ids, ids clamped into [0, C), positions holding an id outside [0, C))."""
    valid = index != opts.ignore_index
    bad = (valid & ((index < 0) | (index >= num_classes))).any(-1)
    return valid, torch.where(valid, index, 0).clamp(0, max(num_classes - 1, 0)), bad


def log_probs_grad(logits: Tensor, index: Tensor, grad_log_probs: Optional[Tensor], grad_entropy: Optional[Tensor],
                   opts) -> Tensor:  # fmt: skip
    """``Σ_k g_k ∂lp_k/∂z + g_H ∂H/∂z`` for logits (..., C), ids (..., K), in the logits' dtype; differentiable::

        (Σ_k g_k [c = t_k] − G p_c − g_H p_c (log p_c + H)) · chain_c,   G = Σ_k g_k,  chain = (1 − tanh²) / T
    """
    logp, p, chain = _log_softmax_parts(logits, opts)
    valid, ids, bad = _id_masks(index, opts, logits.shape[-1])
    grad = torch.zeros_like(p)
    if grad_log_probs is not None:
        g = torch.where(valid, grad_log_probs.to(p.dtype), 0.0)
        grad = grad.scatter_add(-1, ids, g) - g.sum(-1, keepdim=True) * p
    if grad_entropy is not None and opts.entropy:
        plogp = p * logp
        entropy = -plogp.sum(-1, keepdim=True)
        g_h = torch.where(valid.any(-1), grad_entropy.to(p.dtype), 0.0).unsqueeze(-1)
        grad = grad - g_h * (plogp + p * entropy)
    grad = torch.where(bad.unsqueeze(-1), torch.nan, grad * chain)
    return grad.to(logits.dtype)


def log_probs_jvp(logits: Tensor, index: Tensor, tangent: Tensor, opts):
    """Forward-mode tangents ``(lp_dot (..., K), H_dot (...) or None)`` for a logits tangent ``ż``::

        lp_dot_k = ẋ_{t_k} − Σ_c p_c ẋ_c,    H_dot = −Σ_c p_c (log p_c + H) ẋ_c,    ẋ = chain · ż
    """
    logp, p, chain = _log_softmax_parts(logits, opts)
    valid, ids, bad = _id_masks(index, opts, logits.shape[-1])
    xdot = tangent.to(p.dtype) * chain
    mean = (p * xdot).sum(-1, keepdim=True)
    lp_dot = torch.where(valid, xdot.gather(-1, ids) - mean, 0.0).masked_fill(bad.unsqueeze(-1), torch.nan)
    h_dot = None
    if opts.entropy:
        plogp = p * logp
        h_dot = -(plogp * xdot).sum(-1) + plogp.sum(-1) * mean.squeeze(-1)
        h_dot = torch.where(valid.any(-1), h_dot, 0.0).masked_fill(bad, torch.nan)
    return lp_dot, h_dot
