"""crossent.trl: the fused-head function against TRL's own, patch()'s verification and refusals, ZeRO-3's gather,
and a model with TRL's fused head (trainers end to end: tests/test_trl_trainers.py)."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl")

import transformers  # noqa: E402  (after the skip: optional dependencies)
from trl.trainer import utils as trl_utils  # noqa: E402

import crossent.trl as ct  # noqa: E402

TRL_FUNCTION = trl_utils._ChunkedLogProbFunction


@pytest.fixture(autouse=True)
def _unpatched():
    ct.unpatch()
    yield
    ct.unpatch()


def _operands(n, d, v, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) / d**0.5
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, b, t


def _run(fn, h, w, b, t, args, grads=True):
    """Every output, and the gradients of Σ g₁ log_probs + Σ g₂ entropy (entropy only when requested)."""
    leaves = [None if x is None else x.detach().requires_grad_(grads) for x in (h, w, b)]
    out = fn.apply(*leaves, t, *args)
    if not grads:
        return list(out), []
    g = torch.Generator().manual_seed(1)
    pairs = [(o, torch.randn(o.shape, generator=g)) for o in out[:2] if o is not None]
    wanted = [x for x in leaves if x is not None]
    return list(out), list(torch.autograd.grad([o for o, _ in pairs], wanted, [u for _, u in pairs]))


def _assert_same(theirs, ours, rtol=1e-5, atol=1e-5):
    for name, a, b in zip(ct.OUTPUTS + ("d hidden", "d weight", "d bias"), theirs[0] + theirs[1], ours[0] + ours[1]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# (N, D, V) and the chunk: V a multiple of the chunk, V not (a short last tile) — crossent's fused route; one tile
# (TRL's default chunk 32768, and V = chunk) — crossent keeps the logits on CPU
SHAPES = [((24, 16, 48), 16), ((37, 24, 101), 32), ((5, 8, 7), 32768), ((19, 8, 40), 40)]


@pytest.mark.parametrize("shape,chunk", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("options", [(1.0, None, 1.0), (0.7, None, 1.0), (1.0, 3.0, 1.0), (1.3, 2.5, 0.5)],
                         ids=["plain", "temperature", "softcap", "all"])  # fmt: skip
def test_function_equals_trls(shape, chunk, bias, options):
    """Every output and the three gradients, fp32: TRL's function and crossent's agree to fp32 rounding."""
    h, w, b, t = _operands(*shape, bias)
    temperature, softcap, scale = options
    args = (temperature, chunk, softcap, scale, ct.OUTPUTS)
    _assert_same(_run(TRL_FUNCTION, h, w, b, t, args), _run(ct.CrossentLogProbFunction, h, w, b, t, args))


@pytest.mark.parametrize("outputs", [(), ("log_probs",), ("entropy",), ("is_top1",), ("log_sum_sq_probs", "mean_logits")])
def test_only_requested_outputs(outputs):
    """Each optional output only when named (None otherwise, as TRL's); log_probs always."""
    h, w, b, t = _operands(9, 8, 20, True)
    args = (1.0, 16, None, 1.0, outputs)
    theirs, ours = _run(TRL_FUNCTION, h, w, b, t, args), _run(ct.CrossentLogProbFunction, h, w, b, t, args)
    absent = [False] + [n not in outputs for n in ct.OUTPUTS[1:]]
    assert [o is None for o in ours[0]] == [o is None for o in theirs[0]] == absent
    _assert_same(theirs, ours)


def test_extras_carry_no_gradient_and_types():
    h, w, b, t = _operands(6, 8, 10, True)
    out = ct.CrossentLogProbFunction.apply(h.requires_grad_(), w, b, t, 1.0, 16, None, 1.0, ct.OUTPUTS)
    assert [o.requires_grad for o in out] == [True, True, False, False, False]
    assert [o.dtype for o in out] == [torch.float32] * 4 + [torch.bool]


def test_ties_and_softcap_zero_as_trl():
    """is_top1 on ties (zero hidden: every logit 0, only the first id counts as the argmax); TRL reads
    final_logit_softcapping=0.0 as a cap of 1 (its kernels take ``κ or 1``)."""
    h, w, b, t = _operands(8, 4, 6, False)
    h[:4] = 0.0
    t[:4] = torch.tensor([0, 1, 5, 0])
    for softcap in (None, 0.0):
        args = (1.0, 4, softcap, 1.0, ct.OUTPUTS)
        theirs, ours = _run(TRL_FUNCTION, h, w, b, t, args), _run(ct.CrossentLogProbFunction, h, w, b, t, args)
        _assert_same(theirs, ours)
    assert ours[0][4][:4].tolist() == [True, False, False, True]


def test_no_grad_and_empty_batch():
    """Under no_grad (reference models) nothing is recorded; N = 0 (TRL's GPU path on an all-ignored batch)
    gives empty outputs and zero gradients."""
    h, w, b, t = _operands(5, 8, 12, True)
    with torch.no_grad():
        _assert_same(_run(TRL_FUNCTION, h, w, b, t, (0.9, 8, None, 1.0, ct.OUTPUTS), grads=False),
                     _run(ct.CrossentLogProbFunction, h, w, b, t, (0.9, 8, None, 1.0, ct.OUTPUTS), grads=False))  # fmt: skip
    args = (1.0, 8, None, 1.0, ("entropy",))
    _assert_same(_run(TRL_FUNCTION, h[:0], w, b, t[:0], args), _run(ct.CrossentLogProbFunction, h[:0], w, b, t[:0], args))


def test_bf16_autocast_as_close_to_float64_as_trls():
    """Under CPU bf16 autocast (TRL's configs' default) both run the product in bf16; crossent's errors against the
    float64 values of the same rounded operands are at most TRL's (+ 10%: the two round differently)."""
    h, w, b, t = _operands(64, 32, 300, True)
    args = (0.8, 128, None, 1.0, ("entropy",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = _run(TRL_FUNCTION, h, w, b, t, args)
        ours = _run(ct.CrossentLogProbFunction, h, w, b, t, args)
    hb, wb, bb = (x.bfloat16().double() for x in (h, w, b))
    want = _run(TRL_FUNCTION, hb, wb, bb, t, (0.8, 128, None, 1.0, ("entropy",)))  # fp64 product, fp32 fold
    for i, name in ((0, "log_probs"), (1, "entropy")):
        err_trl = (theirs[0][i].double() - want[0][i].double()).abs().max()
        err_ours = (ours[0][i].double() - want[0][i].double()).abs().max()
        assert err_ours <= 1.1 * err_trl + 1e-6, (name, err_ours.item(), err_trl.item())
    for a, b_ in zip(theirs[1], ours[1]):
        assert a.dtype == b_.dtype == torch.float32  # gradients in the parameters' dtype, through autocast's casts


def test_unknown_output_raises():
    h, w, b, t = _operands(3, 4, 5, False)
    with pytest.raises(ValueError, match="outputs must name per-token outputs"):
        ct.CrossentLogProbFunction.apply(h, w, b, t, 1.0, 8, None, 1.0, ("log_probs", "logits"))


# ---------------------------------------------------------------------------------------------- ZeRO-3


@pytest.mark.parametrize("chunk", [8, 32], ids=["fused", "kept-logits"])
def test_zero3_gather_in_backward(monkeypatch, chunk):
    """A ZeRO-3 stand-in: the head's data is gone outside ``maybe_gather_lm_head_ctx`` (as DeepSpeed leaves a
    partitioned parameter, numel 0). TRL's wrapper gathers around the forward; crossent's backward must gather
    again, as TRL's does, and give the gradients of an unpartitioned run."""
    h, w, b, t = _operands(10, 8, 24, True)
    args = (0.9, chunk, None, 1.0, ("entropy",))
    want = _run(ct.CrossentLogProbFunction, h, w, b, t, args)
    head = torch.nn.Linear(8, 24)
    full = {head.weight: w.clone(), head.bias: b.clone()}
    gathers = []

    @contextlib.contextmanager
    def gather(*params):
        gathers.append(len(params))
        for p in params:
            p.data = full[p]
        yield
        for p in params:
            p.data = p.data.new_empty(0)

    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", gather)
    for p in full:
        p.data = p.data.new_empty(0)
    x = h.clone().requires_grad_()
    with gather(head.weight, head.bias):
        out = ct.CrossentLogProbFunction.apply(x, head.weight, head.bias, t, *args)
    assert head.weight.numel() == 0
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=g) for o in out[:2]]
    grads = torch.autograd.grad(out[:2], (x, head.weight, head.bias), ups)
    assert gathers == [2, 2]
    _assert_same((want[0], want[1]), (list(out), list(grads)))


# ---------------------------------------------------------------------------------------------- patch


def test_patch_unpatch_is_patched():
    assert not ct.is_patched()
    ct.patch()
    ct.patch()  # twice: a no-op
    assert ct.is_patched() and trl_utils._ChunkedLogProbFunction is ct.CrossentLogProbFunction
    ct.unpatch()
    assert not ct.is_patched() and trl_utils._ChunkedLogProbFunction is TRL_FUNCTION
    ct.unpatch()
    assert trl_utils._ChunkedLogProbFunction is TRL_FUNCTION


def test_a_wrong_adapter_is_refused(monkeypatch):
    """An adapter that ignores the temperature differs from TRL on the probe: patch() raises, TRL untouched (on
    either of crossent's routes: the fused family, and the plain family on kept logits)."""
    for name in ("linear_token_log_probs", "token_log_probs"):
        real = getattr(ct, name)
        with monkeypatch.context() as m:
            m.setattr(ct, name, lambda *args, temperature, real=real, **kwargs: real(*args, temperature=1.0, **kwargs))
            with pytest.raises(ct.UnsupportedTRLError, match=r"does not reproduce trl 1\.\d+\.\d+'s .*log_probs: max \|d"):
                ct.patch()
        assert not ct.is_patched() and trl_utils._ChunkedLogProbFunction is TRL_FUNCTION


def test_a_trl_without_the_hook_is_refused(monkeypatch):
    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(ct.UnsupportedTRLError, match=r"trl \S+ has no trl\.trainer\.utils\._ChunkedLogProbFunction"):
        ct.patch()
    assert not hasattr(trl_utils, "_ChunkedLogProbFunction")


def test_import_crossent_does_not_import_trl():
    code = "import sys, crossent; print('trl' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------- a fused-head model


def test_model_with_trls_fused_head(monkeypatch):
    """A tiny Gemma 2 (softcap) with ``add_fused_lm_head``: labels with −100, every output, temperature; the
    loss, outputs (0 at ignored positions) and gradients are TRL's with crossent patched in (and crossent ran:
    a head that kept TRL's function would pass the comparison by itself)."""
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    final_logit_softcapping=5.0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg)
    trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=ct.OUTPUTS)
    ids = torch.randint(0, 64, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.loss + out.entropy.sum()).backward()
        return [getattr(out, n) for n in ("loss",) + ct.OUTPUTS], [p.grad.clone() for p in model.parameters()]

    calls = []
    monkeypatch.setattr(ct, "_crossent_call", lambda *a, real=ct._crossent_call: calls.append(a) or real(*a))
    theirs = run()
    assert not calls
    ct.patch()  # its probe calls crossent too
    calls.clear()
    ours = run()
    assert len(calls) == 1, len(calls)  # the model's one head call
    for a, b in zip(theirs[0] + theirs[1], ours[0] + ours[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    mask = labels[:, 1:] != -100
    assert not ours[0][1][~mask].any() and not ours[0][5][~mask].any()
