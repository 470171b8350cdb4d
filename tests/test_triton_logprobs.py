"""The Triton log-prob kernels (crossent.kernels.triton_logprobs) against the float64 oracle and the torch kernels.

As tests/test_triton_rows.py: CPU tensors through Triton's interpreter where there is no GPU (tiny sizes: the
interpreter runs every program in Python), the compiled kernels on CUDA where there is one. Blocks are forced to
32 columns so the online max / sum-exp / Σ p log p cross several blocks and a partial last one.
"""

from __future__ import annotations

import _triton_mode  # noqa: I001  (first: it may set TRITON_INTERPRET before anything imports Triton)
import math

import numpy as np
import pytest
import torch

import crossent
from crossent import reference
from crossent._options import LogProbRowOptions
from crossent.kernels import logprob_rows
from crossent.kernels.shard import VocabShard

pytest.importorskip("triton")
from crossent.kernels import triton_logprobs, triton_rows  # noqa: E402

OPTIONS = {
    "plain": {},
    "temperature": {"temperature": 0.6},
    "softcap_ignore": {"softcap": 3.0, "temperature": 1.4, "ignore_index": 2},
}


@pytest.fixture
def device():
    return _triton_mode.kernel_device()


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setitem(triton_rows.ROW_LAUNCH, 2, (32, 1))
    monkeypatch.setitem(triton_rows.ROW_LAUNCH, 4, (32, 1))


def _case(rows, classes, k, opts, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (3.0 * torch.randn(rows, classes, generator=g, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, classes, (rows, k), generator=g)
    ignore = opts.get("ignore_index", -100)
    ids[0] = ignore  # one position all ignored
    ids[1, 0] = ignore  # one id of another
    gl = torch.randn(rows, k, generator=g, dtype=torch.float64)
    gh = torch.randn(rows, generator=g, dtype=torch.float64)
    return z.to(device), ids.to(device), gl.to(device), gh.to(device)


def _reference(z, ids, gl, gh, opts):
    kw = dict(temperature=opts.get("temperature", 1.0), ignore_index=opts.get("ignore_index", -100),
              softcap=opts.get("softcap"))  # fmt: skip
    z64, i64 = z.double().cpu().numpy(), ids.cpu().numpy()
    return (reference.token_log_probs(z64, i64, **kw), reference.token_entropy(z64, i64, **kw),
            reference.token_log_probs_grad(z64, i64, gl.cpu().numpy(), gh.cpu().numpy(), **kw))  # fmt: skip


def _close(got, want, tol):
    np.testing.assert_allclose(got.double().cpu().numpy(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("classes", [1, 7, 100])
@pytest.mark.parametrize("option", OPTIONS)
def test_kernels_match_reference(device, option, classes):
    opts = OPTIONS[option]
    z, ids, gl, gh = _case(5, classes, 2, opts, device)
    row_opts = LogProbRowOptions(entropy=True, **opts)
    rows = triton_logprobs.forward(z, ids, row_opts)
    ref_lp, ref_h, ref_dz = _reference(z, ids, gl, gh, opts)
    _close(rows.log_probs, ref_lp, 2e-5)
    _close(rows.entropy, ref_h, 2e-5)
    out = torch.empty_like(z)
    triton_logprobs.backward(z, ids, rows.lse, rows.entropy, gl, gh, row_opts, out)
    _close(out, ref_dz, 2e-5)
    # the torch kernels agree as closely on the same fp32 inputs
    torch_out = torch.empty_like(z)
    logprob_rows.backward(z, ids, rows.lse, rows.entropy, gl, gh, row_opts, torch_out)
    torch.testing.assert_close(out, torch_out, rtol=1e-5, atol=1e-6)


def test_shards_and_upstream_on_one_output(device):
    z, ids, gl, gh = _case(4, 70, 3, {}, device)
    opts = LogProbRowOptions(entropy=True)
    whole = triton_logprobs.forward(z, ids, opts)
    parts = [triton_logprobs.shard_stats(z[:, a:b], ids, opts, a) for a, b in ((0, 33), (33, 70))]
    combined = logprob_rows.finish(logprob_rows.combine_stats(parts), ids, opts, 70)
    torch.testing.assert_close(combined.log_probs, whole.log_probs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combined.entropy, whole.entropy, rtol=1e-6, atol=1e-6)
    for g_lp, g_h in ((gl, None), (None, gh)):
        full = torch.empty_like(z)
        triton_logprobs.backward(z, ids, whole.lse, whole.entropy, g_lp, g_h, opts, full)
        want = torch.empty_like(z)
        logprob_rows.backward(z, ids, whole.lse, whole.entropy, g_lp, g_h, opts, want)
        torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-6)
        pieces = torch.cat([_shard_grad(z, ids, whole, g_lp, g_h, opts, a, b) for a, b in ((0, 40), (40, 70))], -1)
        torch.testing.assert_close(pieces, full, rtol=0, atol=0)


def _shard_grad(z, ids, whole, g_lp, g_h, opts, a, b):
    out = torch.empty_like(z[:, a:b])
    triton_logprobs.backward(z[:, a:b].contiguous(), ids, whole.lse, whole.entropy, g_lp, g_h, opts, out,
                             VocabShard(a, z.shape[-1]))  # fmt: skip
    return out


def test_minus_inf_and_bf16(device):
    z, ids, gl, gh = _case(3, 40, 2, {}, device, dtype=torch.bfloat16)
    z[:, 30:] = -math.inf
    ids[:, 1] = 5
    ids[:, 0] %= 30  # sampled ids are never masked tokens
    opts = LogProbRowOptions(entropy=True)
    rows = triton_logprobs.forward(z, ids, opts)
    want = logprob_rows.forward(z, ids, opts)
    torch.testing.assert_close(rows.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.entropy, want.entropy, rtol=1e-5, atol=1e-5)
    out = torch.empty_like(z)
    triton_logprobs.backward(z, ids, rows.lse, rows.entropy, gl, gh, opts, out)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and out[:, 30:].eq(0).all()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_public_impl_triton_equals_torch(device, fused):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g).to(device)
    w = torch.randn(45, 6, generator=g).to(device)
    ids = torch.randint(0, 45, (9, 2), generator=g).to(device)
    results = []
    for impl in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        kw = dict(entropy=True, temperature=0.8, softcap=5.0, impl=impl, log_sum_sq_probs=True, mean_logits=True,
                  is_top1=True)
        with _triton_mode.launches(triton_logprobs) as ran:
            if fused:  # blocks of 4 rows and 20 columns: vocabulary pieces in both loops
                out = crossent.linear_token_log_probs(*leaves, ids, chunk_size=4,
                                                      memory_budget=4 * 20 * 4 + 4 * 6 * 12, **kw)  # fmt: skip
            else:
                out = crossent.token_log_probs(leaves[0] @ leaves[1].T, ids, **kw)
            grads = torch.autograd.grad([out.log_probs.sum(), (out.entropy * 3).sum()], leaves)
        assert (ran[0] > 0) == (impl == "triton")  # the Triton kernels ran exactly when asked for
        results.append((*out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


STATS = dict(log_sum_sq_probs=True, mean_logits=True, is_top1=True)


@pytest.mark.parametrize("option", OPTIONS)
def test_statistics_match_reference_ties_and_shards(device, option):
    """log Σ p², the mean logit and top-1 from the stats kernel vs the float64 oracle; top-1 ties inside one
    32-column block, across two blocks and in the partial last block go to the first column (as torch.argmax);
    shards (0, 33) + (33, 100) combine to the whole row's."""
    opts = OPTIONS[option]
    ign = opts.get("ignore_index", -100)
    z, ids, _, _ = _case(6, 100, 3, opts, device)
    for row, (a, b) in {2: (10, 20), 3: (31, 32), 4: (97, 99)}.items():
        z[row, a] = z[row, b] = 30.0
        ids[row] = torch.tensor([b, a, ign])
    row_opts = LogProbRowOptions(**opts, **STATS)
    rows = triton_logprobs.forward(z, ids, row_opts)
    kw = dict(temperature=opts.get("temperature", 1.0), ignore_index=ign, softcap=opts.get("softcap"))
    z64, i64 = z.double().cpu().numpy(), ids.cpu().numpy()
    _close(rows.log_sum_sq_probs, reference.token_log_sum_sq_probs(z64, i64, **kw), 2e-6)
    _close(rows.mean_logits, reference.token_mean_logits(z64, i64, **kw), 2e-6)
    want_top1 = torch.from_numpy(reference.token_is_top1(z64, i64, **kw))
    torch.testing.assert_close(rows.is_top1.cpu(), want_top1)
    assert rows.is_top1[2:5].tolist() == [[False, True, False]] * 3  # the later tied column is not top-1
    torch_rows = logprob_rows.forward(z, ids, row_opts)
    for field in ("log_sum_sq_probs", "mean_logits", "is_top1"):
        torch.testing.assert_close(getattr(rows, field), getattr(torch_rows, field), rtol=1e-6, atol=1e-6)
    parts = [triton_logprobs.shard_stats(z[:, a:b], ids, row_opts, a) for a, b in ((0, 33), (33, 100))]
    combined = logprob_rows.finish(logprob_rows.combine_stats(parts), ids, row_opts, 100)
    for field in ("log_sum_sq_probs", "mean_logits", "is_top1"):
        torch.testing.assert_close(getattr(combined, field), getattr(rows, field), rtol=1e-6, atol=1e-6)
