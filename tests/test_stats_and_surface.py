"""``return_stats=True`` (the statistics users log) and the public surface (names, keyword-only options).

Statistics: every public loss (functional and module, plain and fused linear) returns
``CrossEntropyStats(loss, lse, z_loss)`` whose ``loss`` is bitwise the loss without the flag (and whose
backward gives bitwise the same gradients), whose ``lse`` equals the float64 oracle's log-sum-exp of the
(soft-capped) logits at every position, ignored ones included, and whose ``z_loss`` equals the z-loss part
computed here by hand from that oracle LSE (``s · ω · lse²`` per position, reduced as the loss is).

Surface: keyword-only module options (PyTorch's positional ``size_average`` / ``ignore_index`` slots must
not map silently), no options class in the public names, version, ``py.typed``, ``crossent.distributed``'s
names, module reprs, numpy scalars as options.
"""

from __future__ import annotations

import importlib.resources
import math

import numpy as np
import pytest
import torch

import crossent
from crossent import reference
from crossent._precision import fast_half_products
from _helpers import F64, index_shape, make_index_target, make_logits, make_prob_target

REDUCTIONS = ["none", "mean", "sum"]
EXACT = dict(rtol=0, atol=0)
# lse / z-loss part of float32 or bfloat16 input against the float64 oracle on the same (upcast) values:
# the library accumulates in float32, so a few float32 ulps of a value of a few nats. A wrong term (a
# missing cap, weight or denominator) is off by far more than this.
F32 = dict(rtol=2e-6, atol=2e-6)


def _tol(dtype):
    return F64 if dtype == torch.float64 else F32


# --- oracle pieces, float64 numpy -------------------------------------------------------------------


def oracle_lse(logits_classes_last: np.ndarray, softcap):
    """Float64 LSE along the last axis of the (capped: κ tanh(z / κ)) logits."""
    z = logits_classes_last if softcap is None else softcap * np.tanh(logits_classes_last / softcap)
    return reference.logsumexp(z, axis=-1)


def oracle_z_part(lse, omega, z_loss, reduction, mean_denominator):
    """``z_loss · ω · lse²`` per position, then ``none`` / ``sum`` / sum over ``mean_denominator`` (0 if 0)."""
    rows = z_loss * omega * lse * lse
    if reduction == "none":
        return rows
    if reduction == "sum":
        return np.asarray(rows.sum())
    return np.asarray(0.0 if mean_denominator == 0 else rows.sum() / mean_denominator)


def index_omega(target: np.ndarray, weight, ignore_index):
    """``w_t`` per position (1 without class weights), 0 where the target is ignored."""
    w = np.ones(int(target.max(initial=0)) + 1) if weight is None else weight
    return np.where(target == ignore_index, 0.0, w[np.clip(target, 0, len(w) - 1)])


def as_np(t):
    return None if t is None else t.detach().to(torch.float64).numpy()


def _backward_upstream(loss, reduction, seed=1):
    """A random per-position upstream gradient for ``none`` (a scalar 1.7 for mean/sum), seeded."""
    if reduction != "none":
        return torch.tensor(1.7, dtype=loss.dtype)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)


def check_stats_type(out):
    assert type(out) is crossent.CrossEntropyStats, f"expected CrossEntropyStats, got {type(out).__name__}"
    assert out._fields == ("loss", "lse", "z_loss")


def check_stat_tensor(name, got, shape, dtype):
    assert tuple(got.shape) == tuple(shape), f"{name} shape {tuple(got.shape)} != {tuple(shape)}"
    assert got.dtype == dtype, f"{name} dtype {got.dtype} != {dtype}"
    assert not got.requires_grad, f"{name} must not require grad"


# --- cross_entropy / CrossEntropyLoss ---------------------------------------------------------------

# name -> (logits shape, dtype, target kind, options, some targets ignored)
CE_CASES = {
    # no options: z_loss=0, so the z part must be exactly zero (same shape as the loss)
    "(N,C) f64 plain": ((6, 7), torch.float64, "index", {}, False),
    # z-loss with the default ignore_index: ignored positions give ω = 0 but still a real lse
    "(N,C) f64 z_loss, ignored": ((6, 7), torch.float64, "index", dict(z_loss=0.05), True),
    # every option, ignore_index=2 inside [0, C) (a real class skipped), weighted mean denominator
    "(N,C) f64 every option, ignore_index in range": (
        (9, 7), torch.float64, "index",
        dict(weight=True, ignore_index=2, label_smoothing=0.1, z_loss=0.05, softcap=4.0), True,
    ),
    # class dim 1 of a 4-d input: lse has shape (N, d1, d2); C = 5 not a power of two
    "(N,C,d1,d2) f64 every option": (
        (2, 5, 3, 4), torch.float64, "index",
        dict(weight=True, label_smoothing=0.2, z_loss=0.03, softcap=3.0), True,
    ),
    # probability targets: ω = Σ_c w_c y_c, mean divides by the number of positions
    "(N,C) f64 probabilities, every option": (
        (6, 7), torch.float64, "probs", dict(weight=True, label_smoothing=0.1, z_loss=0.05, softcap=4.0), False,
    ),
    # probability targets of a 4-d input (class dim 1 in the target too)
    "(N,C,d1,d2) f64 probabilities, z_loss": ((2, 5, 3, 4), torch.float64, "probs", dict(z_loss=0.02), False),
    # probability targets without z-loss: the z part is exactly zero
    "(N,C) f64 probabilities plain": ((6, 7), torch.float64, "probs", dict(weight=True), False),
    # float32 input: lse comes back float32
    "(N,C) f32 every option": (
        (8, 13), torch.float32, "index", dict(weight=True, label_smoothing=0.1, z_loss=0.05, softcap=4.0), True,
    ),
    # bfloat16 input (4-d): loss, lse and z part in float32
    "(N,C,d1,d2) bf16 z_loss, smoothing": (
        (2, 6, 3, 2), torch.bfloat16, "index", dict(label_smoothing=0.1, z_loss=0.02), True,
    ),
}  # fmt: skip


def _ce_inputs(shape, dtype, kind, opts, ignored):
    logits = make_logits(shape, dtype)
    num_classes = shape[1]
    ignore_index = opts.get("ignore_index", -100)
    if kind == "index":
        target = make_index_target(shape, ignore_value=ignore_index if ignored else None)
    else:
        target = make_prob_target(shape, dtype)
    weight = (torch.rand(num_classes, dtype=torch.float64) + 0.5).to(dtype) if opts.get("weight") else None
    options = {k: v for k, v in opts.items() if k != "weight"}
    return logits, target, weight, options


def _ce_call(form, logits, target, weight, options, return_stats):
    """The functional or module form; ``options`` holds every keyword (``impl`` among them)."""
    if form == "module":
        return crossent.CrossEntropyLoss(weight, return_stats=return_stats, **options)(logits, target)
    return crossent.cross_entropy(logits, target, weight, return_stats=return_stats, **options)


# "auto": on these small CPU inputs, whichever path crossent picks for small shapes; "torch": the O(N) row
# kernels (custom ops + autograd Function) explicitly. Both must keep the stats contract.
@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_stats(case, reduction, form, impl):
    shape, dtype, kind, opts, ignored = CE_CASES[case]
    logits, target, weight, options = _ce_inputs(shape, dtype, kind, opts, ignored)
    options.update(reduction=reduction, impl=impl)

    # the loss and gradient without the flag, then with it: bitwise the same
    x0 = logits.clone().requires_grad_()
    plain = _ce_call(form, x0, target, weight, options, False)
    assert isinstance(plain, torch.Tensor)
    plain.backward(_backward_upstream(plain, reduction))
    x1 = logits.clone().requires_grad_()
    out = _ce_call(form, x1, target, weight, options, True)
    check_stats_type(out)
    torch.testing.assert_close(out.loss, plain, **EXACT)
    out.loss.backward(_backward_upstream(out.loss, reduction))
    torch.testing.assert_close(x1.grad, x0.grad, **EXACT)

    # lse: float64 oracle of the capped logits at every position (ignored ones included), batch shape
    z64 = np.moveaxis(as_np(logits), 1, -1)
    want_lse = oracle_lse(z64, options.get("softcap"))
    check_stat_tensor("lse", out.lse, index_shape(shape), torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.lse.double(), torch.from_numpy(want_lse), **_tol(dtype))

    # z-loss part: s · ω · lse² per position, reduced as the loss
    check_stat_tensor("z_loss", out.z_loss, out.loss.shape, out.loss.dtype)
    s = options.get("z_loss", 0.0)
    if s == 0.0:
        torch.testing.assert_close(out.z_loss, torch.zeros_like(out.loss), **EXACT)
        return
    w = as_np(weight)
    if kind == "index":
        omega = index_omega(target.numpy(), w, options.get("ignore_index", -100))
        denom = omega.sum()
    else:
        y = np.moveaxis(as_np(target), 1, -1)
        omega = y.sum(-1) if w is None else y @ w
        denom = omega.size
    want_z = oracle_z_part(want_lse, omega, s, reduction, denom)
    torch.testing.assert_close(out.z_loss.double(), torch.from_numpy(want_z), **_tol(dtype))


def test_cross_entropy_stats_hand_value():
    """Uniform logits zeros(2, 4), targets [1, 3], z_loss 0.1: lse = log 4 at both positions, z part
    0.1 · log² 4 = 0.192181 (mean), loss = log 4 + that."""
    log4 = math.log(4.0)
    out = crossent.cross_entropy(torch.zeros(2, 4), torch.tensor([1, 3]), z_loss=0.1, return_stats=True)
    torch.testing.assert_close(out.lse, torch.full((2,), log4), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(out.z_loss, torch.tensor(0.192181), rtol=0, atol=5e-7)
    torch.testing.assert_close(out.z_loss, torch.tensor(0.1 * log4**2), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(out.loss, torch.tensor(log4 + 0.1 * log4**2), rtol=1e-7, atol=1e-7)
    # sum: twice the mean; none: one term per position
    hand = dict(z_loss=0.1, return_stats=True)
    out = crossent.cross_entropy(torch.zeros(2, 4), torch.tensor([1, 3]), reduction="sum", **hand)
    torch.testing.assert_close(out.z_loss, torch.tensor(2 * 0.1 * log4**2), rtol=1e-7, atol=1e-7)
    out = crossent.cross_entropy(torch.zeros(2, 4), torch.tensor([1, 3]), reduction="none", **hand)
    torch.testing.assert_close(out.z_loss, torch.full((2,), 0.1 * log4**2), rtol=1e-7, atol=1e-7)


def test_cross_entropy_stats_ignored_position_keeps_lse_and_drops_z_term():
    """Position 1 ignored: its lse is still log 4 + its logit shift, its z term 0; the mean's denominator
    is 1 (one position left)."""
    z = torch.zeros(2, 4, dtype=torch.float64)
    z[1] += 2.0  # a shifted row: lse = 2 + log 4
    out = crossent.cross_entropy(z, torch.tensor([1, -100]), z_loss=0.1, return_stats=True)
    torch.testing.assert_close(out.lse, torch.tensor([math.log(4.0), 2.0 + math.log(4.0)], dtype=torch.float64), **F64)
    torch.testing.assert_close(out.z_loss, torch.tensor(0.1 * math.log(4.0) ** 2, dtype=torch.float64), **F64)


def test_cross_entropy_stats_all_ignored_mean_is_zero():
    """Every target ignored: the mean (over zero weight) is 0, and so is its z part (not NaN)."""
    out = crossent.cross_entropy(
        make_logits((3, 5)), torch.full((3,), -100), z_loss=0.1, return_stats=True
    )
    torch.testing.assert_close(out.loss, torch.zeros((), dtype=torch.float64), **EXACT)
    torch.testing.assert_close(out.z_loss, torch.zeros((), dtype=torch.float64), **EXACT)
    assert bool(torch.isfinite(out.lse).all()), out.lse


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_cross_entropy_z_part_is_the_loss_difference(kind):
    """Independent of the hand formula: loss(z_loss = s) − loss(z_loss = 0) is the returned z part
    (weighted mean with ignored positions for indices; probabilities divide by N)."""
    shape = (7, 9)
    logits = make_logits(shape)
    target = make_index_target(shape, ignore_value=-100) if kind == "index" else make_prob_target(shape)
    weight = torch.rand(9, dtype=torch.float64) + 0.5
    opts = dict(label_smoothing=0.1, softcap=5.0)
    without = crossent.cross_entropy(logits, target, weight, **opts)
    out = crossent.cross_entropy(logits, target, weight, z_loss=0.07, return_stats=True, **opts)
    torch.testing.assert_close(out.loss - without, out.z_loss, **F64)


# --- linear_cross_entropy / LinearCrossEntropyLoss --------------------------------------------------

V, D = 11, 5  # vocabulary not a power of two
# name -> (hidden shape, dtype, bias, options, some targets ignored)
LINEAR_CASES = {
    # (N, D), no options, 3 token blocks of 4: z part exactly zero
    "(N,D) f64 plain": ((9, D), torch.float64, False, dict(chunk_size=4), False),
    # (B, T, D): lse of shape (B, T); z-loss with some ignored positions
    "(B,T,D) f64 z_loss, ignored": ((2, 5, D), torch.float64, False, dict(z_loss=0.05, chunk_size=3), True),
    # every option with bias, ignore_index=3 inside [0, V); a budget that splits the vocabulary into pieces
    "(B,T,D) f64 every option, vocabulary pieces": (
        (2, 5, D), torch.float64, True,
        dict(weight=True, ignore_index=3, label_smoothing=0.1, z_loss=0.05, softcap=4.0, chunk_size=4,
             memory_budget=608), True,
    ),
    # float32: lse float32
    "(N,D) f32 every option": (
        (9, D), torch.float32, True, dict(weight=True, label_smoothing=0.1, z_loss=0.05, softcap=4.0), True,
    ),
    # bfloat16 hidden and head: loss, lse and z part float32
    "(B,T,D) bf16 z_loss": ((2, 3, D), torch.bfloat16, False, dict(z_loss=0.02, label_smoothing=0.1), True),
}  # fmt: skip


def _linear_inputs(shape, dtype, bias, opts, ignored):
    x = (torch.randn(shape, dtype=torch.float64)).to(dtype)
    w = (torch.randn(V, D, dtype=torch.float64) * 1.5).to(dtype)
    b = torch.randn(V, dtype=torch.float64).to(dtype) if bias else None
    target = torch.randint(0, V, shape[:-1])
    if ignored:  # 3 positions at ignore_index (never all)
        target.view(-1)[torch.randperm(target.numel())[:3]] = opts.get("ignore_index", -100)
    class_weight = (torch.rand(V, dtype=torch.float64) + 0.5).to(dtype) if opts.get("weight") else None
    options = {k: v for k, v in opts.items() if k != "weight"}
    return x, w, b, target, class_weight, options


def _linear_call(form, x, w, b, target, class_weight, options, return_stats):
    if form == "module":
        fn = crossent.LinearCrossEntropyLoss(class_weight, return_stats=return_stats, **options)
        return fn(x, w, target, b)
    return crossent.linear_cross_entropy(
        x, w, target, linear_bias=b, weight=class_weight, return_stats=return_stats, **options
    )


@pytest.mark.cpu_path  # the 16-bit oracle follows the products the CPU runs
@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_cross_entropy_stats(case, reduction, form):
    shape, dtype, bias, opts, ignored = LINEAR_CASES[case]
    x, w, b, target, class_weight, options = _linear_inputs(shape, dtype, bias, opts, ignored)
    options["reduction"] = reduction

    def leaves():
        return [x.clone().requires_grad_(), w.clone().requires_grad_(),
                None if b is None else b.clone().requires_grad_()]  # fmt: skip

    p0 = leaves()
    plain = _linear_call(form, *p0, target, class_weight, options, False)
    assert isinstance(plain, torch.Tensor)
    plain.backward(_backward_upstream(plain, reduction))
    p1 = leaves()
    out = _linear_call(form, *p1, target, class_weight, options, True)
    check_stats_type(out)
    torch.testing.assert_close(out.loss, plain, **EXACT)
    out.loss.backward(_backward_upstream(out.loss, reduction))
    for name, got, want in zip(("dX", "dW", "db"), p1, p0):
        if want is not None:
            torch.testing.assert_close(got.grad, want.grad, **EXACT, msg=lambda m, n=name: f"{n}: {m}")

    # lse: oracle of the capped logits X Wᵀ + b, shape target.shape, as the path that ran forms them. Float64
    # products for float32/64 input, and for 16-bit input where the CPU's products run in fp32 (no bf16 / fp16
    # matrix units, or CROSSENT_CPU_CAPABILITY below them); where they run in 16 bits the logits are held in its
    # dtype (the block scratch, as in F.linear), so the oracle starts from those rounded logits (from exact
    # products the lse would differ by ~1e-2, bf16 rounding of Z).
    if dtype in (torch.float32, torch.float64) or not fast_half_products(x.device.type, dtype):
        logits = as_np(x) @ as_np(w).T + (0.0 if b is None else as_np(b))
    else:
        logits = as_np(torch.nn.functional.linear(x, w, b))
    want_lse = oracle_lse(logits, options.get("softcap"))
    check_stat_tensor("lse", out.lse, target.shape, torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.lse.double(), torch.from_numpy(want_lse), **_tol(dtype))

    check_stat_tensor("z_loss", out.z_loss, out.loss.shape, out.loss.dtype)
    s = options.get("z_loss", 0.0)
    if s == 0.0:
        torch.testing.assert_close(out.z_loss, torch.zeros_like(out.loss), **EXACT)
        return
    omega = index_omega(target.numpy(), as_np(class_weight), options.get("ignore_index", -100))
    want_z = oracle_z_part(want_lse, omega, s, reduction, omega.sum())
    torch.testing.assert_close(out.z_loss.double(), torch.from_numpy(want_z), **_tol(dtype))


def test_linear_cross_entropy_stats_hand_value():
    """Zero hidden states give uniform logits over V = 4: lse = log 4, z part 0.1 · log² 4 = 0.192181."""
    log4 = math.log(4.0)
    w = torch.randn(4, 3)
    out = crossent.linear_cross_entropy(torch.zeros(2, 3), w, torch.tensor([1, 3]), z_loss=0.1, return_stats=True)
    torch.testing.assert_close(out.lse, torch.full((2,), log4), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(out.z_loss, torch.tensor(0.192181), rtol=0, atol=5e-7)
    torch.testing.assert_close(out.loss, torch.tensor(log4 + 0.1 * log4**2), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_z_part_is_the_loss_difference(reduction):
    """loss(z_loss = s) − loss(z_loss = 0) is the returned z part (weights, ignored positions, softcap)."""
    x = torch.randn(3, 4, D, dtype=torch.float64)
    w = torch.randn(V, D, dtype=torch.float64) * 1.5
    target = torch.randint(0, V, (3, 4))
    target[0, :2] = -100
    cw = torch.rand(V, dtype=torch.float64) + 0.5
    opts = dict(weight=cw, label_smoothing=0.1, softcap=5.0, chunk_size=5, reduction=reduction)
    without = crossent.linear_cross_entropy(x, w, target, **opts)
    out = crossent.linear_cross_entropy(x, w, target, z_loss=0.07, return_stats=True, **opts)
    torch.testing.assert_close(out.loss - without, out.z_loss, **F64)


# --- public surface ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [crossent.CrossEntropyLoss, crossent.LinearCrossEntropyLoss])
@pytest.mark.parametrize(
    "args",
    [
        (None, 5),  # PyTorch's (weight, size_average): 5 must not become ignore_index or anything else
        (None, None, 5),  # PyTorch's (weight, size_average, ignore_index)
        (None, None, 5, None, "sum"),  # PyTorch's full positional order up to reduction
    ],
)
def test_module_options_after_weight_are_keyword_only(cls, args):
    with pytest.raises(TypeError, match="positional argument"):
        cls(*args)


@pytest.mark.parametrize("cls", [crossent.CrossEntropyLoss, crossent.LinearCrossEntropyLoss])
@pytest.mark.parametrize("name", ["size_average", "reduce", "label_smoothin"])  # PyTorch's deprecated; a typo
def test_module_unknown_keyword_raises_type_error(cls, name):
    with pytest.raises(TypeError, match=name):
        cls(**{name: True})


def test_no_options_class_in_public_names():
    assert not [n for n in crossent.__all__ if n.endswith("Options")], crossent.__all__
    assert not hasattr(crossent, "CrossEntropyOptions")
    assert not hasattr(crossent, "LinearOptions")
    missing = [n for n in crossent.__all__ if not hasattr(crossent, n)]
    assert not missing, f"__all__ names not defined: {missing}"
    assert "CrossEntropyStats" in crossent.__all__


def test_version():
    assert crossent.__version__ == "0.2.0"


def test_ships_py_typed():
    assert importlib.resources.files("crossent").joinpath("py.typed").is_file()


def test_distributed_public_names():
    import crossent.distributed as cd

    assert cd.__all__ == ["vocab_ranges", "check_vocab_layout", "vocab_parallel_cross_entropy",
                          "vocab_parallel_linear_cross_entropy", "vocab_parallel_token_log_probs",
                          "vocab_parallel_linear_token_log_probs", "vocab_parallel_linear_distill_loss"]  # fmt: skip
    assert all(callable(getattr(cd, n)) for n in cd.__all__)
    for private in ("all_reduce_stats", "all_reduce_sum"):
        assert not hasattr(cd, private), f"crossent.distributed.{private} should not be public"


def test_module_repr_names_options():
    text = repr(crossent.CrossEntropyLoss(label_smoothing=0.1))
    assert "label_smoothing=0.1" in text and "reduction='mean'" in text, text
    text = repr(crossent.LinearCrossEntropyLoss(label_smoothing=0.1, reduction="sum", chunk_size=8))
    assert "label_smoothing=0.1" in text and "reduction='sum'" in text and "chunk_size=8" in text, text


# --- numpy scalars as options, bool refused --------------------------------------------------------


# (numpy ignore_index, numpy label_smoothing) -> the same Python values
NUMPY_OPTIONS = [
    (np.int64(2), np.float64(0.1)),  # ignore_index inside [0, C): the value must really reach the kernel
    (np.int32(-100), np.float32(0.25)),  # 0.25 is exact in float32, so the Python twin is 0.25
    (np.int16(4), np.float16(0.5)),
]


@pytest.mark.parametrize("np_ignore, np_eps", NUMPY_OPTIONS)
def test_numpy_scalar_options_give_the_python_loss(np_ignore, np_eps):
    py_ignore, py_eps = int(np_ignore), float(np_eps)
    assert py_eps in (0.1, 0.25, 0.5)
    logits = make_logits((8, 6))
    target = make_index_target((8, 6))
    target[:3] = py_ignore  # some positions at the ignored value
    kw_np = dict(ignore_index=np_ignore, label_smoothing=np_eps, reduction="none")
    kw_py = dict(ignore_index=py_ignore, label_smoothing=py_eps, reduction="none")
    torch.testing.assert_close(
        crossent.cross_entropy(logits, target, **kw_np), crossent.cross_entropy(logits, target, **kw_py), **EXACT
    )
    torch.testing.assert_close(
        crossent.CrossEntropyLoss(**kw_np)(logits, target), crossent.cross_entropy(logits, target, **kw_py), **EXACT
    )
    x, w = torch.randn(8, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(
        crossent.linear_cross_entropy(x, w, target, **kw_np), crossent.linear_cross_entropy(x, w, target, **kw_py),
        **EXACT,
    )
    torch.testing.assert_close(
        crossent.LinearCrossEntropyLoss(**kw_np)(x, w, target), crossent.linear_cross_entropy(x, w, target, **kw_py),
        **EXACT,
    )
    # stored as plain Python numbers: the repr prints them as Python does, not as np.int64(2)
    text = repr(crossent.CrossEntropyLoss(**kw_np))
    assert f"ignore_index={py_ignore}," in text and f"label_smoothing={py_eps}," in text, text
    # the ignored positions are really ignored (loss 0), so the numpy value was not lost on the way
    loss = crossent.cross_entropy(logits, target, **kw_np)
    torch.testing.assert_close(loss[:3], torch.zeros(3, dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), torch.tensor(True)])  # a bool in every spelling
def test_bool_ignore_index_is_a_type_error(value):
    logits, target = make_logits((3, 4)), torch.tensor([0, 1, 2])
    x, w = torch.randn(3, 2), torch.randn(4, 2)
    with pytest.raises(TypeError, match="ignore_index"):
        crossent.cross_entropy(logits, target, ignore_index=value)
    with pytest.raises(TypeError, match="ignore_index"):
        crossent.CrossEntropyLoss(ignore_index=value)
    with pytest.raises(TypeError, match="ignore_index"):
        crossent.linear_cross_entropy(x, w, target, ignore_index=value)
    with pytest.raises(TypeError, match="ignore_index"):
        crossent.LinearCrossEntropyLoss(ignore_index=value)


def test_options_are_cached_by_value_and_type():
    # The same keyword values give the same validated object back; a value equal in Python but of another
    # type (2.0 == 2 == True) is validated on its own, so a float or bool ignore_index is still refused.
    from crossent._options import CrossEntropyOptions

    a = CrossEntropyOptions.build(ignore_index=2, label_smoothing=0.1)
    assert CrossEntropyOptions.build(ignore_index=2, label_smoothing=0.1) is a
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="ignore_index"):
            CrossEntropyOptions.build(ignore_index=bad, label_smoothing=0.1)
    with pytest.raises(TypeError, match="ignore_index"):
        CrossEntropyOptions.build(ignore_index=[2])  # unhashable: validated, not cached
