"""Shared test helpers: input builders, one call that returns (loss, input grad), numpy conversion."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Float64 agreement between two exact-in-float64 computations of the same formula (different summation
# orders). A wrong term (a missing weight, a wrong denominator, a sign) is orders of magnitude larger.
F64 = dict(rtol=1e-10, atol=1e-12)


def class_dim(x: torch.Tensor) -> int:
    """The class dimension: 0 for unbatched (C,), else 1."""
    return 0 if x.dim() == 1 else 1


def index_shape(logits_shape) -> tuple:
    """The class-index target shape for logits of ``logits_shape`` (class dim removed)."""
    cd = 0 if len(logits_shape) == 1 else 1
    return tuple(logits_shape[:cd]) + tuple(logits_shape[cd + 1 :])


def make_logits(shape, dtype=torch.float64, scale=3.0) -> torch.Tensor:
    """Seeded standard-normal logits times ``scale`` (a few nats of spread, so no class is negligible)."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def make_index_target(logits_shape, *, ignore_value=None, num_ignored=None) -> torch.Tensor:
    """int64 class indices in [0, C); with ``ignore_value``, some positions (never all, unless the target
    is unbatched or has one position) are set to it."""
    c = logits_shape[0 if len(logits_shape) == 1 else 1]
    t = torch.randint(0, c, index_shape(logits_shape))
    if ignore_value is not None:
        flat = t.view(-1)
        n = flat.numel()
        k = num_ignored if num_ignored is not None else max(1, n // 3)
        if n > 1:
            k = min(k, n - 1)
        flat[torch.randperm(n)[:k]] = ignore_value
    return t


def make_prob_target(logits_shape, dtype=torch.float64, zeros=False) -> torch.Tensor:
    """Class probabilities of the logits' shape (each position sums to 1 over the class dim); with
    ``zeros`` some entries are exactly 0 (0 · log p must give 0)."""
    cd = 0 if len(logits_shape) == 1 else 1
    y = torch.softmax(torch.randn(logits_shape, dtype=torch.float64) * 2, dim=cd)
    if zeros:
        y = torch.where(torch.rand(logits_shape, dtype=torch.float64) < 0.3, 0.0, y)
        y[(slice(None),) * cd + (0,)] += 1e-3  # keep every position's mass positive
        y = y / y.sum(cd, keepdim=True)
    return y.to(dtype)


def loss_and_grad(fn, logits, target, grad_output=None, **kwargs):
    """Run ``fn(leaf, target, **kwargs)`` on a fresh leaf copy of ``logits``; backward with ``grad_output``
    (default: ones of the loss's shape). Returns (loss detached, d loss / d logits)."""
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, x, grad_output.to(loss.dtype))
    return loss.detach(), grad


def np64(t) -> np.ndarray:
    """A tensor (or None) as a float64/int64 numpy array."""
    if t is None:
        return None
    t = t.detach().cpu()
    return t.numpy() if not t.is_floating_point() else t.to(torch.float64).numpy()


def worst_error(actual: torch.Tensor, expected: np.ndarray):
    """(max |actual − expected|, its index, actual there, expected there), in float64."""
    a = actual.detach().to(torch.float64).cpu().numpy()
    e = np.broadcast_to(np.asarray(expected, dtype=np.float64), a.shape)
    if a.size == 0:
        return 0.0, (), None, None
    err = np.abs(a - e)
    i = np.unravel_index(int(np.argmax(err)), err.shape)
    return float(err[i]), tuple(int(k) for k in i), float(a[i]), float(e[i])


def torch_expected(logits, target, grad_output=None, weight=None, ignore_index=-100, reduction="mean",
                   label_smoothing=0.0, module=False):
    """PyTorch's loss and input grad (functional or module form), with crossent's one documented
    difference applied: a class-index "mean" over zero total weight is 0 with a zero gradient (torch: NaN)."""
    opts = dict(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if module:
        mod = torch.nn.CrossEntropyLoss(**opts)
        loss, grad = loss_and_grad(lambda x, t: mod(x, t), logits, target, grad_output)
    else:
        loss, grad = loss_and_grad(torch.nn.functional.cross_entropy, logits, target, grad_output, **opts)
    if reduction == "mean" and not target.is_floating_point():
        num_classes = logits.shape[0 if logits.dim() == 1 else 1]
        w = torch.ones(num_classes, dtype=logits.dtype) if weight is None else weight.to(logits.dtype)
        valid = target != ignore_index
        if float(torch.where(valid, w[target.clamp(0, num_classes - 1)], 0.0).sum()) == 0.0:
            if not torch.isnan(loss):
                raise AssertionError("torch was expected to give NaN for a zero-weight mean; its behaviour changed")
            loss, grad = torch.zeros_like(loss), torch.zeros_like(grad)
    return loss, grad


def reference_expected(logits, target, grad_output=None, weight=None, **opts):
    """crossent.reference's loss and input grad (float64 numpy) for tensor arguments."""
    from crossent import reference

    z, t, w = np64(logits), np64(target), np64(weight)
    g = 1.0 if grad_output is None else np64(grad_output)
    return (
        reference.cross_entropy(z, t, weight=w, **opts),
        reference.cross_entropy_grad(z, t, weight=w, grad_output=g, **opts),
    )


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns (every allocation is one)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


# --- the C row kernels' tests (tests/test_cpu_rows.py, tests/test_small_cpu.py) ----------------------------------

# cross-entropy options over which the C kernels are checked; "weight": True takes the case's class weights
ROW_OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": 3},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-3},
    "all": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "ignore_index": 3},
}
# one unit in the last place at 1.0 of each dtype the C kernels read
ULP = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def row_case(n, c, dtype, seed=0, scale=4.0):
    """Logits (n, c) in ``dtype``, int64 targets (every fourth one class 3, the ``ignore`` option's index, where
    c > 3) and class weights in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * scale).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::4] = 3 if c > 3 else t[::4]
    return x, t, torch.rand(c, generator=g) + 0.5


def row_kwargs(opts: dict, w: torch.Tensor) -> dict:
    """``cross_entropy`` keyword arguments of options like ``ROW_OPTIONS``'s, the class weights ``w`` where
    ``"weight"`` asks for them."""
    kw = {k: v for k, v in opts.items() if k != "weight"}
    if opts.get("weight"):
        kw["weight"] = w
    return kw


def row_reference(x, t, kw: dict, reduction: str = "none"):
    """float64 loss and gradient (for grad_output 1) from crossent.reference, on the logits as given (rounded to
    their dtype)."""
    from crossent import reference

    args = {k: (v.double().numpy() if k == "weight" else v) for k, v in kw.items()}
    z = x.double().numpy()
    loss = reference.cross_entropy(z, t.numpy(), reduction=reduction, **args)
    grad = reference.cross_entropy_grad(z, t.numpy(), reduction=reduction, **args)
    return torch.from_numpy(np.asarray(loss)), torch.from_numpy(np.asarray(grad))


def padded_lm_rows(vocab: int, seq: int, count: int, seed: int = 3) -> list:
    """``count`` causal-LM training rows for ``Trainer`` (input_ids, attention_mask, labels) with uneven right
    padding: row i has ``2 + (7 i) mod (seq − 1)`` valid tokens; labels −100 at padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        mask = (torch.arange(seq) < 2 + (7 * i) % (seq - 1)).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """``examples/<name>.py`` as a module (not run as a script): tests call its functions."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
