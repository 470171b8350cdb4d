"""Memory held for backward, measured with torch.autograd.graph.saved_tensors_hooks.

crossent keeps the input itself (no copy), the target and one float64 LSE per position: O(N) beyond
what the caller already owns. PyTorch's F.cross_entropy keeps the N×C log-probabilities. Both halves
are asserted, so the test fails if crossent starts saving an (N, C) tensor or if the measurement
stops seeing PyTorch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent

N, C = 64, 4096
# Per position, crossent needs 8 bytes (float64 LSE) plus small bookkeeping (scalars for the reduction).
# 64 bytes per position is a generous O(N) budget and still 64× below one N×C float32 tensor (4·C bytes).
BYTES_PER_POSITION = 64


def _saved_storages(fn, *args, **kwargs):
    """Run fn under saved_tensors_hooks; return {storage data_ptr: storage nbytes} of everything saved
    for backward (a saved view keeps its whole storage alive, so storages are what is counted)."""
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return saved, out


def _extra_bytes(saved, *owned):
    """Bytes saved beyond the tensors the caller owns anyway (input, target, weight), by storage."""
    owned_ptrs = {t.untyped_storage().data_ptr() for t in owned if t is not None}
    return sum(n for ptr, n in saved.items() if ptr not in owned_ptrs)


CASES = {
    "index-2d": ((N, C), "index", {}),
    "index-2d-all-options": ((N, C), "index", dict(weight=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)),
    "index-kdim": ((4, C, 16), "index", {}),  # N·d1 = 64 positions, class dim not last
    "probs-2d": ((N, C), "probs", dict(label_smoothing=0.1)),
    "index-2d-inplace": ((N, C), "index", dict(inplace_backward=True)),
}


def _inputs(shape, kind, dtype):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    positions = shape[0] * (shape[2] if len(shape) > 2 else 1)
    if kind == "index":
        t = torch.randint(0, C, (shape[0], *shape[2:]))
    else:
        t = torch.softmax(torch.randn(shape), 1).to(dtype)
    return x, t, positions


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape, kind, opts", CASES.values(), ids=CASES.keys())
def test_saved_for_backward_is_o_of_n(shape, kind, opts, dtype, reduction):
    x, t, positions = _inputs(shape, kind, dtype)
    opts = dict(opts)
    weight = torch.rand(C, dtype=dtype) + 0.5 if opts.pop("weight", False) else None
    saved, loss = _saved_storages(crossent.cross_entropy, x, t, weight, reduction=reduction, **opts)
    extra = _extra_bytes(saved, x, t, weight)
    assert extra < BYTES_PER_POSITION * positions, f"{extra} bytes saved beyond the input for {positions} positions"
    # the input itself is kept (no copy), so backward can recompute the softmax from it
    assert x.untyped_storage().data_ptr() in saved
    # and backward still works from what was kept
    loss.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_torch_saves_n_by_c(dtype, reduction):
    """The baseline the O(N) claim is measured against: F.cross_entropy keeps ≥ N·C·4 bytes beyond the
    input (its log-probabilities). If this stops holding, the measurement above proves nothing."""
    x, t, positions = _inputs((N, C), "index", dtype)
    saved, _ = _saved_storages(F.cross_entropy, x, t, reduction=reduction)
    extra = _extra_bytes(saved, x, t)
    assert extra >= N * C * x.element_size(), f"torch saved only {extra} bytes beyond its input"
    assert extra >= BYTES_PER_POSITION * positions * 8  # far past crossent's budget


def test_saved_bytes_do_not_grow_with_classes():
    """Doubling C leaves crossent's extra saved bytes unchanged (they depend on N only)."""
    sizes = []
    for c in (1024, 2048):
        x = torch.randn(N, c, requires_grad=True)
        t = torch.randint(0, c, (N,))
        saved, _ = _saved_storages(crossent.cross_entropy, x, t, label_smoothing=0.1)
        sizes.append(_extra_bytes(saved, x, t))
    assert sizes[0] == sizes[1], sizes
