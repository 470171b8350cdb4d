"""The fused linear distillation's loop: student and teacher logits block by block, the student's gradients.

Fused: per block of token rows (and of vocabulary columns), both heads' logits products, the divergence and the
student's gradient (``distill_rows``), then the student's dX/dW/db products.
Never materialized: the (N, V) logits of either head, p, q, m or their gradient; one block of each at a time.
Written in place: only the block buffers (ours): the student's becomes the block's finished gradient G.

With X (N, D_s), W (V, D_s), b the student's head, X_t (N, D_t), W_t (V, D_t), b_t the teacher's:
``Z = X Wᵀ + b``, ``Z_t = X_t W_tᵀ + b_t``, and per block ``dX_blk = G W``, ``dW += Gᵀ X_blk``, ``db += Σ_i G_i``
(the teacher gets no gradient). The buffers, products and epilogues are the fused linear CE's
(``linear_loop._Workspace``, one for each head, sharing one block plan); the distillation step writes the
finished G (``GradFactors(None, None, None)``). Passes per block:

- whole rows, one process: both logits products, :func:`distill_rows.block_step_`, the dX and dW products —
  4 products per block (the floor: teacher forward, student forward and its two gradient products);
- vocabulary pieces or vocab-parallel ranks: (1) per piece the logits and :func:`distill_rows.piece_stats`,
  combined over the pieces and the ranks (the stats hook: O(rows) numbers); (2) per piece the logits again
  and the divergence's row sums (and for β = 0 the gradient), summed over pieces and ranks (the sums hook);
  (3) for β > 0 the logits once more and the gradient, which needs the global row sums.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from crossent._options import DistillRowOptions
from crossent._precision import compute_dtype
from crossent.kernels import cpu_rows, scratch
from crossent.kernels.distill_rows import (
    Scratch,
    block_step_,
    piece_loss,
    piece_stats,
    piece_step_,
    scratch_blocks,
)
from crossent.kernels.linear_loop import (
    GradNeeds,
    LinearGrads,
    LoopArgs,
    _kept_rows,
    _rows_of,
    _scattered,
    _Workspace,
    half_blocks,
)
from crossent.kernels.linear_plan import ChunkPlan, check_memory_budget, plan_chunks
from crossent.kernels.linear_step import FINISHED
from crossent.kernels.shard import VocabShard
from crossent.kernels.torch_rows import RowStats, combine_stats


class DistillHooks(NamedTuple):
    """Vocab-parallel combines, called once per block of rows on every rank: this rank's piece stats (``distill_rows``: a ``RowStats`` of (k, rows) sums)
    → the global ones, and this rank's divergence row sums → their sum over the ranks (None: one process)."""

    stats: Optional[Callable[[RowStats], RowStats]] = None
    sums: Optional[Callable[[Tensor], Tensor]] = None


def block_count(opts: DistillRowOptions, grads: bool) -> int:
    """Block-sized buffers one block of rows holds: the two heads' logits and the step's scratch."""
    return 2 + scratch_blocks(opts, grads)


def check_distill_budget(num_rows, dim, vocab, dtype, opts: DistillRowOptions, chunk_size, memory_budget) -> None:
    """:func:`linear_plan.check_memory_budget` for the share of the budget one of the ``block_count`` blocks gets.

    Raises:
        ValueError: a budget that cannot hold one full-vocabulary row of every block.
    """
    if memory_budget is None:
        return
    blocks = block_count(opts, True)
    try:
        check_memory_budget(num_rows, dim, vocab, dtype, chunk_size, memory_budget // blocks)
    except ValueError as e:
        raise ValueError(f"memory_budget={memory_budget} bytes is shared by {blocks} block buffers here (both "
                         f"heads' logits and the step's scratch), {memory_budget // blocks} bytes each: {e}") from None


def plan(x: Tensor, dim: int, vocab: int, opts: DistillRowOptions, loop: LoopArgs, grads: bool, c_step: bool = False,
         half: bool = False, dw_spared: int = 0) -> ChunkPlan:  # fmt: skip
    """The block shape: :func:`linear_plan.plan_chunks` for one block with 1 / ``block_count`` of an explicit
    ``memory_budget``, or by default the fused CE's default budget (``default_memory_budget``) for each block,
    ``dim`` the larger hidden size of the two heads. Why not share the default: blocks of a third the rows run
    the four products ~10% slower on the CPU (measured at (4096, 1024, 32768): 1.22× the floor at ~330 rows,
    1.11× at ~1000; docs/benchmarks.md, "Distillation"), and the scratch stays far below the recipe's.
    ``c_step``: whole-row blocks go to the C step (no scratch blocks); ``half``: and they stay 16-bit (2 bytes per
    logit; one block of rows may use the ``dw_spared`` bytes of the fp32 dW sum it does without, as the fused
    CE's plan). ``chunk_size`` alone fixes the rows and keeps the vocabulary whole, as in the fused CE."""
    blocks = 2 if c_step else block_count(opts, grads)
    share = None if loop.memory_budget is None else loop.memory_budget // blocks  # None: the default, per block
    return plan_chunks(x.shape[0], dim, vocab, x.dtype, x.device, loop.chunk_size, share, fp32_block=not half,
                       one_block_spares=dw_spared // blocks)  # fmt: skip


@scratch.reused
def linear_distill(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    teacher_input: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Optional[Tensor],
    target: Optional[Tensor],
    opts: DistillRowOptions,
    loop: LoopArgs,
    *,
    grad_scale: Optional[Tensor] = None,
    needs: GradNeeds = GradNeeds(),
    shard: Optional[VocabShard] = None,
    hooks: DistillHooks = DistillHooks(),
    step: Callable[..., Tensor] = block_step_,
) -> Tuple[Tensor, LinearGrads]:
    """Per-row loss (N,) in the compute dtype and, with ``grad_scale`` (() or (N,): the upstream gradient per
    row), the student's gradients (those ``needs`` asks for; None elsewhere).

    ``input`` (N, D_s), ``linear_weight`` (V_local, D_s), ``teacher_input`` (N, D_t), ``teacher_weight``
    (V_local, D_t), biases None or (V_local,), ``target`` None or (N,) int64 (rows equal to ``ignore_index`` are
    dropped before the products). With a vocabulary ``shard`` and ``hooks`` (vocab-parallel), dX is this rank's
    share (sum it over the ranks) and dW, db this rank's rows. ``step``: the whole-row block step
    (:func:`distill_rows.block_step_`, or Triton's with the same contract); pieces always run the torch passes.
    """
    n = input.shape[0]
    keep = None if target is None else _kept_rows(target, opts.ignore_index, loop.skip_ignored)
    if keep is not None:  # the rows that count, then their results put back in place
        loss, grads = linear_distill(
            input[keep], linear_weight, linear_bias, teacher_input[keep], teacher_weight, teacher_bias, target[keep],
            opts, loop._replace(skip_ignored=False), grad_scale=_rows_of(grad_scale, keep, n), needs=needs,
            shard=shard, hooks=hooks, step=step,
        )  # fmt: skip
        return _scattered(loss, keep, n, 0.0), grads._replace(input=_scattered(grads.input, keep, n, 0.0))
    grads = grad_scale is not None
    vocab = loop.plan_vocab or linear_weight.shape[0]
    c_step = _c_step(input, linear_weight, teacher_input, opts, shard, hooks, step)
    half = c_step and half_blocks(input, linear_weight, opts, loop, shard, None, True)
    fp32_dw = half and grads and needs.need_weight and loop.accumulate == "float32"
    dim = max(input.shape[1], teacher_input.shape[1])
    block_plan = plan(input, dim, vocab, opts, loop, grads, c_step, half, linear_weight.numel() * 4 if fp32_dw else 0)
    if c_step and block_plan.cols < vocab:  # the C step takes whole rows: a vocabulary split plans again
        c_step = half = False
        block_plan = plan(input, dim, vocab, opts, loop, grads)
    labels = target if target is not None else torch.zeros(n, dtype=torch.int64, device=input.device)
    student = _Workspace(input, linear_weight, linear_bias, labels, None, 0.0, loop, needs, shard, grads,
                         plan=block_plan, half_block=half)  # fmt: skip
    teacher = _Workspace(teacher_input, teacher_weight, teacher_bias, labels, None, 0.0, loop,
                         GradNeeds(False, False, False), shard, False, plan=block_plan, half_block=half)  # fmt: skip
    width = student.pieces[0][1] - student.pieces[0][0]
    rows = max(1, min(block_plan.rows, n))
    n_bufs = 0 if c_step else scratch_blocks(opts, grads)  # the C step needs no scratch
    bufs = [torch.empty(rows * width, dtype=student.cdt, device=input.device) for _ in range(n_bufs)]
    loss = torch.empty(n, dtype=compute_dtype(input.dtype), device=input.device)
    g_rows = None if grad_scale is None else grad_scale.to(student.cdt).expand(n)
    for r0, r1 in student.row_blocks():
        t_blk = None if target is None else target[r0:r1]
        g = None if g_rows is None else g_rows[r0:r1]
        if len(student.pieces) == 1 and hooks.stats is None:
            piece = student.pieces[0]
            s, t = student.logits(r0, r1, piece), teacher.logits(r0, r1, piece)
            loss[r0:r1] = step(s, t, t_blk, g, opts, None if c_step else _scratch(bufs, s.shape, opts, grads))
            if g is not None:
                student.add_block_grad(s, FINISHED, r0, r1, piece, first=True)
            continue
        loss[r0:r1] = _pieces(student, teacher, r0, r1, t_blk, g, opts, bufs, hooks)
    return loss, student.finish()


def _c_step(x, w, x_t, opts: DistillRowOptions, shard, hooks: DistillHooks, step) -> bool:
    """Whether whole-row blocks go to the C step (:func:`cpu_rows.distill`, through ``block_step_``): options and
    the blocks' dtype it covers (:func:`cpu_rows.covers_distill_options`: the blocks are the compute dtype's, or
    16-bit where ``half_blocks`` keeps them so), both heads in one dtype, no vocabulary shard or stats hook."""
    whole = shard is None or (shard.vocab_start == 0 and shard.num_classes == w.shape[0])
    return (step is block_step_ and whole and hooks.stats is None and x_t.dtype == x.dtype
            and cpu_rows.covers_distill_options(opts, x.device, compute_dtype(x.dtype)))  # fmt: skip


def _scratch(bufs, shape, opts, grads) -> Scratch:
    """The scratch blocks as views of ``shape``."""
    numel = shape[0] * shape[1]
    return Scratch.of([b[:numel].view(shape) for b in bufs], opts, grads)


def _pieces(student, teacher, r0, r1, target, g, opts: DistillRowOptions, bufs, hooks: DistillHooks) -> Tensor:
    """Rows [r0, r1) over vocabulary pieces (or a vocab-parallel rank's columns): the passes of the module doc."""

    def blocks(piece):
        return student.logits(r0, r1, piece), teacher.logits(r0, r1, piece)

    parts = []
    for piece in student.pieces:
        s, t = blocks(piece)
        parts.append(piece_stats(s, t, target, opts, student.vocab_start + piece[0], _scratch(bufs, s.shape, opts, False).term))
    stats = parts[0] if len(parts) == 1 else combine_stats(parts)
    stats = stats if hooks.stats is None else hooks.stats(stats)
    lse = stats.lse()
    grad_now = g is not None and opts.beta == 0.0  # KL(p ‖ q)'s gradient needs only the log-sum-exps
    sums = 0
    for k, piece in enumerate(student.pieces):
        s, t = blocks(piece)
        scratch = _scratch(bufs, s.shape, opts, grad_now)
        sums = sums + piece_step_(s, t, target, lse, opts, scratch, student.vocab_start + piece[0], g if grad_now else None)
        if grad_now:
            student.add_block_grad(s, FINISHED, r0, r1, piece, first=k == 0)
    sums = sums if hooks.sums is None else hooks.sums(sums)
    if g is not None and not grad_now:
        for k, piece in enumerate(student.pieces):
            s, t = blocks(piece)
            piece_step_(s, t, target, lse, opts, _scratch(bufs, s.shape, opts, True), student.vocab_start + piece[0],
                        g, sums)  # fmt: skip
            student.add_block_grad(s, FINISHED, r0, r1, piece, first=k == 0)
    return piece_loss(stats, lse, sums, target, opts)
