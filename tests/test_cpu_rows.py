"""The C row kernels (crossent._cpu_rows via crossent.kernels.cpu_rows) against the float64 reference, PyTorch
and the torch-ops path they replace: conversions bit for bit, the option grid, blocks and strides, edge rows,
threads, and that the extension shares PyTorch's OpenMP runtime."""

from __future__ import annotations

import math
import os
import re
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from _helpers import ROW_OPTIONS, ULP, row_case, row_kwargs, row_reference
from crossent import reference
from crossent._options import CrossEntropyOptions, RowOptions
from crossent.kernels import cpu_rows, dispatch, linear_loop
from crossent.kernels.shard import VocabShard

pytestmark = [
    pytest.mark.skipif(not cpu_rows.available(), reason="crossent._cpu_rows was not built (no C compiler)"),
    pytest.mark.cpu_path,  # each x86-64 level runs its own build (tests/test_cpu_level.py runs these at v3 too)
]

CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def convert(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(values.shape, dtype=dtype)
    cpu_rows._native.convert(CODES[values.dtype], values.data_ptr(), CODES[dtype], out.data_ptr(), values.numel())
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bit for bit, except that any NaN equals any NaN."""
    assert a.dtype == b.dtype
    nan = a.isnan()
    torch.testing.assert_close(nan, b.isnan(), rtol=0, atol=0)
    int_dtype = torch.int32 if a.dtype == torch.float32 else torch.int16
    torch.testing.assert_close(a[~nan].view(int_dtype), b[~nan].view(int_dtype), rtol=0, atol=0)


# --- conversions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_value_converts_to_float32_exactly(dtype):
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    same_bits(convert(every, torch.float32), every.float())


def _float32_cases() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    near_half = torch.linspace(-7e4, 7e4, 200_001)  # through f16's overflow threshold 65520
    small = torch.logspace(-46, -3, 20_001) * torch.tensor([1.0, -1.0]).repeat(10_001)[:20_001]
    # values halfway between two 16-bit neighbours (ties to even) and one fp32 ulp either side
    halfway = torch.arange(0, 1 << 16, dtype=torch.int32).mul(1 << 16).add(1 << 15).view(torch.float32)
    ties = torch.cat([halfway, torch.nextafter(halfway, torch.tensor(math.inf)), torch.nextafter(halfway, torch.tensor(-math.inf))])
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99, 65520.0, 2**-14, 2**-24,
                            2**-25, 2**-25 * 1.0001, 3.0e38, -3.0e38, torch.finfo(torch.float32).tiny])  # fmt: skip
    return torch.cat([random_bits.view(torch.float32), near_half, small, ties, special])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_rounds_to_16_bits_as_pytorch_does(dtype):
    values = _float32_cases()
    same_bits(convert(values, dtype), values.to(dtype))


# --- the kernels against the reference and the torch-ops path ----------------------------------------------

def _run(x, t, w, opts, reduction="none", enabled=True, monkeypatch=None):
    """Loss, gradient and upstream gradient of ``cross_entropy`` with the C kernels on or off — checking that they
    ran exactly when on (a ``covers`` that declined would compare the torch ops with themselves)."""
    monkeypatch.setattr(cpu_rows, "ENABLED", enabled)
    calls = []
    native = cpu_rows._rows_call
    monkeypatch.setattr(cpu_rows, "_rows_call", lambda *a, **k: calls.append(a[0]) or native(*a, **k))
    xr = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xr, t, reduction=reduction, **row_kwargs(opts, w))
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(loss.shape, generator=g) if loss.dim() else torch.tensor(1.0)
    loss.backward(upstream)
    monkeypatch.setattr(cpu_rows, "_rows_call", native)
    assert bool(calls) == enabled, calls
    return loss.detach(), xr.grad, upstream


def _reference(x, t, w, opts, upstream):
    """float64 loss rows and gradient (times the per-row ``upstream``) from crossent.reference."""
    loss, grad = row_reference(x, t, row_kwargs(opts, w))
    return loss, grad * upstream.double().unsqueeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", list(ROW_OPTIONS))
@pytest.mark.parametrize("classes", [1, 7, 256, 257, 3000])
def test_kernels_match_the_float64_reference_and_the_torch_path(dtype, option, classes, monkeypatch):
    x, t, w = row_case(9, classes, dtype)
    t = t.clamp(max=classes - 1)
    opts = dict(ROW_OPTIONS[option])
    if classes <= 3:
        opts.pop("ignore_index", None)
    loss, grad, upstream = _run(x, t, w, opts, monkeypatch=monkeypatch)
    ref_loss, ref_grad = _reference(x, t, w, opts, upstream)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6 * math.log(classes + 1))
    # the gradient is rounded once to the input dtype: within an ulp of it, or of its largest term (|g| · 1:
    # p − onehot cancels where p ≈ 1)
    ulp = ULP[dtype]
    atol = 2 * ulp * float(upstream.abs().max())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=ulp, atol=atol)
    # off the target column the terms are scale · p_c and the smoothing term, each O(|g| (p_c + ε w_c / C)), and
    # p_c = exp(x_c − lse) carries the fp32 rounding of x_c − lse (relative ~ulp_32 · |log p_c|): the bound per
    # element (the global atol above alone would pass a missing ε / C term in 16 bits); the floor is the output
    # dtype's subnormal spacing
    p = torch.from_numpy(np.asarray(reference.softmax(x.double().numpy())))
    eps = opts.get("label_smoothing", 0.0)
    g_rows = upstream.double().abs().unsqueeze(-1)
    bound = (ulp + 2**-23 * (2 + p.clamp(min=1e-300).log().abs())) * ref_grad.abs()
    bound += 8 * ulp * g_rows * (p + 1.5 * eps / classes) + torch.finfo(dtype).smallest_normal * 2**-10
    off_target = torch.ones_like(bound, dtype=torch.bool).scatter_(-1, t.clamp(min=0).unsqueeze(-1), False)
    err = (grad.double() - ref_grad).abs()
    assert bool((err[off_target] <= bound[off_target]).all()), float((err - bound)[off_target].max())
    loss_t, grad_t, _ = _run(x, t, w, opts, enabled=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(loss, loss_t, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad.float(), grad_t.float(), rtol=ulp, atol=atol)


@pytest.mark.parametrize("path", ["o_n", pytest.param("small", marks=pytest.mark.one_pass)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_error_is_no_worse_than_pytorchs_own(dtype, path, monkeypatch):
    # path: the O(N) kernels, or (marked one_pass: the small-input backends stay on) the C one pass
    x, t, _ = row_case(64, 3000, dtype, scale=3.0)
    assert _one_pass_backend(x, t) == ("c" if path == "small" else None)
    loss, grad, _ = _run(x, t, None, {}, reduction="mean", monkeypatch=monkeypatch)
    xr = x.clone().requires_grad_()
    naive = F.cross_entropy(xr, t)
    naive.backward()
    xd = x.double().requires_grad_()
    ref = F.cross_entropy(xd, t)  # float64 on the rounded logits
    ref.backward()
    assert (loss.double() - ref.detach()).abs() <= (naive.double() - ref.detach()).abs() + 1e-6
    assert (grad.double() - xd.grad).abs().max() <= (xr.grad.double() - xd.grad).abs().max() + 1e-6


def test_the_max_in_a_later_block_rescales_the_sum(monkeypatch):
    # blocks are 256 columns: a row max that rises block after block exercises the running rescale
    x = torch.linspace(-30.0, 30.0, 1000).repeat(3, 1)
    x[1] = x[1].flip(0)
    x[2, 700] = 80.0
    t = torch.tensor([0, 999, 700])
    loss, grad, upstream = _run(x, t, None, {"label_smoothing": 0.3}, monkeypatch=monkeypatch)
    ref_loss, ref_grad = _reference(x, t, None, {"label_smoothing": 0.3}, upstream)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9)


def test_strided_rows_and_batch_dims(monkeypatch):
    # rows of a wider buffer (row stride > C) and (N, d, C) class-last batches take the kernels; a (N, C, d)
    # input's class dim is not contiguous after it is moved last and takes the torch ops
    x, t, w = row_case(8, 600, torch.float32)
    wide = torch.randn(8, 1000)
    wide[:, 100:700] = x
    strided = wide[:, 100:700]
    assert cpu_rows.covers(strided.unsqueeze(1), None, RowOptions())
    loss, grad, upstream = _run(strided, t, w, {"weight": True}, monkeypatch=monkeypatch)
    ref_loss, ref_grad = _reference(x, t, w, {"weight": True}, upstream)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-9)
    spatial = torch.randn(2, 50, 3)  # (N, C, d): class dim 1
    ts = torch.randint(0, 50, (2, 3))
    monkeypatch.setattr(cpu_rows, "ENABLED", True)
    out = crossent.cross_entropy(spatial, ts, reduction="none")
    torch.testing.assert_close(out, F.cross_entropy(spatial, ts, reduction="none"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_backward_writes_over_the_logits(dtype, monkeypatch):
    x, t, _ = row_case(6, 700, dtype)
    _, expected, _ = _run(x, t, None, {}, reduction="sum", monkeypatch=monkeypatch)
    leaf = x.float().requires_grad_()
    logits = leaf.to(dtype) * 1.0  # its own storage, which the backward overwrites
    crossent.cross_entropy(logits, t, reduction="sum", inplace_backward=True).backward()
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad.to(dtype), expected, rtol=0, atol=0)


def test_edge_rows(monkeypatch):
    c = 300
    x = torch.randn(6, c)
    x[0] = -math.inf  # all −inf, valid: NaN
    x[1] = -math.inf  # all −inf, ignored: loss 0, zero gradient
    x[2, :150] = -math.inf  # half −inf: finite
    x[3] = 1e30  # huge and equal: uniform
    x[3, 7] = 1e30 + 1e24
    x[4, 5] = math.nan  # NaN: NaN loss and gradient row
    t = torch.tensor([0, -100, 200, 7, 1, 2])
    loss, grad, upstream = _run(x, t, None, {}, monkeypatch=monkeypatch)
    assert loss[0].isnan() and grad[0].isnan().all()
    assert loss[1] == 0 and (grad[1] == 0).all()
    assert loss[4].isnan() and grad[4].isnan().all()
    torch.testing.assert_close(loss[5:], F.cross_entropy(x[5:], t[5:], reduction="none"))
    ref = F.cross_entropy(x[2:4].double().requires_grad_(), t[2:4], reduction="none")
    torch.testing.assert_close(loss[2:4].double(), ref.detach(), rtol=1e-6, atol=1e-6)
    assert (grad[2, :150] == 0).all()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: nothing to compare")
def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    x, t, w = row_case(64, 3000, torch.bfloat16)
    results = []
    for threshold in (0, 1 << 40):  # every call on all threads / on the calling thread only
        monkeypatch.setattr(cpu_rows, "PARALLEL_MIN_ELEMENTS", threshold)
        results.append(_run(x, t, w, {"weight": True, "label_smoothing": 0.1}, monkeypatch=monkeypatch)[:2])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["o_n", pytest.param("small", marks=pytest.mark.one_pass)])
def test_out_of_range_class_raises_before_any_kernel_runs(path, monkeypatch):
    calls = []
    native = cpu_rows._rows_call
    monkeypatch.setattr(cpu_rows, "_rows_call", lambda *a, **k: calls.append(1) or native(*a, **k))
    x = torch.randn(4, 500, requires_grad=True)
    assert _one_pass_backend(x, torch.zeros(4, dtype=torch.long)) == ("c" if path == "small" else None)
    with pytest.raises(ValueError, match="class index 500, outside"):
        crossent.cross_entropy(x, torch.tensor([0, 1, 500, -100]))
    assert not calls
    crossent.cross_entropy(x, torch.tensor([0, 1, 499, -100]))
    assert calls  # the spy sees the kernels where they run


@pytest.mark.parametrize("path", ["o_n", pytest.param("small", marks=pytest.mark.one_pass)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_the_extension_the_torch_ops_run(path, dtype, monkeypatch):
    # small: the C one pass declines, PyTorch's fused one pass ("aten") takes the call
    monkeypatch.setattr(cpu_rows, "_native", None)
    assert not cpu_rows.available()
    assert not cpu_rows.covers(torch.zeros(1, 1, 4), None, RowOptions())
    x, t, _ = row_case(5, 40, dtype)
    assert _one_pass_backend(x, t) == ("aten" if path == "small" else None)
    xr, xt = x.clone().requires_grad_(), x.float().requires_grad_()
    loss = crossent.cross_entropy(xr, t)
    loss.backward()
    F.cross_entropy(xt, t).backward()
    torch.testing.assert_close(loss, F.cross_entropy(x.float(), t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xr.grad, xt.grad.to(dtype), rtol=2**-7, atol=1e-6)


def _one_pass_backend(x, t):
    """The one-pass backend a default cross_entropy call of (N, C) logits ``x`` takes, None for the rows' kernels."""
    plan = dispatch.one_pass(x, t, None, "index", CrossEntropyOptions.build(), VocabShard.whole(x.shape[-1]))
    return None if plan is None else plan.backend


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_is_loaded():
    # the extension names libgomp.so.1; where PyTorch ships one, the loader must reuse PyTorch's (one thread pool)
    maps = open("/proc/self/maps").read()
    runtimes = set(re.findall(r"\S*lib(?:g|i)?omp[\w.-]*\.so[\w.]*", maps))
    assert len(runtimes) == 1, runtimes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_row_buffers_of_finished_threads_are_freed():
    # a small call runs on its calling thread, which keeps a row buffer (here 2 × 30000 floats, half of it written
    # by the bf16 conversion) for its next calls; 300 short-lived threads must not leave 300 of them (~35 MiB)
    x = torch.randn(1, 1, 30000).bfloat16()
    t = torch.zeros(1, 1, dtype=torch.long)

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def work():
        cpu_rows.forward(x, t, None, RowOptions())

    work()
    before = rss_mib()
    for _ in range(300):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert rss_mib() - before < 8.0


def test_fused_distillation_blocks_for_the_c_step_get_no_scratch(monkeypatch):
    # fp32 blocks of whole rows go to the C step too (β = 0 or 1): the torch step's scratch blocks are not made
    from crossent.kernels import distill_loop

    made = []
    monkeypatch.setattr(distill_loop, "_scratch", lambda *a: made.append(1))
    g = torch.Generator().manual_seed(2)
    x, x_t = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    w, w_t = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    xr = x.requires_grad_()
    crossent.linear_distill_loss(xr, w, x_t, w_t, beta=1.0).backward()
    assert not made and torch.isfinite(xr.grad).all()


# --- the fused linear CE's 16-bit block step ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_16_bit_step_matches_the_torch_step(dtype, blocks, option, reduction, monkeypatch):
    # 16-bit products forced "fast" (CI's CPU may lack bf16 matrix units): the C step then takes the blocks —
    # one block: the finished gradient and dW as one 16-bit product; several: diag(scale) P, the rest factored
    monkeypatch.setattr(linear_loop, "fast_half_products", lambda device_type, dt: True)
    calls = []
    step = cpu_rows.loss_and_grad
    monkeypatch.setattr(cpu_rows, "loss_and_grad", lambda *a, **k: calls.append(k.get("factored")) or step(*a, **k))
    g = torch.Generator().manual_seed(3)
    n, d, v = 40, 16, 300
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    kwargs = dict(ROW_OPTIONS[option])
    weight = torch.rand(v, generator=g) + 0.5 if kwargs.pop("weight", False) else None
    if "ignore_index" in kwargs:
        kwargs["ignore_index"] = -100
    chunk = 8 if blocks == "several" else None

    def run(enabled):
        monkeypatch.setattr(cpu_rows, "ENABLED", enabled)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = crossent.linear_cross_entropy(xr, wr, t, weight=weight, reduction=reduction, chunk_size=chunk, **kwargs)
        loss.backward(torch.randn(loss.shape, generator=torch.Generator().manual_seed(4)) if loss.dim() else None)
        return loss.detach(), xr.grad, wr.grad

    got = run(True)
    if reduction != "none":  # the recompute backward ("none") keeps the torch step; its forward takes the C one
        assert calls and all(f is (blocks == "several") for f in calls), calls
    want = run(False)
    ulp = ULP[dtype]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], want[1:]):  # rounded to 16 bits in different places: a few ulps of the largest entry
        torch.testing.assert_close(a.float(), b.float(), rtol=4 * ulp, atol=4 * ulp * float(b.float().abs().max()))


# --- per-token log-probs and entropy: the C row stats -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("classes", [5, 256, 1000])
def test_log_prob_stats_match_the_reference_and_the_torch_path(dtype, temperature, classes, monkeypatch):
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(7, classes, generator=g) * 5).to(dtype)
    z[1, : classes // 2] = -math.inf  # −inf logits: their entropy terms are 0
    z[2] = -math.inf  # an all −inf row: NaN log-probs (its ids are ignored below: 0)
    z[3, -1] = 60.0  # the max in the last block: the running rescale
    ids = torch.randint(0, classes, (7, 3), generator=g)
    ids[2] = -100
    ids[4, 1] = -100
    upstream = torch.randn(7, 3, generator=g), torch.randn(7, generator=g)

    calls = []
    for name in ("log_prob_stats", "log_prob_grad"):
        native = getattr(cpu_rows, name)
        monkeypatch.setattr(cpu_rows, name, lambda *a, _f=native, _n=name: calls.append(_n) or _f(*a))

    def run(enabled):
        monkeypatch.setattr(cpu_rows, "ENABLED", enabled)
        zr = z.clone().requires_grad_()
        out = crossent.token_log_probs(zr, ids, temperature=temperature, entropy=True)
        (out.log_probs * upstream[0]).sum().add((out.entropy * upstream[1]).sum()).backward()
        return out.log_probs, out.entropy, zr.grad

    got = run(True)
    assert set(calls) == {"log_prob_stats", "log_prob_grad"}  # the C kernels ran (and not below)
    calls.clear()
    want = run(False)
    assert not calls
    ref_lp = reference.token_log_probs(z.double().numpy(), ids.numpy(), temperature=temperature)
    ref_h = reference.token_entropy(z.double().numpy(), ids.numpy(), temperature=temperature)
    finite = ~torch.from_numpy(np.isnan(ref_h))
    torch.testing.assert_close(got[0].double(), torch.from_numpy(ref_lp), rtol=2e-6, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(got[1].double()[finite], torch.from_numpy(ref_h)[finite], rtol=2e-6, atol=2e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-5, equal_nan=True)


# --- distillation (forward / reverse KL): the C block step -------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("form", ["logits", "fused"])
@pytest.mark.parametrize("vocab", [700, 70_000], ids=["kept", "streaming"])
def test_distill_step_matches_the_torch_step_and_the_reference(beta, temperature, form, vocab, monkeypatch):
    # β = 0 and 1 take the C step (β = 0.5 stays on the torch step: both paths must agree with the oracle anyway);
    # rows of 700 keep their exponentials in the row buffer, rows of 70000 (past 2^16) take the streaming passes
    g = torch.Generator().manual_seed(7)
    n, d, v = (12 if vocab < 10_000 else 3), 8, vocab
    xs, xt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ws, wt = torch.randn(v, d, generator=g), torch.randn(v, d, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    target[::3] = -100

    def loss_of(x):
        if form == "logits":
            return crossent.distill_loss(x @ ws.T, xt @ wt.T, beta=beta, temperature=temperature, target=target)
        return crossent.linear_distill_loss(x, ws, xt, wt, beta=beta, temperature=temperature, target=target)

    got, want, c_step_ran = _with_and_without_the_c_step(xs, loss_of, monkeypatch)
    assert c_step_ran == (beta in (0.0, 1.0))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    # dX sums V terms in fp32 in both paths: at 70000 columns each is ~1e-5 off float64 (the C one no further)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7 if v < 10_000 else 4e-5)
    z_s, z_t = (xs @ ws.T).double().numpy(), (xt @ wt.T).double().numpy()
    ref = reference.generalized_jsd(z_s, z_t, beta=beta, temperature=temperature, target=target.numpy())
    torch.testing.assert_close(got[0].double(), torch.tensor(float(ref), dtype=torch.float64), rtol=1e-5, atol=1e-6)


def _with_and_without_the_c_step(x0, loss_of, monkeypatch):
    """(loss, dX) of ``loss_of(x)`` for ``x`` a copy of ``x0`` with the C kernels on, the same with them off, and
    whether the C distillation step ran (with them on)."""
    calls = []
    native = cpu_rows.distill
    monkeypatch.setattr(cpu_rows, "distill", lambda *a: calls.append(1) or native(*a))

    def run(enabled):
        monkeypatch.setattr(cpu_rows, "ENABLED", enabled)
        x = x0.clone().requires_grad_()
        loss = loss_of(x)
        loss.sum().backward()
        return loss.detach(), x.grad

    got = run(True)
    c_step_ran = bool(calls)
    return got, run(False), c_step_ran


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("vocab", [700, 70_000], ids=["kept", "streaming"])
def test_distill_step_infinite_and_nan_logits_as_the_torch_step(beta, vocab, monkeypatch):
    # −inf columns in both heads add nothing; in one head only, a huge finite term (the torch step clamps the
    # log-probabilities to the lowest finite value); an all −inf row or a NaN logit: a NaN loss and gradient row
    g = torch.Generator().manual_seed(11)
    z, zt = torch.randn(6, vocab, generator=g) * 3, torch.randn(6, vocab, generator=g) * 3
    z[0, -5:], zt[0, -5:] = -math.inf, -math.inf
    z[1, : vocab // 2] = -math.inf  # the student's only
    zt[2, 3] = -math.inf  # the teacher's only
    z[3] = -math.inf
    z[4, 7], zt[5, 2] = math.nan, math.nan
    got, want, c_step_ran = _with_and_without_the_c_step(
        z, lambda x: crossent.distill_loss(x, zt, beta=beta, reduction="none"), monkeypatch
    )
    assert c_step_ran
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, equal_nan=True)
    # the torch step rounds log q and log p at their own magnitude (|log q| up to ~2^5 with these logits), so its
    # gradient is off by up to ~2^5 fp32 ulps of its row's largest entry (31 measured under PyTorch's AVX2 kernels,
    # the C step's ~1): per row, twice that (a row with the huge clamped term has its own scale)
    row_scale = want[1].nan_to_num(0.0, posinf=0.0, neginf=0.0).abs().amax(-1, keepdim=True)
    bound = 2**-17 * row_scale + 1e-4 * want[1].abs()
    close = ((got[1] - want[1]).abs() <= bound) | (got[1] == want[1]) | (got[1].isnan() & want[1].isnan())
    assert close.all(), (got[1][~close], want[1][~close])
