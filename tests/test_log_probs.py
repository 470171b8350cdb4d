"""crossent.token_log_probs and crossent.linear_token_log_probs against the float64 oracle (crossent.reference) and
PyTorch's materializing recipe (``log_softmax(z / T).gather`` and ``−Σ p log p``), with every option, both index
forms, gradients from either output, the transforms, compile, and the fused form's memory promise.

Shapes are off every block edge: V = 1031 (prime: no vocabulary piece divides it), N = 257 rows (one past 4 blocks of
64), D = 67. Float64 unless the test is about precision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vmap

import crossent
from crossent import reference
from _helpers import LargestAllocation as _LargestAllocation
from crossent._options import LogProbRowOptions
from crossent.kernels import linear_loop, logprob_ops, logprob_rows
from crossent.kernels.linear_loop import GradNeeds, LoopArgs
from crossent.kernels.linear_plan import scratch_bytes
from crossent.kernels.op_args import flatten
from crossent.kernels.shard import VocabShard

F64 = dict(rtol=1e-10, atol=1e-12)
N, D, V = 257, 67, 1031

# each option on its own, then all at once (the cap bites on logits of a few units)
OPTIONS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "softcap": {"softcap": 2.5},
    "all": {"temperature": 1.3, "softcap": 4.0, "ignore_index": 3},
}
# K = None: one id per position (index = input.shape[:-1]); K = 3: three ids per position
KS = [None, 3]


def _ids(shape, vocab, k, ignore_index=-100, frac=0.2, seed=1):
    """Ids (shape) or (shape + (k,)); about ``frac`` of them ignored, and position 0 all ignored."""
    g = torch.Generator().manual_seed(seed)
    full = tuple(shape) if k is None else tuple(shape) + (k,)
    ids = torch.randint(0, vocab, full, generator=g)
    flat = ids.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: int(flat.numel() * frac)]] = ignore_index
    ids.view(-1, 1 if k is None else k)[0] = ignore_index
    return ids


def _logits(shape, vocab=V, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)).to(dtype)


def _ref(z, ids, opts, g_lp=None, g_h=None):
    """(log_probs, entropy, dz) from crossent.reference, in float64 numpy."""
    kw = dict(temperature=opts.get("temperature", 1.0), ignore_index=opts.get("ignore_index", -100),
              softcap=opts.get("softcap"))  # fmt: skip
    z64, i64 = z.detach().double().numpy(), ids.numpy()
    lp = reference.token_log_probs(z64, i64, **kw)
    h = reference.token_entropy(z64, i64, **kw)
    dz = reference.token_log_probs_grad(z64, i64, None if g_lp is None else g_lp.double().numpy(),
                                        None if g_h is None else g_h.double().numpy(), **kw)  # fmt: skip
    return torch.from_numpy(np.asarray(lp)), torch.from_numpy(np.asarray(h)), torch.from_numpy(dz)


def _recipe(z, ids, temperature=1.0, ignore_index=-100, softcap=None):
    """PyTorch's materializing recipe (plain, differentiable torch ops): log_softmax → gather, and −Σ p log p."""
    x = z if softcap is None else softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(x / temperature, -1)
    single = ids.shape == z.shape[:-1]
    k_ids = ids.unsqueeze(-1) if single else ids
    valid = k_ids != ignore_index
    lp = torch.where(valid, logp.gather(-1, torch.where(valid, k_ids, 0)), 0.0)
    h = torch.where(valid.any(-1), -(logp.exp() * logp).sum(-1), 0.0)
    return (lp.squeeze(-1) if single else lp), h


def _upstream(lp, h, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lp.shape, generator=g, dtype=lp.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)


# --- hand values ---------------------------------------------------------------------------------------------


def test_hand_values():
    # row (0, log 9) at T = 2 is softmax(0, log 3) = (¼, ¾): lp = log ¾, H = −(¼ log ¼ + ¾ log ¾) = 0.5623351446
    z = torch.tensor([[0.0, math.log(9.0)]], dtype=torch.float64, requires_grad=True)
    out = crossent.token_log_probs(z, torch.tensor([1]), temperature=2.0, entropy=True)
    torch.testing.assert_close(out.log_probs, torch.tensor([math.log(0.75)], dtype=torch.float64), **F64)
    torch.testing.assert_close(out.entropy, torch.tensor([0.5623351446188083], dtype=torch.float64), **F64)
    (dz,) = torch.autograd.grad(out.log_probs.sum(), z)  # (onehot − p) / T = (−¼, ¼) / 2
    torch.testing.assert_close(dz, torch.tensor([[-0.125, 0.125]], dtype=torch.float64), **F64)
    (dz,) = torch.autograd.grad(crossent.token_log_probs(z, torch.tensor([1]), temperature=2.0, entropy=True).entropy.sum(), z)
    # −p (log p + H) / T: p = (¼, ¾), log p + H = (log ¼ + H, log ¾ + H)
    h = 0.5623351446188083
    expected = [-0.25 * (math.log(0.25) + h) / 2, -0.75 * (math.log(0.75) + h) / 2]
    torch.testing.assert_close(dz, torch.tensor([expected], dtype=torch.float64), **F64)


def test_uniform_logits_give_log_c_and_shift_invariance():
    z = torch.zeros(4, 7, dtype=torch.float64)
    out = crossent.token_log_probs(z, torch.tensor([0, 3, 6, 2]), entropy=True)
    torch.testing.assert_close(out.log_probs, torch.full((4,), -math.log(7), dtype=torch.float64), **F64)
    torch.testing.assert_close(out.entropy, torch.full((4,), math.log(7), dtype=torch.float64), **F64)
    z = _logits((5,), 11)
    ids = torch.randint(0, 11, (5, 2))
    a, b = (crossent.token_log_probs(x, ids, entropy=True) for x in (z, z + 123.0))
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-12, atol=1e-11)


# --- the oracle, both index forms, every option, gradients from either output ---------------------------------


@pytest.mark.parametrize("k", KS, ids=["single", "K3"])
@pytest.mark.parametrize("option", OPTIONS)
def test_plain_matches_reference_and_recipe(option, k):
    opts = OPTIONS[option]
    z = _logits((3, 43), 131)
    ids = _ids((3, 43), 131, k, opts.get("ignore_index", -100))
    ref_lp, ref_h, _ = _ref(z, ids, opts)
    out = crossent.token_log_probs(z, ids, entropy=True, **opts)
    assert out.log_probs.shape == ids.shape and out.entropy.shape == (3, 43)
    torch.testing.assert_close(out.log_probs, ref_lp, **F64)
    torch.testing.assert_close(out.entropy, ref_h, **F64)
    recipe_lp, recipe_h = _recipe(z, ids, **opts)
    torch.testing.assert_close(out.log_probs, recipe_lp, **F64)
    torch.testing.assert_close(out.entropy, recipe_h, **F64)
    for g_lp_on, g_h_on in ((True, False), (False, True), (True, True)):
        x = z.clone().requires_grad_()
        out = crossent.token_log_probs(x, ids, entropy=True, **opts)
        g_lp, g_h = _upstream(out.log_probs, out.entropy)
        used = [(t, g) for t, g, on in ((out.log_probs, g_lp, g_lp_on), (out.entropy, g_h, g_h_on)) if on]
        (dz,) = torch.autograd.grad([t for t, _ in used], x, [g for _, g in used])
        _, _, ref_dz = _ref(z, ids, opts, g_lp if g_lp_on else None, g_h if g_h_on else None)
        torch.testing.assert_close(dz, ref_dz, **F64)


@pytest.mark.parametrize("k", KS, ids=["single", "K3"])
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("chunks", ["one", "several", "vocab-split"])
def test_fused_matches_reference(option, k, chunks):
    opts = OPTIONS[option]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(D))
    b = torch.randn(V, generator=g, dtype=torch.float64)
    ids = _ids((N,), V, k, opts.get("ignore_index", -100))
    chunking = {"one": {}, "several": {"chunk_size": 64},
                "vocab-split": {"chunk_size": 100, "memory_budget": scratch_bytes(100, 300, D, torch.float64)}}[chunks]
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = crossent.linear_token_log_probs(leaves[0], leaves[1], ids, linear_bias=leaves[2], entropy=True, **opts,
                                          **chunking)  # fmt: skip
    z = F.linear(x, w, b)
    ref_lp, ref_h, _ = _ref(z, ids, opts)
    torch.testing.assert_close(out.log_probs, ref_lp, **F64)
    torch.testing.assert_close(out.entropy, ref_h, **F64)
    g_lp, g_h = _upstream(out.log_probs, out.entropy)
    grads = torch.autograd.grad([out.log_probs, out.entropy], leaves, [g_lp, g_h])
    _, _, dz = _ref(z, ids, opts, g_lp, g_h)
    for got, want in zip(grads, (dz @ w, dz.T @ x, dz.sum(0))):
        torch.testing.assert_close(got, want, **F64)


def test_fused_gradient_from_one_output_and_partial_requires_grad():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 9, generator=g, dtype=torch.float64), torch.randn(50, 9, generator=g, dtype=torch.float64)
    ids = _ids((40,), 50, 2)
    z = F.linear(x, w)
    for which in ("log_probs", "entropy"):
        for needs in ((True, False), (False, True), (True, True)):
            leaves = [t.clone().requires_grad_(n) for t, n in zip((x, w), needs)]
            out = crossent.linear_token_log_probs(*leaves, ids, entropy=True, chunk_size=16)
            target = getattr(out, which)
            up = torch.randn(target.shape, generator=g, dtype=torch.float64)
            grads = torch.autograd.grad(target, [p for p in leaves if p.requires_grad], up)
            _, _, dz = _ref(z, ids, {}, up if which == "log_probs" else None, up if which == "entropy" else None)
            want = [r for r, n in zip((dz @ w, dz.T @ x), needs) if n]
            for got, r in zip(grads, want):
                torch.testing.assert_close(got, r, **F64)


def test_batch_dims_and_unbatched():
    z = _logits((2, 3, 4), 13)
    ids = _ids((2, 3, 4), 13, 2)
    out = crossent.token_log_probs(z, ids, entropy=True)
    ref_lp, ref_h, _ = _ref(z, ids, {})
    torch.testing.assert_close(out.log_probs, ref_lp, **F64)
    torch.testing.assert_close(out.entropy, ref_h, **F64)
    one = crossent.token_log_probs(z[0, 0, 0], torch.tensor(5), entropy=True)  # (C,) logits, a 0-d index
    assert one.log_probs.shape == () and one.entropy.shape == ()
    torch.testing.assert_close(one.log_probs, torch.log_softmax(z[0, 0, 0], -1)[5], **F64)
    x = torch.randn(2, 5, 6, dtype=torch.float64)  # fused: (B, T, D) input
    w = torch.randn(13, 6, dtype=torch.float64)
    ids = torch.randint(0, 13, (2, 5, 3))
    out = crossent.linear_token_log_probs(x, w, ids, entropy=True)
    ref_lp, ref_h, _ = _ref(F.linear(x, w), ids, {})
    torch.testing.assert_close(out.log_probs, ref_lp, **F64)
    torch.testing.assert_close(out.entropy, ref_h, **F64)


# --- ignore semantics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_ignored_ids_give_zero_and_no_gradient(fused):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(17, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 17, (6, 3), generator=g)
    ids[1] = -1  # every id of position 1: its entropy is 0 too
    ids[2, 0] = -1  # one id of position 2: its log-prob is 0, its entropy is not
    run = (lambda a, i: crossent.linear_token_log_probs(a, w, i, ignore_index=-1, entropy=True)) if fused else (
        lambda a, i: crossent.token_log_probs(F.linear(a, w), i, ignore_index=-1, entropy=True))  # fmt: skip
    leaf = x.clone().requires_grad_()
    out = run(leaf, ids)
    assert out.log_probs[1].eq(0).all() and out.log_probs[2, 0] == 0 and out.entropy[1] == 0 and out.entropy[2] > 0
    (dx,) = torch.autograd.grad([out.log_probs, out.entropy], leaf, [torch.ones(6, 3, dtype=torch.float64),
                                                                     torch.ones(6, dtype=torch.float64)])  # fmt: skip
    assert dx[1].eq(0).all()
    # ignored ids ≡ those ids removed: position 2's gradient equals that of its other two ids alone
    leaf2 = x[2:3].clone().requires_grad_()
    out2 = run(leaf2, ids[2:3, 1:])
    (dx2,) = torch.autograd.grad([out2.log_probs, out2.entropy], leaf2, [torch.ones(1, 2, dtype=torch.float64),
                                                                        torch.ones(1, dtype=torch.float64)])  # fmt: skip
    torch.testing.assert_close(dx[2:3], dx2, **F64)


def test_all_ignored_and_empty():
    z = _logits((4,), 9).requires_grad_()
    out = crossent.token_log_probs(z, torch.full((4, 2), -100), entropy=True)
    assert out.log_probs.eq(0).all() and out.entropy.eq(0).all()
    (dz,) = torch.autograd.grad([out.log_probs, out.entropy], z, [torch.ones(4, 2, dtype=torch.float64),
                                                                 torch.ones(4, dtype=torch.float64)])  # fmt: skip
    assert dz.eq(0).all()
    empty = crossent.token_log_probs(torch.zeros(0, 9), torch.zeros(0, dtype=torch.int64), entropy=True)
    assert empty.log_probs.shape == (0,) and empty.entropy.shape == (0,)
    fused = crossent.linear_token_log_probs(torch.zeros(0, 3), torch.randn(9, 3), torch.zeros(0, 2, dtype=torch.int64))
    assert fused.log_probs.shape == (0, 2) and fused.entropy is None


def test_minus_inf_logits_masked_vocabulary():
    # −inf on non-sampled tokens (a masked vocabulary): p = 0 there, finite log-probs, entropy and gradient
    z = _logits((3,), 8)
    z[:, 5:] = -math.inf
    leaf = z.clone().requires_grad_()
    ids = torch.tensor([0, 2, 4])
    out = crossent.token_log_probs(leaf, ids, entropy=True)
    recipe_lp, _ = _recipe(z[:, :5], ids)
    torch.testing.assert_close(out.log_probs, recipe_lp, **F64)
    torch.testing.assert_close(out.entropy, torch.from_numpy(reference.token_entropy(z.numpy())), **F64)
    (dz,) = torch.autograd.grad([out.log_probs, out.entropy], leaf, [torch.ones(3, dtype=torch.float64) * 2,
                                                                   torch.ones(3, dtype=torch.float64) * 3])  # fmt: skip
    assert torch.isfinite(dz).all() and dz[:, 5:].eq(0).all()


# --- precision contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_output_dtypes(dtype):
    z = _logits((5,), 11, dtype).requires_grad_()
    out = crossent.token_log_probs(z, torch.randint(0, 11, (5,)), entropy=True)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.log_probs.dtype == want and out.entropy.dtype == want
    (dz,) = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), z)
    assert dz.dtype == dtype
    x, w = torch.randn(5, 4, dtype=dtype, requires_grad=True), torch.randn(11, 4, dtype=dtype, requires_grad=True)
    out = crossent.linear_token_log_probs(x, w, torch.randint(0, 11, (5, 2)), entropy=True)
    assert out.log_probs.dtype == want and out.entropy.dtype == want
    assert [g.dtype for g in torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), (x, w))] == [dtype, dtype]


def _worst(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_low_precision_no_worse_than_the_naive_recipe(dtype, fused):
    """Error against the float64 oracle ≤ the naive same-dtype recipe's + a small stated tolerance (16 fp32 ulp /
    1 bf16 ulp of the largest value). The logits sit at +300 (an LLM without z-loss), where an fp32 lse rounds."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 64, 32, 3001
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.6
    b = torch.full((v,), 300.0, dtype=torch.float64)
    ids = torch.randint(0, v, (n, 2), generator=g)
    xs, ws, bs = (t.to(dtype) for t in (x, w, b))
    z64 = F.linear(xs.double(), ws.double(), bs.double())  # the oracle sees the rounded inputs
    ref_lp, ref_h, _ = _ref(z64, ids, {"temperature": 0.9})
    if fused:
        ours = crossent.linear_token_log_probs(xs, ws, ids, linear_bias=bs, entropy=True, temperature=0.9, chunk_size=24)
        naive_z = F.linear(xs, ws, bs)
    else:
        naive_z = F.linear(xs, ws, bs)
        ours = crossent.token_log_probs(naive_z, ids, entropy=True, temperature=0.9)
    naive_lp, naive_h = _recipe(naive_z, ids, temperature=0.9)
    ulp = 2.0**-19 if dtype == torch.float32 else 2.0**-8
    for got, naive, ref in ((ours.log_probs, naive_lp, ref_lp), (ours.entropy, naive_h, ref_h)):
        tol = ulp * max(1.0, ref.abs().max().item())
        assert _worst(got, ref) <= _worst(naive, ref) + tol, (_worst(got, ref), _worst(naive, ref))


def test_fp32_log_probs_keep_their_digits_at_large_logits():
    # at |z| ~ 1e4 an fp32 lse is rounded at ~1e-3; ours is formed in float64 from the max and log-sum
    z = torch.randn(8, 100, dtype=torch.float64) + 1e4
    ids = torch.randint(0, 100, (8,))
    ours = crossent.token_log_probs(z.float(), ids, entropy=True)
    ref_lp, ref_h, _ = _ref(z.float().double(), ids, {})
    assert _worst(ours.log_probs, ref_lp) < 1e-5 and _worst(ours.entropy, ref_h) < 1e-5


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite float > 0, got 0.0"),
        ({"temperature": -1.0}, ValueError, "temperature must be a finite float > 0"),
        ({"temperature": math.inf}, ValueError, "temperature must be a finite float > 0, got inf"),
        ({"temperature": math.nan}, ValueError, "temperature must be a finite float > 0, got nan"),
        ({"temperature": "2"}, TypeError, "temperature must be a finite float > 0, got '2' of type str"),
        ({"softcap": 0.0}, ValueError, "softcap must be None or a finite float > 0"),
        ({"entropy": 1}, TypeError, "entropy must be a bool"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
    ],
)
def test_bad_options(kwargs, exc, match):
    z, ids = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(exc, match=match):
        crossent.token_log_probs(z, ids, **kwargs)
    with pytest.raises(exc, match=match):
        crossent.linear_token_log_probs(torch.randn(2, 3), torch.randn(5, 3), ids, **kwargs)


def test_bad_tensors():
    z = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"index must have shape input.shape\[:-1\] = \(2, 3\).*\(2, 3, 'K'\).*got \(3, 2\)"):
        crossent.token_log_probs(z, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="index must have shape"):
        crossent.token_log_probs(z, torch.zeros(2, 3, 1, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="index must hold integer class ids, got dtype torch.float32"):
        crossent.token_log_probs(z, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="index must be a torch.Tensor, got list"):
        crossent.token_log_probs(z, [[0, 1, 2], [0, 1, 2]])
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        crossent.token_log_probs(z.long(), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="input has no classes"):
        crossent.token_log_probs(torch.zeros(2, 0), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target contains class index 5, outside \[0, 5\)"):
        crossent.token_log_probs(z, torch.full((2, 3, 2), 5))
    with pytest.raises(ValueError, match=r"target contains class index -2, outside \[0, 5\) and not ignore_index=-1"):
        crossent.token_log_probs(z, torch.full((2, 3), -2), ignore_index=-1)
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"target contains class index 7"):
        crossent.linear_token_log_probs(x, w, torch.full((4, 2), 7))
    with pytest.raises(ValueError, match="index must have shape"):
        crossent.linear_token_log_probs(x, w, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="must equal linear_weight's D"):
        crossent.linear_token_log_probs(x, torch.randn(5, 4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="linear_weight has dtype torch.float64"):
        crossent.linear_token_log_probs(x, w.double(), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="memory_budget=10 bytes is too small"):
        crossent.linear_token_log_probs(x, w, torch.zeros(4, dtype=torch.int64), memory_budget=10)


def test_out_of_range_ids_give_nan_rows_in_the_kernels():
    # what CUDA gives (no host sync there): the kernels themselves, past the CPU check
    z = torch.randn(3, 6, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [2, 9], [3, -100]])
    opts = LogProbRowOptions(entropy=True)
    rows = logprob_rows.forward(z, ids, opts)
    assert rows.log_probs[1, 1].isnan() and not rows.log_probs[1, 0].isnan() and rows.entropy[1].isnan()
    assert not rows.entropy[[0, 2]].isnan().any()
    out = torch.empty_like(z)
    logprob_rows.backward(z, ids, rows.lse, rows.entropy, torch.ones(3, 2, dtype=torch.float64), None, opts, out)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()


# --- autograd: gradcheck, transforms, compile -----------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
def test_gradcheck_plain_and_gradgradcheck(option):
    opts = OPTIONS[option]
    z = _logits((4,), 7).requires_grad_()
    ids = _ids((4,), 7, 2, opts.get("ignore_index", -100))
    ids[0, 0] = 1  # position 0 not all ignored: some entropy gradient through every row

    def fn(x):
        out = crossent.token_log_probs(x, ids, entropy=True, **opts)
        return out.log_probs, out.entropy

    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))


def test_gradcheck_fused():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    ids = _ids((6,), 9, 2)

    def fn(a, bw, bb):
        out = crossent.linear_token_log_probs(a, bw, ids, linear_bias=bb, entropy=True, softcap=3.0, temperature=0.8,
                                              chunk_size=4)  # fmt: skip
        return out.log_probs, out.entropy

    assert torch.autograd.gradcheck(fn, (x, w, b))


def _plain_fn(opts):
    def fn(z, ids):
        out = crossent.token_log_probs(z, ids, entropy=True, **opts)
        return out.log_probs.sin().sum() + (out.entropy * 0.7).sum()

    return fn


def _recipe_fn(opts):
    def fn(z, ids):
        lp, h = _recipe(z, ids, **opts)
        return lp.sin().sum() + (h * 0.7).sum()

    return fn


@pytest.mark.parametrize("option", OPTIONS)
def test_torch_func_plain(option):
    opts = OPTIONS[option]
    z = _logits((5,), 7)
    ids = _ids((5,), 7, 2, opts.get("ignore_index", -100))
    ours, theirs = _plain_fn(opts), _recipe_fn(opts)
    torch.testing.assert_close(grad(ours)(z, ids), grad(theirs)(z, ids), **F64)
    torch.testing.assert_close(jacrev(ours)(z, ids), jacrev(theirs)(z, ids), **F64)
    tangent = torch.randn_like(z)
    torch.testing.assert_close(jvp(lambda a: ours(a, ids), (z,), (tangent,))[1],
                               jvp(lambda a: theirs(a, ids), (z,), (tangent,))[1], **F64)  # fmt: skip
    zb, ib = _logits((3, 5), 7), _ids((3, 5), 7, 2, opts.get("ignore_index", -100))
    torch.testing.assert_close(vmap(grad(ours))(zb, ib), vmap(grad(theirs))(zb, ib), **F64)
    per_sample = vmap(lambda a, i: crossent.token_log_probs(a, i, entropy=True, **opts)[:2])(zb, ib)  # vmap: no None
    recipe = vmap(lambda a, i: _recipe(a, i, **opts))(zb, ib)
    torch.testing.assert_close(per_sample[0], recipe[0], **F64)
    torch.testing.assert_close(per_sample[1], recipe[1], **F64)
    assert vmap(lambda a, i: crossent.token_log_probs(a, i, **opts).log_probs)(zb, ib).shape == ib.shape


def test_torch_func_fused():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    ids = _ids((6,), 9, 2)

    def ours(a, bw):
        out = crossent.linear_token_log_probs(a, bw, ids, entropy=True, chunk_size=4)
        return out.log_probs.sin().sum() + (out.entropy * 0.7).sum()

    def theirs(a, bw):
        return _recipe_fn({})(F.linear(a, bw), ids)

    torch.testing.assert_close(grad(ours, argnums=(0, 1))(x, w), grad(theirs, argnums=(0, 1))(x, w), **F64)
    torch.testing.assert_close(jacrev(ours, argnums=(0, 1))(x, w), jacrev(theirs, argnums=(0, 1))(x, w), **F64)
    xb = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(vmap(grad(ours), in_dims=(0, None))(xb, w),
                               vmap(grad(theirs), in_dims=(0, None))(xb, w), **F64)  # fmt: skip
    with pytest.raises(RuntimeError, match="linear_token_log_probs does not support forward-mode AD"):
        jvp(lambda a: ours(a, w), (x,), (torch.ones_like(x),))
    leaf = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(ours(leaf, w), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="linear_token_log_probs does not support second derivatives.*token_log_probs"):
        dx.sum().backward()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_compile_fullgraph_equals_eager(fused):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 5, generator=g), torch.randn(31, 5, generator=g)
    ids = _ids((12,), 31, 2)

    def step(a, bw):
        if fused:
            out = crossent.linear_token_log_probs(a, bw, ids, entropy=True, temperature=0.8, chunk_size=5)
        else:
            out = crossent.token_log_probs(F.linear(a, bw), ids, entropy=True, temperature=0.8)
        return (out.log_probs * 2).sum() - out.entropy.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        loss = fn(*leaves)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_custom_ops_opcheck_and_fakes():
    z, ids = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 7, (5, 2))
    stats = LogProbRowOptions(entropy=True, log_sum_sq_probs=True, mean_logits=True, is_top1=True)
    for opts in (LogProbRowOptions(entropy=True, temperature=0.5), LogProbRowOptions(), stats):
        args = [z, ids, *flatten(opts, VocabShard.whole(7)), "torch"]
        torch.library.opcheck(logprob_ops._logprob_forward, args)
        lp, h, lse = logprob_ops._logprob_forward(*args)[:3]
        g_h = torch.ones(5, dtype=torch.float64) if opts.entropy else lse.new_empty(0)
        back = [z, ids, lse, h, torch.ones(5, 2, dtype=torch.float64), g_h, *flatten(opts, VocabShard.whole(7)), "torch"]
        torch.library.opcheck(logprob_ops._logprob_backward, back)
        x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
        settings = [*flatten(opts, VocabShard.whole(7), LoopArgs(chunk_size=2), GradNeeds()), "torch"]
        fwd = [x, w, None, ids, *settings]
        torch.library.opcheck(logprob_ops._linear_logprob_forward, fwd)
        lp, h, lse = logprob_ops._linear_logprob_forward(*fwd)[:3]
        torch.library.opcheck(logprob_ops._linear_logprob_backward,
                              [x, w, None, ids, lse, h, torch.ones(5, 2, dtype=torch.float64), g_h, *settings])


# --- the fused form's memory and work ------------------------------------------------------------------------


def test_fused_never_allocates_n_by_v():
    n, dim, vocab = 512, 32, 4096  # N×V = 2M elements; dW is 128K, a block 128×V = 512K
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, requires_grad=True)
    ids = torch.randint(0, vocab, (n, 2), generator=g)
    with _LargestAllocation() as naive:  # the detector can fail: the materializing recipe trips it
        lp, h = _recipe(F.linear(x, w), ids)
        (lp.sum() + h.sum()).backward()
    assert naive.largest >= n * vocab
    with _LargestAllocation() as public:
        out = crossent.linear_token_log_probs(x, w, ids, entropy=True, chunk_size=128)
        (out.log_probs.sum() + out.entropy.sum()).backward()
    opts, loop = LogProbRowOptions(entropy=True), LoopArgs(chunk_size=128)
    with _LargestAllocation() as loops:  # inside the ops (the mode cannot see into them)
        rows = linear_loop.linear_log_probs(x.detach(), w.detach(), None, ids, opts, loop)
        linear_loop.linear_log_probs_grads(x.detach(), w.detach(), None, ids, rows.lse, rows.entropy,
                                           torch.ones(n, 2), torch.ones(n), opts, loop)  # fmt: skip
    for mode in (public, loops):
        assert mode.largest < n * vocab, f"{mode.op} allocated {mode.largest} elements (N×V = {n * vocab})"


def test_fused_products_forward_one_backward_three(monkeypatch):
    calls = []
    real = linear_loop._Workspace.logits
    monkeypatch.setattr(linear_loop._Workspace, "logits", lambda self, *a: calls.append("logits") or real(self, *a))
    x, w = torch.randn(20, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    ids = torch.randint(0, 9, (20,))
    with torch.no_grad():
        crossent.linear_token_log_probs(x, w, ids, entropy=True, chunk_size=8)
    assert calls == ["logits"] * 3  # 3 blocks, one product each, nothing else
    calls.clear()
    out = crossent.linear_token_log_probs(x, w, ids, entropy=True, chunk_size=8)
    assert len(calls) == 3
    out.entropy.sum().backward()
    assert len(calls) == 6  # the logits again per block (then dX and dW: the 4 products)


def test_inputs_not_modified_and_retain_graph():
    x, w = torch.randn(10, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    ids = torch.randint(0, 9, (10, 2))
    before = [t.clone() for t in (x, w, ids)]
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    out = crossent.linear_token_log_probs(*leaves, ids, entropy=True, chunk_size=3, softcap=2.0)
    loss = out.log_probs.sum() + out.entropy.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for t, b in zip((x, w, ids), before):
        assert torch.equal(t, b)


def test_softmax_path_and_max_first_path_agree():
    """The CPU softmax path (lse from the ids' largest p, H = Σ entr(p)) and the max-first stats give the same rows;
    an id whose p is below 2^-100 in some row sends the call down the max-first path (also right)."""
    z = _logits((6,), 50, scale=4.0)
    ids = torch.randint(0, 50, (6, 2))
    opts = LogProbRowOptions(entropy=True, temperature=0.9)
    fast = logprob_rows.softmax_rows(z, ids, opts)
    slow = logprob_rows.finish(logprob_rows.shard_stats(z, ids, opts), ids, opts, 50)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, **F64)
    z[2, ids[2]] = -400.0  # both ids of row 2 are (nearly) impossible: p < 2^-100
    assert logprob_rows.softmax_rows(z, ids, opts) is None
    rows = logprob_rows.forward(z, ids, opts)
    ref_lp, ref_h, _ = _ref(z, ids, {"temperature": 0.9})
    torch.testing.assert_close(rows.log_probs, ref_lp, **F64)
    torch.testing.assert_close(rows.entropy, ref_h, **F64)
    out, want = torch.empty_like(z), torch.empty_like(z)  # backward: whole rows (softmax) vs two shards (exp path)
    g, g_h = torch.randn(6, 2, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    logprob_rows.backward(z, ids, rows.lse, rows.entropy, g, g_h, opts, out)
    for v0, v1 in ((0, 20), (20, 50)):
        logprob_rows.backward(z[:, v0:v1], ids, rows.lse, rows.entropy, g, g_h, opts, want[:, v0:v1], VocabShard(v0, 50))
    _, _, ref_dz = _ref(z, ids, {"temperature": 0.9}, g, g_h)
    torch.testing.assert_close(out, ref_dz, **F64)
    torch.testing.assert_close(want, ref_dz, **F64)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_ignored_positions_are_dropped_before_the_products(fraction):
    # Prompt and padding positions (every id ignore_index) cost no product: (1 − f) of the all-valid work,
    # counted inside the loops; the outputs are the same as the materializing recipe's, 0 where ignored.
    from test_linear_cross_entropy import _ProductFlops

    g = torch.Generator().manual_seed(7)
    n, dim, vocab = 200, 16, 300
    x, w = torch.randn(n, dim, generator=g), torch.randn(vocab, dim, generator=g)
    ids = torch.randint(0, vocab, (n, 2), generator=g)
    opts, loop = LogProbRowOptions(entropy=True), LoopArgs(chunk_size=64)
    counts = {}
    for f in (0.0, fraction):
        idf = ids.clone()
        idf[: int(f * n)] = -100
        with _ProductFlops() as mode:
            rows = linear_loop.linear_log_probs(x, w, None, idf, opts, loop)
            grads = linear_loop.linear_log_probs_grads(x, w, None, idf, rows.lse, rows.entropy, torch.ones(n, 2),
                                                       torch.ones(n), opts, loop)  # fmt: skip
        counts[f] = mode.flops
        if f:
            assert torch.equal(rows.log_probs[: int(f * n)], torch.zeros(int(f * n), 2))
            assert torch.equal(rows.entropy[: int(f * n)], torch.zeros(int(f * n)))
            assert torch.equal(grads.input[: int(f * n)], torch.zeros(int(f * n), dim))
            lp, h = _recipe(F.linear(x, w), idf)
            torch.testing.assert_close(rows.log_probs, lp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rows.entropy, h, rtol=1e-5, atol=1e-5)
    assert counts[0.0] > 0 and counts[fraction] <= (1 - fraction) * counts[0.0] * 1.001, counts


@pytest.mark.parametrize("c_kernels", [True, False])
def test_entropy_at_a_large_vocabulary_no_worse_than_the_fp32_recipe(c_kernels, monkeypatch):
    # the sums run over 32768 terms: an fp32 dot product lost ~20× the recipe's accuracy here (the torch-ops path)
    from crossent.kernels import cpu_rows

    if c_kernels and not cpu_rows.available():
        pytest.skip("crossent._cpu_rows was not built (no C compiler)")
    monkeypatch.setattr(cpu_rows, "ENABLED", c_kernels)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(64, 32768, generator=g) * 3
    ids = torch.randint(0, 32768, (64,), generator=g)
    exact = torch.special.entr(torch.softmax(z.double(), -1)).sum(-1)
    recipe = torch.special.entr(torch.softmax(z, -1)).sum(-1)
    ours = crossent.token_log_probs(z, ids, entropy=True).entropy
    assert (ours.double() - exact).abs().max() <= (recipe.double() - exact).abs().max()
