"""The small-input path (``crossent._materialized``: PyTorch's fused log_softmax + nll) equals the O(N) kernels
on every option: the same loss, gradients, dtypes, statistics and errors; only what is saved differs."""

import math

import pytest
import torch

import crossent
from crossent import _materialized

pytestmark = pytest.mark.materialized

C = 11
# Each option alone and combined; ignore_index inside [0, C) too; weights with a zero (a zero-weight mean).
OPTIONS = {
    "plain": {},
    "weight": {"weight": "rand"},
    "ignore": {"ignore_index": 4},
    "smoothing": {"label_smoothing": 0.15},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "all": {"weight": "rand", "ignore_index": 4, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
}


def _case(shape, option, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(OPTIONS[option])
    n = shape[0]
    z = (3.0 * torch.randn(shape, generator=g)).to(dtype)
    t = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
    t.view(-1)[:: 3] = kw.get("ignore_index", -100)
    if kw.get("weight") == "rand":
        kw["weight"] = torch.rand(C, generator=g) + 0.5
    assert n  # the grid below never builds an empty batch here
    return z, t, kw


def _both(z, t, kw, reduction, grad_output):
    """(loss, grad) through the small-input path and through the O(N) kernels."""
    out = []
    for limit in (_materialized.MATERIALIZED_MAX_ELEMENTS, -1):
        _materialized.MATERIALIZED_MAX_ELEMENTS = limit
        try:
            x = z.clone().requires_grad_()
            loss = crossent.cross_entropy(x, t, reduction=reduction, **kw)
            loss.backward(grad_output(loss))
            out.append((loss, x.grad))
        finally:
            _materialized.MATERIALIZED_MAX_ELEMENTS = 1 << 20
    return out


@pytest.mark.parametrize("shape", [(16, C), (4, C, 3)], ids=["NxC", "NxCxd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", OPTIONS)
def test_small_path_equals_the_kernels(shape, dtype, reduction, option):
    z, t, kw = _case(shape, option, dtype)
    def grad_output(loss):  # the same upstream gradient for both paths
        return torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=loss.dtype) + 0.5
    (small, d_small), (big, d_big) = _both(z, t, kw, reduction, grad_output)
    assert small.dtype == big.dtype and d_small.dtype == d_big.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(small, big, **tol)
    grad_tol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=2e-3)  # one bf16 rounding apart
    torch.testing.assert_close(d_small, d_big, **grad_tol)


def test_the_small_path_is_taken_and_saves_what_pytorch_saves():
    z, t = torch.randn(8, C, requires_grad=True), torch.randint(0, C, (8,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        crossent.cross_entropy(z, t)
    assert (8, C) in saved  # PyTorch's log-probabilities: the path below the threshold
    big = torch.randn(8, (1 << 20) // 8 + 1)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        crossent.cross_entropy(big.requires_grad_(), torch.zeros(8, dtype=torch.long))
    assert all(math.prod(s) <= big.numel() for s in saved) and (8,) in saved  # the O(N) path: input + LSE


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_target_ignored_gives_zero_and_zero_gradient(reduction):
    z = torch.randn(5, C, requires_grad=True)
    loss = crossent.cross_entropy(z, torch.full((5,), -100), reduction=reduction, label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros(5, C))


@pytest.mark.parametrize("shape", [(0, C), (0, C, 2)], ids=["N=0", "N=0-kdim"])
def test_empty_batch_mean_is_zero(shape):
    z = torch.randn(shape, requires_grad=True)
    loss = crossent.cross_entropy(z, torch.zeros(shape[:1] + shape[2:], dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and z.grad.shape == shape


def test_ignored_all_minus_inf_rows_get_a_zero_gradient():
    z = torch.randn(4, C)
    z[1] = -math.inf
    x = z.requires_grad_()
    loss = crossent.cross_entropy(x, torch.tensor([0, -100, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(x.grad[1], torch.zeros(C)) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("target", [[0, C, 1], [0, -100, -5, 2], [-100, -100, C]], ids=["above", "below-with-ignored", "above-with-ignored"])
def test_out_of_range_is_a_value_error(target):
    with pytest.raises(ValueError, match="outside"):
        crossent.cross_entropy(torch.randn(len(target), C), torch.tensor(target))


@pytest.mark.parametrize("option", ["plain", "all"])
def test_return_stats_on_the_small_path(option):
    z, t, kw = _case((16, C), option, torch.float32)
    out = crossent.cross_entropy(z, t, return_stats=True, **kw)
    _materialized.MATERIALIZED_MAX_ELEMENTS = -1
    try:
        ref = crossent.cross_entropy(z, t, return_stats=True, **kw)
    finally:
        _materialized.MATERIALIZED_MAX_ELEMENTS = 1 << 20
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("option", ["plain", "all"])
def test_compiled_and_vmapped_small_calls_work_and_match_eager(option):
    """The small path reads the target and total weight on the host: under torch.compile(fullgraph=True) and
    vmap the call takes the O(N) custom ops instead (it used to fail with a data-dependent guard / .item())."""
    z, t, kw = _case((16, C), option, torch.float32)
    eager = crossent.cross_entropy(z, t, **kw)
    compiled = torch.compile(lambda a, b: crossent.cross_entropy(a, b, **kw), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, t), eager, rtol=2e-6, atol=2e-6)
    batch = torch.stack([z, 2 * z])
    vmapped = torch.func.vmap(lambda a: crossent.cross_entropy(a, t, **kw))(batch)
    torch.testing.assert_close(vmapped, torch.stack([eager, crossent.cross_entropy(2 * z, t, **kw)]), rtol=2e-6, atol=2e-6)


def test_a_mean_over_zero_total_class_weight_is_zero_with_zero_gradient():
    z = torch.randn(6, C, requires_grad=True)
    weight = torch.ones(C)
    weight[:3] = 0.0
    loss = crossent.cross_entropy(z, torch.tensor([0, 1, 2, -100, 0, 1]), weight, label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
