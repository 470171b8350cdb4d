"""crossent.sparse_distill_loss (top-K teacher) against the float64 oracle crossent.reference.sparse_distill,
whose gradient is the chain rule of docs/math.md ("Sparse teacher"), independent of autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import F64, np64

import crossent
from crossent import reference

N, D, V, K = 11, 6, 37, 5


def _problem(dtype=torch.float64):
    x, w, b = torch.randn(N, D, dtype=dtype), torch.randn(V, D, dtype=dtype), torch.randn(V, dtype=dtype)
    teacher = torch.log_softmax(torch.randn(N, V, dtype=torch.float64) * 2, -1)
    lp, ids = teacher.topk(K, -1)  # the teacher's top-K ids and log-probs (Σ p_k < 1: a tail remains)
    target = torch.randint(0, V, (N,))
    target[::4] = -100
    return x, w, b, ids, lp.to(dtype), target


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sparse_matches_reference_float64(beta, tail, reduction):
    x, w, b, ids, lp, t = _problem()
    g = torch.rand(N, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3, dtype=torch.float64)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    kw = dict(beta=beta, temperature=1.7, target=t, reduction=reduction, tail=tail)
    loss = crossent.sparse_distill_loss(xs, ws, ids, lp, linear_bias=b, chunk_size=4, **kw)
    loss.backward(g)
    z = F.linear(x, w, b).numpy()
    ref_kw = dict(kw, target=t.numpy())
    np.testing.assert_allclose(np64(loss), reference.sparse_distill(z, ids.numpy(), lp.numpy(), **ref_kw), **F64)
    dz = reference.sparse_distill_grad(z, ids.numpy(), lp.numpy(), grad_output=g.numpy(), **ref_kw)
    np.testing.assert_allclose(np64(xs.grad), dz @ w.numpy(), **F64)
    np.testing.assert_allclose(np64(ws.grad), dz.T @ x.numpy(), **F64)


def test_sparse_with_every_id_equals_the_dense_loss():
    # K = V: the tail is empty and the renormalization is the identity, so both equal distill_loss
    x, w, b, *_ = _problem()
    teacher = torch.log_softmax(torch.randn(N, V, dtype=torch.float64), -1)
    ids = torch.arange(V).expand(N, V)
    dense = crossent.distill_loss(F.linear(x, w, b), teacher, beta=0.3, temperature=2.0, teacher_is_log_probs=True)
    for tail in (True, False):
        sparse = crossent.sparse_distill_loss(x, w, ids, teacher, linear_bias=b, beta=0.3, temperature=2.0, tail=tail)
        torch.testing.assert_close(sparse, dense, **F64)


def test_sparse_gradcheck_and_chunking():
    x, w, b, ids, lp, t = _problem()
    fn = lambda x_, w_: crossent.sparse_distill_loss(x_, w_, ids, lp, linear_bias=b, beta=1.0, target=t,  # noqa: E731
                                                     reduction="none", chunk_size=3)  # fmt: skip
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(), w.clone().requires_grad_()))
    whole = crossent.sparse_distill_loss(x, w, ids, lp, linear_bias=b, target=t)
    torch.testing.assert_close(crossent.sparse_distill_loss(x, w, ids, lp, linear_bias=b, target=t, chunk_size=2),
                               whole, **F64)  # fmt: skip


def test_sparse_float32_loss_dtype_and_bad_inputs():
    x, w, b, ids, lp, t = _problem(torch.bfloat16)
    assert crossent.sparse_distill_loss(x, w, ids, lp, linear_bias=b).dtype == torch.float32
    x, w, b, ids, lp, t = _problem(torch.float32)
    with pytest.raises(ValueError, match="positive entry"):
        crossent.sparse_distill_loss(x, w, ids, lp.abs() + 0.1)
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        crossent.sparse_distill_loss(x, w, ids + V, lp)
    with pytest.raises(ValueError, match="same shape"):
        crossent.sparse_distill_loss(x, w, ids, lp[:, :-1])
    with pytest.raises(TypeError, match="integer"):
        crossent.sparse_distill_loss(x, w, ids.float(), lp)
    with pytest.raises(ValueError, match="beta"):
        crossent.sparse_distill_loss(x, w, ids, lp, beta=2.0)
    with pytest.raises(TypeError, match="tail"):
        crossent.sparse_distill_loss(x, w, ids, lp, tail="yes")
