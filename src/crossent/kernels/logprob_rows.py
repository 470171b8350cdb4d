"""Per-token log-probability and entropy row kernels in plain torch ops: the CPU path and the CUDA fallback.

Fused: softcap, temperature, row max, sum-exp, the entropy's Σ p·log p and the K id gathers, a chunk of rows at a time.
Never materialized: the (N, C) log-probabilities, probabilities or any full-size temporary; chunk-sized scratch only.
Written in place: only ``out`` of :func:`backward`.

Notation (docs/math.md, "Per-token log-probabilities and entropy"): per row the logits the math sees are
``x = κ tanh(z / κ) / T``, ``p = softmax(x)``, ``lse = log Σ_c exp(x_c)``; the ids ``t_k`` (K per row, class dim
last: ``index`` is ``(..., K)``) give ``lp_k = x_{t_k} − lse`` and the entropy is ``H = −Σ_c p_c log p_c``.
A shard (the whole row, one vocabulary piece of the fused loop, or one rank's slice) reports
:class:`LogProbStats`: its max ``m``, ``s = Σ exp(x − m)``, ``d = Σ exp(x − m)(x − m)`` and its ids' ``x``;
shards combine exactly (:func:`combine_stats`), and ``lse = M + log S``, ``H = log S − D / S``: the entropy is
formed from sums relative to the max, never as ``lse − Σ p x`` (which would cancel at |lse| ≫ H).
Per-row results come out in the compute dtype (fp32; fp64 for fp64 logits), the LSE in float64.

Three more statistics, each only when its flag is set (docs/math.md, "Three statistics without gradient"):
``q = Σ exp(2(x − m))`` (``log Σ p² = log q − 2 log s``), ``Σ x`` (the mean logit) and, per id, the shard's max where
its first argmax is the id / lies before the id (top-1 by argmax, ties to the first column; they combine by max).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from crossent._options import LogProbRowOptions
from crossent._precision import compute_dtype
from crossent.kernels import cpu_rows
from crossent.kernels.linear_step import FINISHED, GradFactors
from crossent.kernels.shard import VocabShard
from crossent.kernels.torch_rows import Shift, _capped, _chunks, _shape_3d, _views_as_3d, index_masks, local_targets


class LogProbStats(NamedTuple):
    """What one shard of columns contributes per row (compute dtype): ``max`` (all −inf rows clamped to the
    lowest finite value, so ``sumexp`` is 0 there, not NaN), ``sumexp = Σ exp(x − max)``, ``plogp = Σ exp(x −
    max)(x − max)`` (None without entropy) and ``target_logits`` (..., K): ``x`` at each id in the shard, else 0.

    Each None unless its flag asks: ``sumsq = Σ exp(2(x − max))`` (``log_sum_sq_probs``), ``logit_sum = Σ x``
    (``mean_logits``); for ``is_top1``, ``top`` the shard's max of ``x`` as its argmax saw it (not clamped) and per id
    ``top_at`` / ``top_before`` (..., K): ``top`` where the shard's first argmax is the id / lies before it, else −inf
    (:func:`top_stats`)."""

    max: Tensor
    sumexp: Tensor
    plogp: Optional[Tensor]
    target_logits: Tensor
    sumsq: Optional[Tensor] = None
    logit_sum: Optional[Tensor] = None
    top: Optional[Tensor] = None
    top_at: Optional[Tensor] = None
    top_before: Optional[Tensor] = None

    def lse(self) -> Tensor:
        """``max + log sumexp`` in float64 (see torch_rows.RowStats.lse for why float64); the stats stay as they
        are (``sumexp`` is read again for the entropy)."""
        return torch.log(self.sumexp.double()).add_(self.max.double())


LogProbStatsHook = Callable[[LogProbStats], LogProbStats]
"""This process's row stats over its columns → the stats over all C columns (vocab-parallel:
:func:`crossent.kernels.collectives.logprob_stats_hook`)."""


class LogProbRows(NamedTuple):
    """Per-row results: ``log_probs`` (..., K) and ``entropy`` (...) (None unless asked for) in the compute dtype,
    ``lse`` (...) in float64; ``log_sum_sq_probs``, ``mean_logits`` (...) in the compute dtype and ``is_top1`` (..., K)
    bool, each None unless asked for."""

    log_probs: Tensor
    entropy: Optional[Tensor]
    lse: Tensor
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logits: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None

    @staticmethod
    def empty(batch_shape, index_shape, opts: LogProbRowOptions, dtype: torch.dtype, device) -> "LogProbRows":
        """Uninitialized results for ``opts`` on ``device``, ``dtype`` the compute dtype: the shapes and dtypes
        above, None where not asked (the fused loop's outputs; the custom ops' fakes)."""

        def new(shape, kind=dtype, wanted=True):
            return torch.empty(shape, dtype=kind, device=device) if wanted else None

        return LogProbRows(new(index_shape), new(batch_shape, wanted=opts.entropy), new(batch_shape, torch.float64),
                           new(batch_shape, wanted=opts.log_sum_sq_probs), new(batch_shape, wanted=opts.mean_logits),
                           new(index_shape, torch.bool, opts.is_top1))  # fmt: skip


def forward(
    logits: Tensor,
    index: Tensor,
    opts: LogProbRowOptions,
    shard: Optional[VocabShard] = None,
    combine: Optional[LogProbStatsHook] = None,
    *,
    stats: Callable[..., LogProbStats] = None,
) -> LogProbRows:
    """Log-probabilities of ``index`` (..., K) under ``softmax(x)``, the entropy (``opts.entropy``) and the LSE.

    ``shard`` (default: the whole row) says which columns ``logits`` (..., V_s) holds; ``combine`` turns this
    shard's stats into the full rows' (vocab-parallel); ``stats`` computes a shard's (default
    :func:`shard_stats`; Triton's is ``triton_logprobs.shard_stats``). Ignored ids give 0; a position whose ids
    are all ignored has entropy 0; an id outside [0, C) gives NaN (and a NaN entropy for its position).
    """
    shard = VocabShard.whole(logits.shape[-1]) if shard is None else shard
    if stats is None and combine is None and shard.is_whole(logits.shape[-1]):
        rows = softmax_rows(logits, index, opts)
        if rows is not None:
            return rows
    stats = (shard_stats if stats is None else stats)(logits, index, opts, shard.vocab_start)
    return finish(stats if combine is None else combine(stats), index, opts, shard.num_classes)


def shard_stats(logits: Tensor, index: Tensor, opts: LogProbRowOptions, vocab_start: int = 0) -> LogProbStats:
    """:class:`LogProbStats` of the columns ``[vocab_start, vocab_start + V_s)`` held by ``logits`` (..., V_s)."""
    z3, ids3 = _as_3d(logits, index)
    cdt = compute_dtype(logits.dtype)
    if cpu_rows.covers(z3, None, opts):  # the same stats in C, one pass over the logits as stored
        row_max, sumexp, plogp = cpu_rows.log_prob_stats(z3, opts.temperature, opts.entropy)
        extra = _extra_stats(z3, opts) if _any_extra(opts) else _Extra()  # only when asked
        return _with_id_logits(row_max, sumexp, plogp, extra, z3, ids3, opts, vocab_start, index.shape)
    row_max, sumexp = (torch.empty(z3.shape[:2], dtype=cdt, device=z3.device) for _ in range(2))
    plogp = torch.empty_like(row_max) if opts.entropy else None
    extra = _Extra.empty(row_max, cdt, opts.log_sum_sq_probs, opts.mean_logits, opts.is_top1)
    lowest = torch.finfo(cdt).min
    for idx, x, scratch in _chunks(z3, cdt, 1 if opts.entropy else 0):
        src = scaled_logits(x, z3[idx], opts)
        m = extra.add_sums(idx, src) if _any_extra(opts) else None  # the argmax pass gives the max too
        m = (src.amax(-1) if m is None else m).clamp_(min=lowest)  # add_sums stored its own copy
        row_max[idx] = m
        y = torch.sub(src, m.unsqueeze(-1), out=x)  # x − m ≤ 0
        if plogp is None:
            e = y.exp_()
            sumexp[idx] = e.sum(-1)
        else:
            y.clamp_(min=lowest)  # −inf → lowest: its term e·y is 0 · lowest = 0, not 0 · (−inf); NaN stays NaN
            e = torch.exp(y, out=scratch[0])
            sumexp[idx] = e.sum(-1)
            plogp[idx] = y.mul_(e).sum(-1)
        if extra.sumsq is not None:  # Σ e², e = exp(x − m): the same exponentials
            extra.sumsq[idx] = e.square_().sum(-1)
    return _with_id_logits(row_max, sumexp, plogp, extra, z3, ids3, opts, vocab_start, index.shape)


def _any_extra(opts: LogProbRowOptions) -> bool:
    return opts.log_sum_sq_probs or opts.mean_logits or opts.is_top1


class _Extra(NamedTuple):
    """The optional per-row sums of a shard (N, M) (compute dtype; ``top_col`` int64: the first argmax's column in
    the shard), each None unless its flag asks."""

    sumsq: Optional[Tensor] = None
    logit_sum: Optional[Tensor] = None
    top: Optional[Tensor] = None
    top_col: Optional[Tensor] = None

    @staticmethod
    def empty(like: Tensor, dtype: torch.dtype, sumsq: bool, logit_sum: bool, top: bool) -> "_Extra":
        """Buffers of ``like``'s shape and device, in ``dtype``, for the sums asked for."""

        def new(flag, kind=dtype):
            return torch.empty(like.shape, dtype=kind, device=like.device) if flag else None

        return _Extra(new(sumsq), new(logit_sum), new(top), new(top, torch.int64))

    def add_sums(self, idx, src: Tensor) -> Optional[Tensor]:
        """Write ``Σ x`` and (max, first argmax) of a chunk ``src`` (…, C) at ``idx``; returns the max (unclamped) when
        the argmax pass took it, else None. (``torch.max`` over a dim returns the first maximal index.) ``Σ x`` is a
        product with a vector of ones: one BLAS read, half the time of ``sum`` on the CPU (its error on the mean is
        far below the mean's own rounding)."""
        if self.logit_sum is not None:
            self.logit_sum[idx] = torch.matmul(src, src.new_ones(src.shape[-1]))
        if self.top is None:
            return None
        top, col = src.max(-1)
        self.top[idx], self.top_col[idx] = top, col
        return top


def _extra_stats(z3: Tensor, opts: LogProbRowOptions) -> _Extra:
    """The optional sums of rows ``z3`` (N, M, C) whose other stats the C kernels took (``x = z / T``, no softcap).

    ``Σ exp(2x − 2m)`` is the C stats' sum at temperature ``T / 2``: its max is ``2m`` exactly (halving T doubles
    every ``x``, a binary scaling that commutes with rounding), so it is relative to the same max — one vectorized
    pass, where torch's sub / exp / square / sum took 6× as long. The first argmax of 16-bit logits is ``z``'s as
    stored (``z ↦ fp32(z) / T`` is increasing and keeps distinct 16-bit values distinct, so the first argmax is
    ``x``'s and the max divided by T is ``x`` there bit for bit; torch's bf16 max is as fast as its fp32 one). The rest
    (``Σ x``; fp32's argmax) runs per chunk of ``x``: fp32 logits at T = 1 are ``x`` (no copy); fp32 at T ≠ 1 are
    divided first (two neighbouring fp32 values can round to one quotient: a tie in ``x``); 16-bit ``Σ x`` from an
    fp32 chunk (torch's bf16 sum into fp32 is 2× slower than the copy and a product with ones)."""
    cdt, t = compute_dtype(z3.dtype), opts.temperature
    sumsq = cpu_rows.log_prob_stats(z3, t / 2, False)[1] if opts.log_sum_sq_probs else None
    top = top_col = None
    if opts.is_top1 and z3.dtype != cdt:
        top, top_col = z3.max(-1)
        top = top.to(cdt).div_(t)
    extra = _Extra.empty(z3[..., 0], cdt, False, opts.mean_logits, opts.is_top1 and top is None)
    if extra.logit_sum is not None or extra.top is not None:
        for idx, x, _ in _chunks(z3, cdt, 0):
            extra.add_sums(idx, scaled_logits(x, z3[idx], opts))
    return extra._replace(sumsq=sumsq) if top is None else extra._replace(sumsq=sumsq, top=top, top_col=top_col)


def top_stats(top: Tensor, top_col: Tensor, index: Tensor, vocab_start: int = 0):
    """Per id of ``index`` (..., K) (global ids): ``(top_at, top_before)`` of a shard whose max is ``top`` (...) at
    the shard's first argmax column ``top_col`` (...): ``top`` where ``vocab_start + top_col`` is the id / lies
    before it, else −inf. O(rows · K)."""
    value = top.unsqueeze(-1).expand(index.shape)
    col = top_col.unsqueeze(-1) + vocab_start
    none = torch.full((), -math.inf, dtype=top.dtype, device=top.device)
    return torch.where(col == index, value, none), torch.where(col < index, value, none)


def _with_id_logits(row_max, sumexp, plogp, extra: _Extra, z3, ids3, opts, vocab_start, index_shape) -> LogProbStats:
    """The row stats (N, M) with the id logits gathered (re-read and upcast, then the same transforms)."""
    local, col = local_targets(ids3, vocab_start, z3.shape[-1])
    picked = torch.gather(z3, -1, col).to(compute_dtype(z3.dtype))
    picked = scaled_logits(picked, picked, opts)
    top_at = top_before = None
    if extra.top is not None:
        top_at, top_before = (t.reshape(index_shape) for t in top_stats(extra.top, extra.top_col, ids3, vocab_start))
    shape = index_shape[:-1]

    def rows(t):
        return None if t is None else t.reshape(shape)

    return LogProbStats(rows(row_max), rows(sumexp), rows(plogp), torch.where(local, picked, 0.0).reshape(index_shape),
                        rows(extra.sumsq), rows(extra.logit_sum), rows(extra.top), top_at, top_before)  # fmt: skip


# Below this a reference column's fp32 probability has lost bits (normal floats end at 2^-126): the softmax
# path below then gives way to the max-first stats (as linear_step's CPU fast path does for the cross-entropy).
_TINY_PROB = 2.0**-100


def softmax_rows(logits: Tensor, index: Tensor, opts: LogProbRowOptions) -> Optional[LogProbRows]:
    """CPU fast path for whole rows: per chunk one fused ``softmax`` (into scratch), then::

        lse = x_j − log p_j   (j: the row's id with the largest p),   H = (lse − m) + Σ_c p_c (m − x_c)

    ``lse`` keeps its digits at any |lse| (``log p_j`` is small and exact to its own ulp); the entropy is the
    sum of two terms ≥ 0 (``log Σ exp(x − m)`` and ``Σ p (m − x)``, one product and PyTorch's cascade sum in place
    of ``entr`` and a sum), so no ``lse − Σ p x`` cancellation. Returns None (nothing
    written) off the CPU, or when some row's reference probability is below 2^-100: then the max-first stats.
    """
    if logits.device.type != "cpu" or index.shape[-1] == 0:
        return None
    z3, ids3 = _as_3d(logits, index)
    if cpu_rows.covers(z3, None, opts):  # the C stats (shard_stats) take these rows in one pass
        return None
    cdt = compute_dtype(logits.dtype)
    valid, ids_safe, bad = index_masks(ids3, opts.ignore_index, z3.shape[-1])
    picked = torch.gather(z3, -1, ids_safe).to(cdt)
    picked = scaled_logits(picked, picked, opts)
    lse = torch.empty(z3.shape[:2], dtype=torch.float64)
    entropy = torch.empty_like(lse) if opts.entropy else None
    extra = _Extra.empty(lse, cdt, opts.log_sum_sq_probs, opts.mean_logits, opts.is_top1)
    lowest = torch.finfo(cdt).min
    for idx, x, scratch in _chunks(z3, cdt, 1 if opts.entropy else 0):
        src = scaled_logits(x, z3[idx], opts)
        top = extra.add_sums(idx, src) if _any_extra(opts) else None  # before the softmax, which may write over src
        if entropy is None:
            p = torch._softmax(src, -1, False, out=x)
        else:  # y = x − m (−inf → lowest: its term p·y is 0, not 0·(−inf)); p from y, the same softmax
            row_max = (src.amax(-1) if top is None else top).unsqueeze(-1).clamp_(min=lowest)  # top: max(-1) ran
            y = torch.sub(src, row_max, out=x).clamp_(min=lowest)
            p = torch._softmax(y, -1, False, out=scratch[0])
        p_ref, ref = p.gather(-1, ids_safe[idx]).max(-1)
        if bool((p_ref < _TINY_PROB).any()):  # CPU: a free host check
            return None
        lse[idx] = picked[idx].gather(-1, ref.unsqueeze(-1)).squeeze(-1).double() - p_ref.double().log()
        if entropy is not None:  # H = (lse − m) + Σ p (m − x): two terms ≥ 0, no cancellation; the sum is
            p_y = torch.mul(p, y, out=y).sum(-1)  # PyTorch's cascade sum (a BLAS dot's fp32 sum was 5× less exact)
            entropy[idx] = (lse[idx] - row_max.squeeze(-1).double()) - p_y.double()
        if extra.sumsq is not None:  # Σ p² ≥ 1/C: its log directly
            extra.sumsq[idx] = p.square_().sum(-1)
    log_probs = torch.where(valid, picked.double() - lse.unsqueeze(-1), 0.0).masked_fill_(bad, math.nan)
    if entropy is not None:
        entropy = _per_position(entropy, valid, bad, cdt)
    shape = logits.shape[:-1]
    rows = LogProbRows(log_probs.to(cdt).reshape(index.shape), None if entropy is None else entropy.reshape(shape),
                       lse.reshape(shape))  # fmt: skip
    if not _any_extra(opts):
        return rows
    sq = None if extra.sumsq is None else _per_position(extra.sumsq.double().log(), valid, bad, cdt).reshape(shape)
    top1 = None if extra.top is None else (valid & (extra.top_col.unsqueeze(-1) == ids3)).reshape(index.shape)
    return rows._replace(log_sum_sq_probs=sq, mean_logits=_mean_logits(extra.logit_sum, valid, bad, cdt, z3.shape[-1],
                                                                       shape), is_top1=top1)  # fmt: skip


def _per_position(values: Tensor, valid: Tensor, bad: Tensor, cdt) -> Tensor:
    """A per-position float64 value in the compute dtype: 0 where every id of the position is ignored, NaN where one
    lies outside [0, C) (as the entropy)."""
    return torch.where(valid.any(-1), values, 0.0).masked_fill_(bad.any(-1), math.nan).to(cdt)


def _mean_logits(logit_sum: Optional[Tensor], valid, bad, cdt, num_classes: int, shape) -> Optional[Tensor]:
    """``Σ x / C`` per position (float64 division), as :func:`_per_position`; None without the sum."""
    if logit_sum is None:
        return None
    return _per_position(logit_sum.double() / num_classes, valid, bad, cdt).reshape(shape)


def combine_stats(parts: Sequence[LogProbStats]) -> LogProbStats:
    """Stats of the union of disjoint shards::

        M = max_r m_r,   S = Σ_r a_r s_r,   D = Σ_r a_r (d_r + (m_r − M) s_r),   a_r = exp(m_r − M)

    (``d`` is relative to each shard's own max, so it is re-referenced to ``M``); the id logits add up."""
    row_max = torch.stack([p.max for p in parts]).amax(0)
    scales = [torch.exp(p.max - row_max) for p in parts]
    sumexp = sum(a * p.sumexp for a, p in zip(scales, parts))
    plogp = sumsq = logit_sum = top = top_at = top_before = None
    if parts[0].plogp is not None:
        plogp = sum(a * (p.plogp + (p.max - row_max) * p.sumexp) for a, p in zip(scales, parts))
    if parts[0].sumsq is not None:  # e^{2(x − M)} = a² e^{2(x − m)}
        sumsq = sum(a * a * p.sumsq for a, p in zip(scales, parts))
    if parts[0].logit_sum is not None:
        logit_sum = sum(p.logit_sum for p in parts)
    if parts[0].top is not None:  # maxima all three (docs/math.md)
        top, top_at, top_before = (torch.stack([getattr(p, f) for p in parts]).amax(0)
                                   for f in ("top", "top_at", "top_before"))  # fmt: skip
    return LogProbStats(row_max, sumexp, plogp, sum(p.target_logits for p in parts), sumsq, logit_sum, top, top_at,
                        top_before)  # fmt: skip


def finish(stats: LogProbStats, index: Tensor, opts: LogProbRowOptions, num_classes: int) -> LogProbRows:
    """The per-row results from the full rows' stats, in float64 per row (O(N·K)), returned in the compute dtype:
    ``lp_k = x_{t_k} − lse``, ``H = log S − D / S``; ``log Σ p² = log Q − 2 log S``, ``mean = Σ x / C``,
    ``top1_k = top_at_k ≥ top and top_at_k > top_before_k`` (each only when asked)."""
    cdt = stats.sumexp.dtype
    lse = stats.lse()
    valid, _, bad = index_masks(index, opts.ignore_index, num_classes)
    log_probs = stats.target_logits.double() - lse.unsqueeze(-1)
    log_probs = torch.where(valid, log_probs, 0.0).masked_fill_(bad, math.nan).to(cdt)
    s = stats.sumexp.double()
    entropy = _per_position(s.log() - stats.plogp.double() / s, valid, bad, cdt) if opts.entropy else None
    rows = LogProbRows(log_probs, entropy, lse)
    if not _any_extra(opts):
        return rows
    sq = None
    if opts.log_sum_sq_probs:
        sq = _per_position(stats.sumsq.double().log() - 2.0 * s.log(), valid, bad, cdt)
    top1 = None
    if opts.is_top1:
        top1 = valid & (stats.top_at >= stats.top.unsqueeze(-1)) & (stats.top_at > stats.top_before)
    mean = _mean_logits(stats.logit_sum, valid, bad, cdt, num_classes, s.shape)
    return rows._replace(log_sum_sq_probs=sq, mean_logits=mean, is_top1=top1)


def backward(
    logits: Tensor,
    index: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    grad_log_probs: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    opts: LogProbRowOptions,
    out: Tensor,
    shard: Optional[VocabShard] = None,
) -> None:
    """Write ``Σ_k g_k ∂lp_k/∂z + g_H ∂H/∂z`` into ``out`` (``logits.shape``; may be ``logits``)::

        ∂/∂x_c = Σ_k g_k [c = t_k] − p_c (G + g_H (log p_c + H)),   G = Σ_k g_k,   then · chain_c / T

    ``lse`` and ``entropy`` are the full rows' (so a shard's columns need no communication); a None upstream
    gradient is zero. Ignored ids (and, for ``g_H``, positions whose ids are all ignored) contribute nothing.
    """
    shard = VocabShard.whole(logits.shape[-1]) if shard is None else shard
    if not _views_as_3d(out, logits):  # an in-place target whose strides don't flatten: via a buffer
        buf = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        backward(logits, index, lse, entropy, grad_log_probs, grad_entropy, opts, buf, shard)
        out.copy_(buf)
        return
    z3, ids3 = _as_3d(logits, index)
    out3 = out.view(z3.shape)
    cdt = compute_dtype(logits.dtype)
    rows = z3.shape[:2]
    def as_rows(t, shape, like):  # a per-id or per-position tensor (maybe stride-0) in the (N, M, ...) layout
        return None if t is None else t.expand(shape).reshape(like)

    f = grad_factors(ids3, lse.reshape(rows), as_rows(entropy, lse.shape, rows),
                     as_rows(grad_log_probs, index.shape, ids3.shape), as_rows(grad_entropy, lse.shape, rows), opts,
                     shard, z3.shape[-1])  # fmt: skip
    scale, ent_scale = f.scale.to(cdt), None if f.entropy_scale is None else f.entropy_scale.to(cdt)
    at_ids = f.at_ids.to(cdt)
    if cpu_rows.covers(z3, out3, opts):  # the same in C
        cpu_rows.log_prob_grad(z3, out3, opts.temperature, f.shift, scale, ent_scale, f.columns, at_ids)
        return
    shift = Shift(f.shift, cdt)
    lowest = torch.finfo(cdt).min
    direct = out.dtype == cdt
    n_scratch = (1 if opts.softcap else 0) + (1 if ent_scale is not None else 0)
    # CPU, whole rows, no entropy gradient: p from one fused softmax (it recomputes the row's own lse); rows
    # without gradient are zeroed afterwards (p is NaN on an all −inf row). Elsewhere p = exp(x − lse), and
    # p log p from the same pass (cheaper than the softmax's exp plus entr's log).
    softmax_path = z3.device.type == "cpu" and shard.is_whole(z3.shape[-1]) and ent_scale is None
    dead = f.shift.isinf() if softmax_path else None
    for idx, x, scratch in _chunks(z3, cdt, n_scratch, scratch_for_x=not direct):
        x = out3[idx] if direct else x
        chain = scratch.pop() if opts.softcap else None
        src = _capped(x, z3[idx], opts.softcap, chain_out=chain)
        if opts.temperature != 1.0:
            src = torch.div(src, opts.temperature, out=x)
        if softmax_path:
            y = torch._softmax(src, -1, False, out=x).mul_(scale[idx].unsqueeze(-1))  # a p
            if bool(dead[idx].any()):
                y[dead[idx]] = 0.0
        else:
            y = shift.subtract_from(src, idx, out=x)  # log p (rows without gradient: −inf)
            if ent_scale is None:  # a p
                y.exp_().mul_(scale[idx].unsqueeze(-1))
            else:  # a p + b p log p, with p log p = 0 where p = 0 (log p clamped: 0 · lowest, not 0 · −inf)
                e = torch.exp(y.clamp_(min=lowest), out=scratch[0])
                y.mul_(e).mul_(ent_scale[idx].unsqueeze(-1)).addcmul_(e, scale[idx].unsqueeze(-1))
        y.scatter_add_(-1, f.columns[idx], at_ids[idx])
        if chain is not None:
            y.mul_(chain)
        if not direct:
            out3[idx].copy_(y)


class LogProbGradFactors(NamedTuple):
    """Per-row factors of the gradient over a shard (float64), with ``p = exp(x − lse)``::

        ∂/∂z_c = (scale · p_c + entropy_scale · p_c log p_c + Σ_k at_ids_k [c = col_k]) · chain_c

    ``scale = −(G + g_H H) / T``, ``entropy_scale = −g_H / T`` (None without an entropy gradient),
    ``at_ids = g_k / T`` where the id lies in the shard (else 0), ``columns`` the ids' columns in the shard
    (clamped), ``shift`` the row's lse, +inf on rows without gradient (p = 0 exactly there). Rows holding an
    id outside [0, C) get a NaN scale."""

    scale: Tensor
    entropy_scale: Optional[Tensor]
    at_ids: Tensor
    columns: Tensor
    shift: Tensor


def grad_factors(index, lse, entropy, grad_log_probs, grad_entropy, opts: LogProbRowOptions, shard: VocabShard,
                 shard_size: int) -> LogProbGradFactors:  # fmt: skip
    """The :class:`LogProbGradFactors` of rows with global ids ``index`` (..., K): O(rows · K) work."""
    valid, _, bad = index_masks(index, opts.ignore_index, shard.num_classes)
    local, columns = local_targets(index, shard.vocab_start, shard_size)
    inv_t = 1.0 / opts.temperature
    lse = lse.double()
    g = torch.zeros(index.shape, dtype=torch.float64, device=index.device)
    if grad_log_probs is not None:
        g = torch.where(valid, grad_log_probs.double().expand(index.shape), 0.0)
    scale = -g.sum(-1)
    entropy_scale = None
    if grad_entropy is not None and opts.entropy:
        g_h = torch.where(valid.any(-1), grad_entropy.double().expand(lse.shape), 0.0)
        scale = scale - g_h * torch.where(g_h == 0, 0.0, entropy.double())  # ignored rows: 0, not 0 · NaN
        entropy_scale = -g_h * inv_t
    live = scale != 0 if entropy_scale is None else (scale != 0) | (entropy_scale != 0)
    scale = (scale * inv_t).masked_fill_(bad.any(-1), math.nan)
    shift = lse.masked_fill(~live, math.inf)
    return LogProbGradFactors(scale, entropy_scale, torch.where(local, g * inv_t, 0.0), columns, shift)


def scaled_logits(x: Tensor, z: Tensor, opts: LogProbRowOptions) -> Tensor:
    """The logits the math sees, ``κ tanh(z / κ) / T``, in the compute-dtype buffer ``x`` (or ``z`` itself when
    it is already in the compute dtype and neither transform applies: no copy)."""
    src = _capped(x, z, opts.softcap)
    if opts.temperature != 1.0:
        src = torch.div(src, opts.temperature, out=x)
    return src


def _as_3d(logits: Tensor, index: Tensor):
    """Logits (..., C) as (N, M, C) (a view where one exists) and the ids (..., K) as (N, M, K)."""
    n, m, c = _shape_3d(logits.shape)
    return logits.reshape(n, m, c), index.reshape(n, m, index.shape[-1])


# --- the fused linear loops' chunk step (linear_loop.linear_log_probs / linear_log_probs_grads) -------------------


def chunk_stats(logits: Tensor, index: Tensor, opts: LogProbRowOptions, *, vocab_start: int = 0) -> LogProbStats:
    """The stats of one (rows, V_p) logits block, the columns from ``vocab_start`` on; reads ``logits`` only."""
    return shard_stats(logits, index, opts, vocab_start)


def chunk_grad_(logits: Tensor, index: Tensor, lse: Tensor, entropy: Optional[Tensor], grad_log_probs: Optional[Tensor],
                grad_entropy: Optional[Tensor], opts: LogProbRowOptions, *, vocab_start: int = 0,
                num_classes: Optional[int] = None) -> GradFactors:  # fmt: skip
    """The block's finished gradient written over the block (``logits``, ours), from the full rows' lse and entropy."""
    shard = VocabShard(vocab_start, logits.shape[-1] if num_classes is None else num_classes)
    backward(logits, index, lse, entropy, grad_log_probs, grad_entropy, opts, logits, shard)
    return FINISHED


class LogProbChunkKernels(NamedTuple):
    """The elementwise work of the fused log-prob loops, swappable per backend: a block's stats, its gradient, and
    a fast step for blocks of whole rows (may decline with None)."""

    stats: Callable[..., LogProbStats]
    grad_: Callable[..., GradFactors]
    rows: Callable[..., Optional[LogProbRows]]


TORCH_LOGPROB_KERNELS = LogProbChunkKernels(chunk_stats, chunk_grad_, softmax_rows)
