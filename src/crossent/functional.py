"""Functional API: validate the call once, pick the backend, run the autograd Function, reduce in torch."""

from __future__ import annotations

from typing import Literal, Optional, Union, overload

import torch
from torch import Tensor

from crossent._autograd.common import apply_function, apply_plain, with_transform_rules
from crossent._autograd.cross_entropy import CrossEntropyRows, RowCall
from crossent._autograd.linear import LinearCall, LinearCrossEntropyFused, LinearCrossEntropyRecompute
from crossent._dtensor import check_shard_target, local_operands
from crossent._checks import check_has_classes, check_linear, check_logits, check_weight, class_indices, target_kind
from crossent._options import AccumulateDtype, CrossEntropyOptions, Impl, LinearOptions, Reduction
from crossent._precision import compute_dtype
from crossent._reduction import reduce_rows, reduction_row_scale
from crossent._results import CrossEntropyStats, loss_result
from crossent.kernels.dispatch import one_pass, resolve_impl
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.linear_plan import check_memory_budget
from crossent.kernels.shard import VocabShard

__all__ = ["cross_entropy", "linear_cross_entropy"]

LossOrStats = Union[Tensor, CrossEntropyStats]


@overload
def cross_entropy(
    input: Tensor, target: Tensor, weight: Optional[Tensor] = ..., *, ignore_index: int = ...,
    reduction: Reduction = ..., label_smoothing: float = ..., z_loss: float = ..., softcap: Optional[float] = ...,
    inplace_backward: bool = ..., impl: Impl = ..., return_stats: Literal[False] = ...,
) -> Tensor: ...  # fmt: skip
@overload
def cross_entropy(
    input: Tensor, target: Tensor, weight: Optional[Tensor] = ..., *, ignore_index: int = ...,
    reduction: Reduction = ..., label_smoothing: float = ..., z_loss: float = ..., softcap: Optional[float] = ...,
    inplace_backward: bool = ..., impl: Impl = ..., return_stats: Literal[True],
) -> CrossEntropyStats: ...  # fmt: skip


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    inplace_backward: bool = False,
    impl: Impl = "auto",
    return_stats: bool = False,
) -> LossOrStats:
    r"""Softmax cross-entropy, a drop-in for :func:`torch.nn.functional.cross_entropy`.

    Per position ``i`` with logits ``z_i`` (C classes), ``lse_i = m + log Σ_c exp(z_ic − m)``::

        class index t:   loss_i = w_t (1 − ε)(lse_i − z_it) + (ε / C) Σ_c w_c (lse_i − z_ic) + s w_t lse_i²
        probabilities y: loss_i = Σ_c w_c ((1 − ε) y_ic + ε / C)(lse_i − z_ic) + s (Σ_c w_c y_ic) lse_i²

    with class weights ``w`` (default 1), ``ε = label_smoothing``, ``s = z_loss``; with ``softcap = κ`` the
    logits are first replaced by ``κ tanh(z / κ)``. Positions whose target is ``ignore_index`` give 0.
    ``"mean"`` divides the sum by ``Σ_i w_{t_i}`` over non-ignored positions (class indices, PyTorch's
    weighted mean) or by the number of positions (probabilities).

    Differences from PyTorch, on purpose: a ``"mean"`` over zero total weight (e.g. every target ignored)
    is 0 with a zero gradient, not NaN; for float16/bfloat16 input the loss is float32 (gradients stay in
    the input's dtype). Only O(N) is saved for backward: the input itself (no copy), the target and one
    float64 log-sum-exp per position, instead of the N×C log-probabilities — except for inputs of at most 2^20
    logits on the CPU in eager mode (class indices, ``impl="auto"``, no softcap), where speed wins over a few
    MiB: for a reduced loss the gradient is formed in forward by one pass (the C kernels', or PyTorch's fused
    log_softmax + nll_loss) and held for backward (not with ``inplace_backward``).

    Works under ``torch.func`` (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``hessian``), double backward
    (``create_graph=True``: the gradient is then formed from plain torch ops, exactly), ``torch.autocast``
    (computed in float32, as PyTorch's policy for cross_entropy), ``torch.compile`` and ``torch.export``.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ..., dK); any floating dtype, CPU or CUDA.
        target: class indices (), (N) or (N, d1, ..., dK) of an integer dtype, in [0, C) or
            ``ignore_index``; or class probabilities of the input's shape and a floating dtype.
        weight: optional (C,) floating class weights on the input's device (no gradient flows to it).
        ignore_index: class-index value to skip (any int, also one inside [0, C)). With probability
            targets it must be negative (as in PyTorch).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        label_smoothing: ε in [0, 1], PyTorch's formula (also with weights and probability targets).
        z_loss: s ≥ 0, the coefficient of ``lse²`` (PaLM's z-loss; ``lse_square_scale`` elsewhere).
        softcap: κ > 0 caps the logits as ``κ tanh(z / κ)`` (Gemma 2), or None.
        inplace_backward: write the gradient over ``input``'s storage in backward, saving one (N, C)
            buffer. Only when ``input`` is not used after the loss's backward.
        impl: ``"auto"`` (Triton on CUDA when installed, else torch ops), ``"torch"`` or ``"triton"``.
        return_stats: also return the per-position log-sum-exp and the z-loss part (below).

    Returns:
        Tensor: () for ``"mean"``/``"sum"``; the target's batch shape, (N) or (N, d1, ..., dK), for
        ``"none"``. float32 for 16-bit and float32 input, float64 for float64 input. With
        ``return_stats=True``: :class:`CrossEntropyStats` ``(loss, lse, z_loss)`` — ``lse`` the log-sum-exp
        of the (capped) logits per position, ignored ones included, with the batch shape (N) or
        (N, d1, ..., dK), in the loss's dtype, without gradient; ``z_loss`` the z-loss part of ``loss``,
        reduced as ``loss`` is (zero when ``z_loss=0``), without gradient.

    Raises:
        TypeError: non-tensor or non-floating ``input``, non-floating ``weight``; option of the wrong type.
        ValueError: target of neither kind, class index out of range (checked on CPU; on CUDA that row's
            loss and gradient are NaN instead, without a host sync), bad option value, ``weight`` of the
            wrong shape or device.

    Example:
        >>> import torch, crossent
        >>> logits = torch.zeros(2, 4, requires_grad=True)
        >>> loss = crossent.cross_entropy(logits, torch.tensor([1, 3]))
        >>> round(loss.item(), 6)  # uniform logits: log 4
        1.386294
        >>> loss.backward()
        >>> logits.grad[0]  # (softmax − onehot) / N
        tensor([ 0.1250, -0.3750,  0.1250,  0.1250])
        >>> out = crossent.cross_entropy(torch.zeros(2, 4), torch.tensor([1, 3]), z_loss=0.1, return_stats=True)
        >>> out.lse, round(out.z_loss.item(), 6)  # lse = log 4; z-loss part 0.1 · log² 4
        (tensor([1.3863, 1.3863]), 0.192181)
    """
    opts = CrossEntropyOptions.build(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, inplace_backward=inplace_backward, impl=impl, return_stats=return_stats,
    )  # fmt: skip
    return cross_entropy_with_options(input, target, weight, opts)


def cross_entropy_with_options(
    input: Tensor, target: Tensor, weight: Optional[Tensor], opts: CrossEntropyOptions
) -> LossOrStats:
    """:func:`cross_entropy` with validated options (the module form builds them once)."""
    check_logits("input", input)
    num_classes = check_has_classes(input)
    kind = target_kind(input, target, opts.row.ignore_index)
    check_weight(weight, num_classes, input.device)
    if kind == "index":
        target = class_indices(target)
    logits, target = _classes_last(input, target, kind)
    return classes_last_cross_entropy(logits, target, weight, kind, opts, VocabShard.whole(num_classes))


def classes_last_cross_entropy(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], kind: str, opts: CrossEntropyOptions, shard: VocabShard
) -> LossOrStats:
    """The checked call on logits ``(..., C)`` (or one vocab-parallel rank's ``(..., V_local)`` columns of them,
    ``shard``): the backend (the rows' kernels, or for a small CPU call a one-pass backend: ``dispatch.one_pass``),
    the autograd Function, the reduction, the statistics. Shared with ``crossent.distributed``."""
    plan = one_pass(logits, target, weight, kind, opts, shard)
    if plan is None:
        call = RowCall(opts.row, shard, resolve_impl(opts.impl, logits.device), opts.inplace_backward)
        loss, lse = apply_function(CrossEntropyRows, logits, target, weight, call)
    else:  # (a plan: plain eager mode, no forward-mode AD; the Function hands the lse over in the call's list)
        call = RowCall.one_pass_call(opts.row, shard, opts.inplace_backward, plan)
        if torch.is_grad_enabled() and logits.requires_grad:
            loss = apply_plain(CrossEntropyRows, logits, target, weight, call)
        else:  # nothing to differentiate: the Function's forward alone, what its apply would run, without the
            loss = CrossEntropyRows.forward(logits, target, weight, call)  # graph's bookkeeping (~15 of ~40 µs)
        lse = call.handed_over[0]
    if plan is None or plan.row_scale is None:  # a one pass with a row scale reduced on the host (host_row_scale)
        loss = reduce_rows(loss, target, weight, kind, opts)
    return loss_result(loss, lse, target, weight, kind, opts, logits.dtype)


def _classes_last(input: Tensor, target: Tensor, kind: str):
    """Move the class dim of (N, C, d1, ..., dK) last, as a view; (C,) and (N, C) are unchanged."""
    if input.dim() <= 2:
        return input, target
    if kind == "probs":
        target = target.movedim(1, -1)
    return input.movedim(1, -1), target


@overload
def linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = ...,
    weight: Optional[Tensor] = ..., ignore_index: int = ..., reduction: Reduction = ..., label_smoothing: float = ...,
    z_loss: float = ..., softcap: Optional[float] = ..., chunk_size: Optional[int] = ...,
    memory_budget: Optional[int] = ..., accumulate_dtype: AccumulateDtype = ..., impl: Impl = ...,
    return_stats: Literal[False] = ..., logit_scale: Optional[float] = ...,
) -> Tensor: ...  # fmt: skip
@overload
def linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = ...,
    weight: Optional[Tensor] = ..., ignore_index: int = ..., reduction: Reduction = ..., label_smoothing: float = ...,
    z_loss: float = ..., softcap: Optional[float] = ..., chunk_size: Optional[int] = ...,
    memory_budget: Optional[int] = ..., accumulate_dtype: AccumulateDtype = ..., impl: Impl = ...,
    return_stats: Literal[True], logit_scale: Optional[float] = ...,
) -> CrossEntropyStats: ...  # fmt: skip
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
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
    r"""Cross-entropy of a linear layer's output, ``cross_entropy(F.linear(input, linear_weight, linear_bias), target)``,
    without ever holding the (N, V) logits, probabilities or their gradient.

    The same loss, options and semantics as :func:`cross_entropy` with class-index targets (class dim last):
    with ``Z = X Wᵀ + b`` (N tokens, V classes), ``lse_i = log Σ_c exp(Z_ic)``, the NLL term is
    ``w_t (1 − ε)(lse_i − Z_it)``, plus smoothing ``(ε / V) Σ_c w_c (lse_i − Z_ic)`` and z-loss ``s w_t lse_i²``;
    ``softcap`` caps Z first. Gradients (``G = ∂loss/∂Z``): ``dX = G W``, ``dW = Gᵀ X``, ``db = Σ_i G_i``.
    With ``logit_scale = s`` the logits are ``Z = s · (X Wᵀ + b)`` (Cohere's ``logit_scale``; Granite's
    ``1 / logits_scaling``), before ``softcap``.

    How: the tokens are cut into blocks of ``rows``, and the vocabulary into pieces of ``cols`` when one block
    of full rows would not fit the budget. Per block: logits ``X_blk W_pᵀ`` into one scratch buffer, the loss,
    the gradient in place (a softmax and O(rows) factors), then ``dX_blk += G W_p``, ``dW_p += Gᵀ X_blk``.
    With ``"mean"``/``"sum"`` the gradients are formed during forward (3 products per block: the
    6·N·D·V FLOP floor) and scaled by grad_output in backward; with ``"none"`` forward keeps the per-row
    lse and backward recomputes the logits (4 products). A vocabulary split adds one logits product.
    Positions whose target is ``ignore_index`` are dropped before the products (their loss and gradient rows
    are 0): the cost follows the positions that count. Counting them reads one number on the host per call —
    free on the CPU, one device sync on CUDA (so a CUDA-graph capture of the call is not possible).

    Memory: peak extra (beyond the inputs, the loss and the returned gradients dX (N, D), dW (V, D),
    db (V,)) is the block scratch ``rows · cols · (s_c + s_16) + 3 · rows · D · s_c`` (s_c = 4 bytes, 8 for
    float64; s_16 = 2 for 16-bit input, else 0), plus, for a 16-bit weight with ``accumulate_dtype="float32"``
    (or ``"float32_products"``), the fp32 sum of dW (V · D · 4 bytes) and a 4 MiB slice of its 16-bit block
    product, plus O(N + V); 16-bit input on a device without fast 16-bit products (float16 on most CPUs)
    multiplies fp32 copies of the input and weight ((N + V) · D · 4 bytes). ``memory_budget`` bounds the block
    scratch; the default is ``max(128 MiB, 2 · V · D bytes)`` on the CPU and ``max(1 GiB, 2 · V · D bytes)`` on
    CUDA (half the fp32 dW sum, at least the device's floor), × 1.5 for 16-bit input (as many rows per block as
    for fp32): ``linear_plan.default_memory_budget``. On the CPU, 16-bit input with fast 16-bit products and the C
    kernels built runs the C block step, whose block has no fp32 copy (``rows · cols · s_16``), and with all rows
    in one block forms dW as one 16-bit product without the fp32 sum (docs/linear_cross_entropy.md, "Precision").

    Under ``torch.autocast`` the products run in the autocast dtype where ``F.linear`` would (mixed input and
    weight dtypes are cast as ``F.linear`` casts them), the loss is float32 and each parameter's gradient comes
    back in its own dtype. ``torch.func.grad``, ``vjp``, ``jacrev`` and ``vmap`` work (``vmap`` runs one fused
    call per batch element); forward-mode AD (``jvp``, ``jacfwd``, ``hessian``) and second derivatives raise a
    ``RuntimeError`` naming the alternative, ``cross_entropy(F.linear(...))``. With ``"mean"``/``"sum"`` a
    second backward through the same graph (``retain_graph=True``) raises: the gradients were formed in
    forward and are handed out once (keeping them for a second pass would cost dX + dW of memory).

    Args:
        input: (..., D) floating, CPU or CUDA.
        linear_weight: (V, D), the input's dtype and device; or a DTensor placed ``Replicate()`` or ``Shard(0)``
            on one mesh dim (tensor parallelism: runs vocab-parallel over that dim's group; a plain result,
            the same on every rank; docs/distributed.md, "Training engines"); likewise ``linear_bias``.
        target: (...) = ``input.shape[:-1]``, integer class indices in [0, V) or ``ignore_index``.
        linear_bias: None or (V,), the input's dtype and device.
        weight: None or (V,) floating class weights (no gradient flows to them).
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in :func:`cross_entropy`.
        chunk_size: token rows per block (default: from the budget); with ``memory_budget`` as well,
            the budget then sets the vocabulary pieces.
        memory_budget: bytes of block scratch (default above); below one row's scratch is an error.
        accumulate_dtype: ``"float32"`` sums dW across blocks in fp32 (fp64 for fp64) and casts once; for
            16-bit input each block's dW product runs in 16 bits where the device multiplies them fast (CUDA;
            on CPUs with matrix instructions for the dtype), rounded once per block. ``"float32_products"``: the
            same fp32 sum of fp32 products of the unrounded block gradient (slower, dW free of those
            roundings). ``"weight"`` sums in the weight's dtype, saving the fp32 copy for 16-bit weights.
            docs/linear_cross_entropy.md, "Precision", states the contract and the measured errors.
        impl: ``"auto"`` (Triton for CUDA tensors when installed), ``"torch"`` or ``"triton"``: the block's
            elementwise step; the products are cuBLAS/CPU BLAS either way.
        return_stats: also return the per-position log-sum-exp and the z-loss part, as in :func:`cross_entropy`.
        logit_scale: s > 0 multiplies the logits before ``softcap`` (default None: 1). Computed as
            ``(s X) Wᵀ + s b`` — the input rows and the bias are scaled (differentiably, a copy of (N, D) and
            (V,)), the kernels are unchanged; for 16-bit input ``s X`` is rounded to the input's dtype.

    Returns:
        Tensor: () for ``"mean"``/``"sum"``, ``target.shape`` for ``"none"``; float32 for 16-bit and float32
        input, float64 for float64. Gradients come back in each parameter's dtype. With ``return_stats=True``:
        :class:`CrossEntropyStats` ``(loss, lse, z_loss)``, ``lse`` of shape ``target.shape``.

    Raises:
        TypeError: non-tensor arguments, non-floating input, dtypes that differ between input, weight, bias.
        ValueError: D of input and weight differ, target shape is not ``input.shape[:-1]``, bias not (V,),
            class index out of range (CPU), chunk_size ≤ 0, memory_budget too small for one row, bad options.

    Example:
        >>> import torch, crossent
        >>> x = torch.zeros(3, 4, requires_grad=True)
        >>> w = torch.randn(5, 4, requires_grad=True)
        >>> loss = crossent.linear_cross_entropy(x, w, torch.tensor([0, 2, 4]))
        >>> round(loss.item(), 6)  # zero input: uniform logits, log 5
        1.609438
        >>> loss.backward()
        >>> bool(torch.allclose(x.grad[0], (w.detach().mean(0) - w.detach()[0]) / 3))  # (p − onehot) W / N
        True
    """
    opts = LinearOptions.build(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, chunk_size=chunk_size, memory_budget=memory_budget, accumulate_dtype=accumulate_dtype,
        impl=impl, return_stats=return_stats, logit_scale=logit_scale,
    )  # fmt: skip
    return linear_cross_entropy_with_options(input, linear_weight, target, linear_bias, weight, opts)


def linear_cross_entropy_with_options(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    opts: LinearOptions,
) -> LossOrStats:
    """:func:`linear_cross_entropy` with validated options (the module form builds them once)."""
    input, linear_weight, linear_bias, target, shard, plan_vocab = local_operands(input, linear_weight, linear_bias, target)
    input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
    check_linear(input, linear_weight, target, linear_bias)
    shard = shard or VocabShard.whole(linear_weight.shape[0])  # a DTensor head sharded over the vocabulary: its rows
    check_weight(weight, shard.num_classes, input.device)
    check_shard_target(target, shard, opts.row.ignore_index)
    return rows_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, opts, shard, plan_vocab)


def autocast_operands(input, linear_weight, linear_bias):
    """Under ``torch.autocast``, the product's operands in the autocast dtype, as ``F.linear`` takes them there
    (float64 and non-floating tensors are left alone). The casts are recorded by autograd, so each parameter's
    gradient comes back in its own dtype (an fp32 master weight gets an fp32 gradient). Outside autocast,
    the operands as they are."""
    if not isinstance(input, Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, linear_weight, linear_bias
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        usable = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if usable else t

    return cast(input), cast(linear_weight), cast(linear_bias)


def logit_scaled(input: Tensor, linear_bias: Optional[Tensor], logit_scale: Optional[float]):
    """``s · (X Wᵀ + b) = (s X) Wᵀ + s b``: the logit scale folded into the product's operands (recorded by
    autograd: ``dX = s · G W``, ``db = s · Σ_i G_i``, ``dW = Gᵀ (s X)``), so the kernels never see it."""
    if logit_scale is None:
        return input, linear_bias
    return input * logit_scale, (None if linear_bias is None else linear_bias * logit_scale)


def rows_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    opts: LinearOptions,
    shard: VocabShard,
    plan_vocab: Optional[int] = None,
) -> LossOrStats:
    """The checked call (``linear_weight`` may be one vocab-parallel rank's rows, ``shard``): the autograd
    Function and the statistics. The ops plan the blocks from ``plan_vocab`` rows of the head (default
    ``linear_weight``'s; vocab-parallel passes the widest shard so that every rank runs the same blocks)."""
    input, linear_bias = logit_scaled(input, linear_bias, opts.logit_scale)
    dim = linear_weight.shape[1]
    x, t = input.reshape(-1, dim), class_indices(target.reshape(-1))
    vocab = linear_weight.shape[0] if plan_vocab is None else plan_vocab
    check_memory_budget(x.shape[0], dim, vocab, input.dtype, opts.chunk_size, opts.memory_budget)
    impl = resolve_impl(opts.impl, input.device)
    # ignored rows are dropped before the products; return_stats asks for their lse too
    loop = LoopArgs(opts.chunk_size, opts.memory_budget, vocab, opts.accumulate_dtype, ignored_lse=opts.return_stats)
    if opts.reduction == "none":
        call = LinearCall(opts.row, shard, loop, GradNeeds(False, False, False), impl)
        function = with_transform_rules(LinearCrossEntropyRecompute)
        loss_rows, lse = function.apply(x, linear_weight, linear_bias, t, weight, call)
        loss = loss_rows.reshape(target.shape)
    else:
        grad_on = torch.is_grad_enabled()
        needs = GradNeeds(*(grad_on and p is not None and p.requires_grad for p in (input, linear_weight, linear_bias)))
        row_scale = reduction_row_scale(t, weight, opts, compute_dtype(input.dtype))
        call = LinearCall(opts.row, shard, loop, needs, impl)
        function = with_transform_rules(LinearCrossEntropyFused)
        loss, lse, *_ = function.apply(x, linear_weight, linear_bias, t, weight, row_scale, call)
    return loss_result(loss, lse.reshape(target.shape), t.reshape(target.shape), weight, "index", opts, input.dtype)
