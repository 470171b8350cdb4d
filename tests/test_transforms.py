"""Drop-in under PyTorch's transforms: torch.func (grad, vmap, jacrev, jvp, hessian), double backward,
autocast, torch.export, dynamic shapes, determinism, and torch.library.opcheck on every custom op.

The ground truth is PyTorch itself on the same float64 tensors: ``F.cross_entropy`` plus the documented
extras in plain torch (softcap first, ``z_loss · ω · lse²``), which every transform differentiates natively.
"""

import numpy as np
import torch._dynamo.testing
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacrev, jvp, vmap

import crossent
from crossent._options import RowOptions
from crossent._precision import fast_half_products
from crossent.kernels import linear_ops, ops
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.op_args import flatten
from crossent.kernels.shard import VocabShard

F64 = dict(rtol=1e-10, atol=1e-12)
C = 7

# Each option on its own, and everything that combines; probability targets with and without extras.
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 3},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.0},
    "all": {"weight": True, "ignore_index": 3, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0},
    "probs": {"probs": True},
    "probs_all": {"probs": True, "weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0},
}


def make_case(option, rows=5, batch=None, seed=0):
    """(logits, target, keyword options for crossent) in float64; ``batch`` adds a leading vmap dim."""
    g = torch.Generator().manual_seed(seed)
    opts = dict(OPTIONS[option])
    lead = (rows,) if batch is None else (batch, rows)
    z = 2.0 * torch.randn(*lead, C, generator=g, dtype=torch.float64)
    if opts.pop("probs", False):
        t = torch.softmax(torch.randn(*lead, C, generator=g, dtype=torch.float64), -1)
    else:
        t = torch.randint(0, C, lead, generator=g)
        if "ignore_index" in opts:
            t[..., 1] = opts["ignore_index"]  # one ignored position per batch, never all of them
    if opts.pop("weight", False):
        opts["weight"] = 0.5 + torch.rand(C, generator=g, dtype=torch.float64)
    return z, t, opts


def torch_recipe(z, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None):  # fmt: skip
    """PyTorch's cross_entropy with the documented extras, in plain (transformable) torch ops."""
    x = z if softcap is None else softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(x, t, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if t.is_floating_point():
        omega = t.sum(-1) if weight is None else t @ weight
        denom = torch.tensor(float(rows.numel()), dtype=z.dtype)
    else:
        valid = t != ignore_index
        w_t = torch.ones_like(rows) if weight is None else weight[t.clamp(0, C - 1)]
        omega = torch.where(valid, w_t, 0.0)
        denom = omega.sum()
    rows = rows + z_loss * omega * torch.logsumexp(x, -1) ** 2
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / denom


def both(option, reduction="mean"):
    """(crossent's loss, PyTorch's recipe) as functions of (logits, target)."""
    _, _, opts = make_case(option)
    opts = dict(opts, reduction=reduction)
    return (lambda z, t: crossent.cross_entropy(z, t, **opts)), (lambda z, t: torch_recipe(z, t, **opts))


# --- torch.func on cross_entropy ------------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
def test_grad_jacrev_jvp_hessian_equal_pytorch(option):
    z, t, _ = make_case(option)
    ours, theirs = both(option)
    torch.testing.assert_close(grad(ours)(z, t), grad(theirs)(z, t), **F64)
    torch.testing.assert_close(jacrev(ours)(z, t), jacrev(theirs)(z, t), **F64)
    tangent = torch.randn_like(z)
    torch.testing.assert_close(jvp(lambda x: ours(x, t), (z,), (tangent,))[1],
                               jvp(lambda x: theirs(x, t), (z,), (tangent,))[1], **F64)  # fmt: skip
    torch.testing.assert_close(hessian(ours)(z, t), hessian(theirs)(z, t), **F64)
    torch.testing.assert_close(jacrev(jacrev(ours))(z, t), jacrev(jacrev(theirs))(z, t), **F64)


@pytest.mark.parametrize("option", ["plain", "all", "probs_all"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_jacrev_of_per_position_losses(option, reduction):
    z, t, _ = make_case(option)
    ours, theirs = both(option, reduction)
    torch.testing.assert_close(jacrev(ours)(z, t), jacrev(theirs)(z, t), **F64)


@pytest.mark.parametrize("option", ["plain", "all", "probs_all"])
def test_per_sample_gradients_vmap_of_grad(option):
    # DP-SGD's per-sample gradients: vmap over a batch of (logits, target), in-dims on both.
    z, t, _ = make_case(option, batch=3)
    ours, theirs = both(option)
    torch.testing.assert_close(vmap(grad(ours))(z, t), vmap(grad(theirs))(z, t), **F64)
    # in-dims on the logits only (one target for every sample)
    torch.testing.assert_close(vmap(grad(ours), in_dims=(0, None))(z, t[0]),
                               vmap(grad(theirs), in_dims=(0, None))(z, t[0]), **F64)  # fmt: skip


def test_vmap_of_the_loss_itself_and_of_a_module():
    z, t, _ = make_case("all", batch=4)
    opts = make_case("all")[2]
    loss_fn = crossent.CrossEntropyLoss(**opts)
    torch.testing.assert_close(vmap(loss_fn)(z, t), vmap(lambda a, b: torch_recipe(a, b, **opts))(z, t), **F64)
    torch.testing.assert_close(grad(lambda a: loss_fn(a, t[0]))(z[0]), grad(lambda a: torch_recipe(a, t[0], **opts))(z[0]),
                               **F64)  # fmt: skip


def test_vmap_refuses_batched_class_weights():
    z, t, _ = make_case("plain", batch=2)
    w = torch.rand(2, C, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="class weights must not be batched"):
        vmap(lambda a, b, c: crossent.cross_entropy(a, b, c))(z, t, w)


def test_gradient_wrt_probability_targets_under_grad():
    z, t, opts = make_case("probs_all")
    ours = grad(lambda y: crossent.cross_entropy(z, y, **opts))(t)
    torch.testing.assert_close(ours, grad(lambda y: torch_recipe(z, y, **opts))(t), **F64)


# --- double backward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradgradcheck(option, reduction):
    z, t, opts = make_case(option, rows=3)
    fn = lambda x: crossent.cross_entropy(x, t, reduction=reduction, **opts)  # noqa: E731
    x = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("option", ["plain", "all", "probs_all"])
def test_hessian_vector_products_equal_pytorch(option):
    z, t, opts = make_case(option)
    v = torch.randn_like(z)
    hvps = []
    for fn in (crossent.cross_entropy, torch_recipe):
        x = z.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, t, **opts), x, create_graph=True)
        (hvp,) = torch.autograd.grad((g * v).sum(), x)
        hvps.append(hvp)
    torch.testing.assert_close(*hvps, **F64)


def test_second_backward_through_the_same_graph():
    z, t, opts = make_case("all")
    x = z.clone().requires_grad_()
    loss = crossent.cross_entropy(x, t, **opts)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)


def test_in_place_backward_refuses_a_second_pass():
    # inplace_backward overwrites the logits: autograd's version counter catches a second backward.
    x = torch.randn(4, C, requires_grad=True)
    logits = x * 1.0
    loss = crossent.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- linear_cross_entropy under transforms ------------------------------------------------------------------


def linear_case(seed=0, n=6, d=4, v=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = -100
    return x, w, b, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_grad_vmap_jacrev_equal_pytorch(reduction):
    x, w, b, t = linear_case()
    scale = torch.arange(1.0, 7.0, dtype=torch.float64)  # "none": a different upstream gradient per row

    def reduce(rows):
        return (rows * scale).sum() if reduction == "none" else rows

    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    ours = lambda x, w: reduce(crossent.linear_cross_entropy(x, w, t, linear_bias=b, **kw))  # noqa: E731
    theirs = lambda x, w: reduce(torch_recipe(F.linear(x, w, b), t, **kw))  # noqa: E731
    for a, c in zip(grad(ours, argnums=(0, 1))(x, w), grad(theirs, argnums=(0, 1))(x, w)):
        torch.testing.assert_close(a, c, **F64)
    torch.testing.assert_close(jacrev(ours)(x, w), jacrev(theirs)(x, w), **F64)
    xb = torch.randn(3, *x.shape, dtype=torch.float64)  # per-sample dW: each sample's own head gradient
    torch.testing.assert_close(vmap(grad(ours, argnums=1), in_dims=(0, None))(xb, w),
                               vmap(grad(theirs, argnums=1), in_dims=(0, None))(xb, w), **F64)  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_refuses_forward_mode_and_second_derivatives_clearly(reduction):
    x, w, b, t = linear_case()
    fn = lambda x: crossent.linear_cross_entropy(x, w, t, reduction=reduction).sum()  # noqa: E731
    for transform in (lambda: jvp(fn, (x,), (x,)), lambda: hessian(fn)(x), lambda: jacrev(jacrev(fn))(x)):
        with pytest.raises(RuntimeError, match="linear_cross_entropy does not support .*crossent.cross_entropy"):
            transform()
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(xr), xr, create_graph=True)  # first order: fine, and the right value
    torch.testing.assert_close(g, torch.autograd.grad(torch_recipe(F.linear(xr, w), t, reduction=reduction).sum(), xr)[0],
                               **F64)  # fmt: skip
    with pytest.raises(RuntimeError, match="linear_cross_entropy does not support second derivatives"):
        g.sum().backward()  # never a silent zero


# --- autocast -------------------------------------------------------------------------------------------------


@pytest.mark.cpu_path  # the oracle follows the products the CPU runs
def test_linear_under_cpu_autocast_matches_f_linear():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g).to(torch.bfloat16)  # bf16 activations
    w = torch.randn(100, 16, generator=g)  # an fp32 master weight: mixed dtypes, as F.linear takes them
    t = torch.randint(0, 100, (32,), generator=g)

    def reference(x, w):
        # the oracle of the path that runs: bf16 products (bf16 logits, as F.linear's under autocast) where the CPU
        # has bf16 matrix units, else fp32 products of the bf16-rounded operands (_precision.fast_half_products)
        if fast_half_products("cpu", torch.bfloat16):
            return F.cross_entropy(F.linear(x, w), t)
        with torch.autocast("cpu", enabled=False):
            return F.cross_entropy(F.linear(x.float(), w.to(torch.bfloat16).float()), t)

    results = []
    for fn in (lambda x, w: crossent.linear_cross_entropy(x, w, t), reference):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(xr, wr)
        loss.backward()
        results.append((loss, xr.grad, wr.grad))
    (ours, dx, dw), (theirs, dx_ref, dw_ref) = results
    assert ours.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # the same products, fp32 loss
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(dw, dw_ref, rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_under_cuda_autocast_matches_f_linear(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g).cuda()
    w = torch.randn(1000, 64, generator=g).cuda() / 8
    t = torch.randint(0, 1000, (256,), generator=g).cuda()
    results = []
    for fn in (lambda x, w: crossent.linear_cross_entropy(x, w, t), lambda x, w: F.cross_entropy(F.linear(x, w), t)):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            loss = fn(xr, wr)
        loss.backward()
        results.append((loss, xr.grad, wr.grad))
    (ours, dx, dw), (theirs, dx_ref, dw_ref) = results
    assert ours.dtype == torch.float32 and dx.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, dx_ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(dw, dw_ref, rtol=2e-2, atol=1e-3)


def test_outside_autocast_nothing_changes_and_dtypes_must_match():
    x, w = torch.randn(4, 8).to(torch.bfloat16), torch.randn(10, 8)
    with pytest.raises(TypeError, match="dtype"):
        crossent.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long))


def test_cross_entropy_under_autocast_runs_in_float32():
    # PyTorch's autocast policy runs cross_entropy in float32: crossent's kernels always do (without the copy).
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 50, generator=g).to(torch.bfloat16)
    t = torch.randint(0, 50, (8,), generator=g)
    w = torch.rand(50, generator=g) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = crossent.cross_entropy(z, t, w, label_smoothing=0.1)
        pytorch = F.cross_entropy(z, t, w, label_smoothing=0.1)
    assert ours.dtype == pytorch.dtype == torch.float32
    torch.testing.assert_close(ours, pytorch, rtol=1e-6, atol=1e-6)


# --- edge cases -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["probs", "index"])
def test_zero_classes_is_a_value_error_naming_the_shape(target):
    z = torch.rand(5, 0)
    t = torch.rand(5, 0) if target == "probs" else torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"no classes.*\(5, 0\)"):
        crossent.CrossEntropyLoss()(z, t)


@pytest.mark.parametrize("ignore_index", [np.int64(-100), np.int32(2), torch.tensor(2), torch.tensor(-100)])
def test_ignore_index_accepts_what_pytorch_accepts(ignore_index):
    z, t = torch.randn(6, C), torch.tensor([0, 2, 1, 2, 5, 6])
    expected = F.cross_entropy(z, t, ignore_index=int(ignore_index))
    torch.testing.assert_close(crossent.cross_entropy(z, t, ignore_index=ignore_index), expected)


@pytest.mark.parametrize("ignore_index", [2.0, True, torch.tensor(2.0), torch.tensor([2])])
def test_ignore_index_refuses_floats_and_bools(ignore_index):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        crossent.cross_entropy(torch.randn(3, C), torch.tensor([0, 1, 2]), ignore_index=ignore_index)


# --- torch.export, dynamic shapes, determinism ----------------------------------------------------------------


class _Classifier(torch.nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.body = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 30)
        self.fused = fused
        self.loss = crossent.LinearCrossEntropyLoss(label_smoothing=0.1) if fused else crossent.CrossEntropyLoss(
            label_smoothing=0.1)  # fmt: skip

    def forward(self, x, t):
        h = torch.relu(self.body(x))
        if self.fused:
            return self.loss(h, self.head.weight, t, self.head.bias)
        return self.loss(self.head(h), t)


@pytest.mark.parametrize("fused", [False, True], ids=["CrossEntropyLoss", "LinearCrossEntropyLoss"])
def test_torch_export_gives_the_same_loss(fused):
    torch.manual_seed(0)
    model = _Classifier(fused).eval()
    x, t = torch.randn(12, 8), torch.randint(0, 30, (12,))
    with torch.no_grad():
        program = torch.export.export(model, (x, t))
        torch.testing.assert_close(program.module()(x, t), model(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
def test_compile_dynamic_does_not_recompile_per_batch_size(fused):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    head = torch.randn(30, 16, requires_grad=True)

    def step(h, t):
        loss = crossent.linear_cross_entropy(h, head, t) if fused else crossent.cross_entropy(h @ head.T, t)
        return loss

    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    for n in (5, 7, 11, 13, 17):
        h, t = torch.randn(n, 16), torch.randint(0, 30, (n,))
        torch.testing.assert_close(compiled(h, t), step(h, t), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 5 batch sizes"


def test_deterministic_mode_runs_every_path_bitwise_reproducibly():
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            z = torch.randn(64, 300, requires_grad=True)
            t = torch.randint(0, 300, (64,))
            y = torch.softmax(torch.randn(64, 300), -1)
            x, w = torch.randn(64, 32, requires_grad=True), torch.randn(300, 32, requires_grad=True)
            losses = [
                crossent.cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-3),
                crossent.cross_entropy(z, y, softcap=5.0),
                crossent.linear_cross_entropy(x, w, t, chunk_size=16, label_smoothing=0.1),
                crossent.linear_cross_entropy(x, w, t, reduction="none", chunk_size=16).sum(),
            ]
            torch.stack(losses).sum().backward()
            runs.append([torch.stack(losses), z.grad, x.grad, w.grad])
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


# --- opcheck: schema, fake kernels, autograd registration, dynamic-shape tracing of every custom op ----------


def _row_samples():
    z, t = torch.randn(5, C), torch.randint(0, C, (5,))
    y = torch.softmax(torch.randn(5, C), -1)
    w = torch.rand(C) + 0.5
    settings = flatten(RowOptions(label_smoothing=0.1, z_loss=1e-3, softcap=3.0), VocabShard.whole(C))
    loss, lse = ops.ce_forward(z, t, w, RowOptions(label_smoothing=0.1, z_loss=1e-3, softcap=3.0), VocabShard.whole(C),
                               "torch")  # fmt: skip
    g = torch.rand(5)
    return [
        (ops._ce_forward, (z, t, w, *settings, "torch")),
        (ops._ce_forward, (z, y, None, *settings, "torch")),
        (ops._ce_backward, (z, t, w, lse, g, *settings, "torch")),
        (ops._ce_backward_inplace, (z.clone(), t, w, lse, g, *settings, "torch")),
        (ops._ce_target_grad, (z, y, w, lse, g, *flatten(RowOptions(label_smoothing=0.1)))),
    ]


def _linear_samples():
    x, w, b = torch.randn(6, 4), torch.randn(9, 4), torch.randn(9)
    t = torch.randint(0, 9, (6,))
    settings = flatten(RowOptions(label_smoothing=0.1), VocabShard.whole(9), LoopArgs(chunk_size=4), GradNeeds())
    lse = linear_ops.linear_ce_forward(x, w, b, t, None, None, RowOptions(label_smoothing=0.1), VocabShard.whole(9),
                                       LoopArgs(chunk_size=4), GradNeeds(), "torch").lse  # fmt: skip
    return [
        (linear_ops._linear_ce_forward, (x, w, b, t, None, torch.full((), 0.5), *settings, "torch")),
        (linear_ops._linear_ce_forward, (x, w, None, t, torch.rand(9), None, *settings, "torch")),
        (linear_ops._linear_ce_backward, (x, w, b, t, None, lse, torch.rand(6), *settings, "torch")),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck_every_custom_op(case):
    op, args = (_row_samples() + _linear_samples())[case]
    torch.library.opcheck(op, args)
