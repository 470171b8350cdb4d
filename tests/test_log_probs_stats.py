"""The per-token family's statistics without gradient — ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` — on the
plain and fused paths, against the float64 oracle (crossent.reference) and plain torch ops (TRL's definitions:
``log Σ softmax(x)²``, ``x.mean(-1)`` of the transformed logits, ``argmax(x) == id``).

The Triton kernel's statistics are tested in tests/test_triton_logprobs.py, the vocab-parallel combine in
tests/_dist_workers.py (``log_prob_job``). Shapes: V = 257 (prime: no vocabulary piece divides it), N = 37.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference
from crossent.kernels import cpu_rows, logprob_rows

STATS = dict(log_sum_sq_probs=True, mean_logits=True, is_top1=True)
FIELDS = tuple(STATS)
N, D, V = 37, 11, 257
OPTIONS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "softcap_ignore": {"softcap": 2.5, "temperature": 1.3, "ignore_index": 3},
}
# "one": whole rows in one block; "split": blocks of 8 rows and vocabulary pieces (the pieces' stats combined)
CHUNKS = {"one": {}, "split": dict(chunk_size=8, memory_budget=8 * 60 * 8 + 8 * D * 8)}


def _ids(k, ignore_index=-100, seed=1):
    """(N,) or (N, k) ids; position 0 all ignored, about a fifth of the others ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N,) if k is None else (N, k), generator=g)
    ids.view(-1)[torch.randperm(ids.numel(), generator=g)[: ids.numel() // 5]] = ignore_index
    ids[0] = ignore_index
    return ids


def _tied(z, ids, ignore_index):
    """Row 1: its max at two columns, the ids on both (the first is top-1, the later is not)."""
    z[1, 40] = z[1, 200] = z[1].max() + 1.0
    ids[1] = 200 if ids.dim() == 1 else torch.tensor([200, 40, ignore_index])[: ids.shape[1]]
    return z, ids


def _reference(z, ids, opts):
    kw = dict(temperature=opts.get("temperature", 1.0), ignore_index=opts.get("ignore_index", -100),
              softcap=opts.get("softcap"))  # fmt: skip
    z64, i64 = z.detach().double().numpy(), ids.numpy()
    return {"log_sum_sq_probs": torch.from_numpy(np.asarray(reference.token_log_sum_sq_probs(z64, i64, **kw))),
            "mean_logits": torch.from_numpy(np.asarray(reference.token_mean_logits(z64, i64, **kw))),
            "is_top1": torch.from_numpy(np.asarray(reference.token_is_top1(z64, i64, **kw)))}  # fmt: skip


def _plain_torch(z, ids, temperature=1.0, ignore_index=-100, softcap=None):
    """TRL's definitions in plain torch ops, in z's dtype: log Σ p², the mean of x, argmax(x) == id."""
    x = (z if softcap is None else softcap * torch.tanh(z / softcap)) / temperature
    k_ids = ids.unsqueeze(-1) if ids.dim() == z.dim() - 1 else ids
    valid = k_ids != ignore_index
    some = valid.any(-1)
    out = {"log_sum_sq_probs": torch.where(some, torch.log((torch.softmax(x, -1) ** 2).sum(-1)), 0.0),
           "mean_logits": torch.where(some, x.mean(-1), 0.0),
           "is_top1": valid & (x.argmax(-1, keepdim=True) == k_ids)}  # fmt: skip
    if ids.dim() == z.dim() - 1:
        out["is_top1"] = out["is_top1"].squeeze(-1)
    return out


def _check(out, want, tol):
    for f in FIELDS:
        if f == "is_top1":
            torch.testing.assert_close(getattr(out, f), want[f], msg=lambda m, f=f: f"{f}: {m}")
        else:
            torch.testing.assert_close(getattr(out, f).double(), want[f].double(), rtol=tol, atol=tol,
                                       msg=lambda m, f=f: f"{f}: {m}")  # fmt: skip


def test_hand_values():
    z = torch.tensor([[0.0, float(np.log(3.0)), -float("inf")], [1.0, 3.0, 3.0], [0.0, float(np.log(9.0)), 0.0]],
                     dtype=torch.float64)  # fmt: skip
    for fused in (False, True):
        if fused:
            finite = z.nan_to_num(neginf=-1e4)  # −inf · 0 would be NaN in the product; e^{−5000} is 0 in float64
            out = crossent.linear_token_log_probs(finite, torch.eye(3, dtype=torch.float64), torch.tensor([1, 2, 1]),
                                                  temperature=2.0, **STATS)  # fmt: skip
        else:
            out = crossent.token_log_probs(z, torch.tensor([1, 2, 1]), temperature=2.0, **STATS)
        # row 0 at T = 2: x = (0, log √3, −inf), p = (1, √3, 0) / (1 + √3); Σ p² = 4 / (1 + √3)²
        torch.testing.assert_close(out.log_sum_sq_probs[0], torch.tensor(np.log(4.0) - 2 * np.log(1 + np.sqrt(3.0)),
                                                                         dtype=torch.float64))  # fmt: skip
        x_mean = torch.tensor(np.log(3.0) / 3, dtype=torch.float64)  # x = (0, log 3, 0)
        torch.testing.assert_close(out.mean_logits[2], x_mean)
        assert out.is_top1.tolist() == [True, False, True]  # row 1: id 2 ties with column 1, which comes first
        assert fused or out.mean_logits[0] == -float("inf")  # a masked column: the mean of x is −inf, as x.mean(-1)


@pytest.mark.parametrize("k", [None, 3], ids=["single", "K3"])
@pytest.mark.parametrize("option", OPTIONS)
def test_plain_matches_reference_and_torch(option, k):
    opts = OPTIONS[option]
    ign = opts.get("ignore_index", -100)
    g = torch.Generator().manual_seed(0)
    z, ids = _tied(3.0 * torch.randn(N, V, generator=g, dtype=torch.float64), _ids(k, ign), ign)
    out = crossent.token_log_probs(z, ids, entropy=True, **STATS, **opts)
    assert out.log_sum_sq_probs.dtype == out.mean_logits.dtype == torch.float64 and out.is_top1.dtype == torch.bool
    _check(out, _reference(z, ids, opts), 1e-12)
    _check(out, _plain_torch(z, ids, **opts), 1e-12)
    assert out.is_top1[1].tolist() == (False if k is None else [False, True, False])
    assert not out.is_top1[0].any() and out.log_sum_sq_probs[0] == 0 and out.mean_logits[0] == 0  # all ignored


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("k", [None, 3], ids=["single", "K3"])
@pytest.mark.parametrize("option", OPTIONS)
def test_fused_matches_reference(option, k, chunks):
    opts = OPTIONS[option]
    ign = opts.get("ignore_index", -100)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    ids = _ids(k, ign)
    w[200] = w[40] = 2.0 * x[1]  # columns 40 and 200: the same logit everywhere, row 1's max (2|x_1|² ≈ 22)
    b[200] = b[40]
    ids[1] = 200 if k is None else torch.tensor([200, 40, ign])
    out = crossent.linear_token_log_probs(x, w, ids, linear_bias=b, entropy=True, **STATS, **CHUNKS[chunks], **opts)
    z = F.linear(x, w, b)
    _check(out, _reference(z, ids, opts), 1e-11)
    assert out.is_top1[1].tolist() == (False if k is None else [False, True, False])


@pytest.mark.parametrize("c_kernels", [True, False], ids=["C-stats", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(dtype, c_kernels, monkeypatch):
    """fp32 compute for 16-bit and fp32 logits: within 1e-5 of the float64 oracle on the rounded logits (a few fp32
    ulps of ``log Σ p²`` and of the mean), top-1 exactly; the same on the fused path."""
    monkeypatch.setattr(cpu_rows, "ENABLED", c_kernels)
    g = torch.Generator().manual_seed(0)
    z = (3.0 * torch.randn(N, V, generator=g)).to(dtype)
    ids = _ids(2)
    for opts in ({}, {"temperature": 0.7}):
        out = crossent.token_log_probs(z, ids, **STATS, **opts)
        assert out.log_sum_sq_probs.dtype == out.mean_logits.dtype == torch.float32 and out.is_top1.dtype == torch.bool
        _check(out, _reference(z, ids, opts), 1e-5)
    fused = crossent.linear_token_log_probs(z, torch.eye(V, dtype=dtype), ids, **STATS, chunk_size=16)
    _check(fused, _reference(z, ids, {}), 1e-5)


def test_off_means_none_and_no_extra_work(monkeypatch):
    """Without the flags the fields are None and none of the statistics' code runs (plain, fused, C-stats and
    torch paths); each flag alone gives only its field."""
    def fail(*args, **kwargs):
        raise AssertionError("a statistic was computed although not asked for")

    monkeypatch.setattr(logprob_rows._Extra, "add_sums", fail)
    monkeypatch.setattr(logprob_rows, "_extra_stats", fail)
    monkeypatch.setattr(logprob_rows, "top_stats", fail)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    ids = _ids(None)
    for softcap in (None, 3.0):  # the C stats take no softcap: both paths
        outs = [crossent.token_log_probs(F.linear(x, w), ids, entropy=True, softcap=softcap),
                crossent.linear_token_log_probs(x, w, ids, entropy=True, softcap=softcap, chunk_size=8)]  # fmt: skip
        for out in outs:
            assert out.log_sum_sq_probs is None and out.mean_logits is None and out.is_top1 is None
    monkeypatch.undo()
    for flag in FIELDS:
        out = crossent.token_log_probs(F.linear(x, w), ids, **{flag: True})
        assert [getattr(out, f) is not None for f in FIELDS] == [f == flag for f in FIELDS]


def test_no_gradient_and_gradients_unchanged():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    ids = _ids(None)
    grads = []
    for flags in ({}, STATS):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        out = crossent.linear_token_log_probs(*leaves, ids, entropy=True, chunk_size=8, **flags)
        if flags:
            assert not any(getattr(out, f).requires_grad for f in FIELDS)
        grads.append(torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    out = crossent.token_log_probs(z, torch.tensor([0, 1, 2, 3]), **STATS)
    assert not any(getattr(out, f).requires_grad for f in FIELDS)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_vmap_statistics(fused):
    """``torch.func.vmap`` over a batch dim gives each element's statistics (the Functions' vmap rules: plain by
    moving the batch dim in front of the rows, fused by one call per element); entropy off, so its empty
    placeholder sits between the vmapped outputs."""
    g = torch.Generator().manual_seed(0)
    xb, w = torch.randn(3, 5, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (3, 5, 2), generator=g)
    ids[1, 0] = -100  # a position whose ids are all ignored

    def stats(a, i):
        out = (crossent.linear_token_log_probs(a, w, i, **STATS) if fused
               else crossent.token_log_probs(F.linear(a, w), i, **STATS))  # fmt: skip
        return tuple(getattr(out, f) for f in FIELDS)

    batched = torch.func.vmap(stats)(xb, ids)
    one_by_one = [stats(a, i) for a, i in zip(xb, ids)]
    for f, got, *want in zip(FIELDS, batched, *one_by_one):
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12, msg=lambda m, f=f: f"{f}: {m}")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("flag", FIELDS)
def test_bad_flags(flag, fused):
    """Both public forms refuse a non-bool flag before any work (an int is not taken for a bool)."""
    z, ids = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    for value, shown in ((1, "1 of type int"), ("yes", "'yes' of type str")):
        with pytest.raises(TypeError, match=f"{flag} must be a bool, got {shown}"):
            if fused:
                crossent.linear_token_log_probs(z, torch.zeros(4, 3), ids, **{flag: value})
            else:
                crossent.token_log_probs(z, ids, **{flag: value})


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_compile_fullgraph_with_statistics(fused):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 5, generator=g), torch.randn(31, 5, generator=g)
    ids = torch.randint(0, 31, (12, 2), generator=g)

    def step(a, bw):
        if fused:
            out = crossent.linear_token_log_probs(a, bw, ids, entropy=True, temperature=0.8, chunk_size=5, **STATS)
        else:
            out = crossent.token_log_probs(F.linear(a, bw), ids, entropy=True, temperature=0.8, **STATS)
        return out.log_probs.sum() - out.entropy.sum(), out.log_sum_sq_probs, out.mean_logits, out.is_top1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        loss, *stats = fn(*leaves)
        results.append((loss, *stats, *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
