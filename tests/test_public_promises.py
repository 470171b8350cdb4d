"""What a user gets by default: the public functions and modules with no internal switch (the one-pass backends on,
as tests/conftest.py leaves them in tests marked ``one_pass``), over option × dtype × reduction × in-place backward ×
sizes on both sides of every size threshold, against the float64 oracle (``crossent.reference``) and PyTorch.

A result passes when its error against the oracle is at most the naive same-dtype computation's (PyTorch's own
ops in the input's dtype, with the recipe for the options PyTorch lacks) plus a few units of the compute dtype's
rounding. In-place backward must leave the gradient in the logits themselves, and the leaf's gradient right.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference

pytestmark = pytest.mark.one_pass  # no switch: what a user's call runs (tests/conftest.py)

# Each option alone, all of them at once (every option the C one pass takes) and softcap (which it does not); the
# ignored index lies inside [0, C), so a wrong mask would count a real class.
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 3},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "all": {"weight": True, "ignore_index": 3, "label_smoothing": 0.1, "z_loss": 1e-3},
    "softcap": {"softcap": 5.0, "weight": True, "ignore_index": 3},
}
EPS = {torch.float32: 2**-23, torch.bfloat16: 2**-23, torch.float16: 2**-23, torch.float64: 2**-52}  # compute dtype


def _case(shape, dtype, option, seed=0):
    """Logits of ``shape`` (class dim 1, or 0 when unbatched), class-index targets (every fourth one the ignore
    option's index 3; not the one target of an unbatched row: PyTorch's mean over no target is NaN, crossent's 0)
    and the option's keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    x = (3.0 * torch.randn(shape, generator=g)).to(dtype)
    t = torch.randint(0, num_classes, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=g)
    if t.dim():
        t.view(-1)[::4] = 3
    kw = dict(OPTIONS[option])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(num_classes, generator=g) + 0.5
    return x, t, kw


def _oracle(x, t, kw, reduction, upstream):
    """float64 loss and gradient of ``crossent.reference`` on the logits as given (rounded to their dtype)."""
    args = {k: (v.double().numpy() if k == "weight" else v) for k, v in kw.items()}
    z = x.double().numpy()
    loss = reference.cross_entropy(z, t.numpy(), reduction=reduction, **args)
    grad = reference.cross_entropy_grad(z, t.numpy(), reduction=reduction, grad_output=upstream.double().numpy(),
                                        **args)  # fmt: skip
    return torch.as_tensor(loss), torch.as_tensor(grad)


def _naive_loss(z, t, kw, reduction):
    """PyTorch's loss in the logits' dtype: F.cross_entropy on the soft-capped logits ``z``, plus the z-loss recipe
    ``s · w_t · logsumexp²`` reduced alike."""
    w = kw.get("weight")
    w = None if w is None else w.to(z.dtype)
    ignore = kw.get("ignore_index", -100)
    zc = z if kw.get("softcap") is None else kw["softcap"] * torch.tanh(z / kw["softcap"])
    loss = F.cross_entropy(zc, t, w, ignore_index=ignore, reduction=reduction,
                           label_smoothing=kw.get("label_smoothing", 0.0))  # fmt: skip
    if kw.get("z_loss"):
        omega = torch.where(t != ignore, 1.0 if w is None else w[t.clamp(0, len(w) - 1)], 0.0).to(z.dtype)
        lse = torch.logsumexp(zc, 0 if z.dim() == 1 else 1)
        rows = kw["z_loss"] * omega * lse * lse
        loss = loss + {"none": rows, "sum": rows.sum(), "mean": rows.sum() / omega.sum()}[reduction]
    return loss


def _naive(x, t, kw, reduction, upstream):
    """:func:`_naive_loss` and its gradient by autograd, in the input's dtype."""
    z = x.clone().requires_grad_()
    loss = _naive_loss(z, t, kw, reduction)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), z.grad


def _upstream(reduction, batch_shape):
    """grad_output: 1 for a reduced loss (the one pass hands out the gradient it formed in forward), positive
    per-position values for ``"none"``."""
    if reduction != "none":
        return torch.tensor(1.0)
    return torch.rand(batch_shape, generator=torch.Generator().manual_seed(1)) + 0.5


def _check(ours, naive, oracle, eps, what):
    """``max |ours − oracle| ≤ max |naive − oracle| + tol · max(1, max |oracle|)``, ``tol`` 16 units of the compute
    dtype's rounding (``eps``), plus half a unit of a 16-bit result's own (rounding in another order than the naive
    computation's, e.g. a bf16 dW product's sum, may land one rounding step away at the largest element)."""
    ours_err = (ours.double() - oracle).abs().max() if oracle.numel() else 0.0
    naive_err = (naive.double() - oracle).abs().max() if oracle.numel() else 0.0
    tol = 16 * eps + (torch.finfo(ours.dtype).eps / 2 if ours.dtype in (torch.bfloat16, torch.float16) else 0.0)
    bound = naive_err + tol * max(1.0, float(oracle.abs().max()) if oracle.numel() else 1.0)
    assert ours_err <= bound, f"{what}: error {float(ours_err):.3g} > naive {float(naive_err):.3g} + tolerance"


def _run_cross_entropy(x, t, kw, reduction, inplace, module):
    """crossent's loss and the gradient of the logits: through a non-leaf tensor (a layer's output) with
    ``inplace_backward`` — whose storage must then hold the gradient — or the leaf's own ``.grad``."""
    upstream = _upstream(reduction, t.shape)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0 if inplace else leaf
    options = {k: v for k, v in kw.items() if k != "weight"}
    if module:
        loss = crossent.CrossEntropyLoss(kw.get("weight"), reduction=reduction, inplace_backward=inplace, **options)(
            logits, t)
    else:
        loss = crossent.cross_entropy(logits, t, kw.get("weight"), reduction=reduction, inplace_backward=inplace,
                                      **options)  # fmt: skip
    loss.backward(upstream.to(loss.dtype))
    if inplace:
        torch.testing.assert_close(logits.detach(), leaf.grad, rtol=0, atol=0)  # the gradient, in the logits
    return loss.detach(), leaf.grad, upstream


def _check_cross_entropy(shape, dtype, option, reduction, inplace, module):
    x, t, kw = _case(shape, dtype, option)
    loss, grad, upstream = _run_cross_entropy(x, t, kw, reduction, inplace, module)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
    assert loss.shape == (t.shape if reduction == "none" else ()) and grad.shape == x.shape
    ref_loss, ref_grad = _oracle(x, t, kw, reduction, upstream)
    naive_loss, naive_grad = _naive(x, t, kw, reduction, upstream)
    _check(loss, naive_loss, ref_loss, EPS[dtype], "loss")
    _check(grad, naive_grad, ref_grad, EPS[dtype], "gradient")
    return loss, grad


# --- small sizes: every option, dtype, reduction and in-place; the three layouts ------------------------------------
# (13, 37): rows of an odd width; (37,): one unbatched row; (4, 37, 3): the class dim in the middle. All well below
# every threshold, so the calls run the one-pass backends where they apply (the C one pass; PyTorch's fused ops for
# float64) and the rows' kernels where not (softcap, (N, C, d)).
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("shape", [(13, 37), (37,), (4, 37, 3)], ids=["NxC", "C", "NxCxd"])
def test_cross_entropy_and_its_module_at_small_sizes(shape, option, dtype, reduction, inplace):
    loss, grad = _check_cross_entropy(shape, dtype, option, reduction, inplace, module=False)
    if len(shape) != 2:
        return  # the module is checked on (N, C) logits
    x, t, kw = _case(shape, dtype, option)
    loss_m, grad_m, _ = _run_cross_entropy(x, t, kw, reduction, inplace, module=True)
    torch.testing.assert_close(loss_m, loss, rtol=0, atol=0)  # the module is the function
    torch.testing.assert_close(grad_m, grad, rtol=0, atol=0)


# --- both sides of each size threshold: a pairwise set ----------------------------------------------------------
# Thresholds: 2^16 columns (the C kernels' row buffer: longer rows stream), 2^17 logits (where the one pass's
# predecessors split), 2^20 logits (dispatch.ONE_PASS_MAX_ELEMENTS: the one pass below, the rows' kernels above).
# The full grid at these sizes would take minutes on CI's 2 cores; these 9 rows cover every pair of values of
# (option, reduction, in-place, dtype) — a pairwise (covering-array) set — at each size.
PAIRWISE = [
    ("plain", "mean", False, torch.float32), ("plain", "sum", True, torch.bfloat16),
    ("plain", "none", True, torch.float32), ("all", "mean", True, torch.bfloat16), ("all", "sum", False, torch.float32),
    ("all", "none", False, torch.bfloat16), ("softcap", "mean", True, torch.float32),
    ("softcap", "sum", False, torch.bfloat16), ("softcap", "none", True, torch.bfloat16),
]  # fmt: skip
THRESHOLD_SHAPES = {
    "C=2^16": (2, 1 << 16), "C=2^16+1": (2, (1 << 16) + 1),
    "2^17": (128, 1024), "2^17+": (129, 1024),
    "2^20": (1024, 1024), "2^20+": (1025, 1024),
}  # fmt: skip


@pytest.mark.parametrize("option, reduction, inplace, dtype", PAIRWISE, ids=lambda v: str(v))
@pytest.mark.parametrize("size", THRESHOLD_SHAPES)
def test_cross_entropy_on_both_sides_of_each_threshold(size, option, reduction, inplace, dtype):
    module = PAIRWISE.index((option, reduction, inplace, dtype)) % 2 == 1  # every other row through the module
    _check_cross_entropy(THRESHOLD_SHAPES[size], dtype, option, reduction, inplace, module)


def test_in_place_backward_writes_the_logits_at_flash_attentions_sizes():
    # flash-attention's own in-place tests use these sizes (1 × 192 … 289 × 1024, 1 × 128256): all at most 2^20 logits
    for n, c in [(1, 192), (7, 512), (289, 1024), (1, 128256)]:
        x, t, _ = _case((n, c), torch.float32, "plain")
        _check_cross_entropy((n, c), torch.float32, "smoothing", "mean", True, module=False)
        leaf = x.clone().requires_grad_()
        logits = leaf * 1.0
        before = logits.detach().clone()
        crossent.cross_entropy(logits, t, inplace_backward=True).backward()
        assert not torch.equal(logits.detach(), before) and torch.equal(logits.detach(), leaf.grad)


# --- the fused linear cross-entropy and its module ---------------------------------------------------------------
def _linear_case(n, vocab, dim, dtype, option, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g).to(dtype)
    w = (torch.randn(vocab, dim, generator=g) / math.sqrt(dim)).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::4] = 3
    kw = dict(OPTIONS[option])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(vocab, generator=g) + 0.5
    return x, w, t, kw


def _check_linear(n, vocab, dim, dtype, option, reduction, module):
    x, w, t, kw = _linear_case(n, vocab, dim, dtype, option)
    upstream = _upstream(reduction, t.shape)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    options = {k: v for k, v in kw.items() if k != "weight"}
    if module:
        loss = crossent.LinearCrossEntropyLoss(kw.get("weight"), reduction=reduction, **options)(xr, wr, t)
    else:
        loss = crossent.linear_cross_entropy(xr, wr, t, weight=kw.get("weight"), reduction=reduction, **options)
    loss.backward(upstream.to(loss.dtype))
    assert loss.dtype == torch.float32 and xr.grad.dtype == wr.grad.dtype == dtype
    # the oracle: the float64 reference on the float64 product of the operands as given; the naive computation:
    # F.linear and the loss in the operands' dtype, by autograd
    z = x.double() @ w.double().T
    ref_loss, ref_grad = _oracle(z, t, kw, reduction, upstream)
    xn, wn = x.clone().requires_grad_(), w.clone().requires_grad_()
    naive_loss = _naive_loss(F.linear(xn, wn), t, kw, reduction)
    naive_loss.backward(upstream.to(naive_loss.dtype))
    _check(loss.detach(), naive_loss.detach(), ref_loss, EPS[dtype], "loss")
    _check(xr.grad, xn.grad, ref_grad @ w.double(), EPS[dtype] * math.sqrt(vocab), "dX")
    _check(wr.grad, wn.grad, ref_grad.T @ x.double(), EPS[dtype] * math.sqrt(n), "dW")


@pytest.mark.parametrize("module", [False, True], ids=["function", "module"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option", OPTIONS)
def test_linear_cross_entropy_and_its_module_at_a_small_size(option, dtype, reduction, module):
    _check_linear(13, 37, 16, dtype, option, reduction, module)


@pytest.mark.parametrize("option, reduction, _inplace, dtype", PAIRWISE[:6], ids=lambda v: str(v))
@pytest.mark.parametrize("n, vocab", [(2, 1 << 16), (2, (1 << 16) + 1), (16, 1 << 16), (17, 1 << 16)],
                         ids=["V=2^16", "V=2^16+1", "2^20", "2^20+"])  # fmt: skip
def test_linear_cross_entropy_on_both_sides_of_each_threshold(n, vocab, option, reduction, _inplace, dtype):
    module = PAIRWISE.index((option, reduction, _inplace, dtype)) % 2 == 1  # every other row through the module
    _check_linear(n, vocab, 8, dtype, option, reduction, module)


def test_module_attributes_are_those_of_torch():
    ours, theirs = crossent.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    for name in torch.nn.CrossEntropyLoss.__constants__:  # ignore_index, reduction, label_smoothing
        assert getattr(ours, name) == getattr(theirs, name)
    assert ours.weight is None and theirs.weight is None
    w = torch.rand(5) + 0.5
    ours = crossent.CrossEntropyLoss(w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    assert (ours.ignore_index, ours.reduction, ours.label_smoothing) == (2, "sum", 0.1)
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys() == {"weight"}
    assert ours.state_dict().keys() == theirs.state_dict().keys() and torch.equal(ours.weight, theirs.weight)
    x, t = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 2])
    for name, value in (("ignore_index", 4), ("reduction", "none"), ("label_smoothing", 0.2)):
        setattr(ours, name, value)  # as user code sets them on nn.CrossEntropyLoss, which reads them per call
        setattr(theirs, name, value)
        assert getattr(ours, name) == value
        torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-6, atol=1e-6)
    ours.weight = theirs.weight = torch.ones(5)  # a buffer: assigned as in torch
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        ours.reduction = "avg"
    with pytest.raises(TypeError, match="weight"):
        crossent.CrossEntropyLoss(weight=[1.0, 2.0])


def test_linear_module_attributes_are_its_options():
    loss_fn = crossent.LinearCrossEntropyLoss(ignore_index=1, chunk_size=4, logit_scale=0.5, reduction="sum")
    assert (loss_fn.ignore_index, loss_fn.chunk_size, loss_fn.logit_scale, loss_fn.reduction) == (1, 4, 0.5, "sum")
    assert loss_fn.weight is None and loss_fn.label_smoothing == 0.0 and loss_fn.accumulate_dtype == "float32"
    x, w, t = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([0, 1, 2, 3, 1])
    loss_fn.reduction = "none"
    assert loss_fn(x, w, t).shape == (5,)
    with pytest.raises(ValueError, match="chunk_size"):
        loss_fn.chunk_size = 0
