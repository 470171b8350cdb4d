"""Distillation's row math in torch ops: blocks of student and teacher logits → per-row loss, student gradient.

Fused: softcap, temperature, both log-softmaxes, the divergence (KL(p ‖ q), KL(q ‖ p) or the β-mixture JSD),
the hard cross-entropy and the student's gradient, over one (rows, V_s) block of each at a time.
Never materialized: p, q, m or a loss of more than one block; the dense rows use chunks of rows.
Written in place: the two block buffers (student → its gradient, teacher → p) and the scratch blocks.

Per row, with ``s = z_s / T``, ``t = z_t / T`` (after ``κ tanh(·/κ)`` with a softcap), ``log q = s − lse(s)``,
``log p = t − lse(t)`` (or the teacher's log-probabilities as given) and ``g`` the row's upstream gradient
(docs/math.md, "Distillation", derives each line)::

    β = 0       D = Σ p (log p − log q)                      ∂D/∂s_c = q_c − p_c
    β = 1       D = Σ q (log q − log p) = R                  ∂D/∂s_c = q_c (log q_c − log p_c − R)
    0 < β < 1   D = β Σ p r_p + (1 − β) Σ q r_q              ∂D/∂s_c = (1 − β) q_c (r_q,c − Σ_j q_j r_q,j)
                r_q = log(q / m), r_p = log(p / m), m = β p + (1 − β) q
    loss = (1 − α) D + α (lse(z_s) − z_s,t)                  ∂loss/∂z_s,c = (1 − α) ∂D/∂s_c / T + α (h_c − [c = t])

with ``h = softmax(z_s)`` (untempered) and the softcap's ``1 − tanh²`` on top. The row sums (``R``,
``Σ q r_q``, ``Σ p r_p``) and the two (three, with α and T ≠ 1) log-sum-exps are what vocabulary pieces and
vocab-parallel ranks combine; :func:`block_step_` does a whole row in one go, :func:`piece_stats` and
:func:`piece_step_` a piece in the passes ``distill_loop`` runs.

Zero probabilities: both log-probabilities are clamped at the lowest finite value, so that ``0 · log 0``
terms give 0 (a column masked to −inf in both models adds nothing) instead of NaN; ``p > 0`` where ``q = 0``
then gives a huge finite value rather than +inf. NaN logits still propagate.
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor

from crossent._options import DistillRowOptions
from crossent._precision import compute_dtype
from crossent.kernels import cpu_rows
from crossent.kernels.torch_rows import RowStats, Shift, chunk_elements


def scratch_blocks(opts: DistillRowOptions, grads: bool) -> int:
    """Block-sized scratch buffers a step needs besides the two logits blocks: the divergence's term, the JSD's
    softplus, the hard loss's log-softmax (α > 0), the softcap's ``1 − tanh²`` (with gradients)."""
    jsd = 0.0 < opts.beta < 1.0
    return 1 + jsd + (opts.hard_weight > 0.0) + (grads and opts.softcap is not None)


class Scratch(NamedTuple):
    """The step's scratch blocks (each (rows, V_s), compute dtype; None where the options need none)."""

    term: Tensor
    softplus: Optional[Tensor]
    hard: Optional[Tensor]
    chain: Optional[Tensor]

    @staticmethod
    def of(buffers: List[Tensor], opts: DistillRowOptions, grads: bool) -> "Scratch":
        """The named views of ``buffers`` (at least :func:`scratch_blocks` of them)."""
        it = iter(buffers)
        term = next(it)
        softplus = next(it) if 0.0 < opts.beta < 1.0 else None
        hard = next(it) if opts.hard_weight > 0.0 else None
        chain = next(it) if grads and opts.softcap is not None else None
        return Scratch(term, softplus, hard, chain)


def sum_count(opts: DistillRowOptions) -> int:
    """How many per-row sums the divergence has: ``Σ p r_p, Σ q r_q`` for the JSD, one for either KL."""
    return 2 if 0.0 < opts.beta < 1.0 else 1


def divergence(sums: Tensor, opts: DistillRowOptions) -> Tensor:
    """The per-row divergence ``D`` from its row sums ``(sum_count, rows)``."""
    if sum_count(opts) == 1:
        return sums[0]
    return opts.beta * sums[0] + (1.0 - opts.beta) * sums[1]


# --- one block of whole rows --------------------------------------------------------------------------------


def block_step_(
    s: Tensor, t: Tensor, target: Optional[Tensor], grad_scale: Optional[Tensor], opts: DistillRowOptions,
    scratch: Optional[Scratch],
) -> Tensor:  # fmt: skip
    """Per-row loss of a block of whole rows; with ``grad_scale`` (rows,) the gradient ``g ∂loss/∂z_s`` into ``s``.
    ``scratch``: the torch passes' blocks (None where the C step takes the block: it needs none).

    ``s``, ``t``: (rows, V) raw logits (teacher log-probabilities with ``opts.teacher_log_probs``) in the compute
    dtype — or 16-bit, as the fused loop's CPU products wrote them, where :func:`cpu_rows.covers_distill` takes
    them — contiguous, ours (overwritten). ``target``: None or (rows,) int64 (the hard loss's labels; rows equal
    to ``ignore_index`` give loss and gradient 0). Returns the loss (rows,) in the compute dtype.
    """
    grads = grad_scale is not None
    if cpu_rows.covers_distill(s, t, opts):  # forward / reverse KL in C: three passes per row, from the cache
        return _native_step_(s, t, target, grad_scale, opts)
    if scratch is None:  # the fused loop planned 16-bit blocks for the C step (distill_loop._half_blocks)
        raise RuntimeError("distillation block step: no scratch blocks, but the C step does not cover these blocks "
                           f"({s.dtype}, options {opts}); distill_loop._half_blocks must mirror cpu_rows.covers_distill")
    _cap_(s, opts.softcap, scratch.chain if grads else None)
    hard_nll = None
    if opts.hard_weight:  # log softmax(z_s), before the temperature; the hard loss is −log h_t
        _, t_safe = _valid_targets(target, opts, s.shape[-1])
        torch._log_softmax(s, -1, False, out=scratch.hard)
        hard_nll = -scratch.hard.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1)
    if opts.temperature != 1.0:
        s.div_(opts.temperature)
    torch._log_softmax(s, -1, False, out=s)
    not_log_probs = _teacher_log_probs_(t, opts)
    s.clamp_min_(torch.finfo(s.dtype).min)
    sums = _divergence_(s, t, opts, scratch, grads)
    loss = _row_loss(divergence(sums, opts), hard_nll, target, opts, not_log_probs)
    if grads:
        _finish_grad_(s, target, grad_scale, opts, scratch)
    return loss


def _native_step_(s: Tensor, t: Tensor, target: Optional[Tensor], grad_scale: Optional[Tensor],
                  opts: DistillRowOptions) -> Tensor:  # fmt: skip
    """:func:`block_step_` by :func:`cpu_rows.distill`: the gradient's row factor ``g / T`` (0 on ignored rows) is
    applied in C, as :func:`_finish_grad_` applies it (α = 0, a = 1)."""
    cdt = compute_dtype(s.dtype)  # 16-bit blocks (the fused loops' on the CPU): the factors and loss stay fp32
    row_scale = None
    if grad_scale is not None:
        valid, _ = _valid_targets(target, opts, s.shape[-1])
        g = grad_scale.to(cdt).expand(s.shape[:1])
        row_scale = (g if valid is None else torch.where(valid, g, 0.0)) / opts.temperature
    div = cpu_rows.distill(s, t, opts.temperature, opts.beta == 1.0, row_scale)
    return _row_loss(div.to(cdt), None, target, opts, None)


def _teacher_log_probs_(t: Tensor, opts: DistillRowOptions) -> Optional[Tensor]:
    """``t ← log p``: the teacher's log-softmax of its tempered (capped) logits, or its log-probs as given;
    for the latter, returns the rows that are not log-probabilities (a positive entry), without a host sync."""
    bad = None
    if opts.teacher_log_probs:
        bad = (t > 0).any(-1)
    else:
        _cap_(t, opts.softcap, None)
        if opts.temperature != 1.0:
            t.div_(opts.temperature)
        torch._log_softmax(t, -1, False, out=t)
    t.clamp_min_(torch.finfo(t.dtype).min)
    return bad


# --- vocabulary pieces (of a fused block, or of this rank's columns) ----------------------------------------


# A piece's statistics are a :class:`torch_rows.RowStats` (``dot`` None) whose ``max``/``sumexp`` are (k, rows):
# the k log-sum-exps — student ``s``, teacher ``t``, and with α > 0 and T ≠ 1 the untempered student ``z_s`` —
# and ``target_logit`` the hard loss's (the capped ``z_s,t`` where the target lies in the piece, else 0). Pieces
# and ranks combine them with ``torch_rows.combine_stats`` (docs/math.md, "Vocabulary shards").


def lse_count(opts: DistillRowOptions) -> int:
    """2, or 3 when the hard loss needs the untempered student's log-sum-exp too."""
    return 3 if opts.hard_weight and opts.temperature != 1.0 else 2


def piece_stats(s: Tensor, t: Tensor, target: Optional[Tensor], opts: DistillRowOptions, vocab_start: int,
                term: Tensor) -> RowStats:  # fmt: skip
    """First pass over a piece (raw logits ``s``, ``t``, ours): its stats (above); ``term`` is scratch."""
    _cap_(s, opts.softcap, None)
    _cap_(t, opts.softcap, None)
    z_t = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    if opts.hard_weight:
        local, t_local = _local_targets(target, opts, vocab_start, s.shape[-1])
        z_t = torch.where(local, s.gather(-1, t_local.unsqueeze(-1)).squeeze(-1), 0.0)
    parts = []
    if lse_count(opts) == 3:
        parts.append(_max_sumexp(s, term))
    for x in (s, t):
        if opts.temperature != 1.0:
            x.div_(opts.temperature)
    parts = [_max_sumexp(s, term), _max_sumexp(t, term)] + parts
    return RowStats(torch.stack([m for m, _ in parts]), torch.stack([e for _, e in parts]), z_t, None)


def piece_step_(
    s: Tensor, t: Tensor, target: Optional[Tensor], lse: Tensor, opts: DistillRowOptions, scratch: Scratch,
    vocab_start: int, grad_scale: Optional[Tensor] = None, sums: Optional[Tensor] = None,
) -> Tensor:  # fmt: skip
    """A later pass over a piece (raw logits ``s``, ``t``, ours), given the rows' global log-sum-exps ``lse``
    (k, rows) float64: returns the piece's row sums (``sum_count``, rows). With ``grad_scale``, also writes the
    piece's gradient into ``s`` — for β = 0 at once, else only given the global row ``sums`` (a third pass)."""
    grads = grad_scale is not None and (sums is not None or opts.beta == 0.0)
    _cap_(s, opts.softcap, scratch.chain if grads else None)
    _cap_(t, opts.softcap, None)
    lowest = torch.finfo(s.dtype).min
    if opts.hard_weight and grads:  # log h = z_s − lse(z_s)
        _log_probs_(s, lse[2 if lse_count(opts) == 3 else 0], scratch.hard)
    for x, row_lse in ((s, lse[0]), (t, lse[1])):
        if opts.temperature != 1.0:
            x.div_(opts.temperature)
        _log_probs_(x, row_lse, x).clamp_min_(lowest)
    local_sums = _divergence_(s, t, opts, scratch, grads, sums)
    if grads:
        _finish_grad_(s, target, grad_scale, opts, scratch, vocab_start)
    return local_sums


def piece_loss(stats: RowStats, lse: Tensor, sums: Tensor, target: Optional[Tensor],
               opts: DistillRowOptions) -> Tensor:  # fmt: skip
    """The rows' loss from the combined statistics and row sums (every piece's, every rank's)."""
    hard_nll = None
    if opts.hard_weight:
        hard_nll = (lse[2 if lse_count(opts) == 3 else 0] - stats.target_logit.double()).to(sums.dtype)
    return _row_loss(divergence(sums, opts), hard_nll, target, opts, None)


# --- the shared steps -------------------------------------------------------------------------------------


def _divergence_(lq: Tensor, lp: Tensor, opts: DistillRowOptions, scratch: Scratch, grads: bool,
                 given: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """The divergence's row sums ``(sum_count, rows)`` from ``lq = log q``, ``lp = log p`` (both clamped, ours);
    with ``grads``, ``lq ← ∂D/∂s`` without the JSD's factor 1 − β (:func:`_finish_grad_` applies it), using the
    ``given`` global row sums where the pieces' own are partial."""
    w = scratch.term
    beta = opts.beta
    if beta == 0.0:  # D = Σ p (log p − log q); ∂D/∂s = q − p
        torch.sub(lp, lq, out=w)
        lp.exp_()
        sums = w.mul_(lp).sum(-1, keepdim=True).T
        if grads:
            lq.exp_().sub_(lp)
        return sums
    if beta == 1.0:  # D = R = Σ q r, r = log q − log p; ∂D/∂s = q r − R q
        torch.sub(lq, lp, out=w)
        lq.exp_()
        sums = w.mul_(lq).sum(-1, keepdim=True).T
        if grads:
            r_total = sums[0] if given is None else given[0]
            lq.mul_(-r_total.unsqueeze(-1)).add_(w)
        return sums
    # d = log p − log q + log β − log(1 − β);  log m = log q + log(1 − β) + softplus(d), so
    # r_q = −log(1 − β) − softplus(d),  r_p = d − softplus(d) − log β  (exact where d is huge: p or q is 0)
    c_q, c_p = math.log1p(-beta), math.log(beta)
    sp = scratch.softplus
    torch.sub(lp, lq, out=w).add_(c_p - c_q)
    torch._C._nn.softplus(w, 1, 20, out=sp)
    w.sub_(sp).sub_(c_p)  # r_p
    sp.neg_().sub_(c_q)  # r_q
    lp.exp_()
    k_p = w.mul_(lp).sum(-1)
    lq.exp_()
    k_q = torch.mul(lq, sp, out=w).sum(-1)  # w ← q r_q
    if grads:  # ∂D/∂s / (1 − β) = q r_q − (Σ q r_q) q
        k_total = k_q if given is None else given[1]
        lq.mul_(-k_total.unsqueeze(-1)).add_(w)
    return torch.stack([k_p, k_q])


def _finish_grad_(grad: Tensor, target: Optional[Tensor], grad_scale: Tensor, opts: DistillRowOptions,
                  scratch: Scratch, vocab_start: int = 0) -> None:  # fmt: skip
    """``grad ← g ((1 − α) a ∂D/∂s / T + α (h − onehot(t))) · chain`` in place (a = 1 − β for the JSD, else 1);
    ``scratch.hard`` holds ``log h``. Ignored rows give exactly 0."""
    alpha, a = opts.hard_weight, (1.0 - opts.beta if 0.0 < opts.beta < 1.0 else 1.0)
    valid, _ = _valid_targets(target, opts, grad.shape[-1] + vocab_start)
    g = grad_scale.to(grad.dtype).expand(grad.shape[:1])
    g = g if valid is None else torch.where(valid, g, 0.0)
    grad.mul_((g * ((1.0 - alpha) * a / opts.temperature)).unsqueeze(-1))
    if alpha:
        grad.addcmul_(scratch.hard.exp_(), (g * alpha).unsqueeze(-1))
        local, t_local = _local_targets(target, opts, vocab_start, grad.shape[-1])
        grad.scatter_add_(-1, t_local.unsqueeze(-1), torch.where(local, -alpha * g, 0.0).unsqueeze(-1))
    if scratch.chain is not None:
        grad.mul_(scratch.chain)
    if valid is not None and (grad.device.type != "cpu" or not bool(valid.all())):  # not 0 · NaN (−inf rows)
        grad.masked_fill_(~valid.unsqueeze(-1), 0.0)


def _row_loss(div: Tensor, hard_nll: Optional[Tensor], target: Optional[Tensor], opts: DistillRowOptions,
              not_log_probs: Optional[Tensor]) -> Tensor:  # fmt: skip
    """``(1 − α) D + α (−log h_t)`` per row, 0 where the target is ignored; NaN on the ``not_log_probs`` rows
    (teacher log-probabilities as given with a positive entry: not a distribution)."""
    loss = div if not opts.hard_weight else (1.0 - opts.hard_weight) * div + opts.hard_weight * hard_nll
    if not_log_probs is not None:
        loss = loss.masked_fill(not_log_probs, math.nan)
    valid, _ = _valid_targets(target, opts, 1)
    return loss if valid is None else torch.where(valid, loss, 0.0)


def _valid_targets(target, opts, num_classes):
    """(valid rows or None, the target clamped into [0, C)) — None/None without a target."""
    if target is None:
        return None, None
    valid = target != opts.ignore_index
    return valid, torch.where(valid, target, 0).clamp(0, num_classes - 1)


def _local_targets(target, opts, vocab_start, width):
    """(rows whose target lies in the piece's columns, the local column clamped into [0, width))."""
    local = (target >= vocab_start) & (target < vocab_start + width) & (target != opts.ignore_index)
    return local, torch.where(local, target - vocab_start, 0)


def _cap_(x: Tensor, softcap: Optional[float], chain: Optional[Tensor]) -> None:
    """``x ← κ tanh(x / κ)`` in place; ``chain ← 1 − tanh²`` (the derivative) when given."""
    if softcap is None:
        return
    x.div_(softcap).tanh_()
    if chain is not None:
        torch.mul(x, x, out=chain).neg_().add_(1.0)
    x.mul_(softcap)


def _max_sumexp(x: Tensor, term: Tensor):
    """Per-row max (an all −inf row clamped to the lowest finite value, so its sum is 0, not NaN) and
    ``Σ exp(x − max)``; ``term`` is scratch."""
    row_max = x.amax(-1).clamp_(min=torch.finfo(x.dtype).min)
    return row_max, torch.sub(x, row_max.unsqueeze(-1), out=term).exp_().sum(-1)


def _log_probs_(x: Tensor, lse: Tensor, out: Tensor) -> Tensor:
    """``out ← x − lse`` with the float64 ``lse`` applied in two fp32 terms (``torch_rows.Shift``)."""
    return Shift(lse, x.dtype).subtract_from(x, slice(None), out=out)


# --- dense rows (distill_loss): chunks of rows copied into fp32 blocks ------------------------------------


def forward(student: Tensor, teacher: Tensor, target: Optional[Tensor], opts: DistillRowOptions,
            step: Callable[..., Tensor] = block_step_) -> Tensor:  # fmt: skip
    """Per-row loss (compute dtype) of logits ``(N, V)``; ``target`` None or (N,). ``step``: the block step
    (this module's, or Triton's with the same contract)."""
    return _rows(student, teacher, target, None, opts, None, step)


def backward(student: Tensor, teacher: Tensor, target: Optional[Tensor], grad_loss: Tensor,
             opts: DistillRowOptions, step: Callable[..., Tensor] = block_step_) -> Tensor:  # fmt: skip
    """``g_i ∂loss_i/∂student_i`` (N, V) in the student's dtype."""
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _rows(student, teacher, target, grad_loss, opts, out, step)
    return out


def _rows(student, teacher, target, grad_loss, opts, out, step):
    n, vocab = student.shape
    cdt = compute_dtype(student.dtype)
    rows = max(1, min(n, chunk_elements(student.device.type, student.dtype) // max(vocab, 1)))
    grads = grad_loss is not None
    bufs = [torch.empty(rows * vocab, dtype=cdt, device=student.device)
            for _ in range(2 + scratch_blocks(opts, grads))]  # fmt: skip
    loss = torch.empty(n, dtype=cdt, device=student.device)
    g_rows = None if grad_loss is None else grad_loss.to(cdt).expand(n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s, t, *rest = (b[: (r1 - r0) * vocab].view(r1 - r0, vocab) for b in bufs)
        s.copy_(student[r0:r1])
        t.copy_(teacher[r0:r1])
        tgt = None if target is None else target[r0:r1]
        g = None if g_rows is None else g_rows[r0:r1]
        loss[r0:r1] = step(s, t, tgt, g, opts, Scratch.of(rest, opts, grads))
        if grads:
            out[r0:r1].copy_(s)
    return loss
