"""What the autograd Functions of every family share: gradients handed out from forward, the refusal of second
derivatives through fused loops, vmap by loop, and the registry of each Function's variant with torch.func rules.

No loss math and no input validation here (the kernels compute, the functional layer validates and reduces).
"""

from __future__ import annotations

import torch

from crossent._modes import forward_ad_active, transforms_active
from crossent.kernels.collectives import sum_over_ranks_
from crossent.kernels.shard import VocabShard


def batch_first(x, dim, size):
    """``x`` with its vmap batch dim first (an unbatched ``x`` expanded, without a copy)."""
    return x.expand(size, *x.shape) if dim is None else x.movedim(dim, 0)


def vmap_by_loop(function, info, in_dims, args):
    """A vmap rule that runs ``function`` once per batch element and stacks the outputs (dim 0): the fused
    loops take one (N, D) batch of rows, and each element's dW is its own."""
    outputs = []
    for i in range(info.batch_size):
        outputs.append(function.apply(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims))))
    stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
    return stacked, (0,) * len(stacked)


_MATERIALIZED = {  # what a fused function's refusal names as the alternative (it holds the N×V logits)
    "linear_cross_entropy": "crossent.cross_entropy(torch.nn.functional.linear(input, linear_weight, linear_bias), "
    "target, ...)",
    "linear_token_log_probs": "crossent.token_log_probs(torch.nn.functional.linear(input, linear_weight, "
    "linear_bias), index, ...)",
}


def refuse_linear_transform(what: str, name: str = "linear_cross_entropy"):
    raise RuntimeError(
        f"{name} does not support {what}: its gradients come from fused loops that are not differentiable "
        f"themselves. Use {_MATERIALIZED[name]} for this (it holds the N×V logits)."
    )


class _FirstOrderOnly(torch.autograd.Function):
    """A fused linear gradient returned where autograd records a graph (``create_graph=True``, ``torch.func``):
    the value itself, tied to the forward's inputs so that differentiating it again raises a clear error
    instead of giving a silently zero (or missing) second derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, name, *inputs):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[1]

    @staticmethod
    def backward(ctx, *_):
        refuse_linear_transform("second derivatives (double backward, hessian, jacrev of jacrev)", ctx.name)

    @staticmethod
    def jvp(ctx, *_):
        refuse_linear_transform("second derivatives (double backward, hessian, jacrev of jacrev)", ctx.name)


def first_order_only(grads, inputs, name: str = "linear_cross_entropy"):
    """The gradients as they are, or, where autograd records a graph, tied to ``inputs`` by :class:`_FirstOrderOnly`
    (``name``: the fused function a refusal names)."""
    if not torch.is_grad_enabled():
        return grads
    attach = [t for t in inputs if t is not None and t.requires_grad]
    return tuple(None if g is None else _FirstOrderOnly.apply(g, name, *attach) for g in grads)


def claim_forward_grads(ctx, name: str) -> None:
    """Gradients formed in forward are handed out (and scaled in place) by the first backward only."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            f"{name} with reduction 'mean'/'sum' forms its gradients in forward and hands them to the first "
            "backward; backward through it a second time (retain_graph=True) is not supported"
        )
    ctx.consumed = True


def scale_forward_grads(ctx, grad_out, name: str):
    """(dX, dW, db) formed in forward (saved first, then the inputs they are tied to), times ``grad_out``; dX
    summed over the ranks of a vocabulary shard. ``ctx.call`` has ``needs`` and ``shard``."""
    if grad_out is None:  # no gradient reached the loss (grads are not materialized)
        return None, None, None
    saved = ctx.saved_tensors
    grads = [g if need else None for g, need in zip(saved[:3], ctx.call.needs)]
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or transforms_active():
        # traced, recorded or transformed: no host check, no in-place on our gradients
        grads = first_order_only([None if g is None else g * grad_out for g in grads], saved[3:])
    else:
        claim_forward_grads(ctx, name)  # a second pass would scale (and all-reduce) again
        if grad_out.device.type != "cpu" or bool(grad_out != 1):  # on CPU, skip a pass over dW for 1
            grads = [None if g is None else g.mul_(grad_out) for g in grads]
    dx, dw, db = grads
    return sum_over_ranks_(dx, ctx.call.shard.group_name), dw, db


def whole_rows_only(name: str, shard: VocabShard, what: str, alternative: str = "the single-process function"):
    """Raise where ``shard`` is a vocabulary shard: the transforms (``what``) need whole rows."""
    if shard.group_name is not None:
        raise RuntimeError(f"{name} does not support {what}; gather the logits and use {alternative}")


# --- the same Functions with the rules torch.func and forward-mode AD need --------------------------------------
# Kept apart because torch.compile cannot trace a Function that defines ``vmap`` or ``jvp``: the public
# functions pick these (``with_transform_rules``) only while a transform or a forward-AD level is active. Each
# family's module registers its pairs (``register_transformable``) when it is imported.


def looped_and_first_order(function, name: str = "linear_cross_entropy"):
    """``function`` with a vmap rule (one call per batch element: a fused loop takes one batch of rows) and a
    jvp rule that refuses clearly, naming the public function ``name`` (its gradients are not differentiable)."""

    class Transformable(function):
        @staticmethod
        def vmap(info, in_dims, *args):
            return vmap_by_loop(Transformable, info, in_dims, args)

        @staticmethod
        def jvp(ctx, *tangents):
            refuse_linear_transform("forward-mode AD (torch.func.jvp, jacfwd, hessian)", name)

    Transformable.__name__ = Transformable.__qualname__ = f"{function.__name__}Transformable"
    return Transformable


_TRANSFORMABLE: dict = {}


def register_transformable(function, transformable) -> None:
    """Make :func:`with_transform_rules` pick ``transformable`` (``function`` with vmap/jvp rules) for ``function``."""
    _TRANSFORMABLE[function] = transformable


def apply_function(function, *args):
    """``with_transform_rules(function).apply(*args)``; in plain eager mode without ``Function.apply``'s per-call
    ``inspect.signature`` binding of the arguments (~15 µs, a quarter of a 64 × 1000 cross-entropy step): every
    argument here is positional, so there are no defaults to bind."""
    function = with_transform_rules(function)
    # the same test Function.apply makes before its own plain branch, which this repeats without the binding
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return apply_plain(function, *args)


def apply_plain(function, *args):
    """``function.apply(*args)`` for a caller that has established plain eager mode without forward-mode AD
    (``_modes.plain_eager``, ``forward_ad_active``: a small CPU cross-entropy's one-pass plan): what
    :func:`apply_function` runs there, without its checks (~3 µs of a ~60 µs call)."""
    return super(torch.autograd.Function, function).apply(*torch._functorch.utils.unwrap_dead_wrappers(args))


def with_transform_rules(function):
    """``function``, or its subclass with vmap/jvp rules while a ``torch.func`` transform or a forward-mode AD
    level (``torch.autograd.forward_ad.dual_level``) is active."""
    if transforms_active() or forward_ad_active():
        return _TRANSFORMABLE[function]
    return function
