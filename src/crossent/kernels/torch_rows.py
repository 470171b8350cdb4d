"""Row kernels in plain torch ops: the CPU path, and the CUDA path where Triton is absent.

Fused: softcap, row max, sum-exp, target gather, smoothing and z-loss terms, one chunk of rows at a time.
Never materialized: the (N, C) log-probabilities or any full-size temporary; only chunk-sized scratch.
Written in place: only ``out`` in the backward functions (it aliases the logits when asked to).

Two levels. ``forward`` / ``backward`` take rows of logits, whole or a vocabulary shard of them (vocab-parallel
CE: one shard per rank, its stats combined across ranks by a hook). Whole rows of class indices run one fused
log_softmax (forward) or softmax (backward) per chunk. Shards are built from the pieces ``shard_stats`` →
(``combine_stats`` or the hook) → ``index_loss`` and ``shard_backward``, which the fused linear CE's chunk
step (``linear_step``) uses directly. Logits are ``(..., C)`` with any strides; targets ``(...)`` int (class indices)
or ``(..., C)`` float (probabilities); per-position results are fp32 (fp64 for fp64 logits).
The formulas are derived in docs/math.md; the names follow it: ``u`` weighted target vector,
``U = Σ_c u_c``, ``ω`` z-loss weight, ``g`` upstream gradient per row.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from crossent._options import RowOptions
from crossent._precision import compute_dtype
from crossent.kernels import cpu_rows, scratch
from crossent.kernels.shard import VocabShard

StatsHook = Callable[["RowStats"], "RowStats"]
"""Turns this process's per-row stats over its columns into the stats over all C columns (vocab-parallel:
:func:`crossent.kernels.collectives.stats_hook`)."""

# Positions x classes handled per chunk (the scratch of one chunk: 2^23 fp32 = 32 MiB on the CPU). Whole rows
# of class indices run one fused log_softmax / softmax per chunk (row-local: a row stays in cache whatever the
# chunk), so the chunk size mostly sets how many parallel regions a call runs, and each region ends in a
# barrier that a core taken by another process stalls. Measured on the 2-core x86 VM with other jobs running
# (load average 3–4), `benchmarks/row_chunks.py`, fp32 forward+backward against F.cross_entropy: 2^21 / 2^22 /
# 2^23 gave 1.06 / 0.76 / 0.55× at 4096×32768 and 1.90 / 1.01 / 0.73× at 1024×131072 (the earlier
# max/sub/exp/sum passes took 2.0× at 2^21 there). Shards and probability targets use the same chunks. On
# CUDA launch overhead dominates small chunks, and this path is only the fallback for Triton.
# 16-bit logits ("cpu16") are upcast chunk by chunk, and that fp32 copy is read again by the softmax: at 2^22
# (16 MiB) it stays in the VM's 32 MiB L3. bf16 forward+backward, quiet: 0.60× / 0.80× (2^22 / 2^23) at
# 4096×32768, 0.62× / 0.80× at 1024×131072; with a busy process 1.26× / 1.08× and 1.15× / 1.28×.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cpu16": 1 << 22, "cuda": 1 << 27}


def chunk_elements(device_type: str, dtype: torch.dtype) -> int:
    """Positions × classes per chunk for logits of ``dtype`` on ``device_type`` (:data:`CHUNK_ELEMENTS`)."""
    if device_type == "cpu" and dtype.itemsize == 2:
        return CHUNK_ELEMENTS["cpu16"]
    return CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cuda"])


def forward(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    opts: RowOptions,
    shard: Optional[VocabShard] = None,
    combine: Optional[StatsHook] = None,
) -> Tuple[Tensor, Tensor]:
    """Per-position loss (compute dtype) and log-sum-exp (float64), both ``logits.shape[:-1]``.

    ``shard`` (default: the whole row) says which of the head's columns ``logits`` holds; ``combine`` turns
    this shard's row stats into the full rows' (the cross-rank all-reduces of vocab-parallel CE).
    """
    shard = VocabShard.whole(logits.shape[-1]) if shard is None else shard
    if target.is_floating_point():
        return _probs_forward(logits, target, class_weight, opts)
    if shard.is_whole(logits.shape[-1]) and combine is None:
        return _whole_rows_forward(logits, target, class_weight, opts)
    stats = shard_stats(logits, target, class_weight, shard.vocab_start, opts.label_smoothing != 0.0, opts.softcap)
    stats = stats if combine is None else combine(stats)
    lse = stats.lse()
    loss = index_loss(lse, stats.target_logit, stats.dot, target, class_weight, opts, shard.num_classes)
    return loss, lse


def backward(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    opts: RowOptions,
    out: Tensor,
    shard: Optional[VocabShard] = None,
) -> None:
    """Write ``grad_loss[i] · ∂loss_i/∂logits_i`` into ``out`` (``logits.shape``; may be ``logits``).

    ``lse`` is the full row's log-sum-exp (every shard's columns), so a shard's gradient needs no
    communication.
    """
    shard = VocabShard.whole(logits.shape[-1]) if shard is None else shard
    if not _views_as_3d(out, logits):  # an in-place target whose strides don't flatten: via a buffer
        buf = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        backward(logits, target, class_weight, lse, grad_loss, opts, buf, shard)
        out.copy_(buf)
        return
    if target.is_floating_point():
        _probs_backward(logits, target, class_weight, lse, grad_loss, opts, out)
    elif shard.is_whole(logits.shape[-1]):
        _whole_rows_backward(logits, target, class_weight, lse, grad_loss, opts, out)
    else:
        shard_backward(logits, target, class_weight, shard.vocab_start, lse, grad_loss, opts, shard.num_classes, out)


# --- class-index targets over a vocabulary shard -----------------------------------------------------
# A shard is the columns [v0, v0 + V_s) of the full C-class logits: the whole row (v0 = 0, V_s = C),
# a vocabulary chunk of the fused linear CE, or one rank's slice in vocab-parallel CE. Targets and
# weights are always global (class ids in [0, C), weight (C,)). Per row:
#   loss = ω ((1 − ε)(lse − z_t) + s lse²) + (ε / C)(W lse − Σ_c w_c z_c),    ω = w_t, W = Σ_c w_c
#   ∂loss/∂z_c = (ω (1 − ε + 2 s lse) + ε W / C) p_c − ω (1 − ε) [c = t] − ε w_c / C


class RowStats(NamedTuple):
    """What one shard contributes per row; shards combine by :func:`combine_stats` (or all-reduces).

    ``max`` is the shard's row max (an all −inf row is clamped to the dtype's lowest finite value, so
    that ``sumexp = Σ exp(z − max)`` is 0 there, not NaN); ``target_logit`` is ``z_t`` where the target
    lies in the shard, else 0; ``dot`` is ``Σ_c w_c z_c`` over the shard's columns (only with smoothing).
    """

    max: Tensor
    sumexp: Tensor
    target_logit: Tensor
    dot: Optional[Tensor]

    def lse(self) -> Tensor:
        """``max + log sumexp`` in float64: the log-sum-exp over the columns these stats cover.

        float64 because fp32 would round it at |lse| (a 1e-5 error at lse ≈ 300), and ``lse − z_t``
        and ``exp(z − lse)`` would inherit that error; per-row float64 costs O(N).
        """
        return self.sumexp.double().log_().add_(self.max.double())


def combine_stats(parts: Sequence[RowStats]) -> RowStats:
    """Stats of the union of disjoint shards: ``M = max_k m_k``, ``S = Σ_k s_k exp(m_k − M)``, sums of the rest."""
    row_max = torch.stack([p.max for p in parts]).amax(0)
    sumexp = sum(p.sumexp * torch.exp(p.max - row_max) for p in parts)
    target_logit = sum(p.target_logit for p in parts)
    dot = None if parts[0].dot is None else sum(p.dot for p in parts)
    return RowStats(row_max, sumexp, target_logit, dot)


def shard_stats(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    vocab_start: int,
    need_dot: bool,
    softcap: Optional[float],
) -> RowStats:
    """Per-row max, sum-exp, target logit and (``need_dot``) ``Σ_c w_c z_c`` of a shard ``(..., V_s)``."""
    z3, t3, shape = _as_3d(logits, target)
    cdt = compute_dtype(logits.dtype)
    w_shard = shard_weight(class_weight, vocab_start, z3.shape[-1], cdt)
    row_max, sumexp = _empty_rows(z3.shape[:2], cdt, z3.device, 2)
    dot = torch.empty_like(row_max) if need_dot else None
    lowest = torch.finfo(cdt).min
    for idx, x, _ in _chunks(z3, cdt, 0):
        src = _capped(x, z3[idx], softcap)
        if need_dot:
            dot[idx] = weighted_sum(src, w_shard)
        m = src.amax(-1).clamp_(min=lowest)
        row_max[idx] = m
        torch.sub(src, m.unsqueeze(-1), out=x).exp_()
        sumexp[idx] = x.sum(-1)
    local, t_local = local_targets(t3, vocab_start, z3.shape[-1])
    z_t = z3.gather(-1, t_local.unsqueeze(-1)).squeeze(-1).to(cdt)  # the target logit, in fp32
    if softcap is not None:
        z_t = softcap * torch.tanh(z_t / softcap)
    z_t = torch.where(local, z_t, 0.0)
    return RowStats(row_max.reshape(shape), sumexp.reshape(shape), z_t.reshape(shape), None if dot is None else dot.reshape(shape))


def index_loss(
    lse: Tensor,
    target_logit: Tensor,
    dot: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    opts: RowOptions,
    num_classes: int,
) -> Tensor:
    """The per-position loss from the row's lse, target logit and (with smoothing) ``Σ_c w_c z_c``.

    Computed in float64 (O(N) work; ``lse − z_t`` keeps its digits when |lse| is large) and returned
    in the target logit's dtype. Ignored positions give 0; a class index outside [0, C) gives NaN.
    """
    eps = opts.label_smoothing
    out_dtype = target_logit.dtype
    lse, target_logit = lse.double(), target_logit.double()
    valid, t_safe, bad = index_masks(target, opts.ignore_index, num_classes)
    omega = torch.where(valid, weight_at(class_weight, t_safe, lse), 0.0)
    loss = omega * ((1.0 - eps) * (lse - target_logit) + opts.z_loss * lse * lse)
    if eps:
        total_weight = num_classes if class_weight is None else class_weight.double().sum()
        loss = loss + (eps / num_classes) * (total_weight * lse - dot.double())
    return torch.where(valid, loss, 0.0).masked_fill_(bad, math.nan).to(out_dtype)


def shard_backward(
    logits: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    vocab_start: int,
    lse: Tensor,
    grad_loss: Tensor,
    opts: RowOptions,
    num_classes: int,
    out: Tensor,
) -> None:
    """Write ``g · ∂loss/∂z`` for the shard's columns into ``out`` (the shard's shape; may be ``logits``).

    ``lse`` is the full row's log-sum-exp (all shards combined), ``grad_loss`` the upstream gradient g.
    ``out`` must view as (N, M, V_s) like the logits (a fresh contiguous buffer always does).
    """
    z3, t3, _ = _as_3d(logits, target)
    out3 = out.view(z3.shape)
    cdt = compute_dtype(logits.dtype)
    lse2, g2 = _rows_of(lse, z3, torch.float64), _rows_of(grad_loss, z3, cdt, lse.shape)
    f = index_grad_factors(t3, class_weight, lse2, g2, opts, vocab_start, z3.shape[-1], num_classes)
    _, t_local = local_targets(t3, vocab_start, z3.shape[-1])
    # a·p is computed as exp(z − (lse − log|a|))·sign(a): one exp pass instead of exp and multiply. Rows
    # with a = 0 (ignored, zero upstream gradient) get the shift +inf, so exactly 0 comes out, also where
    # lse = −inf (an all −inf row). The shift is formed in float64 (lse is float64).
    shift = Shift((lse2 - f.scale.abs().log()).masked_fill_(f.scale == 0, math.inf), cdt)  # NaN scale: NaN row
    sign = f.scale.sign().to(cdt) if _maybe_negative(f.scale) else None
    at_target = (-f.target_coef).to(cdt)
    smooth = None if f.smooth_coef is None else f.smooth_coef.to(cdt)
    w_shard = shard_weight(class_weight, vocab_start, z3.shape[-1], cdt)
    direct = out.dtype == cdt  # compute straight into out's chunk: no scratch, no copy
    softcap = opts.softcap
    for idx, x, scratch in _chunks(z3, cdt, 1 if softcap else 0, scratch_for_x=not direct):
        x = out3[idx] if direct else x
        chain = scratch[0] if softcap else None
        src = _capped(x, z3[idx], softcap, chain_out=chain)
        shift.subtract_from(src, idx, out=x).exp_()
        if sign is not None:
            x.mul_(sign[idx].unsqueeze(-1))
        _add_index_terms(x, idx, t_local, at_target, smooth, w_shard, chain)
        if not direct:
            out3[idx].copy_(x)


def _add_index_terms(x, idx, t_local, at_target, smooth, w, chain):
    """A chunk holding ``scale · p``: add the target column's and the smoothing term, then the softcap chain."""
    x.scatter_add_(-1, t_local[idx].unsqueeze(-1), at_target[idx].unsqueeze(-1))
    if smooth is not None:
        if w is None:
            x.sub_(smooth[idx].unsqueeze(-1))
        else:
            x.addcmul_(smooth[idx].unsqueeze(-1), w, value=-1.0)
    if chain is not None:
        x.mul_(chain)


# --- class-index targets, whole rows: PyTorch's fused (log-)softmax per chunk ----------------------------------
# One vectorized log_softmax (forward) or softmax (backward) pass per chunk instead of separate max, subtract,
# exp and sum passes: a few long parallel regions, which keeps the cost down when another process takes a core
# (each region ends in a barrier). Both stay exact where it matters: the loss is −log p_t straight from the
# log-softmax (no large lse subtracted), the lse is z_t − log p_t in float64 (z_t exact), and p comes from
# exp(z − m) / s, never from a rounded lse.


def _whole_rows_forward(logits, target, class_weight, opts):
    """Per-position loss and float64 lse of whole rows: ``log p = log_softmax(x)`` per chunk, then
    ``lse = x_t − log p_t`` and (with smoothing) ``Σ_c w_c (lse − x_c) = −Σ_c w_c log p_c``."""
    z3, t3, shape = _as_3d(logits, target)
    if cpu_rows.covers(z3, None, opts):  # the same math in C, reading the logits as stored
        loss, lse, _ = cpu_rows.forward(z3, t3, class_weight, opts)
        return loss.reshape(shape), lse.reshape(shape)
    cdt = compute_dtype(logits.dtype)
    num_classes = z3.shape[-1]
    valid, t_safe, _ = index_masks(t3, opts.ignore_index, num_classes)
    logp_t = torch.empty(z3.shape[:2], dtype=cdt, device=z3.device)
    neg_smooth = torch.empty_like(logp_t) if opts.label_smoothing else None  # Σ_c w_c log p_c
    w = shard_weight(class_weight, 0, num_classes, cdt)
    for idx, x, _ in _chunks(z3, cdt, 0):
        src = _capped(x, z3[idx], opts.softcap)
        torch._log_softmax(src, -1, False, out=x)
        logp_t[idx] = x.gather(-1, t_safe[idx].unsqueeze(-1)).squeeze(-1)
        if neg_smooth is not None:
            neg_smooth[idx] = weighted_sum(x, w)
    z_t = z3.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1).to(cdt)
    if opts.softcap is not None:
        z_t = opts.softcap * torch.tanh(z_t / opts.softcap)
    lse = z_t.double() - logp_t.double()
    dot = None
    if neg_smooth is not None:  # index_loss takes Σ_c w_c x_c: W lse + Σ_c w_c log p_c
        total_weight = num_classes if class_weight is None else class_weight.double().sum()
        dot = total_weight * lse + neg_smooth.double()
    loss = index_loss(lse, z_t, dot, t3, class_weight, opts, num_classes)
    return loss.reshape(shape), lse.reshape(shape)


def _whole_rows_backward(logits, target, class_weight, lse, grad_loss, opts, out):
    """``g · ∂loss/∂z`` of whole rows into ``out``: ``p = softmax(x)`` per chunk, times the row scale, then the
    target and smoothing terms (:func:`index_grad_factors`) and the softcap chain factor."""
    z3, t3, _ = _as_3d(logits, target)
    out3 = out.view(z3.shape)
    if cpu_rows.covers(z3, out3, opts):
        cpu_rows.backward(z3, t3, class_weight, lse, grad_loss, opts, out3)
        return
    cdt = compute_dtype(logits.dtype)
    num_classes = z3.shape[-1]
    lse2, g2 = _rows_of(lse, z3, torch.float64), _rows_of(grad_loss, z3, cdt, lse.shape)
    f = index_grad_factors(t3, class_weight, lse2, g2, opts, 0, num_classes, num_classes)
    _, t_local = local_targets(t3, 0, num_classes)
    scale, at_target = f.scale.to(cdt), (-f.target_coef).to(cdt)
    smooth = None if f.smooth_coef is None else f.smooth_coef.to(cdt)
    w = shard_weight(class_weight, 0, num_classes, cdt)
    direct = out.dtype == cdt and out3.is_contiguous()  # softmax writes rows: straight into out when it can
    softcap = opts.softcap
    on_cpu = out.device.type == "cpu"
    for idx, x, scratch in _chunks(z3, cdt, 1 if softcap else 0, scratch_for_x=not direct):
        x = out3[idx] if direct else x
        chain = scratch[0] if softcap else None
        src = _capped(x, z3[idx], softcap, chain_out=chain)
        torch._softmax(src, -1, False, out=x)
        x.mul_(scale[idx].unsqueeze(-1))
        if not on_cpu:  # no host sync: rows without gradient are zeroed here (see below for the CPU)
            x.masked_fill_((scale[idx] == 0).unsqueeze(-1), 0.0)
        _add_index_terms(x, idx, t_local, at_target, smooth, w, chain)
        if not direct:
            out3[idx].copy_(x)
    # rows without gradient (ignored, zero upstream) are 0 even where softmax is NaN (an all −inf row)
    if on_cpu and bool((f.scale == 0).any()):  # on the CPU the host check is free, and only those rows are written
        zero_rows = (f.scale == 0).nonzero()
        out3[zero_rows[:, 0], zero_rows[:, 1]] = 0


class IndexGradFactors(NamedTuple):
    """Per-row factors of the class-index gradient over a shard, in float64:
    ``g ∂loss/∂z_c = scale · p_c − target_coef · [c = t] − smooth_coef · w_c``.

    ``scale = g (ω (1 − ε + 2 s lse) + ε W / C)``: 0 on ignored rows, NaN on rows whose class index is outside
    [0, C); ``target_coef = g ω (1 − ε)`` where the target lies in the shard, else 0; ``smooth_coef = g ε / C``
    (None without smoothing). The one definition of these factors: the row kernels here and the fused
    linear CE's chunk step (``linear_step``) both use it.
    """

    scale: Tensor
    target_coef: Tensor
    smooth_coef: Optional[Tensor]


def index_grad_factors(
    target: Tensor,
    class_weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    opts: RowOptions,
    vocab_start: int,
    shard_size: int,
    num_classes: int,
) -> IndexGradFactors:
    """The :class:`IndexGradFactors` of rows with global class ids ``target`` and global ``lse`` (same shape),
    for the shard's columns ``[vocab_start, vocab_start + shard_size)`` of ``num_classes``. O(rows) work."""
    eps = opts.label_smoothing
    valid, t_safe, bad = index_masks(target, opts.ignore_index, num_classes)
    local, _ = local_targets(target, vocab_start, shard_size)
    lse = lse.double()
    g = torch.where(valid, grad_loss.double(), 0.0)
    omega = torch.where(valid, weight_at(class_weight, t_safe, lse), 0.0)
    total_weight = num_classes if class_weight is None else class_weight.double().sum()
    scale = g * (omega * (1.0 - eps + 2.0 * opts.z_loss * lse) + eps * total_weight / num_classes)
    scale = torch.where(valid, scale, 0.0).masked_fill_(bad, math.nan)  # not 0·nan where lse = −inf (ignored)
    target_coef = torch.where(local, (1.0 - eps) * g * omega, 0.0)
    return IndexGradFactors(scale, target_coef, (eps / num_classes) * g if eps else None)


class Shift:
    """A per-row float64 shift ``σ`` applied to fp32 logits as ``(z − hi) − lo`` with ``hi + lo = σ``.

    One fp32 subtraction ``z − fp32(σ)`` would round σ at |σ| (≈ |lse|), an error that ``exp`` turns
    into a relative error of |lse|·2⁻²⁴ in every probability; the two-term form rounds only relative
    to the result ``z − σ``, as PyTorch's ``z − lse`` on exact log-probabilities does. For float64
    logits ``lo`` is 0 and skipped.
    """

    def __init__(self, sigma: Tensor, cdt: torch.dtype):
        self.hi = sigma.to(cdt)
        # σ = +inf (ignored rows) has hi = inf and lo = 0, not inf − inf
        self.lo = None if cdt == torch.float64 else torch.where(sigma.isinf(), 0.0, sigma - self.hi.double()).to(cdt)

    def subtract_from(self, src: Tensor, idx, out: Tensor) -> Tensor:
        """``out ← src − σ`` for the rows ``idx`` (broadcast over the class dim)."""
        torch.sub(src, self.hi[idx].unsqueeze(-1), out=out)
        if self.lo is not None:
            out.sub_(self.lo[idx].unsqueeze(-1))
        return out


def index_masks(t, ignore_index, num_classes):
    """(valid, t clamped into [0, C) for safe indexing, out-of-range rows that must become NaN)."""
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= num_classes))
    t_safe = torch.where(valid, t, 0).clamp_(0, num_classes - 1)
    return valid, t_safe, bad


def local_targets(t, vocab_start, shard_size):
    """(target lies in [v0, v0 + V_s), its column in the shard clamped into range).

    An ignore_index inside the range counts as local here; every use of it is multiplied by ω = 0 or
    masked by ``valid`` afterwards, so ignored rows still contribute nothing.
    """
    local = (t >= vocab_start) & (t < vocab_start + shard_size)
    return local, (t - vocab_start).clamp_(0, max(shard_size - 1, 0))


def weight_at(class_weight, t_safe, like):
    """``w_t`` for clamped class indices (ones without weights), in ``like``'s dtype."""
    return torch.ones_like(like) if class_weight is None else class_weight.to(like.dtype)[t_safe]


def shard_weight(class_weight, vocab_start, shard_size, cdt):
    """The shard's slice of the class weights in the compute dtype (None without weights)."""
    return None if class_weight is None else class_weight[vocab_start : vocab_start + shard_size].to(cdt)


def weighted_sum(x, w):
    """``Σ_c w_c x_c`` over the last dim (``w`` None: all ones)."""
    return x.sum(-1) if w is None else x @ w


def _rows_of(values, z3, cdt, shape=None):
    """A per-position tensor (lse or the upstream gradient, maybe stride-0) as (N, M) in the compute dtype."""
    values = values.to(cdt)
    if shape is not None:
        values = values.expand(shape)
    return values.reshape(z3.shape[:2])


# --- probability targets (full rows only) -----------------------------------------------------------
#   u_c = w_c ((1 − ε) y_c + ε / C),  U = Σ_c u_c,  ω = Σ_c w_c y_c
#   loss = U lse − Σ_c u_c z_c + s ω lse²            (a term with u_c = 0 is 0, even at z_c = −inf)
#   ∂loss/∂z_c = (U + 2 s ω lse) p_c − u_c


def _probs_forward(logits, target, class_weight, opts):
    eps, z_loss, softcap = opts.label_smoothing, opts.z_loss, opts.softcap
    z3, y3, shape = _as_3d(logits, target)
    cdt = compute_dtype(logits.dtype)
    w = shard_weight(class_weight, 0, z3.shape[-1], cdt)
    row_max, sumexp, dot, total, omega = _empty_rows(z3.shape[:2], cdt, z3.device, 5)
    lowest = torch.finfo(cdt).min
    for idx, x, (u, uz) in _chunks(z3, cdt, 2):
        omega[idx] = _weighted_targets(u, y3[idx], w, eps)
        total[idx] = u.sum(-1)
        src = _capped(x, z3[idx], softcap)
        m = src.amax(-1).clamp_(min=lowest)
        row_max[idx] = m
        torch.sub(src, m.unsqueeze(-1), out=x)
        dot[idx] = torch.mul(u, x, out=uz).nansum(-1)  # Σ u (z − m); nansum drops exactly the 0·(−inf) terms
        sumexp[idx] = x.exp_().sum(-1)
    # loss = U lse − Σ u z + s ω lse² = U log s − Σ u (z − m) + s ω lse², in float64 per row
    log_s = sumexp.double().log_()
    lse = log_s + row_max.double()
    loss = total.double() * log_s - dot.double() + z_loss * omega.double() * lse * lse  # NaN logits reach lse
    return loss.to(cdt).reshape(shape), lse.reshape(shape)


def _probs_backward(logits, target, class_weight, lse, grad_loss, opts, out):
    eps, z_loss, softcap = opts.label_smoothing, opts.z_loss, opts.softcap
    z3, y3, _ = _as_3d(logits, target)
    out3 = out.view(z3.shape)  # out is ours (contiguous) or the logits, which _as_3d viewed the same way
    cdt = compute_dtype(logits.dtype)
    w = shard_weight(class_weight, 0, z3.shape[-1], cdt)
    lse3, g3 = _rows_of(lse, z3, cdt), _rows_of(grad_loss, z3, cdt, lse.shape)
    shift = Shift(_rows_of(lse, z3, torch.float64), cdt)
    direct = out.dtype == cdt
    for idx, x, scratch in _chunks(z3, cdt, 2, scratch_for_x=not direct):
        x = out3[idx] if direct else x
        u, chain = scratch
        omega = _weighted_targets(u, y3[idx], w, eps)
        src = _capped(x, z3[idx], softcap, chain_out=chain if softcap else None)
        lse_i, g_i = lse3[idx], g3[idx]
        shift.subtract_from(src, idx, out=x).exp_()  # p
        x.mul_((g_i * (u.sum(-1) + 2.0 * z_loss * omega * lse_i)).unsqueeze(-1))
        x.addcmul_(u, g_i.unsqueeze(-1), value=-1.0)
        if softcap:
            x.mul_(chain)
        if not direct:
            out3[idx].copy_(x)


def probs_target_grad(logits: Tensor, target: Tensor, class_weight, lse: Tensor, grad_loss: Tensor, opts) -> Tensor:
    """∂loss/∂y for probability targets: ``g · w_c · (s lse² − (1 − ε) log p_c)``, in the target's dtype."""
    z3, _, _ = _as_3d(logits, target)
    out = torch.empty(z3.shape, dtype=target.dtype, device=target.device)
    cdt = compute_dtype(logits.dtype)
    w = shard_weight(class_weight, 0, z3.shape[-1], cdt)
    lse3, g3 = _rows_of(lse, z3, cdt), _rows_of(grad_loss, z3, cdt, lse.shape)
    shift = Shift(_rows_of(lse, z3, torch.float64), cdt)
    label_smoothing, z_loss, softcap = opts.label_smoothing, opts.z_loss, opts.softcap
    for idx, x, _ in _chunks(z3, cdt, 0):
        src = _capped(x, z3[idx], softcap)
        shift.subtract_from(src, idx, out=x).mul_(-(1.0 - label_smoothing))  # −(1 − ε) log p
        x.add_((z_loss * lse3[idx] * lse3[idx]).unsqueeze(-1))
        if w is not None:
            x.mul_(w)
        out[idx].copy_(x.mul_(g3[idx].unsqueeze(-1)))
    return out.reshape(target.shape)


def _weighted_targets(u, y, w, eps):
    """Fill ``u`` with ``w_c ((1 − ε) y_c + ε / C)``; return ``ω = Σ_c w_c y_c``."""
    u.copy_(y)
    omega = weighted_sum(u, w)
    u.mul_(1.0 - eps).add_(eps / u.shape[-1])
    if w is not None:
        u.mul_(w)
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


def _views_as_3d(out, logits):
    """Whether ``out`` can be viewed (no copy) as the (N, M, C) shape the kernels work on."""
    try:
        out.view(_shape_3d(logits.shape))
        return True
    except RuntimeError:
        return False


def _shape_3d(shape):
    """(..., C) as (N, M, C): N the first batch dim (1 if none), M the product of the rest."""
    batch = shape[:-1]
    return (batch[0] if len(batch) else 1, math.prod(batch[1:]), shape[-1])


def _as_3d(logits, target):
    """View logits as (N, M, C) and the target as (N, M) or (N, M, C); return the batch shape too."""
    n, m, c = _shape_3d(logits.shape)
    z3 = logits.reshape(n, m, c)
    t3 = target.reshape(n, m, c) if target.is_floating_point() else target.reshape(n, m)
    return z3, t3, logits.shape[:-1]


def _chunks(z3: Tensor, cdt, n_scratch: int, scratch_for_x: bool = True) -> Iterator:
    """Yield (index, x, scratch) per chunk: ``index`` selects (n, m) positions of ``z3``; ``x`` and
    each of ``scratch`` are compute-dtype buffers of the chunk's shape, reused across chunks."""
    n, m, num_classes = z3.shape
    rows = max(1, chunk_elements(z3.device.type, z3.dtype) // max(num_classes, 1))
    cap = max(1, min(rows, n * m)) * num_classes
    bufs = [scratch.take(cap, cdt, z3.device) for _ in range(n_scratch + scratch_for_x)]
    try:
        for idx in _blocks(n, m, rows):
            shape = (idx[0].stop - idx[0].start, idx[1].stop - idx[1].start, num_classes)
            views = [b[: math.prod(shape)].view(shape) for b in bufs]
            x = views.pop(0) if scratch_for_x else None
            yield idx, x, views
    finally:  # also when the caller stops early: the next block's call takes them again (kernels.scratch)
        scratch.give_back(*bufs)


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
