"""Distillation's Triton block step (kernels/triton_distill.py) against the torch step, through the public
functions with impl="triton": compiled on CUDA, under Triton's interpreter on CPU (tests/_triton_mode.py)."""

from __future__ import annotations

import pytest
import torch
from _triton_mode import kernel_device, launches

import crossent

OPTIONS = [  # each option alone, then together; V = 300 spans BLOCK edges of the interpreter's 512 lanes
    dict(beta=0.0),
    dict(beta=1.0, temperature=2.0),
    dict(beta=0.4, temperature=0.7),
]
FUSED_OPTIONS = OPTIONS + [
    dict(beta=0.0, softcap=4.0),  # a capped −inf past the row's end is −κ: the lanes must stay −inf (a bug once)
    dict(beta=0.0, hard_weight=0.3),  # hard loss at T = 1: h = q
    dict(beta=0.6, temperature=1.5, hard_weight=0.5, softcap=4.0),  # the hard loss's own lse, the cap's chain
]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_dense_triton_matches_torch(options):
    device = kernel_device()
    z, zt = torch.randn(6, 300, device=device) * 3, torch.randn(6, 300, device=device) * 3
    t = torch.tensor([1, -100, 299, 0, 5, 7], device=device)
    got, want = (z.clone().requires_grad_() for _ in range(2))
    g = torch.rand(6, device=device)
    from crossent.kernels import triton_distill

    losses = {}
    for x, impl in ((want, "torch"), (got, "triton")):
        with launches(triton_distill) as ran:
            losses[impl] = crossent.distill_loss(x, zt, target=t, reduction="none", impl=impl, **options)
            losses[impl].backward(g)
        assert (ran[0] > 0) == (impl == "triton")  # the Triton step ran exactly when asked for
    _close(losses["triton"], losses["torch"])
    _close(got.grad, want.grad)


def test_dense_triton_teacher_log_probs_and_nan_rows():
    device = kernel_device()
    z, lp = torch.randn(3, 40, device=device), torch.log_softmax(torch.randn(3, 40, device=device), -1)
    _close(crossent.distill_loss(z, lp, beta=0.5, teacher_is_log_probs=True, impl="triton"),
           crossent.distill_loss(z, lp, beta=0.5, teacher_is_log_probs=True, impl="torch"))  # fmt: skip
    from crossent._options import DistillRowOptions
    from crossent.kernels import distill_rows, triton_distill

    lp[1, 3] = 0.25  # not a log-probability: that row's loss is NaN (what CUDA does, without a host check)
    loss = distill_rows.forward(z, lp, None, DistillRowOptions(teacher_log_probs=True), triton_distill.block_step_)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("options", FUSED_OPTIONS, ids=str)
def test_fused_triton_matches_torch(options):
    device = kernel_device()
    x, w, b = torch.randn(21, 8, device=device), torch.randn(300, 8, device=device) * 0.5, torch.randn(300, device=device)
    x_t, w_t = torch.randn(21, 5, device=device), torch.randn(300, 5, device=device)
    t = torch.randint(0, 300, (21,), device=device)
    t[::4] = -100
    grads = {}
    from crossent.kernels import triton_distill

    for impl in ("triton", "torch"):
        params = [p.clone().requires_grad_() for p in (x, w, b)]
        with launches(triton_distill) as ran:
            loss = crossent.linear_distill_loss(params[0], params[1], x_t, w_t, linear_bias=params[2], target=t,
                                                chunk_size=8, impl=impl, **options)  # fmt: skip
            loss.backward()
        assert (ran[0] > 0) == (impl == "triton")  # the Triton step ran exactly when asked for
        grads[impl] = (loss.detach(), *(p.grad for p in params))
    for a, e in zip(grads["triton"], grads["torch"]):
        _close(a, e)
