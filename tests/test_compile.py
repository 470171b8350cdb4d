"""torch.compile(fullgraph=True) over crossent.cross_entropy: no graph breaks, same values as eager.

The row kernels are torch.library custom ops with fake implementations, so Dynamo traces through the
public layer and the autograd.Function and keeps each kernel as one opaque node (forward and backward).
fullgraph=True turns any graph break into an error. Each compile costs ~15 s on a 2-core CPU: few tests,
each turning on many options at once.
"""

from __future__ import annotations

import _triton_mode  # noqa: I001  (first: torch._dynamo imports Triton, which fixes its mode then)
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import crossent


def _compiled_matches_eager(fn, *inputs, atol=1e-6, rtol=1e-5):
    """Run ``fn`` eager and compiled (fullgraph) on clones of ``inputs``; compare outputs and grads."""
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("inductor")  # inductor, counting the frames it is handed
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = f(*leaves)
        out.sum().backward()
        results.append((out.detach(), [x.grad for x in leaves if x.is_floating_point()]))
    assert backend.frame_count == 1, f"compiled {backend.frame_count} frames, expected one graph"
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=atol, rtol=rtol)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_compile_torch_impl_all_options():
    # K-dim input (class dim 1), class weights, every extra, weighted mean; impl torch (the CPU path).
    z = 3.0 * torch.randn(4, 33, 5)
    t = torch.randint(0, 33, (4, 5))
    t[0, 0] = -100
    w = torch.rand(33) + 0.5

    def loss_fn(z):
        logits = z * 1.0  # a non-leaf, as a model's output would be
        return crossent.cross_entropy(
            logits, t, w, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, impl="torch", inplace_backward=True
        )

    _compiled_matches_eager(loss_fn, z)


def test_compile_probability_targets_reduction_none():
    # Probability targets that require grad (the target-gradient op) and a per-position loss.
    z = torch.randn(6, 17)
    y = torch.softmax(torch.randn(6, 17), -1)

    def loss_fn(z, y):
        return crossent.cross_entropy(z, y, reduction="none", label_smoothing=0.2, z_loss=1e-2, impl="auto")

    _compiled_matches_eager(loss_fn, z, y)


def test_compile_triton_impl():
    # impl="triton": on CUDA the compiled kernels, elsewhere the same kernels through Triton's interpreter.
    device = _triton_mode.kernel_device()
    z = 3.0 * torch.randn(8, 129, device=device)
    t = torch.randint(0, 129, (8,), device=device)
    t[3] = 64  # = ignore_index, a value inside [0, C)

    def loss_fn(z):
        logits = z * 1.0
        return crossent.cross_entropy(
            logits, t, ignore_index=64, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, reduction="sum",
            impl="triton", inplace_backward=True,
        )  # fmt: skip

    _compiled_matches_eager(loss_fn, z)


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_impl_values_reach_the_backend(impl):
    # Not a compile test (cheap): impl="torch" and "auto" on CPU both run the torch-ops path.
    z = torch.randn(3, 5, requires_grad=True)
    t = torch.tensor([0, 4, 2])
    loss = crossent.cross_entropy(z, t, impl=impl)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(z, t))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_linear_cross_entropy(impl, reduction):
    # Both autograd paths (gradients formed in the forward for "mean", recomputed in backward for "none"),
    # several row blocks and every option that combines; impl "triton" runs the Triton chunk step.
    if impl == "triton":
        _triton_mode.kernel_device()  # the interpreter on CPU (or fails with the reason)
    x = torch.randn(37, 16)
    w = torch.randn(129, 16) / 4.0
    t = torch.randint(0, 129, (37,))
    t[5] = -100

    def loss_fn(x, w):
        return crossent.linear_cross_entropy(
            x, w, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=16, impl=impl
        )

    _compiled_matches_eager(loss_fn, x, w, atol=1e-5)
