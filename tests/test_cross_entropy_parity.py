"""Parity with torch.nn.functional.cross_entropy in float64: every option PyTorch has, forward and grads.

The grid: target kind × shape kind × weight × ignore_index × reduction × label_smoothing, for the
functional and the module form. Sizes are tiny (C = 7, a non-power of two) so the grid runs in seconds;
the blocked/chunked code paths at real sizes are exercised in test_cross_entropy_precision.py.
The one documented difference float64 can show is built into the expectation, never skipped:
a "mean" over zero total weight is 0 with a zero gradient (PyTorch: NaN).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    F64,
    index_shape,
    loss_and_grad,
    make_index_target,
    make_logits,
    make_prob_target,
    np64,
    torch_expected,
)

import crossent
from crossent import reference as R

C = 7
SHAPES = {
    "unbatched(C,)": (C,),  # class dim 0, scalar target
    "2d(N,C)": (6, C),
    "3d(N,C,d1)": (3, C, 4),  # class dim moved last internally: strided view
    "4d(N,C,d1,d2)": (2, C, 3, 2),  # K = 2 spatial dims
}
# ignore_index cases: (ignore_index, value written into some targets or None)
IGNORES = {
    "ignore=-100-absent": (-100, None),
    "ignore=-100-present": (-100, -100),
    "ignore=2-in-range": (2, 2),  # a real class id that is skipped (its positions contribute nothing)
}
PROB_IGNORES = {
    "ignore=-100-default": -100,
    "ignore=-1-negative": -1,  # negative values are accepted with probabilities, as in PyTorch
}
REDUCTIONS = ("none", "mean", "sum")
SMOOTHINGS = (0.0, 0.2)


def _grid():
    for (sk, shape), weighted, red, ls in itertools.product(SHAPES.items(), (False, True), REDUCTIONS, SMOOTHINGS):
        w = "weight" if weighted else "no-weight"
        for ik, (ii, val) in IGNORES.items():
            yield pytest.param("index", shape, weighted, ii, val, red, ls, id=f"index-{sk}-{w}-{ik}-{red}-ls{ls}")
        for ik, ii in PROB_IGNORES.items():
            yield pytest.param("probs", shape, weighted, ii, None, red, ls, id=f"probs-{sk}-{w}-{ik}-{red}-ls{ls}")


GRID = list(_grid())


def _make(kind, shape, weighted, ignore_value):
    logits = make_logits(shape)
    if kind == "index":
        target = make_index_target(shape, ignore_value=ignore_value)
    else:
        target = make_prob_target(shape)
    weight = torch.rand(shape[0 if len(shape) == 1 else 1], dtype=torch.float64) + 0.25 if weighted else None
    return logits, target, weight


def _upstream(shape, reduction):
    """A random upstream gradient: per position for "none", a scalar otherwise."""
    if reduction == "none":
        return torch.randn(index_shape(shape), dtype=torch.float64)
    return torch.tensor(0.5 + torch.rand(()).item(), dtype=torch.float64)


@pytest.mark.parametrize("module", [False, True], ids=["functional", "module"])
@pytest.mark.parametrize("kind, shape, weighted, ignore_index, ignore_value, reduction, ls", GRID)
def test_matches_torch_forward_and_input_grad(kind, shape, weighted, ignore_index, ignore_value, reduction, ls, module):
    logits, target, weight = _make(kind, shape, weighted, ignore_value)
    g = _upstream(shape, reduction)
    want_loss, want_grad = torch_expected(logits, target, g, weight, ignore_index, reduction, ls, module=module)
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=ls)
    if module:
        fn = crossent.CrossEntropyLoss(weight=weight, **opts)
        loss, grad = loss_and_grad(lambda x, t: fn(x, t), logits, target, g)
    else:
        loss, grad = loss_and_grad(crossent.cross_entropy, logits, target, g, weight=weight, **opts)
    assert loss.dtype == torch.float64 and loss.shape == want_loss.shape
    torch.testing.assert_close(loss, want_loss, **F64)
    assert grad.dtype == torch.float64 and grad.shape == logits.shape
    torch.testing.assert_close(grad, want_grad, **F64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ls", SMOOTHINGS, ids=["ls0", "ls0.2"])
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("shape", [(6, C), (2, C, 3, 2)], ids=["2d", "4d"])
def test_probability_target_grad_matches_torch(shape, weighted, ls, reduction):
    """Gradients flow to soft targets too (distillation with a trainable teacher), as in PyTorch."""
    logits, target, weight = _make("probs", shape, weighted, None)
    g = _upstream(shape, reduction)
    grads = []
    for fn in (crossent.cross_entropy, F.cross_entropy):
        x = logits.clone().requires_grad_()
        y = target.clone().requires_grad_()
        loss = fn(x, y, weight=weight, reduction=reduction, label_smoothing=ls)
        grads.append(torch.autograd.grad(loss, (x, y), g))
    torch.testing.assert_close(grads[0][0], grads[1][0], **F64)
    torch.testing.assert_close(grads[0][1], grads[1][1], **F64)


def test_module_weight_is_a_buffer_that_moves_with_to():
    weight = torch.rand(C, dtype=torch.float32) + 0.5
    fn = crossent.CrossEntropyLoss(weight=weight).to(torch.float64)
    assert "weight" in dict(fn.named_buffers())
    assert fn.weight.dtype == torch.float64
    logits, target = make_logits((5, C)), make_index_target((5, C))
    torch.testing.assert_close(fn(logits, target), F.cross_entropy(logits, target, weight=weight.double()), **F64)


# --- the extras torch lacks (z_loss, softcap): against crossent.reference, and gradcheck ------------

EXTRAS = {
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=2.5),
    "z_loss+softcap": dict(z_loss=0.05, softcap=2.5),
    "z_loss+softcap+ls": dict(z_loss=0.05, softcap=2.5, label_smoothing=0.2),
    "tiny-softcap": dict(softcap=0.3),  # tanh saturates: the chain factor 1 − tanh² is far from 1
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("extra", EXTRAS.values(), ids=EXTRAS.keys())
def test_extras_match_reference(extra, shape, kind, weighted, reduction):
    logits, target, weight = _make(kind, shape, weighted, -100 if kind == "index" else None)
    g = _upstream(shape, reduction)
    opts = dict(weight=weight, reduction=reduction, **extra)
    loss, grad = loss_and_grad(crossent.cross_entropy, logits, target, g, **opts)
    ref_opts = dict(opts, weight=np64(weight))
    want_loss = R.cross_entropy(np64(logits), np64(target), **ref_opts)
    want_grad = R.cross_entropy_grad(np64(logits), np64(target), grad_output=np64(g), **ref_opts)
    torch.testing.assert_close(loss, torch.as_tensor(want_loss), **F64)
    torch.testing.assert_close(grad, torch.from_numpy(want_grad), **F64)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("extra", list(EXTRAS.values())[:4], ids=list(EXTRAS.keys())[:4])
def test_extras_gradcheck(extra, shape, kind, reduction):
    """Finite differences of crossent itself: input grad (and soft-target grad for probabilities)."""
    logits, target, weight = _make(kind, shape, True, -100 if kind == "index" else None)
    x = logits.clone().requires_grad_()
    if kind == "probs":
        y = target.clone().requires_grad_()
        fn = lambda x, y: crossent.cross_entropy(x, y, weight, reduction=reduction, **extra)  # noqa: E731
        inputs = (x, y)
    else:
        fn = lambda x: crossent.cross_entropy(x, target, weight, reduction=reduction, **extra)  # noqa: E731
        inputs = (x,)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=True)
