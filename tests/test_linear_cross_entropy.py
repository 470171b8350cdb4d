"""crossent.linear_cross_entropy against the materialized oracle crossent.cross_entropy(F.linear(...)).

Everything in float64 unless the test is about precision. Shapes are chosen off every block edge:
N = 257 rows (one past 4 blocks of 64), D = 67, V = 1031 (prime: no vocabulary piece divides it).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from _helpers import LargestAllocation as _LargestAllocation
from torch.utils._python_dispatch import TorchDispatchMode

import crossent
from crossent._options import RowOptions
from crossent.kernels import linear_loop, linear_plan
from crossent.kernels.linear_loop import LoopArgs
from crossent.kernels.linear_plan import ChunkPlan, plan_chunks, scratch_bytes
from crossent.kernels.shard import VocabShard
from crossent.kernels.torch_rows import combine_stats

F64 = dict(rtol=1e-10, atol=1e-12)
N, D, V = 257, 67, 1031

# option sets: each changes one term of the loss or gradient, the last changes all at once
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 3},  # an ignore_index inside [0, V): a real column must be skipped
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "all": {"weight": True, "ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0},
}
# block shapes: one block; several token blocks (the last holds one row); vocabulary pieces of 300
# columns (4 pieces, the last of 131) on blocks of 100 rows
CHUNKS = {
    "one": {},
    "several": {"chunk_size": 64},
    "vocab-split": {"chunk_size": 100, "memory_budget": scratch_bytes(100, 300, D, torch.float64)},
}


def _problem(shape=(N,), dtype=torch.float64, bias=True, options=(), scale=1.0, vocab=V, dim=D):
    """Seeded (input, linear_weight, linear_bias, target, class weight, kwargs) with logits of a few nats."""
    kw = dict(options)
    x = torch.randn(*shape, dim, dtype=torch.float64) * scale
    w = torch.randn(vocab, dim, dtype=torch.float64) * (2.0 / math.sqrt(dim))
    b = torch.randn(vocab, dtype=torch.float64) if bias else None
    t = torch.randint(0, vocab, shape)
    ignore = kw.get("ignore_index", -100)
    t.view(-1)[torch.randperm(t.numel())[: t.numel() // 5]] = ignore
    cw = None
    if kw.pop("weight", False):
        cw = torch.rand(vocab, dtype=torch.float64) + 0.5
    cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), t, cw, kw


def _grads(loss, params, grad_output):
    leaves = [p for p in params if p is not None and p.requires_grad]
    return torch.autograd.grad(loss, leaves, grad_output)


def _run(fn, x, w, b, t, cw, kw, grad_output, needs=(True, True, True)):
    """Loss and grads of fn on fresh leaves; needs says which of (x, w, b) require grad."""
    leaves = [None if p is None else p.detach().clone().requires_grad_(n) for p, n in zip((x, w, b), needs)]
    loss = fn(leaves[0], leaves[1], t, leaves[2], cw, kw)
    if not any(p is not None and p.requires_grad for p in leaves):
        return loss.detach(), []
    return loss.detach(), _grads(loss, leaves, grad_output)


def _materialized(x, w, t, b, cw, kw):
    kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "memory_budget", "accumulate_dtype")}
    return crossent.cross_entropy(F.linear(x, w, b).movedim(-1, 1) if x.dim() > 2 else F.linear(x, w, b), t,
                                  weight=cw, **kw)  # fmt: skip


def _fused(x, w, t, b, cw, kw):
    return crossent.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, **kw)


def _upstream(reduction, shape, dtype=torch.float64):
    if reduction == "none":
        return torch.randn(shape, dtype=dtype)  # per-token grad_output: the recompute path
    return torch.tensor(0.7, dtype=dtype)  # a scalar ≠ 1: backward must scale the forward-formed gradients


# layout × block shape: every block shape on 2-D input with bias; bias-free and 3-D input on one each
LAYOUTS = [("2d", c) for c in CHUNKS] + [("2d-nobias", "several"), ("3d", "vocab-split")]


@pytest.mark.parametrize("layout,chunks", LAYOUTS, ids=[f"{a}-{b}" for a, b in LAYOUTS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_materialized_reference(option, reduction, layout, chunks):
    shape = (3, 86) if layout == "3d" else (N,)
    x, w, b, t, cw, kw = _problem(shape, bias=layout != "2d-nobias", options=OPTIONS[option])
    kw["reduction"] = reduction
    go = _upstream(reduction, shape)
    ref_loss, ref_grads = _run(_materialized, x, w, b, t, cw, kw, go)
    loss, grads = _run(_fused, x, w, b, t, cw, {**kw, **CHUNKS[chunks]}, go)
    torch.testing.assert_close(loss, ref_loss, **F64)
    assert len(grads) == len(ref_grads)
    for name, g, r in zip(("input", "linear_weight", "linear_bias"), grads, ref_grads):
        torch.testing.assert_close(g, r, **F64, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_partial_requires_grad(needs, reduction):
    x, w, b, t, cw, kw = _problem(options={"label_smoothing": 0.1})
    kw.update(reduction=reduction, chunk_size=64)
    go = _upstream(reduction, (N,))
    _, ref = _run(_materialized, x, w, b, t, cw, kw, go, needs)
    _, got = _run(_fused, x, w, b, t, cw, kw, go, needs)
    assert len(got) == sum(needs)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **F64)


def test_no_grad_and_nothing_requiring_grad_give_the_loss():
    x, w, b, t, cw, kw = _problem()
    ref = _materialized(x, w, t, b, cw, kw)
    torch.testing.assert_close(_fused(x, w, t, b, cw, kw), ref, **F64)
    with torch.no_grad():
        out = _fused(x, w.clone().requires_grad_(True), t, b, cw, kw)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, **F64)


def test_huge_logits_take_the_recompute_fallback():
    """Losses above ~69 underflow the fp32/fp64 target probability's normal range on the fast path;
    the block is recomputed max-first. Logits of ±1e3 make every row such a row."""
    x, w, b, t, cw, kw = _problem(scale=300.0, options={"z_loss": 1e-6})
    go = torch.tensor(1.0, dtype=torch.float64)
    ref_loss, ref_grads = _run(_materialized, x, w, b, t, cw, kw, go)
    loss, grads = _run(_fused, x, w, b, t, cw, {**kw, "chunk_size": 64}, go)
    assert ref_loss > 100.0  # the case is the one it claims to be
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


# --- precision: float32 / 16-bit against the float64 oracle -----------------------------------------------
# Passing rule (as in tests/test_cross_entropy_precision.py): error ≤ error of the naive same-dtype path
# (cross_entropy(F.linear(...)) with everything in that dtype) + slack · max|reference|.
# Slack: the fused path forms the block gradient in fp32 and rounds it to the input dtype once for the
# products, like the naive path. dW: by default each block's 16-bit product (where the device multiplies
# 16 bits fast: "fast" below; elsewhere fp32 products, "emulated") is rounded once and summed in fp32;
# "float32_products" multiplies the unrounded block gradient in fp32; "weight" sums in the weight's dtype.
# 16-bit: 1 ulp at 1.0 (bf16 2^-8, fp16 2^-10) of max|reference| for the per-block roundings (measured ≤ 0.45
# for bf16 with "weight", 5 blocks here); fp32: 16 fp32 ulps for the summation order (measured ≤ 1).
SLACK = {torch.float32: 16 * 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
HALF = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@pytest.mark.parametrize("products", ["fast", "emulated"])
@pytest.mark.parametrize("chunks", ["several", "vocab-split"])
@pytest.mark.parametrize("accumulate", ["float32", "float32_products", "weight"])
@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
def test_low_precision_error_at_most_naive(dtype, accumulate, chunks, products, monkeypatch):
    if dtype == torch.float32 and products == "emulated":
        pytest.skip("float32 products are never emulated")
    # both kinds of device on any machine, and dW's 16-bit partial products in slices of 100 vocabulary rows
    monkeypatch.setattr(linear_loop, "fast_half_products", lambda device_type, dt: products == "fast" and dt != torch.float32)
    monkeypatch.setattr(linear_loop, "HALF_DW_SLICE_BYTES", 100 * D * 2)
    x, w, b, t, cw, kw = _problem(dtype=dtype, options={"label_smoothing": 0.1, "z_loss": 1e-3})
    kw.update(CHUNKS[chunks])
    go = torch.tensor(1.0)
    x64, w64, b64 = (p.double() for p in (x, w, b))  # the oracle on the rounded inputs: errors of the computation
    _, ref = _run(_materialized, x64, w64, b64, t, cw, kw, go.double())
    ref_loss = _materialized(x64, w64, t, b64, cw, kw)
    naive_loss, naive = _run(_materialized, x, w, b, t, cw, kw, go)
    if "memory_budget" in kw:  # the same pieces at the 16-bit scratch size
        kw["memory_budget"] = scratch_bytes(100, 300, D, dtype)
    loss, got = _run(_fused, x, w, b, t, cw, {**kw, "accumulate_dtype": accumulate}, go)
    assert loss.dtype == torch.float32  # the loss is never rounded to 16 bits
    assert [g.dtype for g in got] == [dtype] * 3  # each gradient in its parameter's dtype
    slack = SLACK[dtype]
    assert abs(loss.double() - ref_loss) <= abs(naive_loss.double() - ref_loss) + 8 * 2.0**-23 * abs(ref_loss)
    for name, g, n, r in zip(("input", "linear_weight", "linear_bias"), got, naive, ref):
        err, naive_err = (g.double() - r).abs(), (n.double() - r).abs().max()
        bound = naive_err + slack * r.abs().max()
        worst = int(err.argmax())
        assert err.max() <= bound, (
            f"{name}: error {err.max():.3e} at flat index {worst} (got {g.reshape(-1)[worst]}, "
            f"reference {r.reshape(-1)[worst]}) > naive {naive_err:.3e} + slack"
        )


def test_16bit_dw_paths_are_the_ones_claimed(monkeypatch):
    """On a device with fast 16-bit products the default multiplies dW's blocks in 16 bits (so its dW differs
    from "float32_products" by their rounding); without, every product runs in fp32 (the two agree exactly)."""
    x64, w64, b64, t, cw, kw = _problem()
    x, w, b = (p.to(torch.bfloat16) for p in (x64, w64, b64))
    kw["chunk_size"] = 64
    go = torch.tensor(1.0)
    grads = {}
    for fast in (True, False):
        monkeypatch.setattr(linear_loop, "fast_half_products", lambda device_type, dt, fast=fast: fast)
        for accumulate in ("float32", "float32_products"):
            grads[fast, accumulate] = _run(_fused, x, w, b, t, cw, {**kw, "accumulate_dtype": accumulate}, go)[1][1]
    assert not torch.equal(grads[True, "float32"], grads[True, "float32_products"])
    torch.testing.assert_close(grads[False, "float32"], grads[False, "float32_products"], rtol=0, atol=0)


# --- memory: the N×V logits never exist --------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_n_by_v_elements_is_allocated(reduction):
    n, dim, vocab = 512, 32, 4096  # N×V = 2M elements; dW is V×D = 128K, a block 128×V = 512K
    x, w, b, t, _, _ = _problem((n,), dtype=torch.float32, vocab=vocab, dim=dim)
    x, w, b = (p.requires_grad_(True) for p in (x, w, b))
    opts, loop = RowOptions(label_smoothing=0.1), LoopArgs(chunk_size=128)
    with _LargestAllocation() as naive:  # the detector can fail: the materialized path trips it
        crossent.cross_entropy(F.linear(x, w, b), t).backward()
    assert naive.largest >= n * vocab
    with _LargestAllocation() as public:  # everything around the custom ops, and their outputs
        loss = crossent.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=128)
        loss.backward(torch.ones_like(loss))
    with _LargestAllocation() as loops:  # inside the ops: the loops themselves (the mode can't see in)
        out = linear_loop.linear_loss_and_grads(x.detach(), w.detach(), b.detach(), t, None, opts, loop,
                                                grad_scale=torch.ones(()))  # fmt: skip
        linear_loop.linear_grads(x.detach(), w.detach(), b.detach(), t, None, out.lse, torch.ones(n), opts, loop)
    for mode in (public, loops):
        assert mode.largest < n * vocab, f"{mode.op} allocated {mode.largest} elements (N×V = {n * vocab})"


# --- properties -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inputs_are_not_modified(reduction):
    x, w, b, t, cw, kw = _problem(options={"weight": True, "label_smoothing": 0.1, "softcap": 5.0})
    before = [p.clone() for p in (x, w, b, t, cw)]
    _run(_fused, x, w, b, t, cw, {**kw, "reduction": reduction, "chunk_size": 64}, _upstream(reduction, (N,)))
    for p, q in zip((x, w, b, t, cw), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_and_zero_grads(reduction):
    x, w, b, _, cw, kw = _problem(options={"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2})
    t = torch.full((N,), -100)
    loss, grads = _run(_fused, x, w, b, t, cw, {**kw, "reduction": reduction, "chunk_size": 64},
                       _upstream(reduction, (N,)))  # fmt: skip
    assert torch.count_nonzero(loss) == 0
    for g in grads:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x, w, b, t, _, _ = _problem((0,))
    loss, grads = _run(_fused, x, w, b, t, None, {"reduction": reduction}, _upstream(reduction, (0,)))
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_non_contiguous_input_and_weight():
    x, w, b, t, _, kw = _problem()
    xt = x.T.contiguous().T  # same values, column-major
    wt = w.T.contiguous().T
    go = torch.tensor(1.0, dtype=torch.float64)
    ref_loss, ref = _run(_materialized, x, w, b, t, None, kw, go)
    loss, got = _run(_fused, xt, wt, b, t, None, {"chunk_size": 64}, go)
    torch.testing.assert_close(loss, ref_loss, **F64)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **F64)


def test_module_matches_functional():
    x, w, b, t, cw, _ = _problem(options={"weight": True})
    fn = crossent.LinearCrossEntropyLoss(weight=cw, label_smoothing=0.1, chunk_size=64)
    assert "chunk_size=64" in repr(fn)
    expected = crossent.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1)
    torch.testing.assert_close(fn(x, w, t, b), expected, **F64)


def test_second_backward_through_forward_formed_grads_raises():
    x, w, b, t, _, _ = _problem()
    loss = crossent.linear_cross_entropy(x.requires_grad_(True), w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_vocabulary_slices_with_a_combine_hook_equal_the_whole():
    """The hook vocab-parallel CE plugs in: two slices run the loop concurrently (threads standing in for
    ranks), their per-row stats exchanged by the hook; the loss and dX (summed) equal the whole head's."""
    x, w, b, t, cw, kw = _problem(options={"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3})
    opts = RowOptions(label_smoothing=0.1, z_loss=1e-3)
    loop = LoopArgs(chunk_size=64)
    whole = linear_loop.linear_loss_and_grads(x, w, b, t, cw, opts, loop, grad_scale=torch.ones(()))
    split = [(0, 400), (400, V)]
    barrier, posted, results = threading.Barrier(2), [None, None], [None, None]

    def combine(rank):
        def hook(local):
            posted[rank] = local
            barrier.wait()
            both = combine_stats(posted)
            barrier.wait()
            return both

        return hook

    def rank_main(rank):
        v0, v1 = split[rank]
        results[rank] = linear_loop.linear_loss_and_grads(
            x, w[v0:v1], b[v0:v1], t, cw, opts, loop, grad_scale=torch.ones(()), shard=VocabShard(v0, V),
            combine=combine(rank),
        )  # fmt: skip

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for r in results:
        torch.testing.assert_close(r.loss, whole.loss, **F64)
        torch.testing.assert_close(r.lse, whole.lse, equal_nan=True, **F64)  # ignored rows: skipped, NaN
    torch.testing.assert_close(results[0].grads.input + results[1].grads.input, whole.grads.input, **F64)
    torch.testing.assert_close(torch.cat([r.grads.weight for r in results]), whole.grads.weight, **F64)
    torch.testing.assert_close(torch.cat([r.grads.bias for r in results]), whole.grads.bias, **F64)


def test_plan_chunks():
    f32 = torch.float32
    cpu = torch.device("cpu")
    row = scratch_bytes(1, 32768, 1024, f32)
    assert plan_chunks(4096, 1024, 32768, f32, cpu) == ChunkPlan(824, 32768)  # 128 MiB: 5 equal blocks
    assert plan_chunks(2048, 2048, 131072, f32, cpu) == ChunkPlan(688, 131072)  # 2·V·D bytes = 512 MiB: 3 blocks
    assert plan_chunks(100, 64, 1000, f32, cpu) == ChunkPlan(100, 1000)  # all rows in one block
    assert plan_chunks(4096, 1024, 32768, f32, cpu, chunk_size=300) == ChunkPlan(300, 32768)
    # a budget of 10 rows (< 64): 64 rows of a vocabulary piece instead
    plan = plan_chunks(4096, 1024, 32768, f32, cpu, memory_budget=10 * row)
    assert plan.rows == 64 and linear_plan.MIN_BLOCK_COLS <= plan.cols < 32768
    assert scratch_bytes(plan.rows, plan.cols, 1024, f32) <= 10 * row
    assert plan_chunks(4096, 1024, 32768, f32, cpu, memory_budget=row) == ChunkPlan(1, 32768)  # too thin to split
    with pytest.raises(ValueError, match="too small for even one row"):
        plan_chunks(4096, 1024, 32768, f32, cpu, memory_budget=row - 1)


def test_plan_of_the_16_bit_c_step():
    bf16, cpu = torch.bfloat16, torch.device("cpu")
    dw32 = 32768 * 1024 * 4
    # no fp32 copy of the block: 2 bytes a logit instead of 6, so up to 3× the rows for the same default budget
    # (2587 fit; 4096 rows balance into 2 blocks of 2048)
    assert plan_chunks(4096, 1024, 32768, bf16, cpu, fp32_block=False) == ChunkPlan(2048, 32768)
    assert plan_chunks(4096, 1024, 32768, bf16, cpu) == ChunkPlan(824, 32768)
    # one block spares the fp32 dW sum: taken when it fits the budget plus those bytes, and only then
    one = plan_chunks(4096, 1024, 32768, bf16, cpu, fp32_block=False, one_block_spares=dw32)
    assert one == ChunkPlan(4096, 32768)
    budget = linear_plan.default_memory_budget(cpu, 32768, 1024, bf16)
    assert scratch_bytes(4096, 32768, 1024, bf16, fp32_block=False) <= budget + dw32
    assert plan_chunks(8192, 1024, 32768, bf16, cpu, fp32_block=False, one_block_spares=dw32) == ChunkPlan(2048, 32768)
    # an explicit budget is a bound: no bonus
    explicit = plan_chunks(4096, 1024, 32768, bf16, cpu, memory_budget=budget, fp32_block=False, one_block_spares=dw32)
    assert explicit == ChunkPlan(2048, 32768)


# --- bad input -------------------------------------------------------------------------------------------

BAD = {
    "D mismatch": (lambda x, w, t, b: (x[:, :-1], w, t, b), {}, ValueError, "linear_weight's D"),
    "target shape": (lambda x, w, t, b: (x, w, t[:-1], b), {}, ValueError, "input.shape"),
    "float target": (lambda x, w, t, b: (x, w, t.double(), b), {}, TypeError, "integer class indices"),
    "bias size": (lambda x, w, t, b: (x, w, t, b[:-1]), {}, ValueError, "linear_bias must have shape"),
    "dtype mismatch": (lambda x, w, t, b: (x.float(), w, t, b), {}, TypeError, "dtype"),
    "weight not 2-D": (lambda x, w, t, b: (x, w[0], t, b), {}, ValueError, r"\(V, D\)"),
    "target out of range": (lambda x, w, t, b: (x, w, t.clamp(min=0) + V, b), {}, ValueError, "outside"),
    "chunk_size 0": (lambda *a: a, {"chunk_size": 0}, ValueError, "chunk_size"),
    "chunk_size float": (lambda *a: a, {"chunk_size": 2.0}, TypeError, "chunk_size"),
    "budget below a row": (lambda *a: a, {"memory_budget": 1000}, ValueError, "too small for even one row"),
    "reduction": (lambda *a: a, {"reduction": "avg"}, ValueError, "reduction"),
    "smoothing": (lambda *a: a, {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    "accumulate": (lambda *a: a, {"accumulate_dtype": "float16"}, ValueError, "accumulate_dtype"),
    "class weight": (lambda *a: a, {"weight": torch.ones(3, dtype=torch.float64)}, ValueError, "weight"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises(case):
    change, kw, exc, match = BAD[case]
    x, w, b, t, _, _ = _problem()
    x, w, t, b = change(x, w, t, b)
    with pytest.raises(exc, match=match):
        crossent.linear_cross_entropy(x, w, t, linear_bias=b, **kw)


# --- ignored rows cost nothing ------------------------------------------------------------------------------


class _ProductFlops(TorchDispatchMode):
    """Counts the multiply-adds of every matrix product (mm, addmm) run under it."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
                    torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default):  # fmt: skip
            a, b = (args[0], args[1]) if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out) else args[1:3]
            self.flops += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_ignored_rows_are_dropped_before_the_products(fraction):
    # The products scale with the rows that count: (1 − f) of the all-valid work. Counted inside the loops
    # (a dispatch mode does not see into the custom ops), for the forward-with-gradients loop ("mean"/"sum")
    # and the recompute loop ("none"'s backward).
    n = 200
    x, w, b, _, _, _ = _problem((n,), vocab=300, dim=16)
    t = torch.randint(0, 300, (n,))
    opts, loop = RowOptions(label_smoothing=0.1), LoopArgs(chunk_size=64)
    counts = {}
    for f in (0.0, fraction):
        tf = t.clone()
        tf[: int(f * n)] = -100
        with _ProductFlops() as mode:
            out = linear_loop.linear_loss_and_grads(x, w, b, tf, None, opts, loop, grad_scale=torch.ones(()))
            linear_loop.linear_grads(x, w, b, tf, None, out.lse, torch.ones(n), opts, loop)
        counts[f] = mode.flops
    assert counts[0.0] > 0 and counts[fraction] <= (1 - fraction) * counts[0.0] * 1.001, counts


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_rows_results_equal_the_materialized_loss(reduction):
    # Skipping changes nothing in the results: the loss, and dX rows of ignored tokens exactly 0.
    n = 200
    x, w, b, t, _, _ = _problem((n,), vocab=300, dim=16)
    t[: n // 2] = -100
    leaves = [p.detach().clone().requires_grad_() for p in (x, w, b)]
    loss = crossent.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction,
                                         label_smoothing=0.1, chunk_size=64)  # fmt: skip
    loss.backward(torch.ones_like(loss))
    refs = [p.detach().clone().requires_grad_() for p in (x, w, b)]
    ref = crossent.cross_entropy(F.linear(*refs), t, reduction=reduction, label_smoothing=0.1)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(loss, ref, **F64)
    for a, r in zip(leaves, refs):
        torch.testing.assert_close(a.grad, r.grad, **F64)
    assert torch.equal(leaves[0].grad[: n // 2], torch.zeros(n // 2, 16, dtype=torch.float64))


def test_return_stats_covers_the_ignored_rows():
    # The lse of ignored positions is part of the statistics: with return_stats it is computed for them too.
    x, w, b, t, _, _ = _problem()
    out = crossent.linear_cross_entropy(x, w, t, linear_bias=b, return_stats=True)
    torch.testing.assert_close(out.lse, torch.logsumexp(F.linear(x, w, b), -1), **F64)
