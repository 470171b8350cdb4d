"""16-bit input through the fused loops' gradient products (issue 14), for the families that share the block loop.

Each fused form's dX and dW for bfloat16 / float16 input are compared with the float64 oracle on the same
rounded inputs: the error must be ≤ the naive recipe's (16-bit ``F.linear``, the rest in fp32, autograd) + 1 ulp
at 1.0 of the dtype times max|reference| — on a device that multiplies 16 bits fast (dW's block products in 16
bits, summed in fp32) and on one that does not (every product in fp32), both forced here on any machine.
The cross-entropy has the same test over every ``accumulate_dtype`` in tests/test_linear_cross_entropy.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import _cpu_level
from crossent.kernels import linear_loop

ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
N, D, V = 97, 40, 1031


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.4).to(dtype)
    x_t = torch.randn(N, D, generator=g).to(dtype)
    w_t = (torch.randn(V, D, generator=g) * 0.4).to(dtype)
    ids = torch.randint(0, V, (N,), generator=g)
    g_lp, g_h = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return x, w, x_t, w_t, ids, g_lp, g_h


def _log_probs_recipe(x, w, ids, g_lp, g_h, **_):
    logp = torch.log_softmax(F.linear(x, w).to(torch.promote_types(x.dtype, torch.float32)), -1)
    lp, h = logp.gather(-1, ids[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    return (lp * g_lp.to(lp.dtype)).sum() + (h * g_h.to(h.dtype)).sum()


def _log_probs_fused(x, w, ids, g_lp, g_h, chunk_size, **_):
    out = crossent.linear_token_log_probs(x, w, ids, entropy=True, chunk_size=chunk_size)
    return (out.log_probs * g_lp).sum() + (out.entropy * g_h).sum()


def _distill_recipe(x, w, ids, x_t, w_t, **_):
    cdt = torch.promote_types(x.dtype, torch.float32)
    log_q = torch.log_softmax(F.linear(x, w).to(cdt), -1)
    log_p = torch.log_softmax(F.linear(x_t, w_t).to(cdt), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _distill_fused(x, w, ids, x_t, w_t, chunk_size, **_):
    return crossent.linear_distill_loss(x, w, x_t, w_t, chunk_size=chunk_size)


FAMILIES = {"log_probs": (_log_probs_recipe, _log_probs_fused), "distill": (_distill_recipe, _distill_fused)}


def _grads(fn, x, w, **kw):
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    return torch.autograd.grad(fn(xs, ws, **kw), (xs, ws))


@pytest.mark.parametrize("chunk_size", [24, None], ids=["blocks", "one-block"])
@pytest.mark.parametrize("products", ["fast", "emulated"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", list(ULP), ids=["bf16", "f16"])
def test_fused_gradients_no_worse_than_the_naive_recipe(dtype, family, products, chunk_size, monkeypatch):
    monkeypatch.setattr(linear_loop, "fast_half_products", lambda device_type, dt: products == "fast")
    monkeypatch.setattr(linear_loop, "HALF_DW_SLICE_BYTES", 100 * D * 2)  # several dW slices per block
    recipe, fused = FAMILIES[family]
    x, w, x_t, w_t, ids, g_lp, g_h = _inputs(dtype)
    kw = dict(ids=ids, g_lp=g_lp, g_h=g_h, x_t=x_t, w_t=w_t)
    ref = _grads(recipe, x.double(), w.double(), **{**kw, "x_t": x_t.double(), "w_t": w_t.double()})
    naive = _grads(recipe, x, w, **kw)
    got = _grads(fused, x, w, chunk_size=chunk_size, **kw)
    for name, g, n, r in zip(("dX", "dW"), got, naive, ref):
        assert g.dtype == dtype
        err, naive_err = (g.double() - r).abs().max(), (n.double() - r).abs().max()
        assert err <= naive_err + ULP[dtype] * r.abs().max(), f"{name}: {err:.3e} > naive {naive_err:.3e} + 1 ulp"


@pytest.mark.parametrize("bf16_units, fp16_units", [(True, False), (False, True), (False, False)])
def test_fast_half_products_rule(bf16_units, fp16_units, monkeypatch):
    """CUDA always; the CPU per dtype as oneDNN reports its matrix instructions (both kinds of CPU forced)."""
    from crossent._precision import fast_half_products

    monkeypatch.setattr(_cpu_level, "lowered", lambda: False)  # the CPU at its own level (test_cpu_level: below it)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_units)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: fp16_units)
    fast_half_products.cache_clear()
    try:
        assert not fast_half_products("cpu", torch.float32) and not fast_half_products("cuda", torch.float64)
        assert fast_half_products("cuda", torch.bfloat16) and fast_half_products("cuda", torch.float16)
        assert fast_half_products("cpu", torch.bfloat16) is bf16_units
        assert fast_half_products("cpu", torch.float16) is fp16_units
    finally:
        fast_half_products.cache_clear()  # the next call asks the real oneDNN again


def test_16_bit_distillation_plans(monkeypatch):
    """The distillation loop's plan for 16-bit blocks (the C step): by default one block of rows when it fits with
    the fp32 dW it spares; an explicit budget that splits the vocabulary plans fp32 blocks again (the C step takes
    whole rows only), within the budget."""
    from crossent._options import DistillRowOptions
    from crossent.kernels import distill_loop
    from crossent.kernels.linear_plan import ChunkPlan

    x = torch.empty(3000, 1024, dtype=torch.bfloat16)
    spared = 32768 * 1024 * 4
    opts = distill_loop.LoopArgs()
    one_block = distill_loop.plan(x, 1024, 32768, DistillRowOptions(), opts, True, True, True, spared)
    assert one_block == ChunkPlan(3000, 32768)
    assert distill_loop.plan(x, 1024, 32768, DistillRowOptions(), opts, True, True, True, 0).rows < 3000

    monkeypatch.setattr(linear_loop, "fast_half_products", lambda device_type, dt: True)
    seen = []
    workspace = distill_loop._Workspace

    def recording(*args, **kwargs):
        seen.append((kwargs["plan"], kwargs.get("half_block", False)))
        return workspace(*args, **kwargs)

    monkeypatch.setattr(distill_loop, "_Workspace", recording)
    x, w, x_t, w_t, *_ = _inputs(torch.bfloat16)
    budget = 200_000  # 16-bit blocks would split the vocabulary at this size: 64 rows of ~540 columns
    loss = crossent.linear_distill_loss(x, w, x_t, w_t, memory_budget=budget)
    plan, half = seen[0]
    assert not half  # fp32 blocks (and their 16-bit copies), each within its share of the budget
    per_block = budget // distill_loop.block_count(DistillRowOptions(), True)
    assert plan.rows * plan.cols * (4 + 2) <= per_block
    ref = _distill_recipe(x.double(), w.double(), None, x_t.double(), w_t.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=1e-3)
