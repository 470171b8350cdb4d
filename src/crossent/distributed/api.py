r"""Vocab-parallel cross-entropy over ``torch.distributed``: pure shard math plus thin communication.

Each rank of a process group holds a contiguous slice ``[v_r, v_r + V_r)`` of the ``C`` classes (the
slices may be unequal). Per position, rank ``r`` computes from its slice alone (the shard kernels of
:mod:`crossent.kernels.torch_rows`) ::

    m_r = max_c z_c,   s_r = Σ_c exp(z_c − m_r),   t_r = z_t if t ∈ slice else 0,   d_r = Σ_c w_c z_c

and the ranks combine them exactly as the single-process chunk combine does::

    M = max_r m_r                                  (all-reduce MAX)
    S, z_t, d = Σ_r (s_r exp(m_r − M), t_r, d_r)    (ONE all-reduce SUM of the packed rows)
    lse = M + log S

after which every rank holds the full per-position loss and LSE. The backward is local: each rank's
gradient columns are ``g · ∂loss/∂z_c`` from the global LSE (``shard_backward``), no communication.

Communication per step (N positions, b bytes per element of the compute dtype: 4 for 16/32-bit
logits, 8 for float64; P ranks):

    metadata   one all-gather of 10 int64 (checks + shard offsets): 80 bytes sent, 80·P received
    forward    N·b (max) + k·N·b (sum), k = 2, or 3 with label smoothing: 12·N to 16·N bytes in fp32
    backward   nothing (logits version); the fused linear version adds one all-reduce SUM of the
               input gradient, N·D elements in the input's dtype

versus N·V elements if the logits were gathered. These are the payloads each rank contributes; a ring
all-reduce sends and receives about 2(P − 1)/P times the payload per rank.

Bad input raises on *every* rank, never hangs (:mod:`crossent.distributed.agreement`). Both functions run the
same autograd Functions and custom ops as one process does (``crossent.functional``); the shard they pass
(:class:`~crossent.kernels.shard.VocabShard`, naming the process group) is the only difference, and the
cross-rank combine (:mod:`crossent.kernels.collectives`) the only communication.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from crossent._checks import (
    check_distill_linear,
    check_index_target,
    check_linear,
    check_logits,
    check_token_index,
    check_weight,
    class_indices,
)
from crossent._options import (
    AccumulateDtype,
    CrossEntropyOptions,
    DistillOptions,
    Impl,
    LinearLogProbOptions,
    LinearOptions,
    LogProbOptions,
    Reduction,
)
from crossent._results import TokenLogProbs
from crossent.distributed.agreement import agree, check_vocab_start, device_of
from crossent.functional import LossOrStats, autocast_operands, classes_last_cross_entropy, rows_linear_cross_entropy
from crossent.functional_distill import rows_linear_distill
from crossent.functional_log_probs import rows_linear_token_log_probs, rows_token_log_probs
from crossent.kernels.shard import VocabShard

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_token_log_probs",
    "vocab_parallel_linear_token_log_probs",
    "vocab_parallel_linear_distill_loss",
]


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    impl: Impl = "auto",
    return_stats: bool = False,
) -> LossOrStats:
    r"""Cross-entropy of logits whose vocabulary is split over the ranks of ``group``.

    Equals :func:`crossent.cross_entropy` of the concatenated logits (class dim last), class-index
    targets, with every option; every rank returns the full loss, and each rank's logits receive their
    own columns of the gradient. Per position with ``lse = log Σ_c exp(z_c)`` over all C classes::

        loss = w_t (1 − ε)(lse − z_t) + (ε / C) Σ_c w_c (lse − z_c) + s w_t lse²

    (``C`` the global vocabulary size; ``softcap = κ`` first maps ``z ← κ tanh(z / κ)``). ``"mean"``
    divides by ``Σ w_t`` over non-ignored positions; a mean over zero weight is 0.

    Communication: one all-gather of 10 int64 per rank (checks, offsets), one all-reduce MAX of N
    elements and one all-reduce SUM of 2N (3N with label smoothing) elements of the compute dtype
    (fp32, or fp64 for fp64 logits); none in backward. See ``docs/distributed.md``.

    Args:
        logits: this rank's slice ``(..., V_local)``, any floating dtype; ranks may have unequal V_local.
        target: ``(...)`` integer GLOBAL class ids in [0, C) or ``ignore_index``; the same on every rank.
        group: the process group over which the vocabulary is split (default: the world).
        vocab_start: this rank's first global class. None: the slices lie in rank order and the offsets
            come from all ranks' V_local. Given: on every rank, the slices must tile [0, C).
        weight: optional FULL ``(C,)`` class weights, the same on every rank (no gradient).
        ignore_index, reduction, label_smoothing, z_loss, softcap, impl, return_stats: as in
            :func:`crossent.cross_entropy` (``impl="triton"``: this rank's row statistics and gradient columns
            run the torch kernels, since a shard's statistics need the other ranks; the custom ops and
            autograd Function are the single-process ones).

    Returns:
        Tensor: ``()`` for ``"mean"``/``"sum"``, the target's shape for ``"none"``; fp32 (fp64 for
        fp64 logits); identical on every rank. With ``return_stats=True``: :class:`crossent.CrossEntropyStats`,
        its ``lse`` the full rows' log-sum-exp (every rank's columns).

    Raises:
        ValueError/TypeError on every rank (never a hang) for: a bad argument on any rank, shards that
        don't tile [0, C), ranks disagreeing on shapes/dtype/options, a target outside [0, C).
        RuntimeError: torch.distributed is not initialized.

    Example (on each of two ranks, rank r holding classes [3r, 3r + 3) of 6)::

        >>> logits = full_logits[:, 3 * rank : 3 * rank + 3].requires_grad_()  # doctest: +SKIP
        >>> loss = vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1)  # doctest: +SKIP
        >>> loss.backward()  # logits.grad: this rank's columns of the full gradient  # doctest: +SKIP
    """
    fn = "vocab_parallel_cross_entropy"
    opts_box = []

    def check_and_describe():
        opts = CrossEntropyOptions.build(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, impl=impl, return_stats=return_stats,
        )  # fmt: skip
        opts_box.append(opts)
        check_logits("logits", logits)
        check_index_target(target, logits.shape[:-1], logits.device)
        check_vocab_start(vocab_start)
        check_weight(weight, None, logits.device)
        return dict(vocab_size=logits.shape[-1], vocab_start=vocab_start, rows=target.numel(),
                    shapes=tuple(logits.shape[:-1]), dtypes=(str(logits.dtype), str(target.dtype)),
                    options=(opts, weight is None), weight=weight, target=target)  # fmt: skip

    agreed = agree(fn, group, device_of(logits), ignore_index, check_and_describe)
    shard = VocabShard(agreed.vocab_start, agreed.num_classes, _group_name(group))
    return classes_last_cross_entropy(logits, class_indices(target), weight, "index", opts_box[0], shard)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    accumulate_dtype: AccumulateDtype = "float32",
    impl: Impl = "auto",
    return_stats: bool = False,
    logit_scale: Optional[float] = None,
) -> LossOrStats:
    r"""Fused ``cross_entropy(input @ Wᵀ + b, target)`` with the vocabulary rows of W split over the ranks.

    Equals single-process :func:`crossent.linear_cross_entropy` with the full head (``W_full`` stacking
    every rank's ``linear_weight`` in vocabulary order), i.e. ``crossent.cross_entropy(F.linear(input,
    W_full, b_full), target, ...)``, class dim last. It runs the same chunk loops
    (:mod:`crossent.kernels.linear_loop`) on each rank's rows, with the cross-rank all-reduces as their
    per-block stats hook: the N × V_local logits are never held. The token blocks are planned from the
    widest shard, so every rank makes the same number of combines. With ``"mean"``/``"sum"`` the
    gradients are formed during forward (3 products per block, 6·N·D·V_local FLOPs per rank) and scaled
    in backward; with ``"none"`` backward recomputes the logits (4 products).

    Gradients: ``input`` gets the FULL gradient on every rank (each rank's share ``G_r W_r`` summed by
    one all-reduce); ``linear_weight`` and ``linear_bias`` get this rank's rows, no communication.

    Communication per step: the metadata all-gather; per token block one all-reduce MAX and one SUM of
    the block's rows — N + 2N (3N with label smoothing) elements of the stats dtype (fp32; fp64 for fp64
    input) in all; in backward N·D elements of the input's dtype (when ``input`` requires grad) —
    against N·V for gathering the logits. See ``docs/distributed.md``.

    Args:
        input: ``(..., D)`` floating, the same on every rank (replicated hidden states).
        linear_weight: this rank's ``(V_local, D)`` rows of the output projection, input's dtype/device.
        target: ``(...)`` integer global class ids (``input.shape[:-1]``), the same on every rank.
        linear_bias: this rank's ``(V_local,)`` bias, or None (None on every rank, or on none).
        group, vocab_start, weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in
            :func:`vocab_parallel_cross_entropy`.
        chunk_size, memory_budget, accumulate_dtype, impl, return_stats, logit_scale: as in
            :func:`crossent.linear_cross_entropy`; the same on every rank (the budget is applied to the widest
            shard; ``impl="triton"`` runs the torch chunk step on shards, whose statistics need the other ranks).

    Returns:
        Tensor: ``()`` for ``"mean"``/``"sum"``, ``input.shape[:-1]`` for ``"none"``; fp32 (fp64 for
        fp64 input); identical on every rank. Every rank must call backward (it holds a collective).

    Raises:
        ValueError/TypeError on every rank as :func:`vocab_parallel_cross_entropy`, also for a D that
        differs between input and linear_weight, a bias of the wrong size, bad chunk_size/memory_budget,
        ranks that disagree on which tensors require grad.

    Example (on each of two ranks, rank r holding rows [3r, 3r + 3) of a 6-row head)::

        >>> w_local = head.weight[3 * rank : 3 * rank + 3].detach().requires_grad_()  # doctest: +SKIP
        >>> loss = vocab_parallel_linear_cross_entropy(hidden, w_local, target)  # doctest: +SKIP
        >>> loss.backward()  # hidden.grad full on every rank; w_local.grad this rank's rows  # doctest: +SKIP
    """
    fn = "vocab_parallel_linear_cross_entropy"
    opts_box, operands = [], []

    def check_and_describe():
        opts = LinearOptions.build(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, chunk_size=chunk_size, memory_budget=memory_budget, accumulate_dtype=accumulate_dtype,
            impl=impl, return_stats=return_stats, logit_scale=logit_scale,
        )  # fmt: skip
        opts_box.append(opts)
        operands.extend(autocast_operands(input, linear_weight, linear_bias))
        check_linear(*operands[:2], target, operands[2])  # the single-process checks, as they are
        check_vocab_start(vocab_start)
        check_weight(weight, None, input.device)
        # what needs a gradient decides the collectives (per-block combines, dX's all-reduce): all ranks alike
        needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad
                      for t in (input, linear_weight, linear_bias))  # fmt: skip
        return dict(vocab_size=linear_weight.shape[0], vocab_start=vocab_start, rows=target.numel(),
                    shapes=tuple(input.shape), dtypes=(str(operands[0].dtype), str(target.dtype)),
                    options=(opts, weight is None, linear_bias is None, needs), weight=weight, target=target)  # fmt: skip

    agreed = agree(fn, group, device_of(input), ignore_index, check_and_describe)
    shard = VocabShard(agreed.vocab_start, agreed.num_classes, _group_name(group))
    # planned from the widest shard and the shared N, D, dtype: the same token blocks on every rank
    input, linear_weight, linear_bias = operands
    return rows_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, opts_box[0], shard,
                                     plan_vocab=agreed.widest)  # fmt: skip


def vocab_parallel_token_log_probs(
    logits: Tensor,
    index: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = False,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    is_top1: bool = False,
    softcap: Optional[float] = None,
    impl: Impl = "auto",
) -> TokenLogProbs:
    r""":func:`crossent.token_log_probs` of logits whose vocabulary is split over the ranks of ``group``.

    Equals the single-process call on the concatenated logits; every rank returns the full
    :class:`crossent.TokenLogProbs`, and each rank's logits receive their own columns of the gradient. Per row,
    rank ``r`` reports its shard's max ``m_r``, ``s_r = Σ exp(x − m_r)``, ``d_r = Σ exp(x − m_r)(x − m_r)`` (with
    ``entropy``) and its ids' logits; they combine as ``M = max_r m_r``, ``S = Σ_r a_r s_r``,
    ``D = Σ_r a_r (d_r + (m_r − M) s_r)`` (``a_r = exp(m_r − M)``), ``lse = M + log S``, ``H = log S − D / S``;
    ``log Σ p²`` from ``Q = Σ_r a_r² q_r``, the mean logit from the sum of ``Σ x``, and top-1 from each shard's max
    and first argmax, combined by max (docs/math.md): ties go to the lowest global column, as in one process.

    Communication: the metadata all-gather; one all-reduce MAX of N elements (N·(2K + 2) with ``is_top1``) and one
    all-reduce SUM of (K + 1)·N elements of the compute dtype, plus N for each of ``entropy``,
    ``log_sum_sq_probs`` and ``mean_logits``; none in backward.

    Args:
        logits: this rank's slice ``(..., V_local)``; ranks may have unequal V_local.
        index: ``(...)`` or ``(..., K)`` GLOBAL ids in [0, C) or ``ignore_index``; the same on every rank.
        group, vocab_start: as in :func:`vocab_parallel_cross_entropy`.
        temperature, ignore_index, entropy, log_sum_sq_probs, mean_logits, is_top1, softcap, impl: as in
            :func:`crossent.token_log_probs` (``impl="triton"`` runs this rank's statistics in torch ops, as the
            cross-entropy's).

    Returns:
        :class:`crossent.TokenLogProbs`, identical on every rank.

    Raises:
        ValueError/TypeError on every rank (never a hang), as :func:`vocab_parallel_cross_entropy`.
        RuntimeError: torch.distributed is not initialized; a torch.func transform or double backward.
    """
    opts_box = []

    def check_and_describe():
        opts = LogProbOptions.build(temperature=temperature, ignore_index=ignore_index, entropy=entropy,
                                    log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1,
                                    softcap=softcap, impl=impl)  # fmt: skip
        opts_box.append(opts)
        check_logits("logits", logits)
        check_token_index(index, logits.shape[:-1], logits.device)
        check_vocab_start(vocab_start)
        return dict(vocab_size=logits.shape[-1], vocab_start=vocab_start, rows=index.numel(),
                    shapes=(tuple(logits.shape[:-1]), tuple(index.shape)), dtypes=(str(logits.dtype), str(index.dtype)),
                    options=opts, weight=None, target=index)  # fmt: skip

    agreed = agree("vocab_parallel_token_log_probs", group, device_of(logits), ignore_index, check_and_describe)
    shard = VocabShard(agreed.vocab_start, agreed.num_classes, _group_name(group))
    return rows_token_log_probs(logits, index, opts_box[0], shard)


def vocab_parallel_linear_token_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    index: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = False,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    is_top1: bool = False,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    accumulate_dtype: AccumulateDtype = "float32",
    impl: Impl = "auto",
) -> TokenLogProbs:
    r"""Fused :func:`crossent.linear_token_log_probs` with the vocabulary rows of W split over the ranks.

    Equals the single-process call with the full head (every rank's ``linear_weight`` stacked in vocabulary
    order). Each rank runs the fused loops on its rows, the per-block statistics combined across ranks as in
    :func:`vocab_parallel_token_log_probs`; the N × V_local logits are never held. Backward recomputes the logits
    (4 products per block in all) and needs no communication but the sum of dX.

    Gradients: ``input`` gets the FULL gradient on every rank (one all-reduce of N·D); ``linear_weight`` and
    ``linear_bias`` get this rank's rows.

    Args:
        input: ``(..., D)``, the same on every rank. linear_weight: this rank's ``(V_local, D)`` rows.
        index: ``input.shape[:-1]`` or ``input.shape[:-1] + (K,)`` global ids, the same on every rank.
        linear_bias: this rank's ``(V_local,)`` bias, or None (on every rank).
        group, vocab_start: as in :func:`vocab_parallel_cross_entropy`.
        temperature, ignore_index, entropy, log_sum_sq_probs, mean_logits, is_top1, softcap, chunk_size,
            memory_budget, accumulate_dtype, impl: as in :func:`crossent.linear_token_log_probs`; the same on every
            rank.

    Returns:
        :class:`crossent.TokenLogProbs`, identical on every rank. Every rank must call backward.

    Raises:
        ValueError/TypeError on every rank, as :func:`vocab_parallel_linear_cross_entropy`.
    """
    opts_box, operands = [], []

    def check_and_describe():
        opts = LinearLogProbOptions.build(
            temperature=temperature, ignore_index=ignore_index, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
            mean_logits=mean_logits, is_top1=is_top1, softcap=softcap, chunk_size=chunk_size,
            memory_budget=memory_budget, accumulate_dtype=accumulate_dtype, impl=impl,
        )  # fmt: skip
        opts_box.append(opts)
        operands.extend(autocast_operands(input, linear_weight, linear_bias))
        check_linear(*operands[:2], index, operands[2], check_target=check_token_index)
        check_vocab_start(vocab_start)
        needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad
                      for t in (input, linear_weight, linear_bias))  # fmt: skip
        return dict(vocab_size=linear_weight.shape[0], vocab_start=vocab_start, rows=index.numel(),
                    shapes=(tuple(input.shape), tuple(index.shape)), dtypes=(str(operands[0].dtype), str(index.dtype)),
                    options=(opts, linear_bias is None, needs), weight=None, target=index)  # fmt: skip

    agreed = agree("vocab_parallel_linear_token_log_probs", group, device_of(input), ignore_index, check_and_describe)
    shard = VocabShard(agreed.vocab_start, agreed.num_classes, _group_name(group))
    input, linear_weight, linear_bias = operands
    return rows_linear_token_log_probs(input, linear_weight, index, linear_bias, opts_box[0], shard,
                                       plan_vocab=agreed.widest)  # fmt: skip


def vocab_parallel_linear_distill_loss(
    input: Tensor,
    linear_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    target: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    hard_weight: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    accumulate_dtype: AccumulateDtype = "float32",
    impl: Impl = "auto",
) -> Tensor:
    r"""Fused distillation (:func:`crossent.linear_distill_loss`) with both heads' vocabulary rows split over the
    ranks of ``group`` the same way: rank r holds rows ``[v_r, v_r + V_r)`` of the student's ``linear_weight``
    and of the teacher's ``teacher_weight`` (and biases).

    Equals single-process :func:`crossent.linear_distill_loss` with the full heads. Per block of token rows the
    ranks combine O(rows) numbers (docs/distillation.md, "Vocab-parallel"): one all-reduce MAX of the 2–3 row
    maxima, one SUM of the rescaled sums of exponentials and the hard loss's target logit, one SUM of the 1–2
    divergence row sums; each rank computes its columns' logits, divergence terms and gradient columns. The
    blocks take 2 passes over this rank's columns (β = 0) or 3 (β > 0: the gradient needs the row's divergence).

    Gradients: ``input`` gets the FULL gradient on every rank (the ranks' shares summed by one all-reduce);
    ``linear_weight`` and ``linear_bias`` this rank's rows; the teacher's tensors none.

    Args:
        input, teacher_input: ``(..., D_s)``, ``(..., D_t)``, the same on every rank (replicated hidden states).
        linear_weight, teacher_weight: this rank's ``(V_local, D_s)`` and ``(V_local, D_t)`` rows.
        linear_bias, teacher_bias: this rank's ``(V_local,)`` rows, or None (on every rank alike).
        group, vocab_start: as in :func:`vocab_parallel_linear_cross_entropy`.
        beta, temperature, target, ignore_index, reduction, hard_weight, softcap, chunk_size, memory_budget,
            accumulate_dtype, impl: as in :func:`crossent.linear_distill_loss` (the same on every rank).

    Returns:
        Tensor: as :func:`crossent.linear_distill_loss`, identical on every rank. Every rank must call backward.

    Raises:
        ValueError/TypeError on every rank (never a hang) for a bad argument on any rank, shards that do not
        tile the vocabulary, ranks that disagree on shapes, dtypes or options.
    """
    fn = "vocab_parallel_linear_distill_loss"
    opts_box, operands = [], []

    def check_and_describe():
        opts = DistillOptions.build(
            beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
            hard_weight=hard_weight, softcap=softcap, chunk_size=chunk_size, memory_budget=memory_budget,
            accumulate_dtype=accumulate_dtype, impl=impl,
        )  # fmt: skip
        opts_box.append(opts)
        operands.extend(autocast_operands(input, linear_weight, linear_bias))
        operands.extend(autocast_operands(teacher_input, teacher_weight, teacher_bias))
        check_distill_linear(*operands, target, opts.row.hard_weight)
        check_vocab_start(vocab_start)
        needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad
                      for t in (input, linear_weight, linear_bias))  # fmt: skip
        labels = target if target is not None else torch.zeros(0, dtype=torch.int64, device=input.device)
        return dict(vocab_size=linear_weight.shape[0], vocab_start=vocab_start, rows=input.shape[:-1].numel(),
                    shapes=(tuple(input.shape), tuple(teacher_input.shape), target is None),
                    dtypes=(str(operands[0].dtype), None if target is None else str(target.dtype)),
                    options=(opts, linear_bias is None, teacher_bias is None, needs), weight=None,
                    target=labels)  # fmt: skip

    agreed = agree(fn, group, device_of(input), ignore_index, check_and_describe)
    shard = VocabShard(agreed.vocab_start, agreed.num_classes, _group_name(group))
    return rows_linear_distill(*operands, target, opts_box[0], shard, plan_vocab=agreed.widest)


def _group_name(group: Optional[dist.ProcessGroup]) -> str:
    """The name the custom ops carry for ``group`` (None: the default group)."""
    return (group if group is not None else dist.distributed_c10d._get_default_group()).group_name
