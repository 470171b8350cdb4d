"""Every bad input raises the documented exception, naming the argument and the offending value.

One test per case; functional and module forms both. The messages are matched on what a user needs
to fix the call (argument name, value, shapes, allowed range), not on exact wording.
"""

from __future__ import annotations

import re

import pytest
import torch

import crossent

N, C = 4, 6


def _logits(shape=(N, C), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def _target(shape=(N,)):
    return torch.randint(0, C, shape)


def _shapes_pattern(*shapes):
    """A regex requiring every shape, as Python prints a tuple, in this order."""
    return "(?s)" + ".*".join(re.escape(str(tuple(s))) for s in shapes)


# --- input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_input_raises_type_error(dtype):
    x = torch.zeros(N, C).to(dtype)
    with pytest.raises(TypeError, match=r"input.*floating"):
        crossent.cross_entropy(x, _target())


def test_non_tensor_input_raises_type_error():
    with pytest.raises(TypeError, match=r"input.*Tensor"):
        crossent.cross_entropy([[0.0] * C] * N, _target())


def test_zero_dim_input_raises_value_error():
    with pytest.raises(ValueError, match=r"input.*class dimension"):
        crossent.cross_entropy(torch.tensor(1.0), torch.tensor(0))


def test_module_non_floating_input_raises_type_error():
    with pytest.raises(TypeError, match=r"input.*floating"):
        crossent.CrossEntropyLoss()(torch.zeros(N, C, dtype=torch.int64), _target())


# --- target of neither kind -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_shape, target_shape, target_dtype",
    [
        ((N, C), (N, C - 1), torch.float32),  # probabilities of the wrong class count
        ((N, C), (N + 1,), torch.int64),  # indices for the wrong batch
        ((N, C), (N, 1), torch.int64),  # an extra dim
        ((N, C), (N, C), torch.int64),  # integer target shaped like probabilities
        ((N, C), (N,), torch.float32),  # floating target shaped like indices
        ((N, C), (N,), torch.bool),  # bool is not a class index
        ((N, C, 3), (N, C), torch.int64),  # K-dim input, target missing d1
        ((C,), (1,), torch.int64),  # unbatched input needs a 0-d target
    ],
    ids=["probs-wrong-C", "index-wrong-N", "index-extra-dim", "int-probs-shape", "float-index-shape",
         "bool-target", "kdim-missing-d1", "unbatched-1d-target"],
)
def test_target_of_neither_kind_raises_value_error_naming_both_shapes(input_shape, target_shape, target_dtype):
    x = torch.randn(input_shape)
    t = torch.zeros(target_shape, dtype=target_dtype)
    with pytest.raises(ValueError, match=_shapes_pattern(target_shape, input_shape)):
        crossent.cross_entropy(x, t)


def test_non_tensor_target_raises_type_error():
    with pytest.raises(TypeError, match=r"target.*Tensor"):
        crossent.cross_entropy(_logits(), [0] * N)


def test_target_on_other_device_raises_value_error():
    with pytest.raises(ValueError, match=r"target.*meta"):
        crossent.cross_entropy(_logits(), _target().to("meta"))


def test_module_target_of_neither_kind_raises_value_error():
    with pytest.raises(ValueError, match=_shapes_pattern((N + 1,), (N, C))):
        crossent.CrossEntropyLoss()(_logits(), _target((N + 1,)))


# --- class index out of range (checked on CPU) ------------------------------------------------------


@pytest.mark.parametrize(
    "bad, shape",
    [(C, (N,)), (C + 100, (N,)), (-1, (N,)), (-7, (N,)), (C, (N, 3)), (C, ())],
    ids=["C", "far-above", "minus-1", "negative", "kdim", "unbatched"],
)
def test_index_out_of_range_raises_value_error_naming_the_value(bad, shape):
    logits_shape = (C,) if shape == () else (shape[0], C, *shape[1:])
    t = _target(shape)
    t.view(-1)[-1] = bad
    with pytest.raises(ValueError, match=rf"(?s)(?<![\d-]){re.escape(str(bad))}(?!\d).*\[0, {C}\)"):
        crossent.cross_entropy(torch.randn(logits_shape), t)


def test_index_equal_to_a_negative_ignore_index_is_not_out_of_range():
    """Control for the case above: the same value is fine once it is the ignore_index."""
    t = _target()
    t[0] = -7
    loss = crossent.cross_entropy(_logits(), t, ignore_index=-7, reduction="none")
    torch.testing.assert_close(loss[0], torch.tensor(0.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the no-host-sync range handling is CUDA's")
@pytest.mark.parametrize("bad", [C, -3], ids=["C", "negative"])
def test_index_out_of_range_on_cuda_gives_nan_for_that_row_only(bad):
    """Documented: on CUDA no ValueError (that would sync the host); the offending row's loss and
    gradient are NaN, never silent garbage, and the other rows are unaffected."""
    x = torch.randn(N, C, device="cuda", requires_grad=True)
    t = torch.randint(0, C, (N,), device="cuda")
    t[1] = bad
    loss = crossent.cross_entropy(x, t, reduction="none")
    loss.backward(torch.ones_like(loss))
    assert torch.isnan(loss[1]).item() and torch.isnan(x.grad[1]).all().item()
    rest = [0, 2, 3]
    want = torch.nn.functional.cross_entropy(x.detach()[rest], t[rest], reduction="none")
    torch.testing.assert_close(loss.detach()[rest], want)
    assert torch.isnan(crossent.cross_entropy(x, t)).item()  # and it reaches the mean


def test_module_index_out_of_range_raises_value_error():
    t = _target()
    t[1] = C + 3
    with pytest.raises(ValueError, match=rf"{C + 3}"):
        crossent.CrossEntropyLoss()(_logits(), t)


# --- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["avg", "MEAN", "", None], ids=["avg", "MEAN", "empty", "None"])
def test_bad_reduction_raises_value_error(value):
    with pytest.raises(ValueError, match=r"reduction"):
        crossent.cross_entropy(_logits(), _target(), reduction=value)


@pytest.mark.parametrize("value", [-0.1, 1.01, float("nan"), float("inf")], ids=["negative", "above-1", "nan", "inf"])
def test_label_smoothing_outside_unit_interval_raises_value_error(value):
    with pytest.raises(ValueError, match=r"label_smoothing"):
        crossent.cross_entropy(_logits(), _target(), label_smoothing=value)


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "softcap"])
def test_numeric_option_given_as_string_raises_type_error(name):
    with pytest.raises(TypeError, match=name):
        crossent.cross_entropy(_logits(), _target(), **{name: "0.1"})


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "softcap"])
def test_numeric_option_given_as_list_raises_type_error(name):
    with pytest.raises(TypeError, match=name):
        crossent.cross_entropy(_logits(), _target(), **{name: [0.1]})


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_softcap_not_positive_raises_value_error(value):
    with pytest.raises(ValueError, match=r"softcap"):
        crossent.cross_entropy(_logits(), _target(), softcap=value)


@pytest.mark.parametrize("value", [-1e-4, -1.0, float("nan")], ids=["tiny-negative", "negative", "nan"])
def test_negative_z_loss_raises_value_error(value):
    with pytest.raises(ValueError, match=r"z_loss"):
        crossent.cross_entropy(_logits(), _target(), z_loss=value)


@pytest.mark.parametrize("value", [1.0, "x", None], ids=["float", "str", "None"])
def test_ignore_index_not_an_int_raises_type_error(value):
    with pytest.raises(TypeError, match=r"ignore_index"):
        crossent.cross_entropy(_logits(), _target(), ignore_index=value)


def test_inplace_backward_not_a_bool_raises_type_error():
    with pytest.raises(TypeError, match=r"inplace_backward"):
        crossent.cross_entropy(_logits(), _target(), inplace_backward=1)


def test_unknown_impl_raises_value_error():
    with pytest.raises(ValueError, match=r"impl"):
        crossent.cross_entropy(_logits(), _target(), impl="cuda")


# --- weight -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(C + 1,), (C - 1,), (1, C), ()], ids=["C+1", "C-1", "2d", "0d"])
def test_weight_of_wrong_shape_raises_value_error(shape):
    with pytest.raises(ValueError, match=rf"weight.*\({C},\)"):
        crossent.cross_entropy(_logits(), _target(), torch.ones(shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=["int64", "bool"])
def test_weight_of_non_floating_dtype_raises_type_error(dtype):
    with pytest.raises(TypeError, match=rf"weight.*{dtype}"):
        crossent.cross_entropy(_logits(), _target(), torch.ones(C, dtype=dtype))


def test_weight_on_other_device_raises_value_error():
    """The meta device stands in for a second device, so this runs on a CPU-only machine too."""
    with pytest.raises(ValueError, match=r"weight.*meta"):
        crossent.cross_entropy(_logits(), _target(), torch.ones(C, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a real second device")
def test_weight_on_cuda_with_cpu_input_raises_value_error():
    with pytest.raises(ValueError, match=r"weight.*cuda"):
        crossent.cross_entropy(_logits(), _target(), torch.ones(C, device="cuda"))


def test_weight_not_a_tensor_raises_type_error():
    with pytest.raises(TypeError, match=r"weight"):
        crossent.cross_entropy(_logits(), _target(), [1.0] * C)


def test_module_weight_of_wrong_shape_raises_value_error_at_call():
    fn = crossent.CrossEntropyLoss(weight=torch.ones(C + 2))
    with pytest.raises(ValueError, match=rf"weight.*\({C},\)"):
        fn(_logits(), _target())


# --- ignore_index with probability targets -----------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [0, 3, C + 10], ids=["0", "in-range", "above-C"])
def test_non_negative_ignore_index_with_probability_targets_raises_value_error(ignore_index):
    y = torch.softmax(torch.randn(N, C), 1)
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index}"):
        crossent.cross_entropy(_logits(), y, ignore_index=ignore_index)


def test_module_non_negative_ignore_index_with_probability_targets_raises_value_error():
    y = torch.softmax(torch.randn(N, C), 1)
    with pytest.raises(ValueError, match=r"ignore_index=1"):
        crossent.CrossEntropyLoss(ignore_index=1)(_logits(), y)


# --- the module constructor validates once ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(reduction="avg"), ValueError, r"reduction"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing"),
        (dict(label_smoothing=-0.5), ValueError, r"label_smoothing"),
        (dict(softcap=0.0), ValueError, r"softcap"),
        (dict(softcap=-2.0), ValueError, r"softcap"),
        (dict(z_loss=-0.1), ValueError, r"z_loss"),
        (dict(ignore_index=2.0), TypeError, r"ignore_index"),
        (dict(weight=[1.0] * C), TypeError, r"weight"),
        (dict(inplace_backward="yes"), TypeError, r"inplace_backward"),
        (dict(impl="fast"), ValueError, r"impl"),
    ],
    ids=["reduction", "label_smoothing-high", "label_smoothing-negative", "softcap-zero", "softcap-negative",
         "z_loss-negative", "ignore_index-float", "weight-list", "inplace_backward-str", "impl"],
)
def test_module_constructor_rejects_bad_option(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        crossent.CrossEntropyLoss(**kwargs)


# --- nothing happens before the error ---------------------------------------------------------------


def test_validation_happens_before_any_work():
    """A rejected call leaves no autograd graph behind and does not touch the input."""
    x = _logits().requires_grad_()
    before = x.detach().clone()
    t = _target()
    t[0] = C
    with pytest.raises(ValueError):
        crossent.cross_entropy(x, t, inplace_backward=True)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)
    assert x.grad is None
