"""The per-token log-probability kernels as ``torch.library`` custom ops (one opaque op each for torch.compile).

As :mod:`crossent.kernels.ops` and :mod:`crossent.kernels.linear_ops` for the cross-entropy: the options arrive
flattened (:mod:`crossent.kernels.op_args`) and are rebuilt; the eager implementation runs the backend
:func:`dispatch.logprob_kernels` picks (rows) or :mod:`linear_loop` with a log-prob chunk step (fused); the fake
implementation gives the shapes. Optional outputs and upstream gradients that are absent travel as empty tensors
(custom ops return tensors only) and become None again in the Python wrappers at the bottom. The CPU id-range
check runs inside the forward ops (a host read; see :mod:`crossent.kernels.ops`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent._checks import check_target_range
from crossent._options import LogProbRowOptions
from crossent._precision import compute_dtype
from crossent.kernels import linear_loop
from crossent.kernels.linear_ops import _fake_grads, _grads_out, _or_empty, _vmap_by_loop
from crossent.kernels.collectives import logprob_stats_hook
from crossent.kernels.dispatch import logprob_chunk_kernels, logprob_kernels, no_autocast
from crossent.kernels.linear_loop import GradNeeds, LinearGrads, LoopArgs
from crossent.kernels.logprob_rows import LogProbRows
from crossent.kernels.op_args import flatten, rebuild, schema
from crossent.kernels.shard import VocabShard

_ROWS = f"{schema(LogProbRowOptions, VocabShard)}, str impl"
_LINEAR_KINDS = (LogProbRowOptions, VocabShard, LoopArgs, GradNeeds)
_LINEAR = f"{schema(*_LINEAR_KINDS)}, str impl"
_LINEAR_TENSORS = "Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor index"
_ROWS_OUT = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"  # logprob_rows.LogProbRows' fields, in order


def _check_range(index: Tensor, shard: VocabShard, opts: LogProbRowOptions) -> None:
    if shard.group_name is None and index.device.type == "cpu":
        check_target_range(index, shard.num_classes, opts.ignore_index)


def _rows_out(rows: LogProbRows):
    """The ops' six outputs: ``(log_probs, entropy, lse, log_sum_sq_probs, mean_logits, is_top1)``, the optional
    ones empty (float64) when not asked."""
    return tuple(_or_empty(t, rows.lse) for t in rows)  # one each: outputs may not alias


def _or_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _fake_rows(batch_shape, index, like, opts: LogProbRowOptions):
    """The forward ops' outputs as their eager implementations return them (:func:`_rows_out`)."""
    return _rows_out(LogProbRows.empty(batch_shape, index.shape, opts, compute_dtype(like.dtype), like.device))


@torch.library.custom_op(
    "crossent::logprob_forward", mutates_args=(),
    schema=f"(Tensor logits, Tensor index, {_ROWS}) -> {_ROWS_OUT}",
)  # fmt: skip
def _logprob_forward(logits, index, *args):
    opts, shard, impl = rebuild(args, LogProbRowOptions, VocabShard)
    _check_range(index, shard, opts)
    with no_autocast(logits.device):
        return _rows_out(logprob_kernels(impl).forward(logits, index, opts, shard, logprob_stats_hook(shard.group_name)))


@_logprob_forward.register_fake
def _(logits, index, *args):
    opts, _, _ = rebuild(args, LogProbRowOptions, VocabShard)
    return _fake_rows(logits.shape[:-1], index, logits, opts)


@torch.library.custom_op(
    "crossent::logprob_backward", mutates_args=(),
    schema=f"(Tensor logits, Tensor index, Tensor lse, Tensor row_entropy, Tensor grad_log_probs, Tensor grad_entropy, "
    f"{_ROWS}) -> Tensor",
)  # fmt: skip
def _logprob_backward(logits, index, lse, entropy, grad_log_probs, grad_entropy, *args):
    opts, shard, impl = rebuild(args, LogProbRowOptions, VocabShard)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    with no_autocast(logits.device):
        logprob_kernels(impl).backward(logits, index, lse, _or_none(entropy), _or_none(grad_log_probs),
                                       _or_none(grad_entropy), opts, out, shard)  # fmt: skip
    return out


@_logprob_backward.register_fake
def _(logits, index, lse, entropy, grad_log_probs, grad_entropy, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "crossent::linear_logprob_forward", mutates_args=(),
    schema=f"({_LINEAR_TENSORS}, {_LINEAR}) -> {_ROWS_OUT}",
)  # fmt: skip
def _linear_logprob_forward(input, linear_weight, linear_bias, index, *args):
    opts, shard, loop, _, impl = rebuild(args, *_LINEAR_KINDS)
    _check_range(index, shard, opts)
    with no_autocast(input.device):
        rows = linear_loop.linear_log_probs(
            input, linear_weight, linear_bias, index, opts, loop, shard=shard,
            combine=logprob_stats_hook(shard.group_name), kernels=logprob_chunk_kernels(impl),
        )  # fmt: skip
    return _rows_out(rows)


@_linear_logprob_forward.register_fake
def _(input, linear_weight, linear_bias, index, *args):
    opts = rebuild(args, *_LINEAR_KINDS)[0]
    return _fake_rows(input.shape[:1], index, input, opts)


@torch.library.custom_op(
    "crossent::linear_logprob_backward", mutates_args=(),
    schema=f"({_LINEAR_TENSORS}, Tensor lse, Tensor row_entropy, Tensor grad_log_probs, Tensor grad_entropy, {_LINEAR}) "
    "-> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def _linear_logprob_backward(input, linear_weight, linear_bias, index, lse, entropy, grad_log_probs, grad_entropy,
                             *args):  # fmt: skip
    opts, shard, loop, needs, impl = rebuild(args, *_LINEAR_KINDS)
    with no_autocast(input.device):
        grads = linear_loop.linear_log_probs_grads(
            input, linear_weight, linear_bias, index, lse, _or_none(entropy), _or_none(grad_log_probs),
            _or_none(grad_entropy), opts, loop, needs=needs, shard=shard, kernels=logprob_chunk_kernels(impl),
        )  # fmt: skip
    return _grads_out(grads, input)


@_linear_logprob_backward.register_fake
def _(input, linear_weight, linear_bias, index, lse, entropy, grad_log_probs, grad_entropy, *args):
    needs = rebuild(args, *_LINEAR_KINDS)[3]
    return _fake_grads(input, linear_weight, linear_bias, needs)


_vmap_by_loop(_linear_logprob_forward)
_vmap_by_loop(_linear_logprob_backward)


# --- how the autograd layer calls the ops --------------------------------------------------------------


def logprob_forward(logits: Tensor, index: Tensor, opts: LogProbRowOptions, shard: VocabShard, impl: str):
    """``(log_probs (..., K), entropy (...), lse (...) float64, log_sum_sq_probs (...), mean_logits (...), is_top1
    (..., K) bool)`` of logits (..., V_s), the optional ones empty tensors when not asked."""
    return _logprob_forward(logits, index, *flatten(opts, shard), impl)


def logprob_backward(logits, index, lse, entropy, grad_log_probs, grad_entropy, opts: LogProbRowOptions,
                     shard: VocabShard, impl: str) -> Tensor:  # fmt: skip
    """The gradient w.r.t. the logits (this shard's columns); None upstream gradients are zero."""
    return _logprob_backward(
        logits, index, lse, entropy, _or_empty(grad_log_probs, lse), _or_empty(grad_entropy, lse),
        *flatten(opts, shard), impl,
    )  # fmt: skip


def linear_logprob_forward(input, linear_weight, linear_bias, index, opts: LogProbRowOptions, shard: VocabShard,
                           loop: LoopArgs, impl: str):  # fmt: skip
    """:func:`logprob_forward`'s six outputs (N rows) for ``input · linear_weightᵀ + linear_bias``."""
    return _linear_logprob_forward(input, linear_weight, linear_bias, index,
                                   *flatten(opts, shard, loop, GradNeeds()), impl)  # fmt: skip


def linear_logprob_backward(input, linear_weight, linear_bias, index, lse, entropy, grad_log_probs, grad_entropy,
                            opts: LogProbRowOptions, shard: VocabShard, loop: LoopArgs, needs: GradNeeds,
                            impl: str) -> LinearGrads:  # fmt: skip
    """(dX, dW, db) (None where not asked), the logits recomputed block by block."""
    grads = _linear_logprob_backward(
        input, linear_weight, linear_bias, index, lse, entropy, _or_empty(grad_log_probs, lse),
        _or_empty(grad_entropy, lse), *flatten(opts, shard, loop, needs), impl,
    )  # fmt: skip
    return LinearGrads(*(g if need else None for g, need in zip(grads, needs)))
