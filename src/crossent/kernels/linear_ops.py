"""The fused linear CE's loops as ``torch.library`` custom ops, so that ``torch.compile`` sees one opaque op each.

Each op takes the row options, the vocabulary shard, the loop settings and which gradients to form flattened
(:mod:`crossent.kernels.op_args`); its eager implementation rebuilds them and runs :mod:`linear_loop` with
the chunk step :func:`dispatch.chunk_kernels` picks; its fake implementation gives the output shapes. A
gradient that is not asked for comes back as an empty tensor (custom ops cannot return None). The Python
functions at the bottom are how the autograd layer calls the ops. The class-range check sits in the forward
op for the reason given in :mod:`crossent.kernels.ops`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from crossent._checks import check_target_range
from crossent._options import RowOptions
from crossent._precision import compute_dtype
from crossent.kernels import linear_loop
from crossent.kernels.collectives import stats_hook
from crossent.kernels.dispatch import chunk_kernels, no_autocast
from crossent.kernels.linear_loop import GradNeeds, LinearForward, LinearGrads, LoopArgs
from crossent.kernels.op_args import flatten, rebuild, schema
from crossent.kernels.shard import VocabShard

_KINDS = (RowOptions, VocabShard, LoopArgs, GradNeeds)
_SETTINGS = f"{schema(*_KINDS)}, str impl"
_TENSORS = "Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? class_weight"


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """``t``, or a new empty tensor like ``like`` for None (custom ops take and return tensors only; also
    :mod:`crossent.kernels.logprob_ops`'s, whose ``_or_none`` turns it back)."""
    return like.new_empty(0) if t is None else t


def _grads_out(g: LinearGrads, like: Tensor):
    return _or_empty(g.input, like), _or_empty(g.weight, like), _or_empty(g.bias, like)


def _fake_grads(input, linear_weight, linear_bias, needs: GradNeeds):
    """(dX, dW, db) shapes as the eager ops return them: empty for a gradient not asked for."""
    return (
        torch.empty_like(input) if needs.need_input else input.new_empty(0),
        torch.empty_like(linear_weight) if needs.need_weight else input.new_empty(0),
        torch.empty_like(linear_bias) if needs.need_bias and linear_bias is not None else input.new_empty(0),
    )


@torch.library.custom_op(
    "crossent::linear_ce_forward", mutates_args=(),
    schema=f"({_TENSORS}, Tensor? grad_scale, {_SETTINGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)  # fmt: skip
def _linear_ce_forward(input, linear_weight, linear_bias, target, class_weight, grad_scale, *args):
    opts, shard, loop, needs, impl = rebuild(args, *_KINDS)
    if shard.group_name is None and input.device.type == "cpu":
        check_target_range(target, shard.num_classes, opts.ignore_index)
    with no_autocast(input.device):
        out = linear_loop.linear_loss_and_grads(
            input, linear_weight, linear_bias, target, class_weight, opts, loop, grad_scale=grad_scale, needs=needs,
            shard=shard, combine=stats_hook(shard.group_name), kernels=chunk_kernels(impl),
        )  # fmt: skip
    return (out.loss, out.lse, *_grads_out(out.grads, input))


@_linear_ce_forward.register_fake
def _(input, linear_weight, linear_bias, target, class_weight, grad_scale, *args):
    _, _, _, needs, _ = rebuild(args, *_KINDS)
    loss = input.new_empty(input.shape[:1], dtype=compute_dtype(input.dtype))
    lse = input.new_empty(input.shape[:1], dtype=torch.float64)  # RowStats.lse is float64
    if grad_scale is None:
        needs = GradNeeds(False, False, False)
    return (loss, lse, *_fake_grads(input, linear_weight, linear_bias, needs))


@torch.library.custom_op(
    "crossent::linear_ce_backward", mutates_args=(),
    schema=f"({_TENSORS}, Tensor lse, Tensor grad_loss, {_SETTINGS}) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def _linear_ce_backward(input, linear_weight, linear_bias, target, class_weight, lse, grad_loss, *args):
    opts, shard, loop, needs, impl = rebuild(args, *_KINDS)
    with no_autocast(input.device):
        grads = linear_loop.linear_grads(
            input, linear_weight, linear_bias, target, class_weight, lse, grad_loss, opts, loop, needs=needs,
            shard=shard, kernels=chunk_kernels(impl),
        )  # fmt: skip
    return _grads_out(grads, input)


@_linear_ce_backward.register_fake
def _(input, linear_weight, linear_bias, target, class_weight, lse, grad_loss, *args):
    _, _, _, needs, _ = rebuild(args, *_KINDS)
    return _fake_grads(input, linear_weight, linear_bias, needs)


def _vmap_by_loop(op):
    """A batching rule for ``op``: one call per batch element, outputs stacked (a fused loop takes one batch of
    rows; torch.func reaches these ops when it vmaps a backward, e.g. ``jacrev`` or per-sample gradients)."""

    def rule(info, in_dims, *args):
        outputs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]  # fmt: skip
        stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
        return stacked, (0,) * len(stacked)

    op.register_vmap(rule)


_vmap_by_loop(_linear_ce_forward)
_vmap_by_loop(_linear_ce_backward)


# --- how the autograd layer calls the ops --------------------------------------------------------------


def _present(grads, needs: GradNeeds) -> LinearGrads:
    return LinearGrads(*(g if need else None for g, need in zip(grads, needs)))


def linear_ce_forward(
    input, linear_weight, linear_bias, target, class_weight, grad_scale: Optional[Tensor],
    opts: RowOptions, shard: VocabShard, loop: LoopArgs, needs: GradNeeds, impl: str,
) -> LinearForward:  # fmt: skip
    """Per-row loss and float64 lse (N,), and with ``grad_scale`` the ``needs`` gradients (None elsewhere)."""
    loss, lse, *grads = _linear_ce_forward(
        input, linear_weight, linear_bias, target, class_weight, grad_scale, *flatten(opts, shard, loop, needs), impl
    )
    return LinearForward(loss, lse, _present(grads, needs if grad_scale is not None else GradNeeds(False, False, False)))


def linear_ce_backward(
    input, linear_weight, linear_bias, target, class_weight, lse: Tensor, grad_loss: Tensor,
    opts: RowOptions, shard: VocabShard, loop: LoopArgs, needs: GradNeeds, impl: str,
) -> LinearGrads:  # fmt: skip
    """(dX, dW, db) for the per-row upstream gradient, recomputing the logits block by block from ``lse``."""
    grads = _linear_ce_backward(
        input, linear_weight, linear_bias, target, class_weight, lse, grad_loss, *flatten(opts, shard, loop, needs),
        impl,
    )  # fmt: skip
    return _present(grads, needs)
