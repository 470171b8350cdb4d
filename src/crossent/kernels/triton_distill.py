"""Distillation's block step in Triton: the GPU path, and the same kernel on CPU tensors under ``TRITON_INTERPRET=1``.

Fused: per row, softcap, temperature, both online log-sum-exps (three with the hard loss at T ≠ 1), the
divergence's row sums, the hard cross-entropy and the student's finished gradient — one program per row.
Never materialized: log q, log p, m, or any scratch block; a row streams through registers (3 passes).
Written in place: the student block (each element read, then overwritten with its gradient).

Same contract as :func:`crossent.kernels.distill_rows.block_step_` (the oracle for this file; the formulas are
in its docstring and in docs/math.md, "Distillation"): whole float32 rows, contiguous. Anything else — float64,
vocabulary pieces and vocab-parallel slices (whose statistics need the other pieces first) — runs the torch
step. The passes over a row: (1) online max/sum-exp of ``s = cap(z)/T``, ``t = cap(z_t)/T`` (and of ``cap(z)``
for the hard loss at T ≠ 1); (2) the divergence's row sums from ``log q = s − lse_s``, ``log p = t − lse_t``,
both clamped at the lowest float32 (``0 · log 0 = 0``); (3) with an upstream gradient, the gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from crossent._options import DistillRowOptions
from crossent.kernels import distill_rows
from crossent.kernels.triton_rows import _COMPILE, _FLT_LOWEST, _jit, _softcapped, row_launch, tl


def block_step_(s: Tensor, t: Tensor, target: Optional[Tensor], grad_scale: Optional[Tensor],
                opts: DistillRowOptions, scratch: distill_rows.Scratch) -> Tensor:  # fmt: skip
    """:func:`distill_rows.block_step_` on Triton for contiguous float32 blocks (else the torch step)."""
    if s.dtype != torch.float32 or not (s.is_contiguous() and t.is_contiguous()):
        return distill_rows.block_step_(s, t, target, grad_scale, opts, scratch)
    rows, num_classes = s.shape
    loss = torch.empty(rows, dtype=torch.float32, device=s.device)
    if rows == 0:
        return loss
    beta = opts.beta
    mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    c_q, c_p = (math.log1p(-beta), math.log(beta)) if mode == 2 else (0.0, 0.0)
    tgt = target if target is not None else loss  # a placeholder pointer, never read without HAS_TARGET
    g = grad_scale.to(torch.float32).expand(rows).contiguous() if grad_scale is not None else loss
    block, warps = row_launch(torch.float32, num_classes)
    _distill_row_kernel[(rows,)](
        s, t, tgt, g, loss, num_classes, opts.ignore_index, beta, 1.0 / opts.temperature, opts.hard_weight,
        opts.softcap or 1.0, c_q, c_p,
        MODE=mode, HAS_TARGET=target is not None, HARD=opts.hard_weight > 0.0,
        HARD_OWN_LSE=opts.hard_weight > 0.0 and opts.temperature != 1.0, SOFTCAP=opts.softcap is not None,
        TEACHER_LP=opts.teacher_log_probs, HAS_GRAD=grad_scale is not None, BLOCK=block, num_warps=warps,
        **_COMPILE,
    )  # fmt: skip
    return loss


@_jit
def _capped(x, softcap, SOFTCAP: tl.constexpr, mask):
    """``κ tanh(x / κ)`` (or ``x``) on the row's columns, −inf on the lanes past its end (a capped −inf would
    be −κ, and count in the sums of exponentials)."""
    if SOFTCAP:
        x = tl.where(mask, _softcapped(x, softcap)[0], -float("inf"))
    return x


@_jit
def _distill_row_kernel(
    s_ptr, t_ptr, tgt_ptr, g_ptr, loss_ptr,
    C, ignore_index, beta, inv_t, alpha, softcap, c_q, c_p,
    MODE: tl.constexpr, HAS_TARGET: tl.constexpr, HARD: tl.constexpr, HARD_OWN_LSE: tl.constexpr,
    SOFTCAP: tl.constexpr, TEACHER_LP: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * C, t_ptr + row * C
    cols = tl.arange(0, BLOCK)
    # pass 1: online max and sum-exp of s = cap(z)/T, t = cap(z_t)/T and (hard loss, T ≠ 1) cap(z)
    m_s = tl.max(tl.full([BLOCK], _FLT_LOWEST, tl.float32), 0)
    m_t, m_r = m_s, m_s
    sum_s = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    sum_t, sum_r = sum_s, sum_s
    positive = sum_s  # teacher log-probabilities as given: how many entries are > 0
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        z = _capped(tl.load(s_row + offs, mask=mask, other=-float("inf")), softcap, SOFTCAP, mask)
        x = z * inv_t
        m_new = tl.maximum(m_s, tl.max(x, 0))
        sum_s = sum_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m_s = m_new
        zt = tl.load(t_row + offs, mask=mask, other=-float("inf"))
        if TEACHER_LP:
            positive += tl.sum(tl.where(zt > 0.0, 1.0, 0.0), 0)
        else:
            y = _capped(zt, softcap, SOFTCAP, mask) * inv_t
            m_new = tl.maximum(m_t, tl.max(y, 0))
            sum_t = sum_t * tl.exp(m_t - m_new) + tl.sum(tl.exp(y - m_new), 0)
            m_t = m_new
        if HARD_OWN_LSE:
            m_new = tl.maximum(m_r, tl.max(z, 0))
            sum_r = sum_r * tl.exp(m_r - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m_r = m_new
    lse_s = m_s + tl.log(sum_s)
    lse_t = 0.0
    if not TEACHER_LP:
        lse_t = m_t + tl.log(sum_t)
    lse_h = lse_s
    if HARD_OWN_LSE:
        lse_h = m_r + tl.log(sum_r)
    # pass 2: the divergence's row sums (per lane, then reduced)
    acc_p = tl.zeros([BLOCK], tl.float32)  # Σ p (log p − log q) (β = 0), Σ q (log q − log p) (β = 1), Σ p r_p
    acc_q = tl.zeros([BLOCK], tl.float32)  # Σ q r_q (mixture)
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        x = _capped(tl.load(s_row + offs, mask=mask, other=-float("inf")), softcap, SOFTCAP, mask) * inv_t
        lq = tl.maximum(x - lse_s, _FLT_LOWEST)
        zt = tl.load(t_row + offs, mask=mask, other=-float("inf"))
        if not TEACHER_LP:
            zt = _capped(zt, softcap, SOFTCAP, mask) * inv_t
        lp = tl.maximum(zt - lse_t, _FLT_LOWEST)
        if MODE == 0:
            acc_p += tl.where(mask, tl.exp(lp) * (lp - lq), 0.0)
        elif MODE == 1:
            acc_p += tl.where(mask, tl.exp(lq) * (lq - lp), 0.0)
        else:
            d = lp - lq + (c_p - c_q)
            sp = tl.maximum(d, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(d)))  # softplus(d), no overflow
            acc_p += tl.where(mask, tl.exp(lp) * (d - sp - c_p), 0.0)  # p r_p
            acc_q += tl.where(mask, tl.exp(lq) * (-c_q - sp), 0.0)  # q r_q
    sum_p, sum_q = tl.sum(acc_p, 0), tl.sum(acc_q, 0)
    div = sum_p
    if MODE == 2:
        div = beta * sum_p + (1.0 - beta) * sum_q
    valid = row >= 0  # every row counts without a target
    t_safe = row * 0
    if HAS_TARGET:
        label = tl.load(tgt_ptr + row).to(tl.int64)
        valid = label != ignore_index
        t_safe = tl.minimum(tl.maximum(tl.where(valid, label, 0), 0), C - 1)
    loss = div
    if HARD:
        z_t = _capped(tl.load(s_row + t_safe), softcap, SOFTCAP, t_safe >= 0)
        loss = (1.0 - alpha) * div + alpha * (lse_h - z_t)
    if TEACHER_LP:
        loss = tl.where(positive > 0.0, float("nan"), loss)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if HAS_GRAD:
        # pass 3: grad = g ((1 − α) a ∂D/∂s / T + α (h − onehot(t))) · chain, a = 1 − β for the mixture
        g = tl.where(valid, tl.load(g_ptr + row), 0.0)
        a = 1.0
        if MODE == 2:
            a = 1.0 - beta
        soft = g * (1.0 - alpha) * a * inv_t
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = offs < C
            raw = tl.load(s_row + offs, mask=mask, other=0.0)
            z = raw
            chain = 1.0
            if SOFTCAP:
                z, chain = _softcapped(raw, softcap)
            x = z * inv_t
            lq = tl.maximum(x - lse_s, _FLT_LOWEST)
            zt = tl.load(t_row + offs, mask=mask, other=-float("inf"))
            if not TEACHER_LP:
                zt = _capped(zt, softcap, SOFTCAP, mask) * inv_t
            lp = tl.maximum(zt - lse_t, _FLT_LOWEST)
            q = tl.exp(lq)
            if MODE == 0:
                dd = q - tl.exp(lp)
            elif MODE == 1:
                dd = q * (lq - lp - sum_p)
            else:
                d = lp - lq + (c_p - c_q)
                sp = tl.maximum(d, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(d)))
                dd = q * (-c_q - sp - sum_q)
            grad = soft * dd
            if HARD:
                h = tl.exp(z - lse_h)
                grad += g * alpha * (h - tl.where(offs == t_safe, 1.0, 0.0))
            grad = tl.where(valid, grad * chain, 0.0)
            tl.store(s_row + offs, grad, mask=mask)
