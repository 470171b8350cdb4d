"""Row kernels in plain torch ops: the CPU path, and the CUDA path where Triton is absent.

Fused: softcap, row max, sum-exp, target gather, smoothing and z-loss terms, one chunk of rows at a time.
Never materialized: the (N, C) log-probabilities or any full-size temporary; only chunk-sized scratch.
Written in place: only ``out`` in ``backward`` (it aliases the logits when the caller asked for that).

Every function takes logits ``(..., C)`` (any strides), targets ``(...)`` int (class indices) or
``(..., C)`` float (probabilities), and returns per-position fp32 (fp64 for fp64 logits) values.
The formulas are derived in docs/math.md ("Row kernels"); the names follow it:
``u`` weighted target vector, ``U = Σ_c u_c``, ``ω`` z-loss weight, ``g`` upstream gradient per row.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

# Positions x classes handled per chunk. On the CPU a chunk should stay in cache (2^20 fp32 = 4 MiB,
# split over the cores' 2 MiB L2s by torch's intra-op threads) so that the elementwise passes after
# the first read cost cache, not DRAM, bandwidth, while the few per-chunk op launches stay cheap.
# Per-position arithmetic (target gather, loss assembly, gradient scales) runs once over all rows,
# outside the chunk loop. 2^20 measured best among 2^16..2^22 on a 2-core x86 VM
# (benchmarks/cross_entropy.py, N×C = 4096×32768). On CUDA launch overhead dominates small chunks,
# and this path is only the fallback for Triton.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (the oracle's precision); every other dtype is accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> Tuple[Tensor, Tensor]:
    """Per-position loss and log-sum-exp, both ``logits.shape[:-1]`` in the compute dtype."""
    z3, t3, shape = _as_3d(logits, target)
    cdt = compute_dtype(logits.dtype)
    c = Classes(weight, z3.shape[-1], cdt, label_smoothing)
    probs = target.is_floating_point()
    rows = z3.shape[:2]
    row_max, row_sum = _empty_rows(rows, cdt, z3.device, 2)
    # Σ_c u_c z_c (probabilities) or Σ_c w_c z_c (smoothing); U = Σ_c u_c and ω (probabilities)
    dot, total, omega = _empty_rows(rows, cdt, z3.device, 3)
    for idx, x, scratch in _chunks(z3, cdt, 2 if probs else 0):
        src = _capped(x, z3[idx], softcap)
        if probs:
            u, uz = scratch
            omega[idx] = _weighted_targets(u, t3[idx], c)
            total[idx] = u.sum(-1)
            dot[idx] = torch.mul(u, src, out=uz).nansum(-1)  # drops exactly the 0·(−inf) terms
        elif c.eps:
            dot[idx] = c.dot(src)
        row_max[idx] = src.amax(-1)
        # an all −inf row: clamping its max keeps exp(−inf − m) = 0, so lse = log 0 = −inf, not nan
        torch.sub(src, row_max[idx].clamp_(min=torch.finfo(cdt).min).unsqueeze(-1), out=x).exp_()
        row_sum[idx] = x.sum(-1)
    lse = row_sum.log_().add_(row_max)
    if probs:
        # loss = U lse − Σ_c u_c z_c + s ω lse²   (NaN logits reach lse, so NaN propagates)
        loss = total * lse - dot + z_loss * omega * lse * lse
    else:
        loss = _index_loss(z3, t3, c, ignore_index, z_loss, softcap, lse, dot)
    return loss.reshape(shape), lse.reshape(shape)


def backward(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    out: Tensor,
) -> None:
    """Write ``grad_loss[i] · ∂loss_i/∂logits_i`` into ``out`` (``logits.shape``; may be ``logits``)."""
    z3, t3, _ = _as_3d(logits, target)
    try:
        out3 = out.view(z3.shape)
    except RuntimeError:  # an in-place target whose strides don't flatten: go through a buffer
        buf = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        backward(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss, softcap, buf)
        out.copy_(buf)
        return
    cdt = compute_dtype(logits.dtype)
    lse3 = lse.reshape(z3.shape[:2])
    g3 = grad_loss.to(cdt).expand(lse.shape).reshape(z3.shape[:2])
    c = Classes(weight, z3.shape[-1], cdt, label_smoothing)
    probs = target.is_floating_point()
    direct = out.dtype == cdt  # compute straight into out's chunk: no scratch, no copy
    if not probs:
        rows = _IndexGradRows(t3, c, ignore_index, lse3, g3, z_loss)
    for idx, x, scratch in _chunks(z3, cdt, 1 + probs, scratch_for_x=not direct):
        x = out3[idx] if direct else x
        chain = scratch[-1] if softcap else None
        src = _capped(x, z3[idx], softcap, chain_out=chain)
        if probs:
            _probs_grad_chunk(x, src, t3[idx], c, lse3[idx], g3[idx], z_loss, scratch[0])
        else:
            _index_grad_chunk(x, src, rows, idx, c)
        if chain is not None:
            x.mul_(chain)
        if not direct:
            out3[idx].copy_(x)


def probs_target_grad(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
) -> Tensor:
    """∂loss/∂y for probability targets: ``g · w_c · (s lse² − (1 − ε) log p_c)``, in the target's dtype."""
    z3, _, _ = _as_3d(logits, target)
    out = torch.empty(z3.shape, dtype=target.dtype, device=target.device)
    cdt = compute_dtype(logits.dtype)
    lse3 = lse.reshape(z3.shape[:2])
    g3 = grad_loss.to(cdt).expand(lse.shape).reshape(z3.shape[:2])
    c = Classes(weight, z3.shape[-1], cdt, label_smoothing)
    for idx, x, _ in _chunks(z3, cdt, 0):
        src = _capped(x, z3[idx], softcap)
        torch.sub(src, lse3[idx].unsqueeze(-1), out=x).mul_(-(1.0 - c.eps))  # −(1 − ε) log p
        x.add_((z_loss * lse3[idx] * lse3[idx]).unsqueeze(-1))
        if c.w is not None:
            x.mul_(c.w)
        out[idx].copy_(x.mul_(g3[idx].unsqueeze(-1)))
    return out.reshape(target.shape)


class Classes:
    """Per-class constants: weights ``w`` (or None for all ones), ``W = Σ_c w_c``, ``ε``, ``C``."""

    def __init__(self, weight: Optional[Tensor], num_classes: int, cdt: torch.dtype, label_smoothing: float):
        self.w = None if weight is None else weight.to(cdt)
        self.W = float(num_classes) if weight is None else self.w.sum()
        self.eps = label_smoothing
        self.C = num_classes

    def at(self, t: Tensor, like: Tensor) -> Tensor:
        """``w_t`` for class indices ``t`` (already clamped into range)."""
        return torch.ones_like(like) if self.w is None else self.w[t]

    def dot(self, x: Tensor) -> Tensor:
        """``Σ_c w_c x_c`` over the last dim."""
        return x.sum(-1) if self.w is None else x @ self.w


# --- class-index targets --------------------------------------------------------------------------
#   loss = ω ((1 − ε)(lse − z_t) + s lse²) + (ε / C)(W lse − Σ_c w_c z_c),   ω = w_t
#   ∂loss/∂z_c = (ω (1 − ε + 2 s lse) + ε W / C) p_c − ω (1 − ε) [c = t] − ε w_c / C


def _index_loss(z3, t3, c: Classes, ignore_index, z_loss, softcap, lse, smooth):
    """The per-position loss from lse, the target logit and (with smoothing) Σ_c w_c z_c."""
    valid, t_safe, bad = _index_masks(t3, ignore_index, c.C)
    z_t = z3.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1).to(lse.dtype)  # the target logit, in fp32
    if softcap is not None:
        z_t = softcap * torch.tanh(z_t / softcap)
    omega = torch.where(valid, c.at(t_safe, z_t), 0.0)
    loss = omega * ((1.0 - c.eps) * (lse - z_t) + z_loss * lse * lse)
    if c.eps:
        loss = loss + (c.eps / c.C) * (c.W * lse - smooth)
    return torch.where(valid, loss, 0.0).masked_fill_(bad, math.nan)


class _IndexGradRows:
    """Per-position constants of the class-index gradient, computed once over all rows."""

    def __init__(self, t3, c: Classes, ignore_index, lse, g, z_loss):
        valid, self.t_safe, bad = _index_masks(t3, ignore_index, c.C)
        g = torch.where(valid, g, 0.0)
        omega = torch.where(valid, c.at(self.t_safe, g), 0.0)
        # a·p with a = g (ω (1 − ε + 2 s lse) + ε W / C) is computed as exp(z − (lse − log|a|))·sign(a):
        # one pass instead of three. Ignored rows have a = 0, so shift = +inf and exactly 0 comes out.
        a = g * (omega * (1.0 - c.eps + 2.0 * z_loss * lse) + c.eps * c.W / c.C)
        self.shift = (lse - a.abs().log()).masked_fill_(bad, math.nan)  # out-of-range target: NaN row
        self.sign = a.sign() if _maybe_negative(a) else None
        self.at_target = -(1.0 - c.eps) * g * omega  # the −ω (1 − ε) [c = t] term, times g
        self.smooth = (c.eps / c.C) * g if c.eps else None  # the −ε w_c / C term, times g


def _index_grad_chunk(x, src, rows: _IndexGradRows, idx, c: Classes):
    torch.sub(src, rows.shift[idx].unsqueeze(-1), out=x).exp_()
    if rows.sign is not None:
        x.mul_(rows.sign[idx].unsqueeze(-1))
    x.scatter_add_(-1, rows.t_safe[idx].unsqueeze(-1), rows.at_target[idx].unsqueeze(-1))
    if rows.smooth is not None:
        if c.w is None:
            x.sub_(rows.smooth[idx].unsqueeze(-1))
        else:
            x.addcmul_(rows.smooth[idx].unsqueeze(-1), c.w, value=-1.0)


def _index_masks(t, ignore_index, num_classes):
    """(valid, t clamped into [0, C) for safe indexing, out-of-range rows that must become NaN)."""
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= num_classes))
    t_safe = torch.where(valid, t, 0).clamp_(0, num_classes - 1)
    return valid, t_safe, bad


# --- probability targets --------------------------------------------------------------------------
#   u_c = w_c ((1 − ε) y_c + ε / C),  U = Σ_c u_c,  ω = Σ_c w_c y_c
#   loss = U lse − Σ_c u_c z_c + s ω lse²            (a term with u_c = 0 is 0, even at z_c = −inf)
#   ∂loss/∂z_c = (U + 2 s ω lse) p_c − u_c


def _probs_grad_chunk(x, src, y, c: Classes, lse, g, z_loss, u):
    omega = _weighted_targets(u, y, c)
    torch.sub(src, lse.unsqueeze(-1), out=x).exp_()  # p
    x.mul_((g * (u.sum(-1) + 2.0 * z_loss * omega * lse)).unsqueeze(-1))
    x.addcmul_(u, g.unsqueeze(-1), value=-1.0)


def _weighted_targets(u, y, c: Classes):
    """Fill ``u`` with the weighted targets; return ``ω = Σ_c w_c y_c``."""
    u.copy_(y)
    omega = c.dot(u)
    u.mul_(1.0 - c.eps).add_(c.eps / c.C)
    if c.w is not None:
        u.mul_(c.w)
    return omega


# --- shared pieces ----------------------------------------------------------------------------------


def _capped(x, z, softcap, chain_out=None):
    """The logits as the kernels use them: ``z`` itself when it is already in the compute dtype and
    uncapped (no copy), else ``x ← κ tanh(z / κ)`` (or ``z`` upcast); ``chain_out ← 1 − tanh²``."""
    if softcap is None:
        return z if z.dtype == x.dtype else x.copy_(z)
    x.copy_(z).div_(softcap).tanh_()
    if chain_out is not None:
        torch.mul(x, x, out=chain_out).neg_().add_(1.0)
    return x.mul_(softcap)


def _maybe_negative(a):
    """Whether any row scale is negative; on the CPU we look (free), elsewhere assume so (no host sync)."""
    return a.device.type != "cpu" or bool((a < 0).any())


def _empty_rows(rows, cdt, device, count):
    return [torch.empty(rows, dtype=cdt, device=device) for _ in range(count)]


def _as_3d(logits, target):
    """View logits as (N, M, C) and the target as (N, M) or (N, M, C); return the batch shape too."""
    shape = logits.shape[:-1]
    n = shape[0] if len(shape) else 1
    m = math.prod(shape[1:])
    z3 = logits.reshape(n, m, logits.shape[-1])
    t3 = target.reshape(n, m, logits.shape[-1]) if target.is_floating_point() else target.reshape(n, m)
    return z3, t3, shape


def _chunks(z3: Tensor, cdt, n_scratch: int, scratch_for_x: bool = True) -> Iterator:
    """Yield (index, x, scratch) per chunk: ``index`` selects (n, m) positions of ``z3``; ``x`` and
    each of ``scratch`` are compute-dtype buffers of the chunk's shape, reused across chunks."""
    n, m, num_classes = z3.shape
    rows = max(1, CHUNK_ELEMENTS.get(z3.device.type, CHUNK_ELEMENTS["cuda"]) // max(num_classes, 1))
    cap = max(1, min(rows, n * m)) * num_classes
    bufs = [torch.empty(cap, dtype=cdt, device=z3.device) for _ in range(n_scratch + scratch_for_x)]
    for idx in _blocks(n, m, rows):
        shape = (idx[0].stop - idx[0].start, idx[1].stop - idx[1].start, num_classes)
        views = [b[: math.prod(shape)].view(shape) for b in bufs]
        x = views.pop(0) if scratch_for_x else None
        yield idx, x, views


def _blocks(n, m, rows):
    """(slice over N, slice over M) pairs that cover N×M positions about ``rows`` at a time."""
    if m >= rows:
        for i in range(n):
            for j in range(0, m, rows):
                yield slice(i, i + 1), slice(j, min(j + rows, m))
    else:
        step = max(1, rows // max(m, 1))
        for i in range(0, n, step):
            yield slice(i, min(i + step, n)), slice(0, m)
