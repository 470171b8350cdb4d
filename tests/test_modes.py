"""The eager fast paths (crossent._modes.plain_eager): taken in plain eager mode only, and the custom ops still
run wherever the call must be seen as one op (compile, torch.func, a dispatch mode, tensor subclasses)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import crossent
from crossent._modes import plain_eager
from crossent.kernels import ops


def test_plain_eager_is_false_under_transforms_modes_and_subclasses():
    x = torch.randn(3, 5)
    assert plain_eager(x, None)
    seen = []
    torch.func.vmap(lambda r: seen.append(plain_eager(r)) or r.sum())(x)
    with FlopCounterMode(display=False):
        seen.append(plain_eager(x))
    seen.append(plain_eager(torch.nn.Parameter(x)))  # a subclass
    with FakeTensorMode() as mode:
        seen.append(plain_eager(mode.from_tensor(x)))
    assert seen == [False, False, False, False]


def test_eager_calls_skip_the_custom_ops_and_fake_tensors_use_them(monkeypatch):
    x, t = torch.randn(6, 7, requires_grad=True), torch.randint(0, 7, (6,))
    calls = []
    for name in ("_ce_forward", "_ce_backward"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    crossent.cross_entropy(x, t).backward()
    assert calls == []
    with FakeTensorMode() as mode:  # shape inference: the ops' fake implementations, never a kernel on fake data
        fx, ft = mode.from_tensor(torch.randn(64, 50000).requires_grad_()), mode.from_tensor(torch.zeros(64).long())
        loss = crossent.cross_entropy(fx, ft)
        loss.backward()
        assert loss.shape == () and fx.grad.shape == (64, 50000)
    assert calls == ["_ce_forward", "_ce_backward"]


@pytest.mark.one_pass  # the one-pass backends stay on (tests/conftest.py)
@pytest.mark.parametrize("dtype, kwargs", [(torch.float32, {}), (torch.bfloat16, {}), (torch.float32, {"softcap": 5.0})],
                         ids=["fp32", "bf16", "softcap"])  # fmt: skip
def test_small_inputs_under_fake_tensors_skip_the_host_reading_path(dtype, kwargs):
    # below 2^20 logits eager calls take a one-pass backend (kernels/one_pass.py), reading values on the host; fake
    # tensors have none to read (a data pointer the C kernels would dereference)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(8, 10, dtype=dtype, requires_grad=True))
        t = mode.from_tensor(torch.zeros(8, dtype=torch.long))
        loss = crossent.cross_entropy(x, t, **kwargs)
        loss.backward()
        assert loss.shape == () and x.grad.shape == (8, 10)


def test_in_place_backward_counts_as_a_mutation_in_eager_mode():
    x = torch.randn(4, 9, requires_grad=True)
    logits = x * 1.0
    version = logits._version
    loss = crossent.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    loss.backward(retain_graph=True)
    assert logits._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
