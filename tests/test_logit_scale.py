"""``logit_scale`` of the fused linear cross-entropy: logits ``s · (X Wᵀ + b)`` before ``softcap``.

Against the materialized oracle ``crossent.cross_entropy(s * F.linear(...))`` in float64, value and every
gradient; the option's validation; the module and vocab-parallel plumbing share the options object.
Shapes are off every block edge (N = 37, D = 13, V = 101 prime; ``chunk_size=8`` makes several blocks).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent

F64 = dict(rtol=1e-10, atol=1e-12)
N, D, V = 37, 13, 101


def _leaves(bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, dtype=torch.float64, generator=g)
    w = torch.randn(V, D, dtype=torch.float64, generator=g)
    b = torch.randn(V, dtype=torch.float64, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -100
    return [p.requires_grad_() if p is not None else None for p in (x, w, b)] + [t]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"softcap": 3.0}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 2.0}])
@pytest.mark.parametrize("scale", [0.0625, 2.5])
def test_matches_scaled_materialized_logits(reduction, options, scale):
    x, w, b, t = _leaves()
    got = crossent.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, logit_scale=scale,
                                        chunk_size=8, **options)  # fmt: skip
    got_grads = torch.autograd.grad(got.sum(), (x, w, b))
    want = crossent.cross_entropy(scale * F.linear(x, w, b), t, reduction=reduction, **options)
    want_grads = torch.autograd.grad(want.sum(), (x, w, b))
    torch.testing.assert_close(got, want, **F64)
    for name, g, h in zip(("input", "linear_weight", "linear_bias"), got_grads, want_grads):
        torch.testing.assert_close(g, h, **F64, msg=lambda m, name=name: f"{name}: {m}")


def test_hand_value():
    # one row, logits s·(0, log 3) with s = 2: log-softmax at class 1 is log(9 / 10)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    w = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)
    loss = crossent.linear_cross_entropy(x, w, torch.tensor([1]), logit_scale=2.0)
    assert loss.item() == pytest.approx(-math.log(0.9), abs=1e-14)


def test_one_is_no_scale_and_module_matches_functional():
    x, w, b, t = _leaves()
    plain = crossent.linear_cross_entropy(x, w, t, linear_bias=b)
    torch.testing.assert_close(crossent.linear_cross_entropy(x, w, t, linear_bias=b, logit_scale=1.0), plain, **F64)
    module = crossent.LinearCrossEntropyLoss(logit_scale=0.5, softcap=3.0)
    assert "logit_scale=0.5" in repr(module)
    want = crossent.linear_cross_entropy(x, w, t, linear_bias=b, logit_scale=0.5, softcap=3.0)
    torch.testing.assert_close(module(x, w, t, b), want, **F64)


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                        (math.nan, ValueError), ("2", TypeError), (True, TypeError)])  # fmt: skip
def test_bad_logit_scale_raises_naming_it(bad, error):
    x, w, _, t = _leaves(bias=False)
    with pytest.raises(error, match="logit_scale"):
        crossent.linear_cross_entropy(x, w, t, logit_scale=bad)
