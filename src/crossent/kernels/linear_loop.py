"""The fused linear CE's loops (CPU, and CUDA through cuBLAS): token and vocabulary blocks, products, sums.

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

For 16-bit input the scale is applied to Q in fp32 first and the block rounded to the input dtype once for the
16-bit products; dW's block product then runs in 16 bits where the device multiplies them fast (summed into
the fp32 dW through slices of ``HALF_DW_SLICE_BYTES``), else in the compute dtype from the unrounded Q
(``accumulate_dtype="float32_products"`` asks for that everywhere); where 16-bit products are emulated,
every product runs on fp32 copies of X and W (docs/linear_cross_entropy.md, "Precision").

Two loops: :func:`linear_loss_and_grads` (loss, and with a per-row upstream gradient also dX/dW/db: 3 products
per block) and :func:`linear_grads` (the gradients from a saved per-row lse: 3 products + the logits again).
Both work on a vocabulary *slice* (``VocabShard``) of a C-class head, with a hook that turns the slice's per-row
stats into the global ones, so vocab-parallel CE runs the same loops on each rank. The block shape comes from
``linear_plan``, the elementwise step from ``linear_step`` (or Triton's, ``triton_linear``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from crossent._options import LogProbRowOptions, RowOptions
from crossent._precision import HALF_DTYPES, compute_dtype, fast_half_products
from crossent.kernels import cpu_rows, scratch
from crossent.kernels.linear_plan import ChunkPlan, plan_chunks
from crossent.kernels.linear_step import FINISHED, TORCH_KERNELS, ChunkKernels, GradFactors
from crossent.kernels.logprob_rows import TORCH_LOGPROB_KERNELS, LogProbChunkKernels, LogProbRows
from crossent.kernels.logprob_rows import combine_stats as combine_logprob_stats
from crossent.kernels.logprob_rows import finish as finish_log_probs
from crossent.kernels.shard import VocabShard
from crossent.kernels.torch_rows import (
    StatsHook,
    combine_stats,
    index_grad_factors,
    index_loss,
    local_targets,
    shard_weight,
)

HALF_DW_SLICE_BYTES = 4 << 20


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


class GradNeeds(NamedTuple):
    """Which gradients a loop forms: for the linear input, its weight, its bias."""

    need_input: bool = True
    need_weight: bool = True
    need_bias: bool = True


class LoopArgs(NamedTuple):
    """The fused loops' settings besides the row options: what the block plan is made from (``chunk_size``,
    ``memory_budget``; ``plan_vocab`` vocabulary rows, 0: the weight's own — vocab-parallel ranks plan from the
    widest shard) and where dW is summed (``"float32"`` / ``"float32_products"``: the compute dtype, cast once at
    the end — the latter also keeps each block's dW product in the compute dtype; ``"weight"``: the weight's own
    dtype). The plan is made here, from the tensors' shapes, not by the caller:
    inside the custom ops, a compiled graph does not depend on N. ``skip_ignored``: rows whose target is
    ``ignore_index`` are dropped before the products (their loss and gradients are 0); their lse reads NaN,
    unless ``ignored_lse`` asks for it (``return_stats``: one more product over those rows, loss only)."""

    chunk_size: Optional[int] = None
    memory_budget: Optional[int] = None
    plan_vocab: int = 0
    accumulate: str = "float32"
    skip_ignored: bool = True
    ignored_lse: bool = False

    def plan(self, x: Tensor, linear_weight: Tensor, fp32_block: bool = True, one_block_spares: int = 0) -> ChunkPlan:
        """The block shape for input rows ``x`` (N, D) and the weight's rows (:func:`plan_chunks`)."""
        vocab = self.plan_vocab or linear_weight.shape[0]
        return plan_chunks(x.shape[0], x.shape[1], vocab, x.dtype, x.device, self.chunk_size, self.memory_budget,
                           fp32_block, one_block_spares)  # fmt: skip


@scratch.reused
def linear_loss_and_grads(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    opts: RowOptions,
    loop: LoopArgs,
    *,
    grad_scale: Optional[Tensor] = None,
    needs: GradNeeds = GradNeeds(),
    shard: Optional[VocabShard] = None,
    combine: Optional[StatsHook] = None,
    kernels: ChunkKernels = TORCH_KERNELS,
) -> LinearForward:
    """Per-row loss of ``Z = input · linear_weightᵀ + linear_bias`` and, with ``grad_scale``, the gradients.

    Args:
        input: (N, D). linear_weight: (V_local, D), the rows ``shard`` says of the head (default: all).
            linear_bias: None or (V_local,). target: (N,) int64 global ids. class_weight: None or (C,).
        opts: the row options. loop: what the block shape is planned from, and ``accumulate``.
        grad_scale: None (loss only: one product per block), or the upstream gradient per row, () or (N,):
            then dX, dW, db (those ``needs`` asks for) come out with it (3 products per block; a vocabulary
            split adds the logits product again).
        loop.accumulate: ``"float32"`` / ``"float32_products"`` (dW summed over row blocks in the compute dtype,
            cast once at the end; see the module doc for the block products) or ``"weight"`` (in
            ``linear_weight``'s dtype: no fp32 copy for 16-bit weights). dX rows are summed
            over vocabulary pieces in the compute dtype, db in the compute dtype.
        combine: per block of rows, the stats of this process's columns → global stats (vocab-parallel).
            Then dX is this slice's part (sum it over ranks); dW and db are this slice's. The hook is a
            collective, so every rank must run the same number of row blocks (the same plan).
    """
    keep = _kept_rows(target, opts.ignore_index, loop.skip_ignored)
    if keep is not None:  # the same loop on the rows that count, then their results put back in place
        sub = linear_loss_and_grads(
            input[keep], linear_weight, linear_bias, target[keep], class_weight, opts, loop._replace(skip_ignored=False),
            grad_scale=_rows_of(grad_scale, keep), needs=needs, shard=shard, combine=combine, kernels=kernels,
        )  # fmt: skip
        loss = _scattered(sub.loss, keep, input.shape[0], 0.0)
        lse = _scattered(sub.lse, keep, input.shape[0], math.nan)
        if loop.ignored_lse:  # the statistics cover every row: the ignored ones' lse, from a loss-only pass
            dropped = (target == opts.ignore_index).nonzero().squeeze(-1)
            lse[dropped] = linear_loss_and_grads(
                input[dropped], linear_weight, linear_bias, target[dropped], class_weight, opts,
                loop._replace(skip_ignored=False), shard=shard, combine=combine, kernels=kernels,
            ).lse  # fmt: skip
        return LinearForward(loss, lse, sub.grads._replace(input=_scattered(sub.grads.input, keep, input.shape[0], 0.0)))
    plan = _half_plan(input, linear_weight, opts, loop, shard, combine, kernels is TORCH_KERNELS,
                      grad_scale is not None and needs.need_weight)  # fmt: skip
    half_step = plan is not None
    ws = _Workspace(input, linear_weight, linear_bias, target, class_weight, _smoothing(opts), loop, needs, shard,
                    grad_scale is not None, plan, half_block=half_step)  # fmt: skip
    # one block of rows as well: the C step writes the finished gradient, and dW is that block's 16-bit product
    finished = ws.single_block
    loss = torch.empty(ws.n, dtype=ws.cdt, device=input.device)
    lse = torch.empty(ws.n, dtype=torch.float64, device=input.device)  # O(N); keeps lse − z_t's digits
    scale_rows = None if grad_scale is None else grad_scale.to(ws.cdt).expand(ws.n)
    for r0, r1 in ws.row_blocks():
        t_blk = ws.target[r0:r1]
        g_blk = None if scale_rows is None else scale_rows[r0:r1]
        if half_step:
            _half_block_step(ws, r0, r1, t_blk, class_weight, g_blk, opts, loss, lse, finished)
            continue
        if len(ws.pieces) == 1:
            q = ws.logits(r0, r1, ws.pieces[0])
            out = kernels.loss_and_grad_(
                q, t_blk, class_weight, g_blk, opts, vocab_start=ws.vocab_start, num_classes=ws.num_classes,
                combine=combine, recompute=lambda: ws.logits(r0, r1, ws.pieces[0]),
            )  # fmt: skip
            loss[r0:r1], lse[r0:r1] = out.loss, out.lse
            if g_blk is not None:
                ws.add_block_grad(q, out.factors, r0, r1, ws.pieces[0], first=True)
            continue
        # vocabulary split: stats of every piece first (they need the whole row), then the gradients
        parts = [kernels.stats(ws.logits(r0, r1, p), t_blk, class_weight, opts, vocab_start=ws.vocab_start + p[0])
                 for p in ws.pieces]  # fmt: skip
        stats = combine_stats(parts)
        stats = stats if combine is None else combine(stats)
        lse[r0:r1] = stats.lse()
        loss[r0:r1] = index_loss(lse[r0:r1], stats.target_logit, stats.dot, t_blk, class_weight, opts,
                                 ws.num_classes)  # fmt: skip
        if g_blk is not None:
            ws.pieces_grad(r0, r1, _ce_block_grad(ws, kernels, t_blk, class_weight, lse[r0:r1], g_blk, opts))
    return LinearForward(loss, lse, ws.finish())


@scratch.reused
def linear_grads(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    lse: Tensor,
    grad_loss: Tensor,
    opts: RowOptions,
    loop: LoopArgs,
    *,
    needs: GradNeeds = GradNeeds(),
    shard: Optional[VocabShard] = None,
    kernels: ChunkKernels = TORCH_KERNELS,
) -> LinearGrads:
    """dX, dW, db for the per-row upstream gradient ``grad_loss`` (N,), from the global ``lse`` (N,) the
    forward saved: the logits again, then the three gradient products, per block. No communication needed:
    with a vocabulary slice, dX is this slice's part as in :func:`linear_loss_and_grads`."""
    keep = _kept_rows(target, opts.ignore_index, loop.skip_ignored)
    if keep is not None:
        sub = linear_grads(
            input[keep], linear_weight, linear_bias, target[keep], class_weight, lse[keep],
            _rows_of(grad_loss, keep, input.shape[0]), opts, loop._replace(skip_ignored=False), needs=needs,
            shard=shard, kernels=kernels,
        )  # fmt: skip
        return sub._replace(input=_scattered(sub.input, keep, input.shape[0], 0.0))
    ws = _Workspace(input, linear_weight, linear_bias, target, class_weight, _smoothing(opts), loop, needs, shard, True)
    g = grad_loss.to(ws.cdt).expand(ws.n)
    for r0, r1 in ws.row_blocks():
        ws.pieces_grad(r0, r1, _ce_block_grad(ws, kernels, target[r0:r1], class_weight, lse[r0:r1], g[r0:r1], opts))
    return ws.finish()


def _smoothing(opts: RowOptions) -> float:
    """The ε the factored gradient carries (0 with a softcap: the step then writes the gradient finished)."""
    return opts.label_smoothing if opts.softcap is None else 0.0


def half_blocks(x, linear_weight, opts, loop: LoopArgs, shard, combine, torch_backend: bool) -> bool:
    """Whether a loop's blocks may stay in 16 bits for the C kernels (the rule :func:`_half_plan` states; the
    distillation loop adds its own)."""
    whole = shard is None or (shard.vocab_start == 0 and shard.num_classes == linear_weight.shape[0])
    return (torch_backend and x.device.type == "cpu" and x.dtype in HALF_DTYPES and linear_weight.dtype == x.dtype
            and fast_half_products("cpu", x.dtype) and cpu_rows.available() and opts.softcap is None and whole
            and combine is None and loop.accumulate != "float32_products")  # fmt: skip


def _half_plan(x, linear_weight, opts, loop: LoopArgs, shard, combine, torch_backend: bool,
               dw_wanted: bool) -> Optional[ChunkPlan]:  # fmt: skip
    """The plan of a loop whose blocks stay in 16 bits for the C kernels, or None where they do not: 16-bit input
    multiplied in 16 bits on the CPU, the torch backend (``torch_backend``) with the C kernels built, whole rows
    (no vocabulary shard or stats hook, no softcap, and a plan of one vocabulary piece), dW's block products not
    asked in fp32 (``accumulate_dtype="float32_products"``). The block then takes 2 bytes per logit instead of 6
    (no fp32 copy), and one block of rows may also use the bytes of the fp32 dW sum it spares (``dw_wanted``:
    the loop forms dW)."""
    if not half_blocks(x, linear_weight, opts, loop, shard, combine, torch_backend):
        return None
    fp32_dw = dw_wanted and loop.accumulate == "float32"
    plan = loop.plan(x, linear_weight, fp32_block=False, one_block_spares=linear_weight.numel() * 4 if fp32_dw else 0)
    return plan if plan.cols >= linear_weight.shape[0] else None


def _half_block_step(ws, r0, r1, target, class_weight, grad_scale, opts: RowOptions, loss, lse, finished) -> None:
    """One block of 16-bit logits on the CPU: the C kernels (:mod:`cpu_rows`) read it as the product wrote it
    (no fp32 copy of the block: the plan gives the block 2 bytes per logit instead of 6, so 3× the rows) and
    write ``diag(scale) P`` over it, rounded once, as the torch step's block before its 16-bit products; the
    target and smoothing terms stay factored and are applied in fp32 after the products. ``finished`` (the
    call's only block of rows): the whole gradient G, rounded once — dW is then one 16-bit product ``Gᵀ X``
    with nothing to sum, which is what an fp32 sum of one block cast to 16 bits would give, without the fp32 dW."""
    q = ws.logits(r0, r1, ws.pieces[0])
    q3, t3 = q.unsqueeze(1), target.unsqueeze(1)
    if grad_scale is None:
        loss[r0:r1], lse[r0:r1], _ = cpu_rows.forward(q3, t3, class_weight, opts, ws.c_weights)
        return
    g = grad_scale.unsqueeze(1)
    loss[r0:r1], lse[r0:r1], _ = cpu_rows.loss_and_grad(q3, t3, class_weight, g, opts, q3, factored=not finished,
                                                         weights=ws.c_weights)  # fmt: skip
    if finished:
        ws.add_block_grad(q, FINISHED, r0, r1, ws.pieces[0], first=True)
        return
    f = index_grad_factors(target, class_weight, lse[r0:r1], grad_scale, opts, 0, ws.vocab, ws.vocab)
    smooth = None if f.smooth_coef is None else f.smooth_coef.to(ws.cdt)
    ws.add_block_grad(q, GradFactors(None, f.target_coef.to(ws.cdt), smooth), r0, r1, ws.pieces[0], first=True)


def _ce_block_grad(ws, kernels: ChunkKernels, target, class_weight, lse, g, opts: RowOptions):
    """The cross-entropy recompute step for one block of rows, as :meth:`_Workspace.pieces_grad` calls it."""
    return lambda q, v0: kernels.grad_(q, target, class_weight, lse, g, opts, vocab_start=v0, num_classes=ws.num_classes)


# --- per-token log-probabilities and entropy (docs/log_probs.md): the same workspace, their own chunk step -----


@scratch.reused
def linear_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    index: Tensor,
    opts: LogProbRowOptions,
    loop: LoopArgs,
    *,
    shard: Optional[VocabShard] = None,
    combine=None,
    kernels: LogProbChunkKernels = TORCH_LOGPROB_KERNELS,
) -> LogProbRows:
    """Log-probabilities of ``index`` (N, K), the entropy (``opts.entropy``) and the float64 lse (N,) of the rows of
    ``Z = input · linear_weightᵀ + linear_bias`` (and the statistics the other flags of ``opts`` ask for): one logits
    product per block, the block's stats, combined over vocabulary pieces (and, through ``combine``, over the ranks
    holding the other columns). Positions whose ids are all ``ignore_index`` are dropped before the products
    (``loop.skip_ignored``): their outputs are 0 (False)."""
    keep = _kept_rows(index, opts.ignore_index, loop.skip_ignored)
    if keep is not None:
        sub = linear_log_probs(input[keep], linear_weight, linear_bias, index[keep], opts,
                               loop._replace(skip_ignored=False), shard=shard, combine=combine, kernels=kernels)  # fmt: skip
        n = input.shape[0]
        return LogProbRows(*(_scattered(t, keep, n, math.nan if f == "lse" else 0.0) for f, t in zip(sub._fields, sub)))
    # 16-bit blocks stay 16-bit where the C stats read them (their step, shard_stats, takes any block dtype)
    plan = _half_plan(input, linear_weight, opts, loop, shard, combine, kernels is TORCH_LOGPROB_KERNELS, False)
    ws = _Workspace(input, linear_weight, linear_bias, index, None, 0.0, loop, GradNeeds(False, False, False), shard,
                    False, plan, half_block=plan is not None)  # fmt: skip
    out_rows = LogProbRows.empty((ws.n,), index.shape, opts, ws.cdt, input.device)
    whole = len(ws.pieces) == 1 and ws.vocab_start == 0 and ws.vocab == ws.num_classes and combine is None
    for r0, r1 in ws.row_blocks():
        ids = index[r0:r1]
        first = ws.logits(r0, r1, ws.pieces[0])
        rows = kernels.rows(first, ids, opts) if whole else None
        if rows is None:  # a split, a shard, or the fast step declined (it writes nothing): per-piece stats
            parts = [kernels.stats(first if k == 0 else ws.logits(r0, r1, p), ids, opts, vocab_start=ws.vocab_start + p[0])
                     for k, p in enumerate(ws.pieces)]  # fmt: skip
            stats = parts[0] if len(parts) == 1 else combine_logprob_stats(parts)
            rows = finish_log_probs(stats if combine is None else combine(stats), ids, opts, ws.num_classes)
        for dst, src in zip(out_rows, rows):
            if dst is not None:
                dst[r0:r1] = src
    return out_rows


@scratch.reused
def linear_log_probs_grads(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    index: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    grad_log_probs: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    opts: LogProbRowOptions,
    loop: LoopArgs,
    *,
    needs: GradNeeds = GradNeeds(),
    shard: Optional[VocabShard] = None,
    kernels: LogProbChunkKernels = TORCH_LOGPROB_KERNELS,
) -> LinearGrads:
    """dX, dW, db for upstream gradients on the log-probabilities (N, K) and the entropy (N,) (None: zero), from
    the lse and entropy the forward saved: per block the logits again, the finished gradient, three products.
    No communication: with a vocabulary slice, dX is this slice's part. Positions whose ids are all
    ``ignore_index`` are skipped (their gradient is 0), as in :func:`linear_log_probs`."""
    keep = _kept_rows(index, opts.ignore_index, loop.skip_ignored)
    if keep is not None:
        kept = [None if t is None else t[keep] for t in (index, lse, entropy, grad_log_probs, grad_entropy)]
        sub = linear_log_probs_grads(input[keep], linear_weight, linear_bias, *kept, opts,
                                     loop._replace(skip_ignored=False), needs=needs, shard=shard, kernels=kernels)  # fmt: skip
        return sub._replace(input=_scattered(sub.input, keep, input.shape[0], 0.0))
    # 16-bit blocks: the C gradient writes the finished G over the block, rounded once; one block of rows: dW is its
    # 16-bit product (as in linear_loss_and_grads)
    plan = _half_plan(input, linear_weight, opts, loop, shard, None, kernels is TORCH_LOGPROB_KERNELS,
                      needs.need_weight)  # fmt: skip
    ws = _Workspace(input, linear_weight, linear_bias, index, None, 0.0, loop, needs, shard, True, plan,
                    half_block=plan is not None)

    def rows(t, r0, r1):
        return None if t is None else t[r0:r1]

    for r0, r1 in ws.row_blocks():
        args = [rows(t, r0, r1) for t in (index, lse, entropy, grad_log_probs, grad_entropy)]
        ws.pieces_grad(r0, r1, lambda q, v0: kernels.grad_(q, *args, opts, vocab_start=v0, num_classes=ws.num_classes))
    return ws.finish()


def _kept_rows(target: Tensor, ignore_index: int, skip: bool) -> Optional[Tensor]:
    """The indices of the rows whose target (any of the row's K ids, for (N, K) ids) is not ``ignore_index``,
    when some are not (None: every row counts, or ``skip`` is off). Reads the count on the host: free on the
    CPU, one sync per call on CUDA."""
    if not skip:
        return None
    valid = target != ignore_index
    keep = (valid if valid.dim() == 1 else valid.any(-1)).nonzero().squeeze(-1)
    return None if keep.numel() == target.shape[0] else keep


def _rows_of(values: Optional[Tensor], keep: Tensor, num_rows: Optional[int] = None) -> Optional[Tensor]:
    """A per-row tensor (or a 0-d one, which applies to every row) restricted to the kept rows."""
    if values is None or values.dim() == 0:
        return values
    return values.expand(num_rows)[keep] if num_rows is not None else values[keep]


def _scattered(values: Optional[Tensor], keep: Tensor, num_rows: int, fill: float) -> Optional[Tensor]:
    """The kept rows' ``values`` at their places among ``num_rows`` rows, ``fill`` elsewhere."""
    if values is None:
        return None
    out = values.new_full((num_rows, *values.shape[1:]), fill)
    out[keep] = values
    return out


class _Workspace:
    """Buffers and accumulators of one loop: the block buffer, dX/dW/db sums, and the product epilogues."""

    def __init__(self, x, linear_weight, linear_bias, target, class_weight, smoothing, loop, needs, shard, grads,
                 plan=None, half_block=False):  # fmt: skip
        w, b, plan = linear_weight, linear_bias, loop.plan(x, linear_weight) if plan is None else plan
        self.cdt = compute_dtype(x.dtype)
        self.grad_dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)
        if x.dtype in HALF_DTYPES and not fast_half_products(x.device.type, x.dtype):
            # emulated 16-bit products are slower than the compute dtype's (float16 on most CPUs: ~150× slower
            # than float32): every product runs in the compute dtype, on one copy of each operand
            x, w, b = (None if t is None else t.to(self.cdt) for t in (x, w, b))
        self.x, self.linear_weight, self.linear_bias, self.class_weight = x, w, b, class_weight
        self.target = target
        self.n, self.dim = x.shape
        self.vocab = w.shape[0]
        shard = VocabShard.whole(self.vocab) if shard is None else shard
        self.vocab_start, self.num_classes = shard.vocab_start, shard.num_classes
        self.plan = plan
        cols = max(1, min(plan.cols, self.vocab))
        self.pieces = [(p, min(p + cols, self.vocab)) for p in range(0, max(self.vocab, 1), cols)]
        rows = max(1, min(plan.rows, self.n))
        # one 16-bit block holding every row: the C step writes the finished gradient (no factored smoothing term),
        # and dW is that block's 16-bit product
        self.single_block = half_block and plan.rows >= self.n
        width = self.pieces[0][1] - self.pieces[0][0]
        dev = x.device
        # half_block: the block stays in 16 bits (the C step); else its compute-dtype copy is what the step works on
        self.buf = None if half_block else torch.empty(rows * width, dtype=self.cdt, device=dev)
        # the class weights as the C kernels take them, once per loop (the C step's blocks hold whole rows)
        self.c_weights = cpu_rows.class_weights(class_weight, self.vocab) if half_block else None
        # 16-bit inputs: the logits product writes here; the gradient products read the block cast back
        self.buf_in = None if x.dtype == self.cdt else torch.empty(rows * width, dtype=x.dtype, device=dev)
        need_x, need_w, need_b = (bool(v) for v in needs)
        self.need_x, self.need_w, self.need_b = grads and need_x, grads and need_w, grads and need_b and b is not None
        # dW's block products in the 16-bit input dtype (the device's fast rate), each summed into the fp32 dW
        # through a slice-sized 16-bit partial; else in the compute dtype from the unrounded block gradient
        self.half_dw = self.need_w and loop.accumulate == "float32" and fast_half_products(dev.type, x.dtype)
        # dW summed in the weight's dtype ("weight"), or, for a single 16-bit block of rows, written by its product
        acc_w = w.dtype if loop.accumulate == "weight" or (self.single_block and self.half_dw) else self.cdt
        self.dw_slice = max(1, min(width, HALF_DW_SLICE_BYTES // (2 * max(self.dim, 1))))
        fp32_dw = self.half_dw and acc_w == self.cdt
        self.dw_part = torch.empty(self.dw_slice, self.dim, dtype=x.dtype, device=dev) if fp32_dw else None
        self.dx = torch.empty(x.shape, dtype=self.grad_dtypes[0], device=dev) if self.need_x else None
        direct = len(self.pieces) == 1 and self.grad_dtypes[0] == self.cdt
        self.dx_blk = torch.empty(rows, self.dim, dtype=self.cdt, device=dev) if self.need_x and not direct else None
        # the first row block writes dW (no zero fill: one pass over V×D saved); nothing to write when N = 0
        new_dw = torch.empty if self.n else torch.zeros
        self.dw = new_dw(w.shape, dtype=acc_w, device=dev) if self.need_w else None
        self.db = torch.zeros(self.vocab, dtype=self.cdt, device=dev) if self.need_b else None
        eps = smoothing if grads and not self.single_block else 0.0  # the factored gradient's ε (0: comes finished)
        class_weight_local = shard_weight(class_weight, self.vocab_start, self.vocab, self.cdt)
        self.class_weight_local = (torch.ones(self.vocab, dtype=self.cdt, device=dev) if class_weight_local is None
                                   else class_weight_local)  # fmt: skip
        # smoothing's −ε w_c / C term, summed over rows: Σ_i γ_i x_i (for dW) and Σ_i γ_i (for db), applied once
        self.smooth_x = torch.zeros(self.dim, dtype=self.cdt, device=dev) if eps and self.need_w else None
        self.smooth_sum = torch.zeros((), dtype=self.cdt, device=dev) if eps and self.need_b else None
        self.smooth_dx = [self._class_weighted_rows(p) for p in self.pieces] if eps and self.need_x else None

    def row_blocks(self):
        rows = max(1, min(self.plan.rows, self.n))
        return [(r, min(r + rows, self.n)) for r in range(0, self.n, rows)]

    def logits(self, r0, r1, piece):
        """The raw logits of rows [r0, r1) and the piece's columns, in the block buffer (compute dtype; the 16-bit
        block itself with ``half_block``)."""
        p0, p1 = piece
        shape = (r1 - r0, p1 - p0)
        dst = self.buf_in if self.buf_in is not None else self.buf
        dst = dst[: math.prod(shape)].view(shape)
        out = dst if self.buf is None else self.buf[: math.prod(shape)].view(shape)
        x_blk, w_p = self.x[r0:r1], self.linear_weight[p0:p1]
        if self.linear_bias is None:
            torch.mm(x_blk, w_p.T, out=dst)
        else:
            torch.addmm(self.linear_bias[p0:p1], x_blk, w_p.T, out=dst)
        if dst is not out:
            out.copy_(dst)
        return out

    def pieces_grad(self, r0, r1, block_grad):
        """Gradients of rows [r0, r1) over every piece: the logits recomputed per piece, turned into the block's
        gradient by the step ``block_grad(q, vocab_start) -> GradFactors`` (it needs only the global row stats)."""
        for k, piece in enumerate(self.pieces):
            q = self.logits(r0, r1, piece)
            self.add_block_grad(q, block_grad(q, self.vocab_start + piece[0]), r0, r1, piece, first=k == 0)

    def add_block_grad(self, q, f: GradFactors, r0, r1, piece, first):
        """Add the block's share of dX, dW, db; G = diag(scale) Q − target_coef ⊙ onehot − smooth_coef ⊗ w."""
        p0, p1 = piece
        _, t_col = local_targets(self.target[r0:r1], self.vocab_start + p0, p1 - p0)
        x_blk = self.x[r0:r1]
        q_in = q
        if self.buf_in is not None and q.dtype == self.cdt:  # 16-bit input: diag(scale) Q, rounded once for the 16-bit products
            if f.scale is not None:  # (an fp32 multiply in place and a cast: a mixed-dtype mul is ~5× slower)
                q.mul_(f.scale.unsqueeze(-1))
                f = f._replace(scale=None)
            q_in = self.buf_in[: q.numel()].view(q.shape).copy_(q)
        if self.need_x:
            self._add_dx(q_in, f, r0, r1, piece, t_col, first)
        if self.need_w:
            x_c = x_blk.to(self.cdt)
            dw = self.dw[p0:p1]
            if self.half_dw and dw.dtype == self.cdt:
                self._add_half_dw(q_in, x_blk, dw, r0 == 0)
            elif dw.dtype == self.cdt:  # the product in the compute dtype, from the unrounded Q
                xs = x_c if f.scale is None else x_c * f.scale.unsqueeze(-1)  # dW += Qᵀ (diag(scale) X)
                self._add_product(dw, q.T, xs, r0 == 0)
            else:  # 16-bit products summed in the weight's dtype ("weight"; or the one block's product)
                self._add_product(dw, q_in.T, x_blk, r0 == 0)
            if f.target_coef is not None:  # dW[t_i] −= target_coef_i x_i
                dw.index_add_(0, t_col, (x_c * f.target_coef.unsqueeze(-1)).to(dw.dtype), alpha=-1)
            if f.smooth_coef is not None and first:  # the same γ for every piece: count each row once
                self.smooth_x.addmv_(x_c.T, f.smooth_coef)
        if self.need_b:
            db = self.db[p0:p1]
            if f.scale is None:
                db.add_(q.sum(0, dtype=self.cdt))
            else:
                db.addmv_(q.T, f.scale)
            if f.target_coef is not None:
                db.index_add_(0, t_col, f.target_coef, alpha=-1)
            if f.smooth_coef is not None and first:
                self.smooth_sum.add_(f.smooth_coef.sum())
        if self.need_x and p1 == self.vocab and self.dx_blk is not None:  # the block's dX rows are complete
            self.dx[r0:r1].copy_(self.dx_blk[: r1 - r0])

    @staticmethod
    def _add_product(out, a, b, first):
        """``out = a b`` for the first row block, else ``out += a b``."""
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)

    def _add_half_dw(self, q_in, x_blk, dw, first):
        """``dW (+)= Q_16ᵀ X_16`` with 16-bit products (fp32 accumulation inside the GEMM, the result rounded to
        16 bits once per block and slice) summed into the fp32 ``dw``, ``dw_slice`` vocabulary rows at a time."""
        for s0 in range(0, dw.shape[0], self.dw_slice):
            s1 = min(s0 + self.dw_slice, dw.shape[0])
            part = torch.mm(q_in[:, s0:s1].T, x_blk, out=self.dw_part[: s1 - s0])
            if first:
                dw[s0:s1].copy_(part)
            else:
                dw[s0:s1].add_(part)

    def _add_dx(self, q_in, f, r0, r1, piece, t_col, first):
        """dX_blk (+)= diag(scale) (Q W) − target_coef ⊙ W[t] − smooth_coef ⊗ (wᵀ W)."""
        p0, p1 = piece
        w_p = self.linear_weight[p0:p1]
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
            out.addmv_(self.linear_weight[s:e].to(self.cdt).T, self.class_weight_local[s:e])
        return out

    def finish(self) -> LinearGrads:
        """Apply the once-per-call smoothing terms and cast the sums to each parameter's dtype."""
        dw = db = None
        if self.need_w:
            if self.smooth_x is not None:  # dW −= w ⊗ Σ_i γ_i x_i
                self.dw.addr_(self.class_weight_local.to(self.dw.dtype), self.smooth_x.to(self.dw.dtype), alpha=-1)
            dw = self.dw if self.dw.dtype == self.grad_dtypes[1] else self.dw.to(self.grad_dtypes[1])
            self.dw = None
        if self.need_b:
            if self.smooth_sum is not None:
                self.db.sub_(self.class_weight_local * self.smooth_sum)
            db = self.db.to(self.grad_dtypes[2])
        return LinearGrads(self.dx, dw, db)
