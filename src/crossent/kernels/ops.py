"""The row kernels as ``torch.library`` custom ops, so that ``torch.compile`` sees one opaque op each.

Each op takes the row options and the vocabulary shard flattened (:mod:`crossent.kernels.op_args`) and the
resolved backend name; its eager implementation rebuilds them and runs :func:`dispatch.row_kernels`'s
module; its fake implementation gives the output shapes. The Python functions at the bottom are how the
autograd layer calls the ops: with option objects, flattened here and nowhere else.

The class-range check of CPU class indices runs inside the forward op, not at the public boundary: it reads
the target on the host, which inside a compiled graph would break it (on CUDA the kernels instead give the
offending rows NaN, without a host sync). For a vocab-parallel shard the ranks check the range together
before any work (``crossent.distributed``), so the op skips it. The kernels run with autocast off: their
precision is their own (``_precision``), and under ``torch.autocast`` their fp32 sums would otherwise be
cast down.

In plain eager mode the functions at the bottom run the ops' bodies directly (:func:`crossent._modes.plain_eager`): a custom op's
dispatch costs ~30 µs per call (its schema binding and the options flattened and rebuilt), as much as the
kernels themselves at 64 × 1000. Wherever the op must be seen as one op — while compiling or exporting, under a
``torch.func`` transform or a Python dispatch mode (FakeTensorMode, FlopCounterMode), on tensor subclasses — the
custom op runs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crossent._checks import check_target_range
from crossent._modes import plain_eager
from crossent._options import RowOptions
from crossent._precision import compute_dtype
from crossent.kernels.collectives import stats_hook
from crossent.kernels.dispatch import no_autocast, row_kernels
from crossent.kernels import one_pass
from crossent.kernels.one_pass import OnePass
from crossent.kernels.op_args import flatten, rebuild, schema
from crossent.kernels.shard import VocabShard
from crossent.kernels.torch_rows import probs_target_grad

_ROWS = f"{schema(RowOptions, VocabShard)}, str impl"


@torch.library.custom_op(
    "crossent::ce_forward", mutates_args=(),
    schema=f"(Tensor logits, Tensor target, Tensor? class_weight, {_ROWS}) -> (Tensor, Tensor)",
)  # fmt: skip
def _ce_forward(logits, target, class_weight, *args):
    return _forward_body(logits, target, class_weight, *rebuild(args, RowOptions, VocabShard))


def _forward_body(logits, target, class_weight, opts: RowOptions, shard: VocabShard, impl: str):
    if shard.group_name is None and logits.device.type == "cpu" and not target.is_floating_point():
        check_target_range(target, shard.num_classes, opts.ignore_index)
    with no_autocast(logits.device):
        return row_kernels(impl).forward(logits, target, class_weight, opts, shard, stats_hook(shard.group_name))


@_ce_forward.register_fake
def _(logits, target, class_weight, *args):
    rows = logits.shape[:-1]
    return logits.new_empty(rows, dtype=compute_dtype(logits.dtype)), logits.new_empty(rows, dtype=torch.float64)


@torch.library.custom_op(
    "crossent::ce_backward", mutates_args=(),
    schema=f"(Tensor logits, Tensor target, Tensor? class_weight, Tensor lse, Tensor grad_loss, {_ROWS}) -> Tensor",
)  # fmt: skip
def _ce_backward(logits, target, class_weight, lse, grad_loss, *args):
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_body(logits, target, class_weight, lse, grad_loss, *rebuild(args, RowOptions, VocabShard), out)
    return out


def _backward_body(logits, target, class_weight, lse, grad_loss, opts: RowOptions, shard: VocabShard, impl: str, out):
    with no_autocast(logits.device):
        row_kernels(impl).backward(logits, target, class_weight, lse, grad_loss, opts, out, shard)


@_ce_backward.register_fake
def _(logits, target, class_weight, lse, grad_loss, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "crossent::ce_backward_inplace", mutates_args=("logits",),
    schema=f"(Tensor(a!) logits, Tensor target, Tensor? class_weight, Tensor lse, Tensor grad_loss, {_ROWS}) -> ()",
)  # fmt: skip
def _ce_backward_inplace(logits, target, class_weight, lse, grad_loss, *args):
    _backward_body(logits, target, class_weight, lse, grad_loss, *rebuild(args, RowOptions, VocabShard), logits)


@_ce_backward_inplace.register_fake
def _(logits, target, class_weight, lse, grad_loss, *args):
    return None


@torch.library.custom_op(
    "crossent::ce_target_grad", mutates_args=(),
    schema=f"(Tensor logits, Tensor target, Tensor? class_weight, Tensor lse, Tensor grad_loss, "
    f"{schema(RowOptions)}) -> Tensor",
)  # fmt: skip
def _ce_target_grad(logits, target, class_weight, lse, grad_loss, *args):
    (opts,) = rebuild(args, RowOptions)
    with no_autocast(logits.device):
        return probs_target_grad(logits, target, class_weight, lse, grad_loss, opts)


@_ce_target_grad.register_fake
def _(logits, target, class_weight, lse, grad_loss, *args):
    return torch.empty_like(target, memory_format=torch.contiguous_format)


# --- how the autograd layer calls the ops --------------------------------------------------------------


def ce_forward(
    logits: Tensor, target: Tensor, class_weight: Optional[Tensor], opts: RowOptions, shard: VocabShard, impl: str
) -> Tuple[Tensor, Tensor]:
    """Per-position loss (fp32; fp64 for fp64 logits) and LSE (fp64, both backends), ``logits.shape[:-1]``.

    The LSE is kept in float64 because fp32 would round it at |lse| and the backward's ``exp(z − lse)``
    would inherit that error; per row it costs O(N) (torch_rows.RowStats.lse, triton_rows._store_lse).
    With a vocab-parallel ``shard`` both are the full rows' (the ranks' stats are combined in the op).
    """
    if plain_eager(logits, target, class_weight):
        return _forward_body(logits, target, class_weight, opts, shard, impl)
    return _ce_forward(logits, target, class_weight, *flatten(opts, shard), impl)


def ce_one_pass(logits: Tensor, target: Tensor, class_weight: Optional[Tensor], opts: RowOptions, plan: OnePass):
    """A small CPU call's one pass (``kernels/one_pass.py``; plain eager mode only, so no custom op) on logits (C,) or
    (N, C): per-position loss and float64 lse of the target's shape, the float64 sum of the losses, and the gradient
    formed for the plan's row scale (the logits' shape and dtype), or None."""
    if logits.dim() == 1:  # one unbatched row
        loss, lse, total, formed = ce_one_pass(logits.view(1, -1), target.view(1), class_weight, opts, plan)
        loss = None if loss is None else loss.view(())  # (None: a reduced loss, only its sum)
        return loss, lse.view(()), total, None if formed is None else formed.view(logits.shape)
    if plan.backend == "c":  # (C reads no autocast state)
        return one_pass.forward(logits, target, class_weight, opts, plan)
    with no_autocast(logits.device):  # PyTorch's kernels in the precision chosen there
        return one_pass.forward(logits, target, class_weight, opts, plan)


def ce_one_pass_backward(logits, target, class_weight, lse, upstream, opts: RowOptions, plan: OnePass, inplace: bool):
    """The gradient of a one pass's loss for ``upstream`` (a float for every position, or one per position) from its
    float64 ``lse``: in a new tensor, or written over the logits (``inplace``)."""
    out = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype)
    with no_autocast(logits.device):  # the "aten" backend's kernels in the precision chosen there
        one_pass.backward(logits.view(-1, logits.shape[-1]), target.reshape(-1), class_weight, lse.view(-1), upstream,
                          opts, plan, out.view(-1, out.shape[-1]))  # fmt: skip
    if inplace:
        torch.autograd.graph.increment_version(logits)  # as the op's mutates_args does: a second backward raises
    return out


def ce_backward(logits, target, class_weight, lse, grad_loss, opts: RowOptions, shard: VocabShard, impl: str):
    """Gradient w.r.t. the logits (this shard's columns) in a new tensor of the logits' shape and dtype."""
    if plain_eager(logits, target, class_weight, lse, grad_loss):
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _backward_body(logits, target, class_weight, lse, grad_loss, opts, shard, impl, out)
        return out
    return _ce_backward(logits, target, class_weight, lse, grad_loss, *flatten(opts, shard), impl)


def ce_backward_inplace(logits, target, class_weight, lse, grad_loss, opts: RowOptions, shard: VocabShard, impl):
    """Gradient w.r.t. the logits written over the logits themselves (each chunk read before written)."""
    if plain_eager(logits, target, class_weight, lse, grad_loss):
        _backward_body(logits, target, class_weight, lse, grad_loss, opts, shard, impl, logits)
        torch.autograd.graph.increment_version(logits)  # as the op's mutates_args does: a second backward raises
        return
    _ce_backward_inplace(logits, target, class_weight, lse, grad_loss, *flatten(opts, shard), impl)


def ce_target_grad(logits, target, class_weight, lse, grad_loss, opts: RowOptions):
    """Gradient w.r.t. probability targets (knowledge distillation with a trainable teacher)."""
    return _ce_target_grad(logits, target, class_weight, lse, grad_loss, *flatten(opts))
