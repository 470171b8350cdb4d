"""Per-token log-probability and entropy kernels in Triton: the GPU path (CPU tensors under ``TRITON_INTERPRET=1``).

Fused: softcap, temperature, online max / sum-exp / Σ p·log p, the K id gathers; in backward the whole gradient row.
Never materialized: log-probabilities, probabilities or an fp32 copy of the logits; a row streams through registers.
Written in place: ``out`` of :func:`backward` (the fused loop passes its own block buffer: read, then written).

The contract is :mod:`crossent.kernels.logprob_rows`' (the oracle for this file), shard-aware in both directions:
the stats kernel reports a shard's :class:`LogProbStats` (``m``, ``s = Σ exp(x − m)``, ``d = Σ exp(x − m)(x − m)``,
the ids' logits where they lie in the shard), kept relative to the running max and re-referenced as it grows::

    m' = max(m, max_blk x),  a = exp(m − m'),  s' = a s + Σ_blk exp(x − m'),  d' = a (d + (m − m') s) + Σ_blk e (x − m')

and, each behind its constexpr flag, ``q' = a² q + Σ_blk e²`` (log Σ p²), ``Σ x`` (the mean logit) and the row's max
``μ`` with its first column (top-1: a block's max replaces ``μ`` only when larger, and within a block the lowest
column holding it wins, so ties go to the first column as ``torch.max``). The O(N·K) rest (combine across shards
or ranks, ``lp = x_t − lse``, ``H = log S − D / S``, top-1 per id: ``logprob_rows.top_stats``) is
``logprob_rows.finish`` in torch. The backward kernel writes, per column of a shard ``[v0, v0 + C)`` of ``C_all``::

    ∂/∂z_c = (a p_c + b p_c log p_c + Σ_k [c = t_k] g_k / T) · chain_c,  a = −(G + g_H H) / T,  b = −g_H / T

with ``p = exp((x − hi) − lo)`` from the float64 lse split in two fp32 parts (as ``triton_rows``). float64 logits
run in torch (:mod:`logprob_rows`). Launch table and compile options: ``triton_rows.row_launch`` (the same
one-program-per-row streaming shape).
"""

from __future__ import annotations

import torch
from torch import Tensor

from crossent._options import LogProbRowOptions
from crossent.kernels import logprob_rows
from crossent.kernels.logprob_rows import LogProbChunkKernels, LogProbStats
from crossent.kernels.shard import VocabShard
from crossent.kernels.triton_rows import (_COMPILE, _FLT_LOWEST, _jit, _softcapped, _unit_columns, _unit_stride_view,
                                         row_launch, tl)  # fmt: skip


def _use_torch(logits: Tensor) -> bool:
    return logits.dtype == torch.float64 or logits.shape[-1] == 0


def shard_stats(logits: Tensor, index: Tensor, opts: LogProbRowOptions, vocab_start: int = 0) -> LogProbStats:
    """:func:`logprob_rows.shard_stats` in one Triton program per row (fp64 logits: the torch version)."""
    if _use_torch(logits):
        return logprob_rows.shard_stats(logits, index, opts, vocab_start)
    num_classes, k = logits.shape[-1], index.shape[-1]
    z = _unit_columns(logits.reshape(-1, num_classes))
    ids = index.reshape(-1, k).contiguous()
    rows = z.shape[0]
    row_max, sumexp, plogp = (torch.empty(rows, dtype=torch.float32, device=z.device) for _ in range(3))

    def optional(flag, dtype=torch.float32):  # the kernel writes it only when asked (else row_max stands in)
        return torch.empty(rows, dtype=dtype, device=z.device) if flag else row_max

    sumsq, logit_sum, top = optional(opts.log_sum_sq_probs), optional(opts.mean_logits), optional(opts.is_top1)
    top_col = optional(opts.is_top1, torch.int64)
    picked = torch.empty((rows, k), dtype=torch.float32, device=z.device)
    if rows:
        block, warps = row_launch(z.dtype, num_classes)
        _stats_kernel[(rows,)](
            z, z.stride(0), ids, k, row_max, sumexp, plogp, picked, sumsq, logit_sum, top, top_col, num_classes,
            vocab_start, opts.temperature, opts.softcap or 1.0, SOFTCAP=opts.softcap is not None, ENTROPY=opts.entropy,
            SUMSQ=opts.log_sum_sq_probs, MEAN=opts.mean_logits, TOP1=opts.is_top1, BLOCK=block, num_warps=warps,
            **_COMPILE,
        )  # fmt: skip
    shape = logits.shape[:-1]

    def rows_of(t, wanted):
        return t.reshape(shape) if wanted else None

    top_at = top_before = None
    if opts.is_top1:
        top_at, top_before = (t.reshape(index.shape) for t in logprob_rows.top_stats(top, top_col, ids, vocab_start))
    return LogProbStats(row_max.reshape(shape), sumexp.reshape(shape), rows_of(plogp, opts.entropy),
                        picked.reshape(index.shape), rows_of(sumsq, opts.log_sum_sq_probs),
                        rows_of(logit_sum, opts.mean_logits), rows_of(top, opts.is_top1), top_at,
                        top_before)  # fmt: skip


def forward(logits: Tensor, index: Tensor, opts: LogProbRowOptions, shard=None, combine=None):
    """:func:`logprob_rows.forward` with this module's stats kernel (any shard: its stats are per-row sums)."""
    return logprob_rows.forward(logits, index, opts, shard, combine, stats=shard_stats)  # no softmax path here


def backward(logits: Tensor, index: Tensor, lse: Tensor, entropy, grad_log_probs, grad_entropy, opts: LogProbRowOptions,
             out: Tensor, shard=None) -> None:  # fmt: skip
    """:func:`logprob_rows.backward` in one Triton program per row (fp64 logits: the torch version)."""
    if _use_torch(logits):
        logprob_rows.backward(logits, index, lse, entropy, grad_log_probs, grad_entropy, opts, out, shard)
        return
    shard = VocabShard.whole(logits.shape[-1]) if shard is None else shard
    num_classes, k = logits.shape[-1], index.shape[-1]
    z = _unit_columns(logits.reshape(-1, num_classes))
    rows = z.shape[0]
    if not rows:
        return
    ids = index.reshape(rows, k).contiguous()
    dst = _unit_stride_view(out, rows, num_classes)
    direct = dst is not None
    if not direct:
        dst = torch.empty((rows, num_classes), dtype=out.dtype, device=out.device)
    lse = lse.to(torch.float64).reshape(rows)
    has_g, has_gh = grad_log_probs is not None, grad_entropy is not None and opts.entropy
    g = grad_log_probs.to(torch.float32).expand(index.shape).reshape(rows, k).contiguous() if has_g else lse
    gh = grad_entropy.to(torch.float32).expand(logits.shape[:-1]).reshape(rows).contiguous() if has_gh else lse
    h = entropy.to(torch.float32).reshape(rows).contiguous() if has_gh else lse
    block, warps = row_launch(z.dtype, num_classes)
    _backward_kernel[(rows,)](
        z, z.stride(0), ids, k, lse, h, g, gh, dst, dst.stride(0), num_classes, shard.vocab_start, shard.num_classes,
        opts.ignore_index, opts.temperature, opts.softcap or 1.0, SOFTCAP=opts.softcap is not None, HAS_G=has_g,
        HAS_GH=has_gh, BLOCK=block, num_warps=warps, **_COMPILE,
    )  # fmt: skip
    if not direct:
        out.copy_(dst.view(out.shape))


def chunk_stats(logits: Tensor, index: Tensor, opts: LogProbRowOptions, *, vocab_start: int = 0) -> LogProbStats:
    """The fused loop's stats step (contract of :func:`logprob_rows.chunk_stats`) on Triton."""
    return shard_stats(logits, index, opts, vocab_start)


def chunk_grad_(logits, index, lse, entropy, grad_log_probs, grad_entropy, opts, *, vocab_start=0, num_classes=None):
    """The fused loop's gradient step (contract of :func:`logprob_rows.chunk_grad_`) on Triton, in place."""
    shard = VocabShard(vocab_start, logits.shape[-1] if num_classes is None else num_classes)
    backward(logits, index, lse, entropy, grad_log_probs, grad_entropy, opts, logits, shard)
    return logprob_rows.FINISHED


TRITON_LOGPROB_KERNELS = LogProbChunkKernels(chunk_stats, chunk_grad_, lambda logits, index, opts: None)


# --- kernels (fp32 arithmetic; logits upcast as loaded; index math in int64) --------------------------------------


@_jit
def _scaled(x, temperature, softcap, SOFTCAP: tl.constexpr):
    """``(κ tanh(x / κ) / T, d/dx of it)``; without a softcap the chain factor is 1 / T."""
    if SOFTCAP:
        x, chain = _softcapped(x, softcap)
    else:
        chain = 1.0
    return x / temperature, chain / temperature


@_jit
def _stats_kernel(
    z_ptr, stride_z,  # logits (R, C) of the shard, unit column stride
    ids_ptr, K,  # global ids (R, K), contiguous
    m_ptr, s_ptr, d_ptr, picked_ptr,  # (R,) fp32 outputs, (R, K) fp32: x at ids in the shard, else 0
    q_ptr, xs_ptr, top_ptr, top_col_ptr,  # (R,) fp32: Σ exp(2(x − m)), Σ x, max of x; (R,) int64: its first column
    C, v0, temperature, softcap,
    SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, SUMSQ: tl.constexpr, MEAN: tl.constexpr, TOP1: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK)
    m = tl.full([], _FLT_LOWEST, tl.float32)  # as triton_rows._row_loss
    s = tl.zeros([], tl.float32)
    d = tl.zeros([], tl.float32)
    q = tl.zeros([], tl.float32)
    xs = tl.zeros([], tl.float32)
    top = tl.full([], float("-inf"), tl.float32)
    top_col = tl.zeros([], tl.int64)
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        x = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        x = tl.where(mask, _scaled(x, temperature, softcap, SOFTCAP)[0], float("-inf"))  # padding stays −inf
        block_max = tl.max(x, 0)
        m_new = tl.maximum(m, block_max)
        a = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        if ENTROPY:  # Σ e (x − m), re-referenced to the new max; −inf columns add 0 (not 0 · −inf), NaN stays NaN
            d = a * (d + (m - m_new) * s) + tl.sum(tl.where(x == float("-inf"), 0.0, e * (x - m_new)), 0)
        if SUMSQ:  # Σ e², e^{2(x − m)} rescaled by a² when the max grows
            q = q * a * a + tl.sum(e * e, 0)
        if MEAN:
            xs += tl.sum(tl.where(mask, x, 0.0), 0)
        if TOP1:  # the block's first column holding its max; a later block replaces it only when strictly larger
            block_col = tl.min(tl.where(x == block_max, offs, C), 0).to(tl.int64)
            better = block_max > top
            top_col = tl.where(better, block_col, top_col)
            top = tl.where(better, block_max, top)
        s = s * a + tl.sum(e, 0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(d_ptr + row, d)
    if SUMSQ:
        tl.store(q_ptr + row, q)
    if MEAN:
        tl.store(xs_ptr + row, xs)
    if TOP1:
        tl.store(top_ptr + row, top)
        tl.store(top_col_ptr + row, top_col)
    for k in range(0, K):
        col = tl.load(ids_ptr + row * K + k).to(tl.int64) - v0
        local = (col >= 0) & (col < C)
        x_t = tl.load(z_row + tl.minimum(tl.maximum(col, 0), C - 1)).to(tl.float32)  # never read outside the row
        x_t = _scaled(x_t, temperature, softcap, SOFTCAP)[0]
        tl.store(picked_ptr + row * K + k, tl.where(local, x_t, 0.0))


@_jit
def _backward_kernel(
    z_ptr, stride_z,  # logits (R, C) of the shard, unit column stride
    ids_ptr, K,  # global ids (R, K), contiguous
    lse_ptr, h_ptr, g_ptr, gh_ptr,  # (R,) fp64 lse; (R,) entropy, (R, K) and (R,) upstream gradients, fp32
    out_ptr, stride_out,  # (R, C) gradient, unit column stride; may be z_ptr itself
    C, v0, C_all, ignore_index, temperature, softcap,
    SOFTCAP: tl.constexpr, HAS_G: tl.constexpr, HAS_GH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    ids_row = ids_ptr + row * K
    lse = tl.load(lse_ptr + row).to(tl.float64)
    hi = lse.to(tl.float32)
    lo = tl.where(lse == hi.to(tl.float64), 0.0, (lse - hi.to(tl.float64)).to(tl.float32))
    # the row's factors: G = Σ_k g_k over valid ids; a position with an id outside [0, C_all) is a NaN row
    big_g = tl.zeros([], tl.float32)
    n_valid = tl.zeros([], tl.int32)
    n_bad = tl.zeros([], tl.int32)
    for k in range(0, K):
        t = tl.load(ids_row + k).to(tl.int64)
        valid = t != ignore_index
        n_valid += valid.to(tl.int32)
        n_bad += (valid & ((t < 0) | (t >= C_all))).to(tl.int32)
        if HAS_G:
            big_g += tl.where(valid, tl.load(g_ptr + row * K + k), 0.0)
    a = -big_g
    b = tl.zeros([], tl.float32)
    if HAS_GH:
        g_h = tl.where(n_valid > 0, tl.load(gh_ptr + row), 0.0)
        a -= tl.where(g_h == 0.0, 0.0, g_h * tl.load(h_ptr + row))
        b = -g_h
    live = (a != 0.0) | (b != 0.0)
    poison = tl.where(n_bad > 0, float("nan"), 0.0)
    cols = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        offs = start + cols
        mask = offs < C
        x = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        x, chain = _scaled(x, temperature, softcap, SOFTCAP)
        y = (x - hi) - lo  # log p
        p = tl.exp(y)
        grad = a * p
        if HAS_GH:
            grad += b * tl.where(p == 0.0, 0.0, p * y)  # p log p = 0 where p = 0 (y = −inf)
        grad = tl.where(live, grad, 0.0)  # rows without gradient: exactly 0 (also where lse = −inf)
        if HAS_G:
            for k in range(0, K):
                t = tl.load(ids_row + k).to(tl.int64)
                g_k = tl.where(t != ignore_index, tl.load(g_ptr + row * K + k), 0.0)
                grad += tl.where(offs == t - v0, g_k, 0.0)
        grad = grad * chain + poison
        tl.store(out_ptr + row * stride_out + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)
