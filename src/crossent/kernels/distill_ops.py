"""Distillation's kernels as ``torch.library`` custom ops, so that ``torch.compile`` sees one opaque op each.

As :mod:`crossent.kernels.ops`: options flattened by :mod:`crossent.kernels.op_args` and rebuilt in the op, a
fake implementation for the output shapes, autocast off inside, and the Python wrappers at the bottom the
only callers. The CPU checks that read tensors on the host (teacher log-probabilities that are not, class
indices out of range for the hard loss) run inside the forward ops, not at the public boundary, for the
reason given in :mod:`crossent.kernels.ops`; on CUDA those rows get a NaN loss instead, without a host sync.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crossent._checks import check_target_range
from crossent._options import DistillRowOptions
from crossent._precision import compute_dtype
from crossent.kernels import distill_loop, distill_rows
from crossent.kernels.collectives import distill_hooks
from crossent.kernels.dispatch import distill_step, no_autocast
from crossent.kernels.linear_loop import GradNeeds, LinearGrads, LoopArgs
from crossent.kernels.op_args import flatten, rebuild, schema
from crossent.kernels.shard import VocabShard


def check_teacher_log_probs(teacher: Tensor) -> None:
    """Teacher log-probabilities have no positive entry (CPU tensors: read on the host)."""
    if bool((teacher > 0).any()):
        value = float(teacher[teacher > 0].reshape(-1)[0])
        raise ValueError(
            f"teacher_is_log_probs=True but teacher has a positive entry ({value}): log-probabilities are ≤ 0 "
            "(pass logits with teacher_is_log_probs=False, or torch.log_softmax(teacher_logits, -1))"
        )


_DENSE = f"{schema(DistillRowOptions)}, str impl"


@torch.library.custom_op(
    "crossent::distill_forward", mutates_args=(),
    schema=f"(Tensor input, Tensor teacher, Tensor? target, {_DENSE}) -> Tensor",
)  # fmt: skip
def _distill_forward(input, teacher, target, *args):
    opts, impl = rebuild(args, DistillRowOptions)
    if opts.teacher_log_probs and teacher.device.type == "cpu":
        check_teacher_log_probs(teacher)
    with no_autocast(input.device):
        return distill_rows.forward(input, teacher, target, opts, distill_step(impl))


@_distill_forward.register_fake
def _(input, teacher, target, *args):
    return input.new_empty(input.shape[:1], dtype=compute_dtype(input.dtype))


@torch.library.custom_op(
    "crossent::distill_backward", mutates_args=(),
    schema=f"(Tensor input, Tensor teacher, Tensor? target, Tensor grad_loss, {_DENSE}) -> Tensor",
)  # fmt: skip
def _distill_backward(input, teacher, target, grad_loss, *args):
    opts, impl = rebuild(args, DistillRowOptions)
    with no_autocast(input.device):
        return distill_rows.backward(input, teacher, target, grad_loss, opts, distill_step(impl))


@_distill_backward.register_fake
def _(input, teacher, target, grad_loss, *args):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


_KINDS = (DistillRowOptions, VocabShard, LoopArgs, GradNeeds)


@torch.library.custom_op(
    "crossent::linear_distill", mutates_args=(),
    schema="(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor teacher_input, Tensor teacher_weight, "
    f"Tensor? teacher_bias, Tensor? target, Tensor? grad_scale, {schema(*_KINDS)}, str impl) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)  # fmt: skip
def _linear_distill(input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target,
                    grad_scale, *args):  # fmt: skip
    opts, shard, loop, needs, impl = rebuild(args, *_KINDS)
    if opts.hard_weight and shard.group_name is None and input.device.type == "cpu":
        check_target_range(target, shard.num_classes, opts.ignore_index)
    with no_autocast(input.device):
        loss, grads = distill_loop.linear_distill(
            input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target, opts, loop,
            grad_scale=grad_scale, needs=needs, shard=shard, hooks=distill_hooks(shard.group_name),
            step=distill_step(impl),
        )  # fmt: skip
    return (loss, *(input.new_empty(0) if g is None else g for g in grads))


@_linear_distill.register_fake
def _(input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target, grad_scale, *args):
    _, _, _, needs, _ = rebuild(args, *_KINDS)
    on = grad_scale is not None
    return (
        input.new_empty(input.shape[:1], dtype=compute_dtype(input.dtype)),
        torch.empty_like(input) if on and needs.need_input else input.new_empty(0),
        torch.empty_like(linear_weight) if on and needs.need_weight else input.new_empty(0),
        torch.empty_like(linear_bias) if on and needs.need_bias and linear_bias is not None else input.new_empty(0),
    )


# --- how the autograd layer calls the ops --------------------------------------------------------------


def distill_forward(input: Tensor, teacher: Tensor, target: Optional[Tensor], opts: DistillRowOptions,
                    impl: str) -> Tensor:  # fmt: skip
    """Per-row loss (N,) of student logits ``(N, V)`` against the teacher's, compute dtype."""
    return _distill_forward(input, teacher, target, *flatten(opts), impl)


def distill_backward(input: Tensor, teacher: Tensor, target: Optional[Tensor], grad_loss: Tensor,
                     opts: DistillRowOptions, impl: str) -> Tensor:  # fmt: skip
    """``grad_loss[i] · ∂loss_i/∂input_i`` (N, V), the input's dtype."""
    return _distill_backward(input, teacher, target, grad_loss, *flatten(opts), impl)


def linear_distill(
    input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target,
    grad_scale: Optional[Tensor], opts: DistillRowOptions, shard: VocabShard, loop: LoopArgs, needs: GradNeeds,
    impl: str,
) -> Tuple[Tensor, LinearGrads]:  # fmt: skip
    """Per-row loss (N,) and, with ``grad_scale``, the student's ``needs`` gradients (None elsewhere)."""
    loss, *grads = _linear_distill(
        input, linear_weight, linear_bias, teacher_input, teacher_weight, teacher_bias, target, grad_scale,
        *flatten(opts, shard, loop, needs), impl,
    )  # fmt: skip
    on = grad_scale is not None
    return loss, LinearGrads(*(g if on and need else None for g, need in zip(grads, needs)))
