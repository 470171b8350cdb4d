"""Self-checks of the float64 oracle, crossent.reference: hand values, identities, torch where torch has
the option, finite differences where it does not (z_loss, softcap)."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import F64, index_shape, make_index_target, make_logits, make_prob_target, np64, torch_expected

from crossent import reference as R

# Central differences on smooth float64 functions of O(1) values: truncation error ~h² and rounding
# error ~eps/h balance near h = 1e-5, leaving ~1e-10; 1e-7 is far below any wrong-term error (~1e-2).
FD_STEP = 1e-5
FD_TOL = dict(rtol=1e-7, atol=1e-7)


# --- primitives -------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_logsumexp_log_softmax_softmax_match_torch(axis):
    z = np.random.randn(4, 6, 5) * 5
    zt = torch.from_numpy(z)
    np.testing.assert_allclose(R.logsumexp(z, axis=axis), torch.logsumexp(zt, dim=axis).numpy(), rtol=1e-13)
    np.testing.assert_allclose(R.log_softmax(z, axis=axis), torch.log_softmax(zt, dim=axis).numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(R.softmax(z, axis=axis), torch.softmax(zt, dim=axis).numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(R.softmax(z, axis=axis).sum(axis=axis), 1.0, rtol=1e-14)


@pytest.mark.parametrize(
    "z, want",
    [
        ([1000.0, 1000.0], 1000.0 + math.log(2.0)),  # overflow without the max shift
        ([-1000.0, -1000.0], -1000.0 + math.log(2.0)),  # underflow without the max shift
        ([0.0, -np.inf], 0.0),  # a −inf entry contributes exp(−inf) = 0
        ([-np.inf, -np.inf], -np.inf),  # all −inf: log 0, not nan
        ([3.0], 3.0),  # one class
    ],
    ids=["huge", "tiny", "one-minus-inf", "all-minus-inf", "single-class"],
)
def test_logsumexp_edge_values(z, want):
    np.testing.assert_allclose(R.logsumexp(np.array(z)), want, rtol=1e-15)


def test_entropy_and_kl_hand_values():
    np.testing.assert_allclose(R.entropy(np.array([0.25, 0.25, 0.5])), 1.5 * math.log(2.0), rtol=1e-15)
    np.testing.assert_allclose(R.entropy(np.array([1.0, 0.0, 0.0])), 0.0, atol=0)  # 0 log 0 = 0
    # KL(y || softmax(0, log 3)) with y = (1/2, 1/2): ŷ = (1/4, 3/4)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    np.testing.assert_allclose(R.kl_divergence(np.array([0.5, 0.5]), np.array([0.0, math.log(3.0)])), want, rtol=1e-14)


def test_entropy_and_kl_match_torch():
    y = make_prob_target((5, 9), zeros=True).numpy()
    z = np.random.randn(5, 9) * 3
    np.testing.assert_allclose(R.entropy(y), torch.special.entr(torch.from_numpy(y)).sum(-1).numpy(), rtol=1e-13)
    want = F.kl_div(torch.log_softmax(torch.from_numpy(z), -1), torch.from_numpy(y), reduction="none").sum(-1)
    np.testing.assert_allclose(R.kl_divergence(y, z), want.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("zeros", [False, True], ids=["dense-y", "y-with-zeros"])
def test_cross_entropy_is_entropy_plus_kl(zeros):
    """CE(y, z) = H(y) + KL(y ‖ softmax(z)), per position."""
    y = make_prob_target((6, 11), zeros=zeros).numpy()
    z = np.random.randn(6, 11) * 4
    ce = R.cross_entropy(z, y, reduction="none")
    np.testing.assert_allclose(ce, R.entropy(y) + R.kl_divergence(y, z), rtol=1e-12)
    assert np.all(R.kl_divergence(y, z) >= 0)


# --- the cross-entropy hand values (one per option, so a formula typo cannot hide) -----------------


def test_hand_value_plain():
    # softmax(0, log 3) = (1/4, 3/4); target 0 → −log(1/4)
    np.testing.assert_allclose(R.cross_entropy(np.array([[0.0, math.log(3.0)]]), np.array([0])), math.log(4.0), rtol=1e-15)


def test_hand_value_label_smoothing():
    # ε = 0.5, C = 2, p = (1/4, 3/4), t = 0: u = (0.75, 0.25) → −0.75 log(1/4) − 0.25 log(3/4)
    want = -0.75 * math.log(0.25) - 0.25 * math.log(0.75)
    got = R.cross_entropy(np.array([[0.0, math.log(3.0)]]), np.array([0]), label_smoothing=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-14)


def test_hand_value_weighted_mean():
    # two rows, weights (1, 3): mean = (1·log 2 + 3·log 2) / (1 + 3) = log 2 on uniform logits
    got = R.cross_entropy(np.zeros((2, 2)), np.array([0, 1]), weight=np.array([1.0, 3.0]))
    np.testing.assert_allclose(got, math.log(2.0), rtol=1e-15)
    # and the sum is 4 log 2
    got = R.cross_entropy(np.zeros((2, 2)), np.array([0, 1]), weight=np.array([1.0, 3.0]), reduction="sum")
    np.testing.assert_allclose(got, 4 * math.log(2.0), rtol=1e-15)


def test_hand_value_z_loss():
    # uniform logits over 4 classes: lse = log 4, loss = log 4 + s (log 4)²
    s = 0.1
    got = R.cross_entropy(np.zeros((1, 4)), np.array([1]), z_loss=s)
    np.testing.assert_allclose(got, math.log(4.0) + s * math.log(4.0) ** 2, rtol=1e-15)


def test_hand_value_z_loss_probabilities_weighted():
    # probabilities y = (1/2, 1/2), weights (1, 3): ω = 2, U = 2 → 2 log 2 + s · 2 · (log 2)²
    s = 0.5
    got = R.cross_entropy(np.zeros((1, 2)), np.array([[0.5, 0.5]]), weight=np.array([1.0, 3.0]), z_loss=s, reduction="sum")
    np.testing.assert_allclose(got, 2 * math.log(2.0) + s * 2 * math.log(2.0) ** 2, rtol=1e-15)


def test_hand_value_softcap():
    # κ = 1: logits (100, −100) become (tanh 100, −tanh 100) = (1, −1) in float64; target 0 → log(1 + e^−2)
    got = R.cross_entropy(np.array([[100.0, -100.0]]), np.array([0]), softcap=1.0)
    np.testing.assert_allclose(got, math.log1p(math.exp(-2.0)), rtol=1e-14)


def test_hand_value_gradient():
    # ∂/∂z (−log softmax(z)_t) = p − onehot, with p = (1/4, 3/4), t = 0
    got = R.cross_entropy_grad(np.array([[0.0, math.log(3.0)]]), np.array([0]))
    np.testing.assert_allclose(got, [[0.25 - 1.0, 0.75]], rtol=1e-14)


def test_mean_over_zero_total_weight_is_zero():
    z = np.random.randn(3, 4)
    t = np.array([-100, -100, -100])
    np.testing.assert_allclose(R.cross_entropy(z, t), 0.0, atol=0)
    np.testing.assert_allclose(R.cross_entropy_grad(z, t), np.zeros((3, 4)), atol=0)


# --- against torch, where torch has the option -------------------------------------------------------

SHAPES = {"unbatched": (5,), "2d": (4, 5), "4d": (2, 5, 3, 2)}


def _torch_grid():
    for (sk, shape), kind, weighted, red, ls in itertools.product(
        SHAPES.items(), ("index", "probs"), (False, True), ("none", "mean", "sum"), (0.0, 0.3)
    ):
        ignores = [(-100, None), (-100, -100), (1, 1)] if kind == "index" else [(-100, None)]
        for ii, val in ignores:
            ik = f"ignore={ii}" + ("-present" if val is not None else "")
            w = "weight" if weighted else "no-weight"
            yield pytest.param(shape, kind, weighted, ii, val, red, ls, id=f"{kind}-{sk}-{w}-{ik}-{red}-ls{ls}")


@pytest.mark.parametrize("shape, kind, weighted, ignore_index, ignore_value, reduction, ls", list(_torch_grid()))
def test_reference_matches_torch(shape, kind, weighted, ignore_index, ignore_value, reduction, ls):
    logits = make_logits(shape)
    target = make_index_target(shape, ignore_value=ignore_value) if kind == "index" else make_prob_target(shape)
    weight = torch.rand(shape[0 if len(shape) == 1 else 1], dtype=torch.float64) + 0.25 if weighted else None
    g = torch.randn(index_shape(shape), dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    want_loss, want_grad = torch_expected(logits, target, g, weight, ignore_index, reduction, ls)
    opts = dict(weight=np64(weight), ignore_index=ignore_index, reduction=reduction, label_smoothing=ls)
    loss = R.cross_entropy(np64(logits), np64(target), **opts)
    grad = R.cross_entropy_grad(np64(logits), np64(target), grad_output=np64(g), **opts)
    np.testing.assert_allclose(loss, want_loss.numpy(), **F64)
    assert np.shape(loss) == tuple(want_loss.shape)
    np.testing.assert_allclose(grad, want_grad.numpy(), **F64)


# --- the gradient against finite differences, where torch lacks the option --------------------------


def _finite_difference(f, z):
    grad = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += FD_STEP
        zm[i] -= FD_STEP
        grad[i] = (f(zp) - f(zm)) / (2 * FD_STEP)
    return grad


EXTRAS = {
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=2.5),
    "z_loss+softcap": dict(z_loss=0.05, softcap=2.5),
    "z_loss+softcap+smoothing": dict(z_loss=0.05, softcap=2.5, label_smoothing=0.2),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("kind", ["index-with-ignored", "probs"])
@pytest.mark.parametrize("extra", EXTRAS.values(), ids=EXTRAS.keys())
def test_reference_grad_matches_finite_differences(extra, kind, weighted, reduction):
    shape = (3, 5, 2)  # K-dim: the class axis is not last
    z = np64(make_logits(shape))
    if kind == "probs":
        t = np64(make_prob_target(shape))
    else:
        t = np64(make_index_target(shape, ignore_value=-100, num_ignored=2))
    w = np.random.rand(5) + 0.25 if weighted else None
    g = np.random.randn(*index_shape(shape)) if reduction == "none" else 1.3
    opts = dict(weight=w, reduction=reduction, **extra)

    def scalar(zz):  # <g, loss>: its gradient is the vector-Jacobian product cross_entropy_grad computes
        return float(np.sum(g * R.cross_entropy(zz, t, **opts)))

    np.testing.assert_allclose(R.cross_entropy_grad(z, t, grad_output=g, **opts), _finite_difference(scalar, z), **FD_TOL)


def test_reference_extras_match_torch_composition():
    """z_loss and softcap written out in torch ops (a second, independent derivation of the same formula)."""
    z = make_logits((6, 9), scale=4.0)
    t = make_index_target((6, 9), ignore_value=-100, num_ignored=2)
    w = torch.rand(9, dtype=torch.float64) + 0.25
    s, kappa, eps = 0.03, 3.0, 0.1
    capped = kappa * torch.tanh(z / kappa)
    lse = torch.logsumexp(capped, -1)
    valid = t != -100
    w_t = torch.where(valid, w[t.clamp(min=0)], 0.0)
    nll = F.cross_entropy(capped, t, weight=w, label_smoothing=eps, reduction="none")
    want = (nll + s * w_t * lse**2).sum() / w_t.sum()
    got = R.cross_entropy(np64(z), np64(t), weight=np64(w), label_smoothing=eps, z_loss=s, softcap=kappa)
    np.testing.assert_allclose(got, want.item(), **F64)


def test_reference_is_exact_for_huge_logits():
    """Only the two +M classes matter: p = (1/2, 0, 1/2, 0) and CE = log 2, for any M float64 holds."""
    m = float(torch.finfo(torch.float32).max) / 2
    z = np.array([[m, -m, m, -m]])
    np.testing.assert_allclose(R.softmax(z), [[0.5, 0.0, 0.5, 0.0]], rtol=1e-15)
    np.testing.assert_allclose(R.cross_entropy(z, np.array([0])), math.log(2.0), rtol=1e-15)
    np.testing.assert_allclose(R.cross_entropy_grad(z, np.array([0])), [[-0.5, 0.0, 0.5, 0.0]], rtol=1e-15)


# --- cost of the oracle itself ----------------------------------------------------------------------


def test_reference_memory_is_linear_in_classes():
    """The oracle must be usable at vocabulary sizes (C = 50257, 128256): peak allocation O(N·C), not O(C²)."""
    n, c = 2, 4000
    z = np.random.randn(n, c)
    t = np.random.randint(0, c, n)
    tracemalloc.start()
    try:
        R.cross_entropy(z, t)
        R.cross_entropy_grad(z, t)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    budget = 64 * z.nbytes  # dozens of (N, C) temporaries are fine; a (C, C) matrix is 250x this here
    np.testing.assert_array_less(peak, budget, err_msg=f"peak {peak} bytes for N×C = {n}×{c}")
