"""Per-token log-probabilities and entropy: validate the call once, pick the backend, run the autograd Function.

The RL / preference-training faces of ``CE = H(y) + KL(y ‖ ŷ)`` (docs/math.md, docs/log_probs.md): the
log-probability of sampled tokens ``log ŷ_t`` and the entropy ``H(ŷ)``, plain (logits given) or fused with the LM
head (the N×V logits never exist). No reduction: both are per-token values; the caller reduces.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from crossent._autograd.common import apply_function, with_transform_rules
from crossent._autograd.log_probs import LinearLogProbCall, LinearTokenLogProbs, LogProbCall, TokenLogProbRows
from crossent._checks import check_linear, check_logits, check_token_index, class_indices
from crossent._dtensor import check_shard_target, local_operands
from crossent._options import AccumulateDtype, Impl, LinearLogProbOptions, LogProbOptions
from crossent._results import TokenLogProbs, token_result
from crossent.functional import autocast_operands
from crossent.kernels.dispatch import resolve_impl
from crossent.kernels.linear_loop import LoopArgs
from crossent.kernels.linear_plan import check_memory_budget
from crossent.kernels.shard import VocabShard

__all__ = ["token_log_probs", "linear_token_log_probs", "TokenLogProbs"]


def token_log_probs(
    input: Tensor,
    index: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = False,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    is_top1: bool = False,
    softcap: Optional[float] = None,
    impl: Impl = "auto",
) -> TokenLogProbs:
    r"""Log-probabilities of the tokens ``index`` under ``softmax(input / T)``, and optionally its entropy.

    With ``x = κ tanh(z / κ) / T`` (softcap first, then the temperature; each optional), ``p = softmax(x)``::

        log_probs[..., k] = x_{t_k} − log Σ_c exp(x_c)        entropy = −Σ_c p_c log p_c

    normalized over the full vocabulary. On request, three statistics without gradient (TRL's fused head logs them;
    docs/math.md, "Three statistics without gradient")::

        log_sum_sq_probs = log Σ_c p_c² = lse(2x) − 2 lse(x)    mean_logits = Σ_c x_c / C    is_top1_k = [t_k = argmax x]

    (the mean of ``x``, after softcap and temperature; on ties the first column is the argmax, as ``torch.argmax``).
    Each is computed only when asked. Gradients flow from the log-probs or the entropy or both:
    ``∂lp_k/∂z_c = ([c = t_k] − p_c) / T`` and ``∂H/∂z_c = −p_c (log p_c + H) / T`` (times ``1 − tanh²(z/κ)``).
    Saved for backward: the input (no copy), the ids and two numbers per position, never a (..., C) tensor.

    Args:
        input: (..., C) logits, class dim last, any floating dtype, CPU or CUDA.
        index: (...) = ``input.shape[:-1]``, one id per position, or (..., K) = ``input.shape[:-1] + (K,)``, K ids
            per position; integers in [0, C) or ``ignore_index``.
        temperature: T > 0, finite.
        ignore_index: an id whose log-prob is 0 and gets no gradient; a position whose ids are all ignored has
            entropy 0 (and no entropy gradient).
        entropy: also return the entropy per position.
        log_sum_sq_probs, mean_logits: also return ``log Σ p²`` / the mean of ``x`` per position (0 where every id
            of the position is ignored).
        is_top1: also return, per id, whether it is the argmax (False where the id is ignored).
        softcap: κ > 0 caps the logits as ``κ tanh(z / κ)`` before the temperature (Gemma 2), or None.
        impl: ``"auto"`` (Triton on CUDA when installed, else torch ops), ``"torch"`` or ``"triton"``.

    Returns:
        :class:`TokenLogProbs` ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``: ``log_probs`` and
        ``is_top1`` with ``index``'s shape, the others ``input.shape[:-1]``; each optional one None unless asked;
        float32 for 16-bit and float32 input, float64 for float64 (``is_top1`` bool).

    Raises:
        TypeError: non-tensor or non-floating ``input``, non-integer ``index``, options of the wrong type.
        ValueError: ``index`` of neither shape or on another device; an id outside [0, C) (checked on CPU; on
            CUDA its log-prob, its position's entropy and gradient are NaN, without a host sync); C = 0;
            ``temperature`` ≤ 0 or not finite; ``softcap`` ≤ 0.

    Example:
        >>> import torch, crossent
        >>> logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 2 * torch.log(torch.tensor(3.0)), 0.0, 0.0]])
        >>> out = crossent.token_log_probs(logits, torch.tensor([1, 1]), temperature=2.0, entropy=True)
        >>> out.log_probs  # uniform: log ¼; at T = 2 the second row is (1, 3, 1, 1) / 6: log ½
        tensor([-1.3863, -0.6931])
        >>> out.entropy  # log 4; −(3 · ⅙ log ⅙ + ½ log ½)
        tensor([1.3863, 1.2425])
        >>> z = torch.tensor([[0.0, 3.0, 3.0], [0.0, 0.0, torch.log(torch.tensor(3.0))]])
        >>> stats = dict(log_sum_sq_probs=True, mean_logits=True, is_top1=True)
        >>> out = crossent.token_log_probs(z, torch.tensor([2, 2]), **stats)
        >>> out.is_top1  # row 0: tied with column 1, which comes first
        tensor([False,  True])
        >>> out.log_sum_sq_probs[1]  # p = (⅕, ⅕, ⅗): log(11 / 25)
        tensor(-0.8210)
        >>> out.mean_logits[1]  # log 3 / 3
        tensor(0.3662)
    """
    opts = LogProbOptions.build(temperature=temperature, ignore_index=ignore_index, entropy=entropy,
                                log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1,
                                softcap=softcap, impl=impl)  # fmt: skip
    return token_log_probs_with_options(input, index, opts)


def token_log_probs_with_options(input: Tensor, index: Tensor, opts: LogProbOptions) -> TokenLogProbs:
    """:func:`token_log_probs` with validated options."""
    check_logits("input", input)
    if input.shape[-1] == 0:
        raise ValueError(f"input has no classes: its last dim has size 0 (shape {tuple(input.shape)})")
    check_token_index(index, input.shape[:-1], input.device)
    return rows_token_log_probs(input, index, opts, VocabShard.whole(input.shape[-1]))


def rows_token_log_probs(logits: Tensor, index: Tensor, opts: LogProbOptions, shard: VocabShard) -> TokenLogProbs:
    """The checked call on logits ``(..., C)`` (or one vocab-parallel rank's ``(..., V_local)`` columns, ``shard``):
    the autograd Function and the result. Shared with ``crossent.distributed``."""
    batch_shape = logits.shape[:-1]
    single = index.shape == batch_shape
    ids = class_indices(index)
    ids = ids.unsqueeze(-1) if single else ids
    call = LogProbCall(opts.row, shard, resolve_impl(opts.impl, logits.device))
    return token_result(apply_function(TokenLogProbRows, logits, ids, call), batch_shape, single, opts.row)


def linear_token_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    index: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
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
    r""":func:`token_log_probs` of ``F.linear(input, linear_weight, linear_bias)``, fused: the (N, V) logits,
    probabilities and their gradient never exist.

    The same values, options and semantics as ``token_log_probs(F.linear(input, linear_weight, linear_bias), index,
    ...)``, with gradients for ``input``, ``linear_weight`` and ``linear_bias``. Forward: per block of token rows
    (and of vocabulary columns when one block of full rows exceeds the budget) one logits product and the block's
    row statistics (max, sum-exp, ``Σ p log p``, the ids' logits); it keeps the float64 lse and the entropy per
    row. Backward, given the upstream gradients of ``log_probs`` and/or ``entropy``: per block the logits again, the
    finished gradient ``G`` in place, then ``dX += G W``, ``dW += Gᵀ X``, ``db += Σ G``: 4 products in all (8·N·D·V
    FLOPs). Under ``torch.no_grad()`` only the forward product runs.

    Memory: the block scratch of :func:`crossent.linear_cross_entropy` (the same plan, ``memory_budget``, default
    and ``accumulate_dtype``), plus O(N·K) saved for backward.

    ``torch.func.grad``, ``vjp``, ``jacrev`` and ``vmap`` work (``vmap`` runs one fused call per batch element);
    forward-mode AD and second derivatives raise a ``RuntimeError`` naming the materializing alternative.

    Args:
        input: (..., D) floating, CPU or CUDA.
        linear_weight: (V, D), the input's dtype and device; or a DTensor placed ``Replicate()`` or ``Shard(0)``
            on one mesh dim (tensor parallelism: runs vocab-parallel over that dim's group; a plain result,
            the same on every rank; docs/distributed.md, "Training engines"); likewise ``linear_bias``.
        index: ``input.shape[:-1]`` or ``input.shape[:-1] + (K,)`` integer ids in [0, V) or ``ignore_index``.
        linear_bias: None or (V,).
        temperature, ignore_index, entropy, log_sum_sq_probs, mean_logits, is_top1, softcap, impl: as in
            :func:`token_log_probs`.
        chunk_size, memory_budget, accumulate_dtype: as in :func:`crossent.linear_cross_entropy`.

    Returns:
        :class:`TokenLogProbs` as :func:`token_log_probs` (float32 for 16-bit and float32 input, float64 for
        float64); gradients in each parameter's dtype.

    Raises:
        TypeError/ValueError: as :func:`crossent.linear_cross_entropy` for the operands and chunking, as
        :func:`token_log_probs` for ``index`` and the options.

    Example:
        >>> import torch, crossent
        >>> x = torch.zeros(3, 4, requires_grad=True)
        >>> w = torch.randn(5, 4, requires_grad=True)
        >>> out = crossent.linear_token_log_probs(x, w, torch.tensor([0, 2, 4]), entropy=True)
        >>> out.log_probs  # zero input: uniform logits, log ⅕
        tensor([-1.6094, -1.6094, -1.6094], grad_fn=<ViewBackward0>)
        >>> out.log_probs.sum().backward()
        >>> bool(torch.allclose(x.grad[0], w.detach()[0] - w.detach().mean(0)))  # (onehot − p) W
        True
        >>> crossent.linear_token_log_probs(x, w, torch.tensor([0, 2, 4]), log_sum_sq_probs=True).log_sum_sq_probs
        tensor([-1.6094, -1.6094, -1.6094])
    """
    opts = LinearLogProbOptions.build(
        temperature=temperature, ignore_index=ignore_index, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits, is_top1=is_top1, softcap=softcap, chunk_size=chunk_size, memory_budget=memory_budget,
        accumulate_dtype=accumulate_dtype, impl=impl,
    )  # fmt: skip
    input, linear_weight, linear_bias, index, shard, plan_vocab = local_operands(input, linear_weight, linear_bias, index)
    input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
    check_linear(input, linear_weight, index, linear_bias, check_target=check_token_index)
    shard = shard or VocabShard.whole(linear_weight.shape[0])  # a DTensor head sharded over the vocabulary: its rows
    check_shard_target(index, shard, ignore_index)
    return rows_linear_token_log_probs(input, linear_weight, index, linear_bias, opts, shard, plan_vocab)


def rows_linear_token_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    index: Tensor,
    linear_bias: Optional[Tensor],
    opts: LinearLogProbOptions,
    shard: VocabShard,
    plan_vocab: Optional[int] = None,
) -> TokenLogProbs:
    """The checked fused call (``linear_weight`` may be one vocab-parallel rank's rows, ``shard``; the blocks are
    planned from ``plan_vocab`` rows, default the weight's own), shared with ``crossent.distributed``."""
    batch_shape, dim = input.shape[:-1], linear_weight.shape[1]
    single = index.shape == batch_shape
    x = input.reshape(-1, dim)
    ids = class_indices(index).reshape(x.shape[0], 1 if single else index.shape[-1])
    vocab = linear_weight.shape[0] if plan_vocab is None else plan_vocab
    check_memory_budget(x.shape[0], dim, vocab, input.dtype, opts.chunk_size, opts.memory_budget)
    loop = LoopArgs(opts.chunk_size, opts.memory_budget, vocab, opts.accumulate_dtype)
    call = LinearLogProbCall(opts.row, shard, loop, resolve_impl(opts.impl, input.device))
    outputs = with_transform_rules(LinearTokenLogProbs).apply(x, linear_weight, linear_bias, ids, call)
    return token_result(outputs, batch_shape, single, opts.row)
