"""Fused linear + cross-entropy in torch ops (CPU, and CUDA through cuBLAS): chunk plan, chunk step, loops.

Fused: per block of token rows (and of vocabulary columns), the logits product, the loss and the gradient's products.
Never materialized: the (N, V) logits, probabilities or gradient; one (rows, cols) block at a time, in one buffer.
Written in place: only that block buffer (ours), which the chunk step turns into the block's factored gradient.

Notation (docs/linear_cross_entropy.md): X (N, D) the input rows, W (V, D) the linear weight, b (V,) its bias,
Z = X Wᵀ + b the logits, G = ∂loss/∂Z (scaled by the upstream gradient). Then

    dX = G W,        dW = Gᵀ X,        db = Σ_i G_i

and per block only Z_blk, then G_blk exist. The chunk step does not even write G: it writes a block Q and returns
per-row factors with  G = diag(scale) Q − target_coef ⊙ onehot(t) − smooth_coef ⊗ w  (class weights w), so the
row scaling, the target column and the smoothing term cost O(rows · D) after the products instead of passes
over the (rows, cols) block:

    dX_blk = diag(scale) (Q W) − target_coef ⊙ W[t] − smooth_coef ⊗ (wᵀ W)
    dW    += Qᵀ (diag(scale) X_blk) − Σ_i target_coef_i e_{t_i} x_iᵀ − w ⊗ Σ_i smooth_coef_i x_i

Two loops: :func:`linear_loss_and_grads` (loss, and with a per-row upstream gradient also dX/dW/db: 3 products
per block) and :func:`linear_grads` (the gradients from a saved per-row lse: 3 products + the logits again).
Both work on a vocabulary *slice* [vocab_start, vocab_start + V_local) of a C-class head, with a hook that turns
the slice's per-row stats into the global ones, so vocab-parallel CE runs the same loops on each rank.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from crossent.kernels.torch_rows import (
    RowStats,
    combine_stats,
    compute_dtype,
    index_loss,
    index_masks,
    local_targets,
    shard_backward,
    shard_stats,
    shard_weight,
    weight_at,
    weighted_sum,
)

# --- chunk plan ----------------------------------------------------------------------------------------
# Scratch budget (bytes) when the caller gives none, and the fewest token rows a block may have before
# the vocabulary is split instead (a split costs one more logits product per block; fewer rows make the
# dW product, whose inner dimension is the row count, bandwidth-bound on dW).
# The budget is the larger of the device's floor below and half the fp32 dW sum (V·D·4 bytes), which
# must exist anyway: bigger blocks mean fewer read-modify-write passes over dW and fewer re-packings of W
# by the products, and scratch stays below 50% of dW. CPU floor 128 MiB: ~820 rows at (V, D) =
# (32768, 1024), so scratch + dX + dW stays under PyTorch's chunked mode there. At (2048, 2048, 131072)
# forward+backward took 12.8 s with 256 MiB blocks, 11.9 s with 512 MiB (half of dW: 3 blocks) and
# 12.5 s with 1.1 GiB (in-process, alternating; 2-core x86 VM). CUDA: starting values, not measured.
DEFAULT_MEMORY_BUDGET = {"cpu": 128 << 20, "cuda": 1 << 30}
DW_SHARE = 2  # the default budget is at least (fp32 dW bytes) / DW_SHARE
MIN_BLOCK_ROWS = {"cpu": 64, "cuda": 256}
MIN_BLOCK_COLS = 256  # the narrowest vocabulary piece the plan picks by itself
ROW_ALIGN = 8  # block rows are rounded down to a multiple of this (GEMM micro-kernels), when possible


class ChunkPlan(NamedTuple):
    """Token rows per block, and vocabulary columns per block (``cols == V``: no vocabulary split)."""

    rows: int
    cols: int


def scratch_bytes(rows: int, cols: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes of scratch one (rows, cols) block needs beyond dX, dW and db (see docs/linear_cross_entropy.md).

    ``rows · cols · (s_c + s_16)`` for the block (compute dtype, plus a 16-bit copy for 16-bit inputs:
    the logits product's output and the gradient products' operand) and ``rows · D · 3 s_c`` for the
    block's dX rows, scaled input rows and their cast, where ``s_c`` = 4 (8 for float64).
    """
    s_c = torch.finfo(compute_dtype(dtype)).bits // 8
    s_16 = 0 if compute_dtype(dtype) == dtype else torch.finfo(dtype).bits // 8
    return rows * cols * (s_c + s_16) + rows * dim * 3 * s_c


def default_memory_budget(device: torch.device, vocab: int = 0, dim: int = 0) -> int:
    """The device's floor (``DEFAULT_MEMORY_BUDGET``), or half the fp32 dW sum if that is larger."""
    floor = DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cuda"])
    return max(floor, vocab * dim * 4 // DW_SHARE)


def plan_chunks(
    num_rows: int,
    dim: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> ChunkPlan:
    """Pick the block shape: as many full-vocabulary rows as the budget holds; if that is fewer than
    ``MIN_BLOCK_ROWS``, that many rows and as many vocabulary columns as fit. ``chunk_size`` fixes the
    rows (then only an explicit ``memory_budget`` can split the vocabulary).

    Raises:
        ValueError: ``memory_budget`` below the scratch of one full-vocabulary row.
    """
    n = max(num_rows, 1)
    if memory_budget is not None and memory_budget < scratch_bytes(1, vocab, dim, dtype):
        raise ValueError(
            f"memory_budget={memory_budget} bytes is too small for even one row: one row of V={vocab} classes "
            f"(D={dim}, {dtype}) needs {scratch_bytes(1, vocab, dim, dtype)} bytes of scratch"
        )
    if chunk_size is not None:
        rows = min(chunk_size, n)
        if memory_budget is None:
            return ChunkPlan(rows, vocab)
        return ChunkPlan(rows, _cols_that_fit(rows, vocab, dim, dtype, memory_budget))
    budget = default_memory_budget(device, vocab, dim) if memory_budget is None else memory_budget
    full_rows = max(1, _rows_that_fit(vocab, dim, dtype, budget))
    min_rows = min(n, MIN_BLOCK_ROWS.get(device.type, MIN_BLOCK_ROWS["cuda"]))
    if full_rows >= min_rows:
        return ChunkPlan(_balanced(n, full_rows), vocab)
    per_col = scratch_bytes(min_rows, 1, dim, dtype) - scratch_bytes(min_rows, 0, dim, dtype)
    cols = (budget - scratch_bytes(min_rows, 0, dim, dtype)) // per_col
    if cols < MIN_BLOCK_COLS:  # pieces this narrow make poor products: keep full rows, however few
        return ChunkPlan(full_rows, vocab)
    return ChunkPlan(_balanced(n, min_rows), min(cols, vocab))


def _rows_that_fit(cols, dim, dtype, budget):
    return budget // scratch_bytes(1, cols, dim, dtype)


def _cols_that_fit(rows, vocab, dim, dtype, budget):
    per_col = scratch_bytes(rows, 1, dim, dtype) - scratch_bytes(rows, 0, dim, dtype)
    cols = (budget - scratch_bytes(rows, 0, dim, dtype)) // per_col
    if cols < 1:
        raise ValueError(
            f"memory_budget={budget} bytes cannot hold a block of {rows} rows (chunk_size) and even one "
            f"vocabulary column: that needs {scratch_bytes(rows, 1, dim, dtype)} bytes"
        )
    return min(vocab, cols)


def _balanced(n, rows):
    """Rows per block for equal blocks: the fewest blocks of at most ``rows`` rows, ROW_ALIGN-rounded."""
    blocks = -(-n // rows)
    if blocks == 1:
        return n
    even = -(-n // blocks)
    aligned = -(-even // ROW_ALIGN) * ROW_ALIGN
    return aligned if aligned <= rows else even


# --- the chunk step ------------------------------------------------------------------------------------
# One (rows, V_s) block of logits of the vocabulary columns [v0, v0 + V_s) of a C-class head, in a buffer
# the step may overwrite. Per row, with ω = w_t (0 when ignored), W = Σ_c w_c, g the upstream gradient
# (torch_rows and docs/math.md derive it):
#   ∂loss/∂z_c = g ((ω (1 − ε + 2 s lse) + ε W / C) p_c − ω (1 − ε) [c = t] − ε w_c / C)
# i.e. scale · p_c − target_coef · [c = t] − smooth_coef · w_c, the three GradFactors below.

StatsHook = Callable[[RowStats], RowStats]
"""Turns this process's per-row stats over its columns into the stats over all C columns (identity for one
process; max- and sum-all-reduces in vocab-parallel CE). Called once per block of rows, on every rank."""


class GradFactors(NamedTuple):
    """The block gradient is ``diag(scale) Q − target_coef ⊙ onehot(t − v0) − smooth_coef ⊗ w[v0 : v0 + V_s]``.

    ``Q`` is the block buffer after the step. A None ``scale`` means 1, a None coefficient 0; so a step that
    writes the finished gradient into the buffer returns ``GradFactors(None, None, None)``. ``target_coef``
    is 0 on rows whose target lies outside the block's columns. All per-row, in the compute dtype.
    """

    scale: Optional[Tensor]
    target_coef: Optional[Tensor]
    smooth_coef: Optional[Tensor]


FINISHED = GradFactors(None, None, None)


class ChunkGrad(NamedTuple):
    """What the forward chunk step returns: per-row loss (compute dtype), global lse (float64), the factors."""

    loss: Tensor
    lse: Tensor
    factors: GradFactors


# Below this the fp32 target probability has lost bits (normal floats end at 2^-126): the loss is then
# above ~69 and the CPU fast path recomputes the block and takes the max-first path instead.
_TINY_PROB = 2.0**-100


def chunk_loss_and_grad_(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    grad_scale: Optional[Tensor],
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    *,
    vocab_start: int = 0,
    num_classes: Optional[int] = None,
    combine: Optional[StatsHook] = None,
    recompute: Optional[Callable[[], None]] = None,
) -> ChunkGrad:
    """The forward chunk step: per-row loss and lse of a logits block, and its gradient written in place.

    Args:
        logits: (rows, V_s) logits of the columns [vocab_start, vocab_start + V_s), in the compute dtype
            (float32, or float64), contiguous; ours: it is overwritten (with ``Q`` of :class:`GradFactors`).
        target: (rows,) int64 global class ids in [0, C) or ``ignore_index``.
        weight: None or (C,) global class weights.
        grad_scale: (rows,) upstream gradient per row (may be stride-0), or None for the loss alone
            (then the buffer's content afterwards is unspecified and ``factors`` is ``FINISHED``).
        ignore_index, label_smoothing, z_loss, softcap: as in :func:`crossent.cross_entropy`.
        vocab_start, num_classes: where the block's columns sit in the C-class head (default: all of it).
        combine: :data:`StatsHook` from this block's stats to the global ones (None: the block is all).
        recompute: refills ``logits`` with the block's raw logits. With it, and on the CPU with the whole
            vocabulary in the block, the step takes a one-pass softmax path; without it, the max-first path.

    Returns:
        :class:`ChunkGrad`; ``lse`` is the global log-sum-exp of every row (ignored ones too).
    """
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    opts = (ignore_index, label_smoothing, z_loss)
    if softcap is not None:
        return _capped_loss_and_grad_(logits, target, weight, grad_scale, opts, softcap, vocab_start, num_classes, combine)
    whole = vocab_start == 0 and logits.shape[-1] == num_classes and combine is None
    if whole and recompute is not None and logits.device.type == "cpu":
        done = _softmax_loss_and_grad_(logits, target, weight, grad_scale, opts)
        if done is not None:
            return done
        recompute()
    return _exp_loss_and_grad_(logits, target, weight, grad_scale, opts, vocab_start, num_classes, combine)


def chunk_grad_(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_scale: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    *,
    vocab_start: int = 0,
    num_classes: Optional[int] = None,
) -> GradFactors:
    """The recompute chunk step: the block's gradient in place, from the global per-row ``lse``.

    Same arguments as :func:`chunk_loss_and_grad_`, with ``lse`` (rows,) the global log-sum-exp saved by
    the forward step. Used by the ``"none"`` reduction's backward and by vocabulary-split blocks.
    """
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    if softcap is not None:
        shard_backward(logits, target, weight, vocab_start, lse, grad_scale, ignore_index, label_smoothing,
                       z_loss, softcap, num_classes, logits)  # fmt: skip
        return FINISHED
    factors = _grad_factors(target, weight, lse, grad_scale, (ignore_index, label_smoothing, z_loss), vocab_start,
                            logits.shape[-1], num_classes, logits.dtype)  # fmt: skip
    if vocab_start == 0 and logits.shape[-1] == num_classes:
        _softmax_(logits)  # p itself: one fused pass (the softmax recomputes this very lse)
    else:  # p = exp(z − lse); rows without gradient get shift +inf, so exactly 0 (no inf · 0)
        shift = lse.masked_fill(factors.scale == 0, math.inf)
        torch.sub(logits, shift.unsqueeze(-1), out=logits).exp_()
    return factors


def chunk_stats(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    *,
    vocab_start: int = 0,
) -> RowStats:
    """Per-row stats of one vocabulary block (first pass of a vocabulary-split block); reads ``logits`` only."""
    return shard_stats(logits, target, weight, vocab_start, label_smoothing != 0.0, softcap)


class ChunkKernels(NamedTuple):
    """The elementwise work of the loops, swappable per backend: the three functions above."""

    loss_and_grad_: Callable[..., ChunkGrad]
    grad_: Callable[..., GradFactors]
    stats: Callable[..., RowStats]


TORCH_KERNELS = ChunkKernels(chunk_loss_and_grad_, chunk_grad_, chunk_stats)


def chunk_kernels(impl: str) -> ChunkKernels:
    """The chunk kernels for a resolved ``impl``: torch ops, or Triton's (:mod:`crossent.kernels.triton_linear`)."""
    if impl == "triton":
        from crossent.kernels.triton_linear import TRITON_KERNELS  # imported only when asked for: Triton is optional

        return TRITON_KERNELS
    return TORCH_KERNELS


def _softmax_(x: Tensor) -> None:
    """``x ← softmax(x)`` along the last dim, in place: one fused kernel that reads each row before writing it."""
    torch._softmax(x, -1, False, out=x)


def _softmax_loss_and_grad_(x, target, weight, grad_scale, opts):
    """CPU fast path, whole rows: ``Q = softmax(z)`` in place, ``lse = z_t − log p_t`` (no separate max pass).

    Ignored rows use the column their index is clamped to. Returns None, touching nothing but ``x``, if
    some row's ``p_t`` underflows (its loss is > ~69): the caller then recomputes the block.
    """
    ignore_index, eps, z_loss = opts
    num_classes = x.shape[-1]
    _, t_safe, _ = index_masks(target, ignore_index, num_classes)
    column = t_safe.unsqueeze(-1)
    z_t = x.gather(-1, column).squeeze(-1)
    dot = weighted_sum(x, shard_weight(weight, 0, num_classes, x.dtype)) if eps else None
    _softmax_(x)
    p_t = x.gather(-1, column).squeeze(-1)
    if bool((p_t < _TINY_PROB).any()):  # CPU only: a free host check
        return None
    lse = z_t.double() - p_t.double().log()  # float64, as RowStats.lse()
    loss = index_loss(lse, z_t, dot, target, weight, ignore_index, eps, z_loss, num_classes)
    factors = FINISHED if grad_scale is None else _grad_factors(target, weight, lse, grad_scale, opts, 0,
                                                                 num_classes, num_classes, x.dtype)  # fmt: skip
    return ChunkGrad(loss, lse, factors)


def _exp_loss_and_grad_(x, target, weight, grad_scale, opts, vocab_start, num_classes, combine):
    """Max-first path, any block: ``Q = exp(z − m)`` in place; stats as :func:`shard_stats` gives them."""
    ignore_index, eps, z_loss = opts
    local, t_local = local_targets(target, vocab_start, x.shape[-1])
    z_t = torch.where(local, x.gather(-1, t_local.unsqueeze(-1)).squeeze(-1), 0.0)
    dot = weighted_sum(x, shard_weight(weight, vocab_start, x.shape[-1], x.dtype)) if eps else None
    row_max = x.amax(-1).clamp_(min=torch.finfo(x.dtype).min)  # an all −inf row: sumexp 0, not NaN
    torch.sub(x, row_max.unsqueeze(-1), out=x).exp_()
    local = RowStats(row_max, x.sum(-1), z_t, dot)
    stats = local if combine is None else combine(local)
    lse = stats.lse()
    loss = index_loss(lse, stats.target_logit, stats.dot, target, weight, ignore_index, eps, z_loss, num_classes)
    if grad_scale is None:
        return ChunkGrad(loss, lse, FINISHED)
    # p = Q · exp(m − lse): the normalisation folds into the row scale
    factors = _grad_factors(target, weight, lse, grad_scale, opts, vocab_start, x.shape[-1], num_classes, x.dtype,
                            rescale=torch.exp(row_max - lse))  # fmt: skip
    return ChunkGrad(loss, lse, factors)


def _capped_loss_and_grad_(x, target, weight, grad_scale, opts, softcap, vocab_start, num_classes, combine):
    """Softcap: the tanh chain rule is elementwise, so the torch row kernels write the finished gradient."""
    ignore_index, eps, z_loss = opts
    local = shard_stats(x, target, weight, vocab_start, eps != 0.0, softcap)
    stats = local if combine is None else combine(local)
    lse = stats.lse()
    loss = index_loss(lse, stats.target_logit, stats.dot, target, weight, ignore_index, eps, z_loss, num_classes)
    if grad_scale is not None:
        shard_backward(x, target, weight, vocab_start, lse, grad_scale, ignore_index, eps, z_loss, softcap,
                       num_classes, x)  # fmt: skip
    return ChunkGrad(loss, lse, FINISHED)


def _grad_factors(target, weight, lse, grad_scale, opts, vocab_start, shard_size, num_classes, dtype, rescale=None):
    """The row factors of the formula above the chunk step, formed in lse's dtype (float64 from RowStats.lse:
    O(rows) work) and returned in the block's ``dtype``; NaN scale on out-of-range targets (CUDA)."""
    ignore_index, eps, z_loss = opts
    valid, t_safe, bad = index_masks(target, ignore_index, num_classes)
    local, _ = local_targets(target, vocab_start, shard_size)
    g = torch.where(valid, grad_scale.to(lse.dtype), 0.0)
    omega = torch.where(valid, weight_at(weight, t_safe, lse), 0.0)
    total_weight = num_classes if weight is None else weight.to(lse.dtype).sum()
    scale = g * (omega * (1.0 - eps + 2.0 * z_loss * lse) + eps * total_weight / num_classes)
    if rescale is not None:
        scale = scale * rescale
    target_coef = torch.where(local, (1.0 - eps) * g * omega, 0.0)
    smooth_coef = (eps / num_classes) * g if eps else None
    smooth_coef = None if smooth_coef is None else smooth_coef.to(dtype)
    return GradFactors(scale.masked_fill_(bad, math.nan).to(dtype), target_coef.to(dtype), smooth_coef)


# --- the loops -----------------------------------------------------------------------------------------


class LinearGrads(NamedTuple):
    """Gradients for the linear input (N, D), weight (V_local, D) and bias (V_local,); None where not asked."""

    input: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]


class LinearForward(NamedTuple):
    """Per-row loss and global lse, (N,) in the compute dtype, and the gradients (all None without them)."""

    loss: Tensor
    lse: Tensor
    grads: LinearGrads


class LossOptions(NamedTuple):
    """The loss options the chunk steps take (the fields of :class:`crossent.CrossEntropyOptions` they use)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None


def linear_loss_and_grads(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    opts: LossOptions,
    plan: ChunkPlan,
    *,
    grad_scale: Optional[Tensor] = None,
    needs: Sequence[bool] = (True, True, True),
    accumulate: str = "float32",
    vocab_start: int = 0,
    num_classes: Optional[int] = None,
    combine: Optional[StatsHook] = None,
    kernels: ChunkKernels = TORCH_KERNELS,
) -> LinearForward:
    """Per-row loss of ``Z = input · linear_weightᵀ + linear_bias`` and, with ``grad_scale``, the gradients.

    Args:
        input: (N, D). linear_weight: (V_local, D), the rows [vocab_start, vocab_start + V_local) of the
            head. linear_bias: None or (V_local,). target: (N,) int64 global ids. weight: None or (C,).
        plan: the block shape (:func:`plan_chunks`).
        grad_scale: None (loss only: one product per block), or the upstream gradient per row, () or (N,):
            then dX, dW, db (those ``needs`` asks for) come out with it (3 products per block; a vocabulary
            split adds the logits product again).
        accumulate: ``"float32"`` (dW summed over row blocks in the compute dtype, cast once at the end) or
            ``"weight"`` (in ``linear_weight``'s dtype: no fp32 copy for 16-bit weights). dX rows are summed
            over vocabulary pieces in the compute dtype, db always in fp32.
        combine: per block of rows, the stats of this process's columns → global stats (vocab-parallel).
            Then dX is this slice's part (sum it over ranks); dW and db are this slice's. The hook is a
            collective, so every rank must run the same number of row blocks (the same ``plan.rows``).
    """
    ws = _Workspace(input, linear_weight, linear_bias, target, weight, opts, plan, needs, accumulate,
                    vocab_start, num_classes, grad_scale is not None)  # fmt: skip
    loss = torch.empty(ws.n, dtype=ws.cdt, device=input.device)
    lse = torch.empty(ws.n, dtype=torch.float64, device=input.device)  # O(N); keeps lse − z_t's digits
    scale_rows = None if grad_scale is None else grad_scale.to(ws.cdt).expand(ws.n)
    for r0, r1 in ws.row_blocks():
        t_blk = ws.target[r0:r1]
        g_blk = None if scale_rows is None else scale_rows[r0:r1]
        if len(ws.pieces) == 1:
            q = ws.logits(r0, r1, ws.pieces[0])
            out = kernels.loss_and_grad_(
                q, t_blk, weight, g_blk, *opts, vocab_start=vocab_start, num_classes=ws.num_classes,
                combine=combine, recompute=lambda: ws.logits(r0, r1, ws.pieces[0]),
            )  # fmt: skip
            loss[r0:r1], lse[r0:r1] = out.loss, out.lse
            if g_blk is not None:
                ws.add_block_grad(q, out.factors, r0, r1, ws.pieces[0], first=True)
            continue
        # vocabulary split: stats of every piece first (they need the whole row), then the gradients
        parts = [kernels.stats(ws.logits(r0, r1, p), t_blk, weight, opts.label_smoothing, opts.softcap,
                               vocab_start=vocab_start + p[0]) for p in ws.pieces]  # fmt: skip
        stats = combine_stats(parts)
        stats = stats if combine is None else combine(stats)
        lse[r0:r1] = stats.lse()
        loss[r0:r1] = index_loss(lse[r0:r1], stats.target_logit, stats.dot, t_blk, weight, opts.ignore_index,
                                 opts.label_smoothing, opts.z_loss, ws.num_classes)  # fmt: skip
        if g_blk is not None:
            ws.pieces_grad(r0, r1, lse[r0:r1], g_blk, kernels)
    return LinearForward(loss, lse, ws.finish())


def linear_grads(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    opts: LossOptions,
    plan: ChunkPlan,
    *,
    needs: Sequence[bool] = (True, True, True),
    accumulate: str = "float32",
    vocab_start: int = 0,
    num_classes: Optional[int] = None,
    kernels: ChunkKernels = TORCH_KERNELS,
) -> LinearGrads:
    """dX, dW, db for the per-row upstream gradient ``grad_loss`` (N,), from the global ``lse`` (N,) the
    forward saved: the logits again, then the three gradient products, per block. No communication needed:
    with a vocabulary slice, dX is this slice's part as in :func:`linear_loss_and_grads`."""
    ws = _Workspace(input, linear_weight, linear_bias, target, weight, opts, plan, needs, accumulate,
                    vocab_start, num_classes, True)  # fmt: skip
    g = grad_loss.to(ws.cdt).expand(ws.n)
    for r0, r1 in ws.row_blocks():
        ws.pieces_grad(r0, r1, lse[r0:r1], g[r0:r1], kernels)
    return ws.finish()


class _Workspace:
    """Buffers and accumulators of one loop: the block buffer, dX/dW/db sums, and the product epilogues."""

    def __init__(self, x, w, b, target, weight, opts, plan, needs, accumulate, vocab_start, num_classes, grads):
        self.x, self.w, self.b, self.weight, self.opts = x, w, b, weight, opts
        self.target = target
        self.n, self.dim = x.shape
        self.vocab = w.shape[0]
        self.vocab_start = vocab_start
        self.num_classes = self.vocab if num_classes is None else num_classes
        self.cdt = compute_dtype(x.dtype)
        self.plan = plan
        cols = max(1, min(plan.cols, self.vocab))
        self.pieces = [(p, min(p + cols, self.vocab)) for p in range(0, max(self.vocab, 1), cols)]
        rows = max(1, min(plan.rows, self.n))
        width = self.pieces[0][1] - self.pieces[0][0]
        dev = x.device
        self.buf = torch.empty(rows * width, dtype=self.cdt, device=dev)
        # 16-bit inputs: the logits product writes here; the gradient products read the block cast back
        self.buf_in = None if x.dtype == self.cdt else torch.empty(rows * width, dtype=x.dtype, device=dev)
        need_x, need_w, need_b = (bool(v) for v in needs)
        self.need_x, self.need_w, self.need_b = grads and need_x, grads and need_w, grads and need_b and b is not None
        acc_w = self.cdt if accumulate == "float32" else w.dtype
        self.dx = torch.empty(x.shape, dtype=x.dtype, device=dev) if self.need_x else None
        direct = len(self.pieces) == 1 and x.dtype == self.cdt
        self.dx_blk = torch.empty(rows, self.dim, dtype=self.cdt, device=dev) if self.need_x and not direct else None
        # the first row block writes dW (no zero fill: one pass over V×D saved); nothing to write when N = 0
        new_dw = torch.empty if self.n else torch.zeros
        self.dw = new_dw(w.shape, dtype=acc_w, device=dev) if self.need_w else None
        self.db = torch.zeros(self.vocab, dtype=self.cdt, device=dev) if self.need_b else None
        eps = opts.label_smoothing if grads and opts.softcap is None else 0.0  # softcap: G comes finished
        w_local = shard_weight(weight, vocab_start, self.vocab, self.cdt)
        self.w_local = torch.ones(self.vocab, dtype=self.cdt, device=dev) if w_local is None else w_local
        # smoothing's −ε w_c / C term, summed over rows: Σ_i γ_i x_i (for dW) and Σ_i γ_i (for db), applied once
        self.smooth_x = torch.zeros(self.dim, dtype=self.cdt, device=dev) if eps and self.need_w else None
        self.smooth_sum = torch.zeros((), dtype=self.cdt, device=dev) if eps and self.need_b else None
        self.smooth_dx = [self._class_weighted_rows(p) for p in self.pieces] if eps and self.need_x else None

    def row_blocks(self):
        rows = max(1, min(self.plan.rows, self.n))
        return [(r, min(r + rows, self.n)) for r in range(0, self.n, rows)]

    def logits(self, r0, r1, piece):
        """The raw logits of rows [r0, r1) and the piece's columns, in the block buffer (compute dtype)."""
        p0, p1 = piece
        shape = (r1 - r0, p1 - p0)
        out = self.buf[: math.prod(shape)].view(shape)
        dst = out if self.buf_in is None else self.buf_in[: math.prod(shape)].view(shape)
        x_blk, w_p = self.x[r0:r1], self.w[p0:p1]
        if self.b is None:
            torch.mm(x_blk, w_p.T, out=dst)
        else:
            torch.addmm(self.b[p0:p1], x_blk, w_p.T, out=dst)
        if dst is not out:
            out.copy_(dst)
        return out

    def pieces_grad(self, r0, r1, lse, g, kernels):
        """Gradients of rows [r0, r1) over every piece, from the global lse (logits recomputed per piece)."""
        o = self.opts
        for k, piece in enumerate(self.pieces):
            q = self.logits(r0, r1, piece)
            factors = kernels.grad_(q, self.target[r0:r1], self.weight, lse, g, *o,
                                    vocab_start=self.vocab_start + piece[0], num_classes=self.num_classes)  # fmt: skip
            self.add_block_grad(q, factors, r0, r1, piece, first=k == 0)

    def add_block_grad(self, q, f: GradFactors, r0, r1, piece, first):
        """Add the block's share of dX, dW, db; G = diag(scale) Q − target_coef ⊙ onehot − smooth_coef ⊗ w."""
        p0, p1 = piece
        _, t_col = local_targets(self.target[r0:r1], self.vocab_start + p0, p1 - p0)
        x_blk = self.x[r0:r1]
        q_in = q if self.buf_in is None else self.buf_in[: q.numel()].view(q.shape).copy_(q)
        if self.need_x:
            self._add_dx(q_in, f, r0, r1, piece, t_col, first)
        if self.need_w:
            x_c = x_blk.to(self.cdt)
            dw = self.dw[p0:p1]
            xs = x_c if f.scale is None else x_c * f.scale.unsqueeze(-1)  # dW += Qᵀ (diag(scale) X)
            q_w = (q if dw.dtype == self.cdt else q_in).T
            if r0 == 0:
                torch.mm(q_w, xs.to(dw.dtype), out=dw)
            else:
                dw.addmm_(q_w, xs.to(dw.dtype))
            if f.target_coef is not None:  # dW[t_i] −= target_coef_i x_i
                dw.index_add_(0, t_col, (x_c * f.target_coef.unsqueeze(-1)).to(dw.dtype), alpha=-1)
            if f.smooth_coef is not None and first:  # the same γ for every piece: count each row once
                self.smooth_x.addmv_(x_c.T, f.smooth_coef)
        if self.need_b:
            db = self.db[p0:p1]
            if f.scale is None:
                db.add_(q.sum(0))
            else:
                db.addmv_(q.T, f.scale)
            if f.target_coef is not None:
                db.index_add_(0, t_col, f.target_coef, alpha=-1)
            if f.smooth_coef is not None and first:
                self.smooth_sum.add_(f.smooth_coef.sum())
        if self.need_x and p1 == self.vocab and self.dx_blk is not None:  # the block's dX rows are complete
            self.dx[r0:r1].copy_(self.dx_blk[: r1 - r0])

    def _add_dx(self, q_in, f, r0, r1, piece, t_col, first):
        """dX_blk (+)= diag(scale) (Q W) − target_coef ⊙ W[t] − smooth_coef ⊗ (wᵀ W)."""
        p0, p1 = piece
        w_p = self.w[p0:p1]
        if self.dx_blk is None:  # one piece, dX in the compute dtype: the product goes straight into dX's rows
            dx = term = torch.mm(q_in, w_p, out=self.dx[r0:r1])
        else:
            dx = self.dx_blk[: r1 - r0]
            term = torch.mm(q_in, w_p).to(self.cdt)  # a new (rows, D) tensor: the epilogue works on it in place
        if f.scale is not None:
            term.mul_(f.scale.unsqueeze(-1))
        if f.target_coef is not None:
            term.addcmul_(w_p.index_select(0, t_col), f.target_coef.unsqueeze(-1), value=-1)
        if f.smooth_coef is not None:
            term.addr_(f.smooth_coef, self.smooth_dx[self.pieces.index(piece)], alpha=-1)
        if term is dx:
            return
        if first:
            dx.copy_(term)
        else:
            dx.add_(term)

    def _class_weighted_rows(self, piece, step=4096):
        """``Σ_c w_c W_c`` over the piece's rows (D,), in the compute dtype, a few thousand rows at a time."""
        p0, p1 = piece
        out = torch.zeros(self.dim, dtype=self.cdt, device=self.x.device)
        for s in range(p0, p1, step):
            e = min(s + step, p1)
            out.addmv_(self.w[s:e].to(self.cdt).T, self.w_local[s:e])
        return out

    def finish(self) -> LinearGrads:
        """Apply the once-per-call smoothing terms and cast the sums to each parameter's dtype."""
        dw = db = None
        if self.need_w:
            if self.smooth_x is not None:  # dW −= w ⊗ Σ_i γ_i x_i
                self.dw.addr_(self.w_local.to(self.dw.dtype), self.smooth_x.to(self.dw.dtype), alpha=-1)
            dw = self.dw if self.dw.dtype == self.w.dtype else self.dw.to(self.w.dtype)
            self.dw = None
        if self.need_b:
            if self.smooth_sum is not None:
                self.db.sub_(self.w_local * self.smooth_sum)
            db = self.db.to(self.b.dtype)
        return LinearGrads(self.dx, dw, db)
