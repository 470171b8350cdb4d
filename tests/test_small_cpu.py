"""The C one pass for small CPU inputs (``kernels/one_pass.py``, backend "c": one C pass forms the loss and, for a
reduced loss, its gradient in forward) against the float64 reference and PyTorch, and what autograd does with the
gradient it keeps: grad_output other than 1, retain_graph, double backward, no-grad calls, strided inputs, the bytes
it saves."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossent
from _helpers import ROW_OPTIONS, ULP, row_case, row_kwargs, row_reference
from crossent.bench.measure import saved_bytes
from crossent.kernels import cpu_rows

pytestmark = [
    pytest.mark.one_pass,  # keeps the one-pass backends on (tests/conftest.py)
    pytest.mark.skipif(not cpu_rows.available(), reason="crossent._cpu_rows was not built (no C compiler)"),
]

def _largest_term(x, t, kw, reduction, upstream):
    """Per row, ``g (ω (1 + 2 s |lse|) + ε W / C)``: the size of the largest term the gradient sums, ``g`` the row's
    upstream gradient (grad_output 1 reduced: 1, or 1 / Σ w_t for the mean), ``ω`` its target's weight."""
    z = x.double()
    w = kw.get("weight", torch.ones(z.shape[-1])).double()
    valid = t != kw.get("ignore_index", -100)
    omega = torch.where(valid, w[t.clamp(0, z.shape[-1] - 1)], 0.0)
    g = upstream.double() if upstream is not None else torch.ones(len(t), dtype=torch.float64)
    if reduction == "mean":
        g = g / omega.sum()
    lse = torch.logsumexp(z, -1).abs()
    eps = kw.get("label_smoothing", 0.0)
    return (g * (omega * (1 + 2 * kw.get("z_loss", 0.0) * lse) + eps * w.sum() / z.shape[-1])).unsqueeze(-1)


def _is_small_path(loss) -> bool:
    plan = getattr(loss.grad_fn, "call", None)
    return plan is not None and plan.one_pass is not None and plan.one_pass.backend == "c"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", list(ROW_OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("classes", [7, 1000, 70_000], ids=["C=7", "C=1000", "C=70000-streaming"])
def test_matches_the_float64_reference(dtype, option, reduction, classes):
    # 70000 columns is past the kernels' row buffer (2^16): the streaming pair of passes runs instead
    x, t, w = row_case(2 if classes > 10_000 else 12, classes, dtype)
    kw = row_kwargs(ROW_OPTIONS[option], w)
    xr = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xr, t, reduction=reduction, **kw)
    assert _is_small_path(loss) and loss.dtype == torch.float32
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5 if loss.dim() else None
    loss.backward(upstream)
    ref_loss, ref_grad = row_reference(x, t, kw, reduction)
    if upstream is not None:
        ref_grad = ref_grad * upstream.double().unsqueeze(-1)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6 * math.log(classes + 1))
    # rounded once to the input dtype: within an ulp of each element, or a few fp32 ulps of the row's largest
    # term (p_t − 1 cancels where p_t ≈ 1); the floor is the dtype's subnormal spacing
    assert xr.grad.dtype == dtype
    err = (xr.grad.double() - ref_grad).abs()
    bound = ULP[dtype] * ref_grad.abs() + 4 * 2**-23 * _largest_term(x, t, kw, reduction, upstream)
    bound += torch.finfo(dtype).smallest_normal * ULP[dtype]
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_other_than_one_reruns_the_gradient_pass(dtype, reduction):
    # the gradient formed in forward is for grad_output 1; any other takes the C gradient pass from the saved lse,
    # rounded once: the same bits as the O(N) path's, which computes it the same way
    x, t, w = row_case(10, 300, dtype)
    xr = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xr, t, w, reduction=reduction, label_smoothing=0.1)
    (loss * 0.37).backward()
    ref_loss, ref_grad = row_reference(x, t, {"weight": w, "label_smoothing": 0.1}, reduction)
    torch.testing.assert_close(xr.grad.double(), 0.37 * ref_grad, rtol=ULP[dtype], atol=4 * 2**-23 * 0.37)


def test_retain_graph_gives_the_same_gradient_each_time():
    # the first backward hands out the formed gradient, later ones recompute it from the saved lse (equal up to
    # rounding: exp(z − lse) there, (1 / S) exp(z − m) here)
    x, t, _ = row_case(8, 500, torch.float32)
    xr = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xr, t)
    loss.backward(retain_graph=True)
    first = xr.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(xr.grad, 2 * first, rtol=1e-6, atol=1e-10)
    xr.grad.zero_()  # an optimizer's zero_grad(set_to_none=False)
    loss.backward()
    torch.testing.assert_close(xr.grad, first, rtol=1e-6, atol=1e-10)


def test_double_backward_matches_pytorch():
    x, t, w = row_case(6, 40, torch.float64)
    x32 = x.float().requires_grad_()
    xd = x.clone().requires_grad_()
    v = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad(crossent.cross_entropy(x32, t, w.float(), label_smoothing=0.1), x32, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x32)
    (gd,) = torch.autograd.grad(F.cross_entropy(xd, t, w.double(), label_smoothing=0.1), xd, create_graph=True)
    (hvd,) = torch.autograd.grad((gd * v.double()).sum(), xd)
    torch.testing.assert_close(g.double(), gd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hv.double(), hvd, rtol=1e-4, atol=1e-6)


def test_no_grad_and_no_requires_grad_calls_make_no_graph():
    x, t, _ = row_case(8, 100, torch.bfloat16)
    with torch.no_grad():
        a = crossent.cross_entropy(x.clone().requires_grad_(), t)
    b = crossent.cross_entropy(x, t)
    c = crossent.cross_entropy(x.clone().requires_grad_(), t)
    assert a.grad_fn is None and b.grad_fn is None and _is_small_path(c)
    assert torch.equal(a, b) and torch.equal(a, c.detach())


def test_strided_rows_and_targets():
    wide = torch.randn(8, 900)
    x = wide[:, 100:700]  # rows of a wider buffer: row stride 900
    t = torch.randint(0, 600, (16,))[::2]  # a non-contiguous target
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr, t)
    ref.backward()
    xs = x.requires_grad_()
    loss = crossent.cross_entropy(xs, t)
    loss.backward()
    assert _is_small_path(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wide.grad if wide.grad is not None else x.grad, xr.grad, rtol=1e-5, atol=1e-8)


def test_keeps_the_formed_gradient_and_o_n_otherwise():
    x, t, _ = row_case(8, 100, torch.bfloat16)
    for reduction, formed in (("mean", True), ("none", False)):
        xr = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append((tuple(s.shape), s.dtype)) or s, lambda s: s):
            loss = crossent.cross_entropy(xr, t, reduction=reduction)
        assert saved == [((8, 100), torch.bfloat16), ((8,), torch.int64), ((8,), torch.float64)]  # input, target, lse
        kept = loss.grad_fn.formed
        assert (kept is not None and kept.shape == (8, 100) and kept.dtype == torch.bfloat16) == formed
        assert saved_bytes(lambda: crossent.cross_entropy(xr, t, reduction=reduction), xr) == 8 * 8 + 8 * 8 + (
            8 * 100 * 2 if formed else 0)


def test_the_formed_gradient_is_handed_out_once():
    # torch.autograd.grad returns it to the caller, who may change it: a second backward must not reuse it
    x, t, _ = row_case(8, 100, torch.float32)
    xr = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xr, t)
    (g1,) = torch.autograd.grad(loss, xr, retain_graph=True)
    expected = g1.clone()
    g1.zero_()
    (g2,) = torch.autograd.grad(loss, xr)
    assert g2.data_ptr() != g1.data_ptr()
    torch.testing.assert_close(g2, expected, rtol=1e-6, atol=1e-9)


def test_forward_mode_ad_takes_the_differentiable_path():
    import torch.autograd.forward_ad as fwAD

    x, t, _ = row_case(4, 5, torch.float32)
    v = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    expected = torch.func.jvp(lambda z: F.cross_entropy(z, t), (x,), (v,))[1]
    for requires_grad in (False, True):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.clone().requires_grad_(requires_grad), v)
            tangent = fwAD.unpack_dual(crossent.cross_entropy(dual, t)).tangent
        torch.testing.assert_close(tangent, expected, rtol=1e-5, atol=1e-7)


def test_class_weights_that_require_grad_are_read_detached():
    x, t, w = row_case(8, 100, torch.float32)
    w = w.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = crossent.cross_entropy(x.clone().requires_grad_(), t, w)
    ref = F.cross_entropy(x, t, w.detach())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
