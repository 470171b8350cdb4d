"""The Triton row kernels (crossent.kernels.triton_rows) against the float64 reference.

The tests run the real kernels on the ``device`` fixture's device (see ``_triton_mode``): CPU tensors
through Triton's interpreter where there is no GPU, the compiled kernels on CUDA where there is one. The
``cuda`` tests at the end add GPU-sized shapes; whether they run is decided when they run (they skip
without a GPU). tests/test_triton_compile.py compiles every launch for real GPUs.

Precision contract tested here: per-row loss in fp32 and LSE in fp64 (stored from the fp32 running max
and log-sum, added in fp64); gradients formed in fp32 and cast once to the logits' dtype. A dtype passes when its error against the float64 reference is at most the error of
the naive same-dtype torch computation plus ``TOL[dtype] · max(1, max |reference|)``.
"""

from __future__ import annotations

import _triton_mode  # noqa: I001  (first: it may set TRITON_INTERPRET before anything imports Triton)
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference
from crossent._options import RowOptions
from crossent.kernels.shard import VocabShard
from crossent.kernels.dispatch import resolve_impl
from crossent.kernels import torch_rows

pytest.importorskip("triton")
from crossent.kernels import triton_rows  # noqa: E402  (after the importorskip)

# Extra error allowed beyond the naive computation's, relative to the reference's magnitude:
# fp32 ≈ 16 ulp (online rescaling and the hand-written tanh differ from torch's rounding order);
# bf16 = 1/2 ulp at the largest value (ours and the naive path may round one element differently) on a GPU,
# 1 ulp under the interpreter, which truncates fp32 -> bf16 where GPUs round to nearest (Triton 3.9's
# interpreter, ``cast_impl``). test_bf16_gradient_before_the_cast checks the unrounded values tightly.
TOL = {torch.float32: 2.0**-19, torch.bfloat16: 2.0**-8}
TOL_INTERPRETED_BF16 = 2.0**-7

# Option sets: each turns on one thing, "all" turns on everything that combines. ignore_in_range uses an
# ignore_index inside [0, C) (with C = 1 that ignores every row: the all-ignored path).
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore_in_range": {"ignore_index": "mid"},
    "smoothing": {"label_smoothing": 0.1},
    "weight_smoothing": {"weight": True, "label_smoothing": 0.3},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.0},
    "all": {"weight": True, "ignore_index": "mid", "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0},
    "probs": {"probs": True},
    "probs_all": {"probs": True, "weight": True, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0},
}
# C: 1 (a single class), 7 (far below a block), 128 / 129 (a power of two and one past it: a block edge
# when the block is forced small), 1000 (not a power of two; 32 steps at block 32).
CLASSES = [1, 7, 128, 129, 1000]


@pytest.fixture
def device():
    """CUDA with compiled kernels where there is a GPU, else CPU through the interpreter."""
    return _triton_mode.kernel_device()


@pytest.fixture
def small_blocks(monkeypatch):
    """Force 32-column blocks, so the online max/sum-exp crosses several blocks and a partial last one."""
    monkeypatch.setitem(triton_rows.ROW_LAUNCH, 2, (32, 1))
    monkeypatch.setitem(triton_rows.ROW_LAUNCH, 4, (32, 1))


# --- helpers ------------------------------------------------------------------------------------------------


def make_case(num_classes, opts, dtype, rows=9, device="cpu"):
    """(logits, target, kwargs for crossent.cross_entropy) for one option set; logits ~ N(0, 3²)."""
    z = (3.0 * torch.randn(rows, num_classes, dtype=torch.float64)).to(dtype).to(device)
    kw = {}
    if opts.get("weight"):
        kw["weight"] = (0.2 + torch.rand(num_classes, dtype=torch.float32)).to(device)
    if opts.get("probs"):
        t = torch.softmax(2.0 * torch.randn(rows, num_classes, dtype=torch.float64), -1).float().to(device)
    else:
        t = torch.randint(0, num_classes, (rows,)).to(device)
        ignore = opts.get("ignore_index", -100)
        if ignore == "mid":
            ignore = num_classes // 2
            t[1::3] = ignore
        kw["ignore_index"] = ignore
        t[0] = ignore
    for name in ("label_smoothing", "z_loss", "softcap"):
        if name in opts:
            kw[name] = opts[name]
    return z, t, kw


def reference_rows(z, t, kw, g):
    """Per-row loss and gradient (times ``g``) from the float64 numpy oracle."""
    args = dict(
        weight=None if kw.get("weight") is None else kw["weight"].double().cpu().numpy(),
        ignore_index=kw.get("ignore_index", -100),
        label_smoothing=kw.get("label_smoothing", 0.0),
        z_loss=kw.get("z_loss", 0.0),
        softcap=kw.get("softcap"),
    )
    z64, t64 = z.double().cpu().numpy(), t.cpu().numpy()
    if t.is_floating_point():
        t64 = t64.astype(np.float64)
    loss = reference.cross_entropy(z64, t64, reduction="none", **args)
    grad = reference.cross_entropy_grad(z64, t64, reduction="none", grad_output=g.double().cpu().numpy(), **args)
    return torch.from_numpy(np.asarray(loss)), torch.from_numpy(grad)


def naive_rows(z, t, kw, g):
    """The same loss and gradient computed the naive way, in the logits' dtype, with torch autograd."""
    z = z.detach().clone().requires_grad_()
    cap, s = kw.get("softcap"), kw.get("z_loss", 0.0)
    x = z if cap is None else cap * torch.tanh(z / cap)
    w = kw.get("weight")
    w = None if w is None else w.to(z.dtype)
    ignore = kw.get("ignore_index", -100)
    loss = F.cross_entropy(
        x, t, w, ignore_index=ignore, reduction="none", label_smoothing=kw.get("label_smoothing", 0.0)
    )
    if s:
        w_all = torch.ones(z.shape[-1], dtype=z.dtype, device=z.device) if w is None else w
        if t.is_floating_point():
            omega = (t.to(z.dtype) * w_all).sum(-1)
        else:
            omega = torch.where(t != ignore, w_all[t.clamp(0, z.shape[-1] - 1)], 0.0)
        loss = loss + s * omega * torch.logsumexp(x, -1) ** 2
    loss.backward(g.to(loss.dtype))
    return loss.detach(), z.grad


def assert_no_worse(ours, naive, ref, dtype, what):
    """|ours − ref| ≤ max |naive − ref| + TOL[dtype] · max(1, max |ref|), elementwise; names the worst."""
    ref = ref.to(torch.float64)
    err = (ours.detach().cpu().to(torch.float64) - ref).abs()
    err = torch.where(torch.isnan(err) & ~torch.isnan(ref), math.inf, err.nan_to_num(0.0))
    naive_err = (naive.detach().cpu().to(torch.float64) - ref).abs().nan_to_num(0.0).max()
    tol = TOL_INTERPRETED_BF16 if dtype == torch.bfloat16 and _triton_mode.interpreting() else TOL[dtype]
    bound = naive_err + tol * max(1.0, ref.abs().nan_to_num(0.0).max().item())
    worst = int(err.reshape(-1).argmax())
    if err.reshape(-1)[worst] > bound:
        idx = np.unravel_index(worst, tuple(ref.shape))
        raise AssertionError(
            f"{what}: error {err.reshape(-1)[worst].item():.3e} at {idx} (ours {ours.reshape(-1)[worst].item()!r}, "
            f"reference {ref.reshape(-1)[worst].item()!r}) exceeds naive error {naive_err.item():.3e} "
            f"+ tolerance {bound.item() - naive_err.item():.3e}"
        )


def run_triton(z, t, kw, g, **extra):
    """crossent.cross_entropy(impl="triton", reduction="none"): per-row loss and the logits' gradient."""
    x = z.detach().clone().requires_grad_()
    loss = crossent.cross_entropy(x, t, reduction="none", impl="triton", **kw, **extra)
    loss.backward(g)
    return loss.detach(), x.grad


def check_against_reference(num_classes, opts, dtype, device, rows=9):
    z, t, kw = make_case(num_classes, opts, dtype, rows, device)
    g = torch.rand(rows, dtype=torch.float32, device=device) + 0.5
    loss, grad = run_triton(z, t, kw, g)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = reference_rows(z, t, kw, g)
    naive_loss, naive_grad = naive_rows(z, t, kw, g)
    assert_no_worse(loss, naive_loss, ref_loss, dtype, "loss")
    assert_no_worse(grad, naive_grad, ref_grad, dtype, "grad")


# --- against the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("num_classes", CLASSES)
def test_fp32_matches_reference(device, num_classes, option):
    check_against_reference(num_classes, OPTIONS[option], torch.float32, device)


@pytest.mark.parametrize("option", ["plain", "softcap", "all", "probs_all"])
@pytest.mark.parametrize("num_classes", [7, 129, 1000])
def test_bf16_matches_reference(device, num_classes, option):
    check_against_reference(num_classes, OPTIONS[option], torch.bfloat16, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", ["plain", "all", "probs_all"])
@pytest.mark.parametrize("num_classes", [128, 129, 1000])
def test_block_edges_match_reference(device, small_blocks, num_classes, option, dtype):
    # 32-column blocks: 4 full blocks at C = 128, 4 plus a 1-column block at 129, 31 plus 8 columns at 1000.
    check_against_reference(num_classes, OPTIONS[option], dtype, device)


@pytest.mark.parametrize("option", ["all", "probs_all"])
def test_bf16_gradient_before_the_cast(device, option):
    # bf16 logits, gradient written into an fp32 ``out``: everything but the final rounding, held to fp32's
    # tolerance against the reference on the same (bf16-rounded) logits.
    z, t, kw = make_case(1000, OPTIONS[option], torch.bfloat16, device=device)
    g = torch.rand(z.shape[0], device=device) + 0.5
    args = (kw.get("ignore_index", -100), kw["label_smoothing"], kw["z_loss"], kw["softcap"])
    loss, lse = triton_rows.forward(z, t, kw["weight"], RowOptions(*args))
    out = torch.empty(z.shape, dtype=torch.float32, device=device)
    triton_rows.backward(z, t, kw["weight"], lse, g, RowOptions(*args), out)
    ref_loss, ref_grad = reference_rows(z, t, kw, g)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=2.0**-20, atol=2.0**-20)
    torch.testing.assert_close(out.double().cpu(), ref_grad, rtol=2.0**-19, atol=2.0**-21)


def test_matches_torch_rows_in_fp32(device):
    # The two backends agree to fp32 rounding, with every option on, on a K-dim input (class dim 1).
    z = 3.0 * torch.randn(4, 1000, 3, device=device)
    t = torch.randint(0, 1000, (4, 3), device=device)
    w = torch.rand(1000, device=device) + 0.5
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction="sum")
    losses, grads = [], []
    for impl in ("torch", "triton"):
        x = z.clone().requires_grad_()
        loss = crossent.cross_entropy(x, t, w, impl=impl, **kw)
        loss.backward()
        losses.append(loss)
        grads.append(x.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# --- in place, layouts, reductions ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["all", "probs_all"])
def test_inplace_backward_equals_out_of_place(device, option):
    z, t, kw = make_case(129, OPTIONS[option], torch.float32, device=device)
    g = torch.rand(z.shape[0], device=device) + 0.5
    _, expected = run_triton(z, t, kw, g)
    x = z.clone().requires_grad_()
    logits = x * 1.0  # a non-leaf: in-place backward overwrites its storage
    loss = crossent.cross_entropy(logits, t, reduction="none", impl="triton", inplace_backward=True, **kw)
    grad = torch.autograd.grad(loss, logits, g)[0]
    assert grad.data_ptr() == logits.data_ptr(), "the gradient was not written into the logits' storage"
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_kdim_input_and_inplace_through_a_buffer(device, kind):
    # (N, C, d): the class dim is strided, so the kernels read a contiguous copy and the in-place gradient
    # goes through a buffer that is copied back into the logits' storage.
    z = (3.0 * torch.randn(3, 129, 4)).to(device)
    if kind == "probs":
        t = torch.softmax(torch.randn(3, 129, 4), 1).to(device)
    else:
        t = torch.randint(0, 129, (3, 4)).to(device)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    t64 = t.double().cpu().numpy() if kind == "probs" else t.cpu().numpy()
    expected = torch.from_numpy(reference.cross_entropy_grad(z.double().cpu().numpy(), t64, **kw))
    for inplace in (False, True):
        x = z.clone().requires_grad_()
        logits = x * 1.0
        loss = crossent.cross_entropy(logits, t, impl="triton", inplace_backward=inplace, **kw)
        grad = torch.autograd.grad(loss, logits)[0]
        assert (grad.data_ptr() == logits.data_ptr()) == inplace
        torch.testing.assert_close(grad.double().cpu(), expected, rtol=1e-5, atol=1e-7)


def test_mean_reduction_stride0_grad(device):
    # "mean": the upstream gradient reaches the kernel as a stride-0 (expanded scalar) row vector.
    z, t, kw = make_case(129, OPTIONS["all"], torch.float32, device=device)
    x = z.clone().requires_grad_()
    crossent.cross_entropy(x, t, impl="triton", **kw).backward()
    ref_kw = {k: v for k, v in kw.items() if k != "weight"}
    w = kw["weight"].double().cpu().numpy()
    expected = reference.cross_entropy_grad(z.double().cpu().numpy(), t.cpu().numpy(), w, **ref_kw)
    torch.testing.assert_close(x.grad.double().cpu(), torch.from_numpy(expected), rtol=1e-5, atol=1e-7)


def test_unbatched_and_empty(device):
    z = torch.randn(7, device=device, requires_grad=True)
    loss = crossent.cross_entropy(z, torch.tensor(3, device=device), impl="triton")
    loss.backward()
    expected = reference.cross_entropy(z.detach().double().cpu().numpy(), np.array(3))
    torch.testing.assert_close(loss.double().cpu(), torch.tensor(expected))
    empty = torch.randn(0, 7, device=device, requires_grad=True)
    out = crossent.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device), reduction="none", impl="triton")
    out.sum().backward()
    assert out.shape == (0,) and empty.grad.shape == (0, 7)


# --- properties --------------------------------------------------------------------------------------------


def test_uniform_logits_give_log_c_and_shift_invariance(device):
    t = torch.tensor([0, 500, 999], device=device)
    loss = crossent.cross_entropy(torch.zeros(3, 1000, device=device), t, reduction="none", impl="triton")
    torch.testing.assert_close(loss.cpu(), torch.full((3,), math.log(1000.0)))
    z = torch.randn(3, 1000, device=device)
    shifted = crossent.cross_entropy(z + 100.0, t, reduction="none", impl="triton")
    plain = crossent.cross_entropy(z, t, reduction="none", impl="triton")
    torch.testing.assert_close(shifted, plain, atol=2e-5, rtol=0)


def test_all_ignored_gives_zero_loss_and_grad(device):
    z = torch.randn(5, 129, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    loss = crossent.cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-2, impl="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


def test_minus_inf_non_target_logit_is_finite(device):
    z = torch.randn(2, 129)
    z[:, 5] = -math.inf
    z[1] = -math.inf  # an all −inf row ...
    z[1, 7] = 0.0  # ... but for its target
    z = z.to(device).requires_grad_()
    loss = crossent.cross_entropy(z, torch.tensor([3, 7], device=device), reduction="none", impl="triton")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    assert loss[1].item() == 0.0 and z.grad[0, 5].item() == 0.0


@pytest.mark.parametrize("option", ["plain", "weight_smoothing", "probs_all"])
def test_huge_logits_are_not_rounded_at_the_max(device, option):
    # ±1e4 logits: fp32 rounds lse = m + log Σ exp(x − m) to ~1e-3 there, so the loss is assembled from m
    # and log s, the LSE is stored in fp64 and the backward shifts by its hi and lo parts (the kernels'
    # comments). Two classes per row sit at +1e4, one at 1e4 − 1, the rest at −1e4.
    z, t, kw = make_case(129, OPTIONS[option], torch.float32, device=device)
    kw.pop("softcap", None)  # a softcap would bound the logits, which is not what this test is about
    big = torch.full((9, 129), -1e4)
    big[:, 3] = big[:, 77] = 1e4
    big[:, 78] = 1e4 - 1.0
    z = big.to(device)
    if not t.is_floating_point():
        t = torch.where(t == kw["ignore_index"], t, 77)
    x = z.clone().requires_grad_()
    loss = crossent.cross_entropy(x, t, reduction="none", impl="triton", **kw)
    loss.sum().backward()
    expected, expected_grad = reference_rows(z, t, kw, torch.ones(9))
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(x.grad.double().cpu(), expected_grad, rtol=1e-5, atol=1e-6)


def test_nan_logit_propagates(device):
    z = torch.randn(2, 129)
    z[0, 11] = math.nan
    loss = triton_rows.forward(z.to(device), torch.tensor([1, 2], device=device), None, RowOptions(-100, 0.0, 0.0, None))[0]
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


@pytest.mark.parametrize("bad", [-5, 129, 10**9])
def test_out_of_range_target_gives_nan_row_without_reading_outside(device, bad):
    # The public layer rejects these on CPU; the kernels (the CUDA path, which does not sync the host to
    # check) clamp the index for the memory access and poison the row instead.
    z = torch.randn(3, 129, device=device)
    t = torch.tensor([4, bad, 6], device=device)
    w = torch.rand(129, device=device) + 0.5
    loss, lse = triton_rows.forward(z, t, w, RowOptions(-100, 0.1, 1e-3, None))
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(lse).all()
    out = torch.empty_like(z)
    triton_rows.backward(z, t, w, lse, torch.ones(3, device=device), RowOptions(-100, 0.1, 1e-3, None), out)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    expected, _ = torch_rows.forward(z[[0, 2]], t[[0, 2]], w, RowOptions(-100, 0.1, 1e-3, None))
    torch.testing.assert_close(loss[[0, 2]], expected)


@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("columns", [(0, 17), (17, 40), (9, 31)], ids=["first", "last", "middle"])
def test_shard_backward_equals_the_full_rows_columns(device, option, columns):
    # A vocabulary shard (vocab-parallel CE, a vocabulary-split block of the fused loop): the gradient of the
    # columns [v0, v1) of C = 40 from the full rows' LSE equals those columns of the whole rows' gradient.
    z, t, kw = make_case(40, OPTIONS[option], torch.float32, device=device)
    t[2] = 20 if columns == (9, 31) else t[2]  # a target inside the middle shard
    opts = RowOptions(kw.get("ignore_index", -100), kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap"))
    g = torch.rand(z.shape[0], device=device) + 0.5
    _, lse = triton_rows.forward(z, t, kw.get("weight"), opts)
    whole = torch.empty_like(z)
    triton_rows.backward(z, t, kw.get("weight"), lse, g, opts, whole)
    v0, v1 = columns
    piece = torch.empty_like(z[:, v0:v1])
    triton_rows.backward(z[:, v0:v1].contiguous(), t, kw.get("weight"), lse, g, opts, piece, VocabShard(v0, 40))
    torch.testing.assert_close(piece, whole[:, v0:v1], rtol=1e-6, atol=1e-7)


def test_float64_falls_back_to_torch_rows(device):
    z = torch.randn(4, 33, dtype=torch.float64, device=device)
    t = torch.randint(0, 33, (4,), device=device)
    loss, lse = triton_rows.forward(z, t, None, RowOptions(-100, 0.1, 0.0, 2.0))
    assert loss.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(loss, torch_rows.forward(z, t, None, RowOptions(-100, 0.1, 0.0, 2.0))[0], rtol=0, atol=0)


# --- dispatch and launch table -------------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda")) == "triton"  # decided from the device, nothing runs
    assert resolve_impl("torch", torch.device("cuda")) == "torch"
    assert resolve_impl("triton", torch.device("cuda")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_impl("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", torch.device("cpu")) == "triton"


def test_launch_table():
    # One hand-checked entry per regime: the cap for each element size, and a small row.
    assert triton_rows.row_launch(torch.bfloat16, 131072) == (8192, 16)
    assert triton_rows.row_launch(torch.float32, 131072) == (4096, 8)
    assert triton_rows.row_launch(torch.float32, 1000) == (1024, 2)
    assert triton_rows.row_launch(torch.float16, 7) == (8, 1)
    assert triton_rows.row_launch(torch.float32, 1) == (1, 1)


# --- on a GPU, when there is one -----------------------------------------------------------------------------


@pytest.fixture
def cuda():
    """A CUDA device running the compiled kernels; skips where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if _triton_mode.interpreting():
        pytest.skip("Triton is interpreting in this process (TRITON_INTERPRET=1)")
    return torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", ["plain", "all", "probs_all"])
@pytest.mark.parametrize("num_classes", [32768, 131072 + 7])
def test_cuda_matches_reference_at_vocab_sizes(cuda, num_classes, option, dtype):
    # Many full blocks at the table's own block sizes (the small shapes above run here too, on CUDA).
    assert resolve_impl("auto", cuda) == "triton"
    check_against_reference(num_classes, OPTIONS[option], dtype, cuda, rows=33)


def test_cuda_inplace_and_out_of_range(cuda):
    z, t, kw = make_case(50257, OPTIONS["all"], torch.bfloat16, rows=64, device=cuda)
    g = torch.rand(64, device=cuda)
    _, expected = run_triton(z, t, kw, g)
    logits = z.clone().requires_grad_() * 1.0
    loss = crossent.cross_entropy(logits, t, reduction="none", impl="triton", inplace_backward=True, **kw)
    grad = torch.autograd.grad(loss, logits, g)[0]
    assert grad.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    t_bad = t.clone()
    t_bad[3] = 10**9  # not checked on CUDA (no host sync): a NaN row, never an out-of-bounds access
    loss = crossent.cross_entropy(z, t_bad, reduction="none", impl="auto", **kw)
    torch.cuda.synchronize()
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(64, device=cuda) != 3]).all()
