"""crossent.cross_entropy vs torch.nn.functional.cross_entropy: time, memory saved for backward, error.

Every method runs in the same process on the same tensors; times are medians of forward+backward,
and each is also given as a ratio to PyTorch's. The float64 oracle is ``F.cross_entropy`` on the
float64 upcast (the tests show it agrees with ``crossent.reference`` to float64 rounding; the numpy
reference itself is too slow at these sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import crossent
from crossent.bench.measure import format_bytes, median_seconds, saved_bytes

METHODS: Dict[str, Callable] = {"torch": F.cross_entropy, "crossent": crossent.cross_entropy}
DEFAULT_SHAPES: Tuple[Tuple[int, int], ...] = ((8192, 8192), (4096, 32768), (1024, 131072))
QUICK_SHAPES: Tuple[Tuple[int, int], ...] = ((64, 1000),)
IGNORED_FRACTION = 0.05  # some targets are ignore_index, as in padded LLM batches


@dataclass(frozen=True)
class Result:
    shape: Tuple[int, int]
    dtype: str
    method: str
    seconds: float
    ratio: float  # seconds / PyTorch's seconds on the same shape
    saved: int  # bytes saved for backward beyond the logits themselves
    loss_error: float  # |loss − float64 loss|
    grad_error: float  # max |grad − float64 grad|


def run(
    shapes: Sequence[Tuple[int, int]], dtype: torch.dtype, device: torch.device, reps: int, on_step=lambda label: None
) -> List[Result]:
    """Benchmark every method on every (N, C); ``on_step`` is called after each measurement."""
    results = []
    for n, c in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        logits = (2.0 * torch.randn(n, c, generator=gen)).to(device=device, dtype=dtype)
        target = torch.randint(0, c, (n,), generator=gen)
        target[torch.rand(n, generator=gen) < IGNORED_FRACTION] = -100
        target = target.to(device)
        loss64, grad64 = _oracle(logits, target)
        per_shape = {}
        for name, fn in METHODS.items():
            x = logits.detach().clone().requires_grad_(True)

            def step():
                x.grad = None
                fn(x, target).backward()

            seconds = median_seconds(step, reps, device=device)
            saved = saved_bytes(lambda: fn(x, target), x)
            x.grad = None
            loss = fn(x, target)
            loss.backward()
            per_shape[name] = (seconds, saved, abs(loss.double().item() - loss64), _max_abs(x.grad, grad64))
            x = loss = None  # free the (N, C) input and its gradient before the next method
            on_step(f"{n}x{c} {name}")
        base = per_shape["torch"][0]
        for name, (seconds, saved, lerr, gerr) in per_shape.items():
            results.append(Result((n, c), str(dtype).replace("torch.", ""), name, seconds, seconds / base, saved, lerr, gerr))
    return results


def _oracle(logits, target):
    x = logits.detach().double().requires_grad_(True)
    loss = F.cross_entropy(x, target)
    loss.backward()
    return loss.item(), x.grad


def _max_abs(a, b):
    return (a.double() - b).abs().max().item() if a.numel() else 0.0


def format_table(results: Sequence[Result]) -> str:
    """A fixed-width table, one line per (shape, method)."""
    head = f"{'N x C':>14} {'dtype':>9} {'method':>9} {'median':>10} {'vs torch':>9} {'saved for bwd':>14} {'|loss err|':>10} {'max|grad err|':>13}"
    lines = [head, "-" * len(head)]
    for r in results:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        lines.append(
            f"{shape:>14} {r.dtype:>9} {r.method:>9} {r.seconds * 1e3:>8.1f}ms {r.ratio:>8.2f}x "
            f"{format_bytes(r.saved):>14} {r.loss_error:>10.2e} {r.grad_error:>13.2e}"
        )
    return "\n".join(lines)
