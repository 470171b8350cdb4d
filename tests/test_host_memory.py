"""The huge-page-advised gradient buffer is an ordinary, fully writable tensor of the asked shape."""

import pytest
import torch

import crossent
from crossent.kernels import host_memory


@pytest.mark.parametrize("numel", [0, 5, host_memory.MIN_BYTES // 4 + 3], ids=["empty", "small", "huge-advised"])
def test_buffer_has_shape_dtype_and_takes_writes(numel):
    out = host_memory.empty_for_writing((numel,), torch.float32, torch.device("cpu"))
    assert out.shape == (numel,) and out.dtype == torch.float32 and out.is_contiguous()
    out.fill_(1.5)
    torch.testing.assert_close(out, torch.full((numel,), 1.5))


def test_cross_entropy_gradient_through_advised_buffer_matches_torch():
    # N×C large enough (> MIN_BYTES) that backward takes the advised path
    n, c = 64, host_memory.MIN_BYTES // (4 * 64) + 7
    x = torch.randn(n, c, requires_grad=True)
    t = torch.randint(0, c, (n,))
    crossent.cross_entropy(x, t).backward()
    ours = x.grad
    x.grad = None
    torch.nn.functional.cross_entropy(x, t).backward()
    torch.testing.assert_close(ours, x.grad, rtol=1e-5, atol=1e-9)
