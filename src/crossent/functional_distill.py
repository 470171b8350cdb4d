"""Distillation losses: the generalized Jensen-Shannon divergence between a student's and a teacher's softmax,
on logits (:func:`distill_loss`) or fused with both LM heads (:func:`linear_distill_loss`).

Validate → options → resolve impl → autograd Function → reduce, as :mod:`crossent.functional`. The math is in
docs/math.md, "Distillation"; a complete training step in docs/distillation.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent._autograd.distill import DistillCall, DistillRows, LinearDistillCall, LinearDistillFused, LinearDistillRecompute
from crossent._checks import check_distill_linear, check_distill_logits, check_sparse_teacher, class_indices
from crossent._dtensor import check_shard_target, local_operands
from crossent._options import AccumulateDtype, DistillOptions, Impl, Reduction
from crossent._precision import compute_dtype
from crossent._reduction import reduction_row_scale
from crossent.functional import autocast_operands
from crossent.kernels.dispatch import resolve_impl
from crossent.kernels.distill_loop import check_distill_budget
from crossent.kernels.distill_ops import check_teacher_log_probs
from crossent.kernels.sparse_rows import chunk_rows, sparse_divergence
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.shard import VocabShard

__all__ = ["distill_loss", "linear_distill_loss", "sparse_distill_loss"]


def distill_loss(
    input: Tensor,
    teacher: Tensor,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    target: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    teacher_is_log_probs: bool = False,
    impl: Impl = "auto",
) -> Tensor:
    r"""Generalized Jensen-Shannon divergence between the student's and the teacher's softmax, per position.

    The values of TRL's ``generalized_jsd_loss`` (``"mean"`` here is its ``"batchmean"`` with labels). With
    ``q = softmax(input / T)`` and ``p = softmax(teacher / T)`` over the last dim::

        beta = 0:       KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)          (forward KL)
        beta = 1:       KL(q ‖ p)                                        (reverse KL)
        0 < beta < 1:   β KL(p ‖ m) + (1 − β) KL(q ‖ m),   m = β p + (1 − β) q

    ``T`` divides both logits (no ``T²`` factor). Gradients flow to ``input`` only:
    ``∂/∂input_c = (q_c − p_c) / T`` for beta = 0 (the others in docs/math.md).

    Args:
        input: student logits ``(..., V)``, any floating dtype, CPU or CUDA.
        teacher: teacher logits of the same shape (or log-probabilities, below); it gets no gradient and may
            come from ``torch.no_grad()``.
        beta: β in [0, 1], the mixture weight (0: forward KL, 1: reverse KL).
        temperature: T > 0.
        target: None, or class indices ``input.shape[:-1]``: positions equal to ``ignore_index`` are skipped
            (loss 0, no gradient, not counted by ``"mean"``).
        ignore_index: the skipped label value.
        reduction: ``"mean"`` (sum over the counted positions, divided by their number; 0 when there are
            none), ``"sum"`` or ``"none"`` (per position, ``input.shape[:-1]``).
        teacher_is_log_probs: ``teacher`` holds log-probabilities, used as given (T then applies to the student
            only). An entry > 0 is a ``ValueError`` on the CPU; on CUDA that row's loss is NaN (no host sync).
        impl: ``"auto"`` (Triton for CUDA tensors when installed, else torch ops), ``"torch"`` or ``"triton"``
            (``kernels/triton_distill.py``; float64 runs the torch step).

    Returns:
        Tensor: () for ``"mean"``/``"sum"``, ``input.shape[:-1]`` for ``"none"``; float32 for 16-bit and float32
        input, float64 for float64. Only O(N) is kept for backward beyond the two inputs (no copies).

    Raises:
        TypeError: non-tensor or non-floating input or teacher, target not integer, options of the wrong type.
        ValueError: input and teacher of different V or shape, beta outside [0, 1], temperature ≤ 0, a target
            of the wrong shape, teacher log-probabilities with a positive entry (CPU).

    Example:
        >>> import torch, crossent
        >>> student = torch.zeros(1, 2, requires_grad=True)  # q = (1/2, 1/2)
        >>> teacher = torch.tensor([[0.25, 0.75]]).log()      # p = (1/4, 3/4)
        >>> loss = crossent.distill_loss(student, teacher)    # .25 log .5 + .75 log 1.5
        >>> round(loss.item(), 6)
        0.130812
        >>> loss.backward()
        >>> student.grad  # q − p
        tensor([[ 0.2500, -0.2500]])
    """
    opts = DistillOptions.build(beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                                teacher_is_log_probs=teacher_is_log_probs, impl=impl)  # fmt: skip
    check_distill_logits(input, teacher, target)
    vocab = input.shape[-1]
    x, t = input.reshape(-1, vocab), teacher.detach().reshape(-1, vocab)
    labels = None if target is None else class_indices(target.reshape(-1))
    call = DistillCall(opts.row, resolve_impl(opts.impl, input.device))
    loss_rows = DistillRows.apply(x, t, labels, call)
    if opts.reduction == "none":
        return loss_rows.reshape(input.shape[:-1])
    return loss_rows.sum() * row_scale(labels, x.shape[0], opts, compute_dtype(input.dtype), input.device)


def row_scale(target: Optional[Tensor], num_rows: int, opts: DistillOptions, dtype, device) -> Tensor:
    """``∂(reduced loss)/∂loss_i``: 1 for ``"sum"``; for ``"mean"`` 1 / (the number of counted positions), 0 when
    there are none. A 0-d tensor: no host sync."""
    if target is not None:
        return reduction_row_scale(target, None, opts, dtype)
    value = 1.0 if opts.reduction == "sum" else 1.0 / max(num_rows, 1) if num_rows else 0.0
    return torch.full((), value, dtype=dtype, device=device)


def linear_distill_loss(
    input: Tensor,
    linear_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
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
    r"""Distillation fused with both LM heads: :func:`distill_loss` of ``F.linear(input, linear_weight,
    linear_bias)`` against ``F.linear(teacher_input, teacher_weight, teacher_bias)``, without ever holding
    either head's (N, V) logits, p, q, m or a loss of that size.

    Per position, with ``z = x Wᵀ + b`` (student), ``z_t = x_t W_tᵀ + b_t`` (teacher, hidden size D_t may differ
    from the student's D; V is shared) and ``α = hard_weight``::

        loss = (1 − α) · D_β(softmax(z_t / T) ‖ softmax(z / T)) + α · (lse(z) − z_target)

    ``D_β`` the generalized JSD of :func:`distill_loss`; the hard cross-entropy uses the untempered student
    logits and ``target`` as labels, in the same pass over the vocabulary (one call for the usual soft + hard
    objective). ``softcap = κ`` caps both heads' logits as ``κ tanh(z / κ)`` first. Gradients for the student's
    ``input``, ``linear_weight`` and ``linear_bias``; the teacher's tensors get none (pass them from
    ``torch.no_grad()`` or not; they are detached).

    How: token blocks (and vocabulary pieces when the budget needs them) as in
    :func:`crossent.linear_cross_entropy`; per block both logits products, one elementwise step, the student's
    dX and dW products — 4 products per block with ``"mean"``/``"sum"`` (gradients formed in forward, scaled in
    backward); ``"none"`` runs 2 in forward and 4 in backward. Memory: the block scratch is 2 to 6 block buffers
    (both heads' logits and the step's temporaries) sharing ``memory_budget``; by default each of them gets
    the fused CE's default budget (larger blocks keep the products at their full-size speed).

    Args:
        input: student hidden states ``(..., D)``, floating. linear_weight: ``(V, D)``. linear_bias: None or (V,).
            Both heads' weights (and biases) may be DTensors placed alike: ``Replicate()``, or ``Shard(0)`` on one
            mesh dim (vocab-parallel over its group; a plain result; docs/distributed.md, "Training engines").
        teacher_input: ``(..., D_t)`` with the input's batch shape and dtype. teacher_weight: ``(V, D_t)``.
        teacher_bias: None or (V,).
        beta, temperature, target, ignore_index, reduction: as in :func:`distill_loss`.
        hard_weight: α in [0, 1]; > 0 needs ``target`` (class indices in [0, V) or ``ignore_index``).
        softcap, chunk_size, memory_budget, accumulate_dtype, impl: as in :func:`crossent.linear_cross_entropy`.

    Returns:
        Tensor: () for ``"mean"``/``"sum"``, ``input.shape[:-1]`` for ``"none"``; float32 (float64 for float64).

    Raises:
        TypeError: non-tensor or non-floating arguments, dtypes that differ between the tensors.
        ValueError: different V for student and teacher, hidden sizes that do not match their weights, batch
            shapes that differ, beta or hard_weight outside [0, 1], temperature ≤ 0, hard_weight > 0 without
            target, a class index out of range (CPU, with hard_weight), a memory_budget too small for one row.

    Example:
        >>> import torch, crossent
        >>> x = torch.zeros(2, 3, requires_grad=True)     # zero input: q uniform over V = 2
        >>> w = torch.randn(2, 3, requires_grad=True)
        >>> x_t, w_t = torch.randn(2, 5), torch.randn(2, 5) * 0
        >>> b_t = torch.tensor([0.25, 0.75]).log()         # the teacher's p = (1/4, 3/4)
        >>> loss = crossent.linear_distill_loss(x, w, x_t, w_t, teacher_bias=b_t)
        >>> round(loss.item(), 6)  # KL(p ‖ q) = .25 log .5 + .75 log 1.5
        0.130812
        >>> loss.backward()
        >>> bool(torch.allclose(x.grad[0], (0.25 * w[0] - 0.25 * w[1]).detach() / 2))  # (q − p) W / N
        True
    """
    opts = DistillOptions.build(
        beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction, hard_weight=hard_weight,
        softcap=softcap, chunk_size=chunk_size, memory_budget=memory_budget, accumulate_dtype=accumulate_dtype,
        impl=impl,
    )  # fmt: skip
    input, linear_weight, linear_bias, target, shard, plan_vocab = local_operands(input, linear_weight, linear_bias, target)
    teacher_input, teacher_weight, teacher_bias, _, teacher_shard, _ = local_operands(
        teacher_input, teacher_weight, teacher_bias, None, "teacher_weight")  # fmt: skip
    if teacher_shard != shard:
        raise ValueError(f"teacher_weight's vocabulary rows must be placed as linear_weight's: {teacher_shard} vs {shard} "
                         f"(None: the whole head on this rank)")  # fmt: skip
    input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
    teacher_input, teacher_weight, teacher_bias = autocast_operands(teacher_input, teacher_weight, teacher_bias)
    check_distill_linear(input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target,
                         opts.row.hard_weight)  # fmt: skip
    shard = shard or VocabShard.whole(linear_weight.shape[0])  # a DTensor head sharded over the vocabulary: its rows
    if opts.row.hard_weight > 0:
        check_shard_target(target, shard, ignore_index)
    return rows_linear_distill(input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias,
                               target, opts, shard, plan_vocab)  # fmt: skip


def rows_linear_distill(input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target,
                        opts: DistillOptions, shard: VocabShard, plan_vocab: Optional[int] = None) -> Tensor:  # fmt: skip
    """The checked call (the weights may be one vocab-parallel rank's rows, ``shard``): the autograd Function and
    the reduction. Shared with ``crossent.distributed``."""
    dim, dim_t = linear_weight.shape[1], teacher_weight.shape[1]
    x, x_t = input.reshape(-1, dim), teacher_input.detach().reshape(-1, dim_t)
    w_t, b_t = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
    labels = None if target is None else class_indices(target.reshape(-1))
    vocab = linear_weight.shape[0] if plan_vocab is None else plan_vocab
    check_distill_budget(x.shape[0], max(dim, dim_t), vocab, input.dtype, opts.row, opts.chunk_size, opts.memory_budget)
    impl = resolve_impl(opts.impl, input.device)
    loop = LoopArgs(opts.chunk_size, opts.memory_budget, vocab, opts.accumulate_dtype)
    if opts.reduction == "none":
        call = LinearDistillCall(opts.row, shard, loop, GradNeeds(False, False, False), impl)
        loss = LinearDistillRecompute.apply(x, linear_weight, linear_bias, x_t, w_t, b_t, labels, call)
        return loss.reshape(input.shape[:-1])
    grad_on = torch.is_grad_enabled()
    needs = GradNeeds(*(grad_on and p is not None and p.requires_grad for p in (input, linear_weight, linear_bias)))
    scale = row_scale(labels, x.shape[0], opts, compute_dtype(input.dtype), input.device)
    call = LinearDistillCall(opts.row, shard, loop, needs, impl)
    loss, *_ = LinearDistillFused.apply(x, linear_weight, linear_bias, x_t, w_t, b_t, labels, scale, call)
    return loss


def sparse_distill_loss(
    input: Tensor,
    linear_weight: Tensor,
    teacher_ids: Tensor,
    teacher_log_probs: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    target: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    tail: bool = True,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    accumulate_dtype: AccumulateDtype = "float32",
) -> Tensor:
    r"""Distillation against a sparse teacher: only its top-K ids and their log-probabilities per position.

    The student's ``q = softmax(s)``, ``s = z / T`` with ``z = input · linear_weightᵀ + linear_bias`` (first capped
    to ``κ tanh(z / κ)`` when ``softcap = κ``, as in :func:`linear_distill_loss`), is normalized over the full
    vocabulary; the teacher's ``p_k = exp(teacher_log_probs_k)`` are taken as given (already at the teacher's
    sampling temperature). Then the divergence of :func:`distill_loss` (same ``beta``) over:

    - ``tail=True``: K + 1 outcomes — the K ids, and one bucket ``p_tail = 1 − Σ_k p_k``,
      ``q_tail = 1 − Σ_k q_k`` (the mass each puts elsewhere);
    - ``tail=False``: the K ids only, both renormalized (``q_k / Σ q``, ``p_k / Σ p``).

    Gradient (docs/math.md, "Sparse teacher"): ``∂D/∂s_c = q_c (a_c − Σ_j q_j a_j)`` with
    ``a_c = ∂D/∂q̂_c − ∂D/∂q̂_tail`` on the K ids and 0 elsewhere (tail=False: the K-way softmax's gradient on the
    ids, 0 elsewhere); ``∂s/∂z = 1 / T``, times ``1 − tanh²(z / κ)`` with a softcap. For β = 0,
    ``a_k = p_tail / q_tail − p_k / q_k``. The teacher gets no gradient.

    How: chunks of rows under activation checkpointing, so one chunk's (rows, V) temporaries exist at a time
    (``memory_budget`` bytes of them, default 64 MiB, or ``chunk_size`` rows); backward recomputes each chunk's
    logits. These are PyTorch's own ops on any device (no ``impl``: no custom op and no Triton step; the
    per-chunk work is a few passes over (rows, V)). Precision: logits, loss and the logits' gradient in float32 (float64 for float64); the products in
    the weight's dtype; a 16-bit weight's dW (and db) summed over the chunks in float32 and cast once
    (``accumulate_dtype="float32"``) or in its own dtype (``"weight"``).

    Args:
        input: ``(..., D)`` student hidden states, floating. linear_weight: ``(V, D)``, the input's dtype.
            linear_bias: None or (V,).
        teacher_ids: ``(..., K)`` integer ids in [0, V), distinct per position, ``input.shape[:-1]`` in front.
        teacher_log_probs: ``(..., K)`` floating log-probabilities (≤ 0; an entry > 0 is a ValueError on the CPU
            in eager mode, a NaN loss at that position on CUDA and under ``torch.compile``).
        beta, temperature, target, ignore_index, reduction: as in :func:`distill_loss`.
        tail: the outcome set above.
        softcap: None or κ > 0, the student's logit cap (before ``temperature``).
        chunk_size: None or rows per checkpointed chunk (then ``memory_budget`` must hold such a chunk).
        memory_budget: None or bytes of one chunk's (rows, V) temporaries; sets the rows when ``chunk_size`` is
            None.
        accumulate_dtype: ``"float32"`` or ``"weight"``: the dtype of the cross-chunk dW and db sums for a 16-bit
            weight (the gradients come back in the weight's dtype either way); no effect for fp32/fp64.
            ``"float32_products"`` is ``"float32"`` here (each chunk's products are autograd's, in the input dtype).

    Returns:
        Tensor: () for ``"mean"``/``"sum"``, ``input.shape[:-1]`` for ``"none"``; float32 (float64 for float64).

    Raises:
        TypeError: non-tensor or non-floating arguments, integer-valued options of the wrong type, non-integer
            ``teacher_ids``.
        ValueError: shapes that do not match, beta outside [0, 1], temperature or softcap ≤ 0, an unknown
            accumulate_dtype, a memory_budget too small for one row (or for a chunk of ``chunk_size`` rows), and
            on the CPU in eager mode ids outside [0, V) or a log-probability > 0.

    Example:
        >>> import torch, crossent
        >>> x = torch.zeros(1, 2, requires_grad=True)
        >>> w = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # bias gives q = (½, ¼, ¼)
        >>> b = torch.tensor([0.5, 0.25, 0.25]).log()
        >>> loss = crossent.sparse_distill_loss(x, w, torch.tensor([[0]]), torch.tensor([[0.75]]).log(), linear_bias=b)
        >>> round(loss.item(), 6)  # outcomes {0, tail}: ¾ log(¾ / ½) + ¼ log(¼ / ½)
        0.130812
    """
    opts = DistillOptions.build(
        beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction, tail=tail,
        softcap=softcap, chunk_size=chunk_size, memory_budget=memory_budget, accumulate_dtype=accumulate_dtype,
    )  # fmt: skip
    input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
    check_sparse_teacher(input, linear_weight, linear_bias, teacher_ids, teacher_log_probs, target)
    vocab, dim = linear_weight.shape
    k = teacher_ids.shape[-1]
    x = input.reshape(-1, dim)
    ids = teacher_ids.reshape(-1, k).long()
    lp = teacher_log_probs.detach().reshape(-1, k)
    cdt = compute_dtype(input.dtype)
    rows = chunk_rows(x.shape[0], vocab, cdt, opts.row, opts.chunk_size, opts.memory_budget)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():  # host reads: a graph break when traced
        check_teacher_log_probs(lp)
        if ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
            raise ValueError(f"teacher_ids must lie in [0, {vocab}) (the vocabulary); got {int(ids.min())}..{int(ids.max())}")
    totals_in_float32 = opts.accumulate_dtype != "weight" and linear_weight.dtype.itemsize == 2
    weight, bias = (_float32_total(p) if totals_in_float32 else p for p in (linear_weight, linear_bias))

    def chunk_loss(x_c, w, b, ids_c, lp_c):
        if totals_in_float32:  # the stand-ins → the 16-bit parameters, whose chunk gradients join the fp32 totals
            w, b = _joined(w, linear_weight), _joined(b, linear_bias)
        logits = torch.nn.functional.linear(x_c, w, b).to(cdt)
        return sparse_divergence(logits, ids_c, lp_c.to(cdt), opts.row)

    parts = [torch.utils.checkpoint.checkpoint(chunk_loss, x[r0 : r0 + rows], weight, bias, ids[r0 : r0 + rows],
                                               lp[r0 : r0 + rows], use_reentrant=False)
             for r0 in range(0, x.shape[0], rows)]  # fmt: skip
    loss_rows = torch.cat(parts) if parts else x.new_zeros(0, dtype=cdt)
    loss_rows = loss_rows.masked_fill((lp > 0).any(-1), float("nan"))  # CUDA: not log-probabilities, no host sync
    labels = None if target is None else class_indices(target.reshape(-1))
    if labels is not None:
        loss_rows = torch.where(labels != opts.row.ignore_index, loss_rows, 0.0)
    if opts.reduction == "none":
        return loss_rows.reshape(input.shape[:-1])
    return loss_rows.sum() * row_scale(labels, x.shape[0], opts, cdt, input.device)


# accumulate_dtype="float32" for a 16-bit weight (and bias). Autograd sums the gradients that the checkpointed
# chunks send to one tensor in that tensor's dtype; so each chunk takes the parameter through a float32 stand-in
# (a broadcast 0 that holds no memory), autograd sums the chunks' dW in float32 there, and the stand-in's backward
# casts the total to the weight's dtype once. Why not ``linear_weight.float()`` (a real fp32 copy, cast back per
# chunk): at (N, D, V) = (512, 256, 32768) bf16, K = 20, 102-row chunks, on the CPU, one forward + backward peaks
# at 113 MiB above the inputs with the stand-in, 144 MiB with the copy, 96 MiB with "weight" (live storage bytes,
# counted by a dispatch mode); times were equal within the noise of a loaded 2-core machine (median of 7
# interleaved runs: 2.10 s stand-in, 2.18 s copy, 2.01 s "weight").


class _Float32Total(torch.autograd.Function):
    """``param`` (16-bit) → a float32 stand-in of its shape, a broadcast 0 (no memory). Backward: the float32 sum
    of the gradients that reached the stand-in, cast to ``param``'s dtype once."""

    @staticmethod
    def forward(param: Tensor) -> Tensor:
        return param.new_zeros((), dtype=torch.float32).expand(param.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total.to(ctx.dtype)


class _JoinFloat32Total(torch.autograd.Function):
    """``(stand_in, param)`` → ``param`` itself (a view, no copy). Backward: ``param``'s gradient, in float32, goes
    to the stand-in (and so into the float32 total); ``param`` gets none directly."""

    @staticmethod
    def forward(stand_in: Tensor, param: Tensor) -> Tensor:
        return param.view_as(param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.float(), None


def _float32_total(param: Optional[Tensor]) -> Optional[Tensor]:
    """The float32 stand-in of a 16-bit parameter (None stays None)."""
    return None if param is None else _Float32Total.apply(param)


def _joined(stand_in: Optional[Tensor], param: Optional[Tensor]) -> Optional[Tensor]:
    """``param`` for one chunk's product, its gradient routed into ``stand_in``'s float32 total."""
    return None if param is None else _JoinFloat32Total.apply(stand_in, param)
