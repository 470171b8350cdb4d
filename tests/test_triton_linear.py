"""linear_cross_entropy's Triton chunk kernels (crossent.kernels.triton_linear) against the float64 reference.

The chunk step alone (loss, LSE and the gradient written over the block), the recompute step, and the
whole chunk loop of linear_loop run with these kernels (one block, several row blocks, a vocabulary
split that routes its pieces to the torch kernels). Kernels run where ``_triton_mode`` says: through
Triton's interpreter on CPU tensors, compiled on CUDA where there is a GPU.
"""

from __future__ import annotations

import _triton_mode  # noqa: I001  (first: it may set TRITON_INTERPRET before anything imports Triton)
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference

pytest.importorskip("triton")
from crossent._options import RowOptions  # noqa: E402
from crossent.kernels import dispatch, linear_loop, linear_step, triton_linear  # noqa: E402  (after the importorskip)
from crossent.kernels.linear_loop import LoopArgs  # noqa: E402
from crossent.kernels.linear_plan import scratch_bytes  # noqa: E402

OPTIONS = {
    "plain": {},
    "all": {"weight": True, "ignore_index": 5, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0},
    "weight_smoothing": {"weight": True, "label_smoothing": 0.1},
}


@pytest.fixture
def device():
    return _triton_mode.kernel_device()


def make_block(rows, num_classes, opts, device):
    """A float32 logits block, targets (some ignored, one at ignore_index inside [0, C)), options."""
    z = (3.0 * torch.randn(rows, num_classes)).to(device)
    t = torch.randint(0, num_classes, (rows,))
    ignore = opts.get("ignore_index", -100)
    t[0] = ignore
    t = t.to(device)
    w = (0.2 + torch.rand(num_classes)).to(device) if opts.get("weight") else None
    args = (ignore, opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0), opts.get("softcap"))
    return z, t, w, args


def oracle(z, t, w, args, g):
    """Per-row loss, lse and g-scaled gradient of the block, float64."""
    ignore, eps, s, cap = args
    z64, t64 = z.double().cpu().numpy(), t.cpu().numpy()
    w64 = None if w is None else w.double().cpu().numpy()
    kw = dict(ignore_index=ignore, label_smoothing=eps, z_loss=s, softcap=cap)
    loss = reference.cross_entropy(z64, t64, w64, reduction="none", **kw)
    grad = reference.cross_entropy_grad(z64, t64, w64, reduction="none", grad_output=g.double().cpu().numpy(), **kw)
    x = z64 if cap is None else cap * np.tanh(z64 / cap)
    return torch.from_numpy(loss), torch.from_numpy(reference.logsumexp(x)), torch.from_numpy(grad)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("num_classes", [7, 1000])
def test_chunk_step_matches_reference(device, num_classes, option):
    z, t, w, args = make_block(9, num_classes, OPTIONS[option], device)
    g = torch.rand(9, device=device) + 0.5
    block = z.clone()
    out = triton_linear.loss_and_grad_(block, t, w, g, RowOptions(*args))
    assert out.factors == linear_step.FINISHED  # the block holds the finished gradient
    assert out.loss.dtype == torch.float32 and out.lse.dtype == torch.float64
    ref_loss, ref_lse, ref_grad = oracle(z, t, w, args, g)
    torch.testing.assert_close(out.loss.double().cpu(), ref_loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out.lse.cpu(), ref_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(block.double().cpu(), ref_grad, rtol=1e-5, atol=1e-7)
    # the recompute step: the same gradient from the saved LSE
    again = z.clone()
    assert triton_linear.grad_(again, t, w, out.lse, g, RowOptions(*args)) == linear_step.FINISHED
    torch.testing.assert_close(again, block, rtol=1e-6, atol=1e-8)


def test_chunk_step_loss_only_leaves_the_block(device):
    z, t, w, args = make_block(6, 129, OPTIONS["all"], device)
    block = z.clone()
    out = triton_linear.loss_and_grad_(block, t, w, None, RowOptions(*args))
    torch.testing.assert_close(out.loss.double().cpu(), oracle(z, t, w, args, torch.ones(6))[0], rtol=2e-6, atol=2e-6)
    assert torch.equal(block, z)


def test_out_of_range_target_gives_a_nan_row(device):
    z, t, w, args = make_block(4, 33, OPTIONS["plain"], device)
    t[2] = 10**6
    block = z.clone()
    out = triton_linear.loss_and_grad_(block, t, w, torch.ones(4, device=device), RowOptions(*args))
    assert torch.isnan(out.loss[2]) and torch.isnan(block[2]).all()
    assert torch.isfinite(out.loss[[0, 1, 3]]).all() and torch.isfinite(block[[0, 1, 3]]).all()


def test_vocabulary_piece_recompute_step_runs_the_shard_kernel(device):
    # A piece of the vocabulary (columns [10, 50) of C = 50): the Triton recompute step writes the finished
    # gradient of exactly those columns from the full rows' LSE (the reference's columns 10..49).
    z, t, w, args = make_block(5, 50, OPTIONS["all"], device)
    args = args[:3] + (None,)  # softcap off: its chain factor is tested with whole rows above
    g = torch.rand(5, device=device) + 0.5
    _, lse, ref_grad = oracle(z, t, w, args, g)
    piece = z[:, 10:].clone()
    f = triton_linear.grad_(piece, t, w, lse.to(device), g, RowOptions(*args), vocab_start=10, num_classes=50)
    assert f == linear_step.FINISHED
    torch.testing.assert_close(piece.double().cpu(), ref_grad[:, 10:], rtol=1e-5, atol=1e-7)


def test_vocabulary_piece_forward_step_uses_the_torch_kernels(device):
    # The forward step of a piece needs the other pieces' statistics: the torch step, unchanged.
    z, t, w, args = make_block(5, 40, OPTIONS["plain"], device)
    ours, theirs = z.clone(), z.clone()
    stats = lambda local: local  # noqa: E731  (a hook: this piece's stats stand for the whole row here)
    a = triton_linear.loss_and_grad_(ours, t, w, None, RowOptions(*args), vocab_start=10, num_classes=50,
                                     combine=stats)  # fmt: skip
    b = linear_step.chunk_loss_and_grad_(theirs, t, w, None, RowOptions(*args), vocab_start=10, num_classes=50,
                                         combine=stats)  # fmt: skip
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    torch.testing.assert_close(a.lse, b.lse, rtol=0, atol=0)


# --- the whole loop ---------------------------------------------------------------------------------------------


def _loop_args(plan, dim):
    """LoopArgs whose plan is exactly ``plan`` = (rows, cols): a budget of that block when it splits the vocabulary."""
    rows, cols = plan
    budget = None if cols == 257 else scratch_bytes(rows, cols, dim, torch.float32)
    return LoopArgs(chunk_size=rows, memory_budget=budget)


def linear_reference(x, lw, lb, t, w, args, g):
    """Loss and (dX, dW, db) of cross_entropy(x Wᵀ + b) per row times g, float64."""
    logits = x.double() @ lw.double().T + lb.double()
    loss, _, grad = oracle(logits, t, w, args, g)
    grad = grad.to(logits.device)
    return loss, (grad @ lw.double()).cpu(), (grad.T @ x.double()).cpu(), grad.sum(0).cpu()


@pytest.mark.parametrize("plan", [(64, 257), (16, 257), (16, 100)], ids=["one-block", "row-blocks", "vocab-split"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_linear_loop_with_triton_kernels(device, option, plan):
    n, d, v = 37, 16, 257
    opts = OPTIONS[option]
    x = torch.randn(n, d, device=device)
    lw = torch.randn(v, d, device=device) / 4.0
    lb = torch.randn(v, device=device)
    _, t, w, args = make_block(n, v, opts, device)
    g = torch.rand(n, device=device) + 0.5
    loss_opts = RowOptions(*args)
    out = linear_loop.linear_loss_and_grads(
        x, lw, lb, t, w, loss_opts, _loop_args(plan, d), grad_scale=g, kernels=triton_linear.TRITON_KERNELS
    )
    ref_loss, ref_dx, ref_dw, ref_db = linear_reference(x, lw, lb, t, w, args, g)
    torch.testing.assert_close(out.loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(out.grads, (ref_dx, ref_dw, ref_db)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)
    # the recompute path ("none" reduction's backward) from the saved LSE
    grads = linear_loop.linear_grads(
        x, lw, lb, t, w, out.lse, g, loss_opts, _loop_args(plan, d), kernels=triton_linear.TRITON_KERNELS
    )
    for got, want in zip(grads, (ref_dx, ref_dw, ref_db)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)


def test_linear_cross_entropy_impl_triton_uses_these_kernels():
    assert dispatch.chunk_kernels("triton") is triton_linear.TRITON_KERNELS


def test_linear_cross_entropy_impl_triton_matches_torch(device):
    # Through the public function, every reduction path (grads in forward for mean, recompute for none).
    x = torch.randn(21, 12, device=device)
    lw = torch.randn(131, 12, device=device) / 3.0
    t = torch.randint(0, 131, (21,), device=device)
    for reduction in ("mean", "none"):
        results = []
        for impl in ("torch", "triton"):
            xi, wi = x.clone().requires_grad_(), lw.clone().requires_grad_()
            loss = crossent.linear_cross_entropy(xi, wi, t, reduction=reduction, label_smoothing=0.1, impl=impl)
            loss.sum().backward()
            results.append((loss.detach(), xi.grad, wi.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and against F.cross_entropy of the materialized logits, in float64
    x64, w64 = x.double().requires_grad_(), lw.double().requires_grad_()
    F.cross_entropy(x64 @ w64.T, t, label_smoothing=0.1).backward()
    xi, wi = x.clone().requires_grad_(), lw.clone().requires_grad_()
    crossent.linear_cross_entropy(xi, wi, t, label_smoothing=0.1, impl="triton").backward()
    torch.testing.assert_close(xi.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wi.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
