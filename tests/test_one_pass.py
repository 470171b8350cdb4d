"""The one-pass backends for small CPU inputs (``kernels/one_pass.py``: the C kernels' one pass, and PyTorch's fused
log_softmax + nll_loss, "aten") equal the rows' kernels on every option: the same loss, gradients, dtypes,
statistics and errors; only what is kept for backward differs. Each test runs under both backends (``backend``)."""

import math

import pytest
import torch

import crossent
from crossent.kernels import cpu_rows, dispatch

pytestmark = [pytest.mark.one_pass, pytest.mark.cpu_path]  # cpu_path: the C one pass runs each level's build


@pytest.fixture(params=["c", "aten"])
def backend(request, monkeypatch):
    """The one-pass backend a test's small calls take: "aten" is forced through the dispatch table that sends the
    shapes where PyTorch's kernel is faster to it (every size, every dtype)."""
    if request.param == "c" and not cpu_rows.available():
        pytest.skip("crossent._cpu_rows was not built (no C compiler)")
    if request.param == "aten":
        everything = {dtype: 0 for dtype in (torch.float32, torch.bfloat16, torch.float16)}
        monkeypatch.setattr(dispatch, "PYTORCH_FASTER_FROM", {cpu_rows.VARIANT: everything})
    return request.param


def _node(loss):
    """The cross-entropy Function's node in ``loss``'s graph (behind the reduction's nodes on the rows' path)."""
    node = loss.grad_fn
    while not hasattr(node, "call"):
        node = node.next_functions[0][0]
    return node


def _taken(loss) -> str:
    """The backend that ran a differentiable call: the one pass's, or "rows"."""
    plan = _node(loss).call.one_pass
    return "rows" if plan is None else plan.backend

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


def _rows_only(fn):
    """``fn()`` with the one-pass backends off: the rows' kernels at every size."""
    limit = dispatch.ONE_PASS_MAX_ELEMENTS
    dispatch.ONE_PASS_MAX_ELEMENTS = -1
    try:
        return fn()
    finally:
        dispatch.ONE_PASS_MAX_ELEMENTS = limit


def _both(z, t, kw, reduction, grad_output, backend):
    """(loss, grad) through the one pass (checking which backend ran) and through the rows' kernels."""
    def run():
        x = z.clone().requires_grad_()
        loss = crossent.cross_entropy(x, t, reduction=reduction, **kw)
        taken = _taken(loss)
        loss.backward(grad_output(loss))
        return loss, x.grad, taken

    small, big = run(), _rows_only(run)
    one_pass = z.dim() == 2 and "softcap" not in kw  # (N, C, d) and softcap: the rows' kernels at every size
    c_covers = backend == "c" and z.dtype != torch.float64  # float64: the C kernels decline, aten runs
    assert small[2] == (("c" if c_covers else "aten") if one_pass else "rows")
    assert big[2] == "rows"
    return small[:2], big[:2]


@pytest.mark.parametrize("shape", [(16, C), (4, C, 3)], ids=["NxC", "NxCxd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", OPTIONS)
def test_small_path_equals_the_kernels(shape, dtype, reduction, option, backend):
    # a reduced loss: grad_output 1, the gradient formed in forward is handed out; "none": per-row upstream values,
    # the one pass's gradient pass runs (another grad_output of a reduced loss: the test below)
    z, t, kw = _case(shape, option, dtype)
    def grad_output(loss):  # the same upstream gradient for both paths
        if reduction != "none":
            return torch.ones_like(loss)
        return torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=loss.dtype) + 0.5
    (small, d_small), (big, d_big) = _both(z, t, kw, reduction, grad_output, backend)
    assert small.dtype == big.dtype and d_small.dtype == d_big.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(small, big, **tol)
    grad_tol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=2e-3)  # one bf16 rounding apart
    torch.testing.assert_close(d_small, d_big, **grad_tol)


def test_the_one_pass_keeps_its_gradient_and_the_rows_path_o_n(backend):
    z, t = torch.randn(8, C, requires_grad=True), torch.randint(0, C, (8,))
    loss = crossent.cross_entropy(z, t)
    assert _taken(loss) == backend and loss.grad_fn.formed.shape == (8, C)  # the gradient formed in forward
    big = torch.randn(8, (1 << 20) // 8 + 1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        loss = crossent.cross_entropy(big.requires_grad_(), torch.zeros(8, dtype=torch.long))
    assert _taken(loss) == "rows" and _node(loss).formed is None
    assert all(math.prod(s) <= big.numel() for s in saved) and (8,) in saved  # the O(N) path: input + LSE


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_target_ignored_gives_zero_and_zero_gradient(reduction, backend):
    z = torch.randn(5, C, requires_grad=True)
    loss = crossent.cross_entropy(z, torch.full((5,), -100), reduction=reduction, label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros(5, C))


@pytest.mark.parametrize("shape", [(0, C), (0, C, 2)], ids=["N=0", "N=0-kdim"])
def test_empty_batch_mean_is_zero(shape, backend):
    z = torch.randn(shape, requires_grad=True)
    loss = crossent.cross_entropy(z, torch.zeros(shape[:1] + shape[2:], dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and z.grad.shape == shape


def test_ignored_all_minus_inf_rows_get_a_zero_gradient(backend):
    z = torch.randn(4, C)
    z[1] = -math.inf
    x = z.requires_grad_()
    loss = crossent.cross_entropy(x, torch.tensor([0, -100, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(x.grad[1], torch.zeros(C)) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("target", [[0, C, 1], [0, -100, -5, 2], [-100, -100, C]], ids=["above", "below-with-ignored", "above-with-ignored"])
def test_out_of_range_is_a_value_error(target, backend):
    with pytest.raises(ValueError, match="outside"):
        crossent.cross_entropy(torch.randn(len(target), C), torch.tensor(target))


@pytest.mark.parametrize("option", ["plain", "all"])
def test_return_stats_on_the_small_path(option, backend):
    z, t, kw = _case((16, C), option, torch.float32)
    out = crossent.cross_entropy(z, t, return_stats=True, **kw)
    ref = _rows_only(lambda: crossent.cross_entropy(z, t, return_stats=True, **kw))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("option", ["plain", "all"])
def test_compiled_and_vmapped_small_calls_work_and_match_eager(option, backend):
    """The one pass reads the target and total weight on the host: under torch.compile(fullgraph=True) and vmap the
    call takes the rows' custom ops instead (it used to fail with a data-dependent guard / .item())."""
    z, t, kw = _case((16, C), option, torch.float32)
    eager = crossent.cross_entropy(z, t, **kw)
    compiled = torch.compile(lambda a, b: crossent.cross_entropy(a, b, **kw), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, t), eager, rtol=2e-6, atol=2e-6)
    batch = torch.stack([z, 2 * z])
    vmapped = torch.func.vmap(lambda a: crossent.cross_entropy(a, t, **kw))(batch)
    torch.testing.assert_close(vmapped, torch.stack([eager, crossent.cross_entropy(2 * z, t, **kw)]), rtol=2e-6, atol=2e-6)


def test_a_mean_over_zero_total_class_weight_is_zero_with_zero_gradient(backend):
    z = torch.randn(6, C, requires_grad=True)
    weight = torch.ones(C)
    weight[:3] = 0.0
    loss = crossent.cross_entropy(z, torch.tensor([0, 1, 2, -100, 0, 1]), weight, label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_other_grad_outputs_second_backward_and_in_place_equal_the_kernels(reduction, dtype, inplace, backend):
    # grad_output 0.37 and a second backward (retain_graph) run the one pass's gradient pass from the saved lse;
    # in place, the logits (a layer's output) are overwritten with the gradient
    z, t, kw = _case((16, C), "all", dtype)
    del kw["softcap"]  # (the rows' kernels take softcap)
    def run():
        leaf = z.clone().requires_grad_()
        logits = leaf * 1.0 if inplace else leaf
        loss = crossent.cross_entropy(logits, t, reduction=reduction, inplace_backward=inplace, **kw)
        taken = _taken(loss)
        loss.backward(torch.tensor(0.37), retain_graph=not inplace)
        if inplace:
            assert torch.equal(logits.detach(), leaf.grad)
        else:
            loss.backward(torch.tensor(0.63))  # accumulates: 1.0 in all
        return loss, leaf.grad, taken

    (small, d_small, taken), (big, d_big, _) = run(), _rows_only(run)
    assert taken == ("aten" if backend == "aten" or dtype == torch.float64 else "c")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(small, big, **tol)
    torch.testing.assert_close(d_small, d_big, **(tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=2e-3)))
