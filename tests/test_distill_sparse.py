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


def _oracle(x, w, b, ids, lp, softcap=None, grad_output=1.0, **kw):
    """Float64 loss and (dX, dW, db) from reference.sparse_distill(_grad) on the student's logits, capped first
    with a softcap (the chain rule's ``1 − tanh²(z / κ)`` applied to the oracle's gradient by hand)."""
    z = F.linear(x, w, b).to(torch.float64).numpy()
    chain = 1.0
    if softcap is not None:
        z, chain = softcap * np.tanh(z / softcap), 1.0 - np.tanh(z / softcap) ** 2
    args = (z, np64(ids), np64(lp))
    dz = reference.sparse_distill_grad(*args, grad_output=grad_output, **kw) * chain
    x64, w64 = np64(x), np64(w)
    return reference.sparse_distill(*args, **kw), (dz @ w64, dz.T @ x64, dz.sum(0))


def _loss_and_grads(x, w, b, ids, lp, grad_output=None, **kw):
    """sparse_distill_loss on fresh leaf copies; (loss, (dX, dW, db)) after backward with ``grad_output``."""
    leaves = [p.detach().clone().requires_grad_() for p in (x, w, b)]
    loss = crossent.sparse_distill_loss(leaves[0], leaves[1], ids, lp, linear_bias=leaves[2], **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), tuple(p.grad for p in leaves)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_softcap_with_temperature_matches_reference_float64(beta, tail):
    # κ = 2 against logits of spread ~3: the cap bends most of them; T = 1.7 divides the capped logits
    x, w, b, ids, lp, t = _problem()
    g = torch.rand(N, dtype=torch.float64)
    kw = dict(beta=beta, temperature=1.7, target=t, reduction="none", tail=tail)
    loss, grads = _loss_and_grads(x, w, b, ids, lp, g, softcap=2.0, chunk_size=4, **kw)
    ref_loss, ref_grads = _oracle(x, w, b, ids, lp, softcap=2.0, grad_output=g.numpy(), **dict(kw, target=t.numpy()))
    np.testing.assert_allclose(np64(loss), ref_loss, **F64)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np64(grad), ref, **F64)
    uncapped, _ = _loss_and_grads(x, w, b, ids, lp, g, **kw)
    if np.allclose(np64(uncapped), ref_loss, rtol=1e-3):
        raise AssertionError("the cap did not change the loss: the test cannot tell capped from uncapped")


def test_memory_budget_sets_the_chunks_not_the_result(monkeypatch):
    from crossent.kernels import sparse_rows

    x, w, b, ids, lp, t = _problem()
    chunks = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, x_c, *a, **k: chunks.append(len(x_c)) or
                        checkpoint(fn, x_c, *a, **k))  # fmt: skip
    row = sparse_rows.row_bytes(V, torch.float64, crossent._options.DistillRowOptions())
    kw = dict(beta=0.5, temperature=1.3, target=t, tail=True)
    one_row_chunks = _loss_and_grads(x, w, b, ids, lp, chunk_size=1, **kw)
    assert chunks == [1] * N, chunks
    chunks.clear()
    budgeted = _loss_and_grads(x, w, b, ids, lp, memory_budget=4 * row + row // 2, **kw)  # 4 rows fit, not 5
    assert chunks == [4, 4, 3], chunks
    torch.testing.assert_close(budgeted, one_row_chunks, **F64)
    chunks.clear()
    _loss_and_grads(x, w, b, ids, lp, memory_budget=N * row, chunk_size=2, **kw)  # chunk_size decides the rows
    assert chunks == [2] * 5 + [1], chunks


def test_softcap_row_adds_a_buffer_to_the_budget():
    from crossent._options import DistillRowOptions
    from crossent.kernels.sparse_rows import ROW_BUFFERS, SOFTCAP_ROW_BUFFERS, chunk_rows, row_bytes

    plain, capped = DistillRowOptions(), DistillRowOptions(softcap=30.0)
    assert row_bytes(1000, torch.float32, plain) == 1000 * 4 * ROW_BUFFERS
    assert row_bytes(1000, torch.float32, capped) == 1000 * 4 * (ROW_BUFFERS + SOFTCAP_ROW_BUFFERS)
    assert chunk_rows(100, 1000, torch.float32, capped, None, 10 * row_bytes(1000, torch.float32, capped)) == 10
    assert chunk_rows(100, 1000, torch.float64, plain, None, None) == (64 << 20) // (1000 * 8 * ROW_BUFFERS)


def _relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.linalg.norm(np64(actual) - expected) / np.linalg.norm(expected))


def test_bf16_weight_grads_summed_in_float32():
    # 64 one-row chunks: "weight" rounds the running dW and db sums to bf16 64 times, "float32" once at the end.
    n, v = 64, 300
    x, w, b = torch.randn(n, D).bfloat16(), (torch.randn(v, D) * 0.5).bfloat16(), torch.randn(v).bfloat16()
    lp64, ids = torch.log_softmax(torch.randn(n, v, dtype=torch.float64) * 2, -1).topk(K, -1)
    lp = lp64.bfloat16()
    kw = dict(beta=0.5, temperature=1.3)
    _, ref = _oracle(x, w, b, ids, lp, **kw)
    errors = {}
    for acc in ("float32", "weight"):
        _, (_, dw, db) = _loss_and_grads(x, w, b, ids, lp, chunk_size=1, accumulate_dtype=acc, **kw)
        assert dw.dtype == db.dtype == torch.bfloat16
        errors[acc] = _relative_error(dw, ref[1]), _relative_error(db, ref[2])
    _, (_, dw, db) = _loss_and_grads(x, w, b, ids, lp, chunk_size=n, **kw)
    errors["one chunk"] = _relative_error(dw, ref[1]), _relative_error(db, ref[2])
    # the naive recipe: logits, the divergence and every gradient in bf16 (autograd, one product)
    from crossent._options import DistillRowOptions
    from crossent.kernels.sparse_rows import sparse_divergence

    ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
    sparse_divergence(F.linear(x, ws, bs), ids, lp, DistillRowOptions(**kw)).mean().backward()
    errors["naive bf16"] = _relative_error(ws.grad, ref[1]), _relative_error(bs.grad, ref[2])
    for i, name in enumerate(("dW", "db")):
        f32, weight, whole, naive = (errors[k][i] for k in ("float32", "weight", "one chunk", "naive bf16"))
        # 1e-4: a stated slack on relative errors of ~2.5e-3 (float32), ~1e-2 ("weight"), ~2.5e-2 (naive) here
        assert f32 <= weight + 1e-4 and f32 <= naive + 1e-4, (name, errors)
        # one rounding per chunk's product, none in the sum: within 25% of the one-chunk error ("weight": ~4x)
        assert f32 <= 1.25 * whole, (name, errors)
        assert weight > 1.25 * whole, ("the test cannot tell the two sums apart", name, errors)


def test_accumulate_dtype_has_no_effect_for_float32_weights():
    x, w, b, ids, lp, t = _problem(torch.float32)
    f32 = _loss_and_grads(x, w, b, ids, lp, chunk_size=3, accumulate_dtype="float32")
    weight = _loss_and_grads(x, w, b, ids, lp, chunk_size=3, accumulate_dtype="weight")
    torch.testing.assert_close(f32, weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(softcap=0.0), ValueError, r"softcap must be None or a finite float > 0, got 0\.0"),
        (dict(softcap="2"), TypeError, r"softcap must be None or a finite float > 0, got '2'"),
        (dict(memory_budget=0), ValueError, r"memory_budget must be None or an int > 0, got 0"),
        (dict(memory_budget=2.0), TypeError, r"memory_budget must be an int, got 2\.0"),
        (dict(memory_budget=100), ValueError, r"memory_budget=100 bytes is too small for even one row"),
        (dict(memory_budget=V * 4 * 5 * 3, chunk_size=4), ValueError,
         r"memory_budget=2220 bytes is too small for a chunk of 4 rows \(chunk_size\)"),
        (dict(accumulate_dtype="bfloat16"), ValueError, r"accumulate_dtype must be one of 'float32', 'float32_products', 'weight'; "
                                                        r"got 'bfloat16'"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be None or an int > 0, got 0"),
    ],
)  # fmt: skip
def test_bad_options_raise_before_any_work(kwargs, error, message, monkeypatch):
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: pytest.fail("work started"))
    x, w, b, ids, lp, t = _problem(torch.float32)
    with pytest.raises(error, match=message):
        crossent.sparse_distill_loss(x, w, ids, lp, linear_bias=b, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_matches_eager(dtype):
    # bf16: the float32 dW totals (two autograd Functions inside the checkpointed chunks) traced too
    x, w, b, ids, lp, t = _problem(dtype)
    kw = dict(linear_bias=b, beta=0.5, temperature=1.5, target=t, softcap=4.0, chunk_size=4)

    def loss(x_, w_):
        return crossent.sparse_distill_loss(x_, w_, ids, lp, **kw)

    eager_in = (x.clone().requires_grad_(), w.clone().requires_grad_())
    eager = loss(*eager_in)
    eager.backward()
    compiled_in = (x.clone().requires_grad_(), w.clone().requires_grad_())
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled_in)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, e.grad)
