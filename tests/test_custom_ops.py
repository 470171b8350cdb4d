"""The custom ops' fake (shape/dtype) implementations agree with the eager ones: torch.compile traces with
the fakes, so a dtype they get wrong (e.g. the float64 LSE) would go unnoticed by the value tests."""

import pytest
import torch

from crossent._options import RowOptions
from crossent.kernels import linear_ops, ops
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.op_args import flatten
from crossent.kernels.shard import VocabShard


def _fake_matches_real(op, args):
    real = op(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in fake]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_ops_fake_shapes_and_dtypes(dtype):
    z, t = torch.randn(5, 7, dtype=dtype), torch.randint(0, 7, (5,))
    settings = [RowOptions(label_smoothing=0.1, z_loss=1e-3), VocabShard.whole(7), "torch"]
    loss, lse = ops.ce_forward(z, t, None, *settings)
    _fake_matches_real(ops.ce_forward, [z, t, None, *settings])
    _fake_matches_real(ops.ce_backward, [z, t, None, lse, torch.ones(5), *settings])


@pytest.mark.parametrize("with_grads", [False, True], ids=["loss-only", "grads"])
def test_linear_ops_fake_shapes_and_dtypes(with_grads):
    x, w, b = torch.randn(5, 4), torch.randn(7, 4), torch.randn(7)
    t = torch.randint(0, 7, (5,))
    scale = torch.full((), 0.2) if with_grads else None
    common = [RowOptions(), VocabShard.whole(7), LoopArgs(chunk_size=5), GradNeeds(), "torch"]
    _fake_matches_real(linear_ops._linear_ce_forward, [x, w, b, t, None, scale, *flatten(*common[:4]), "torch"])
    lse = linear_ops.linear_ce_forward(x, w, b, t, None, None, *common).lse
    _fake_matches_real(linear_ops._linear_ce_backward, [x, w, b, t, None, lse, torch.ones(5), *flatten(*common[:4]), "torch"])
