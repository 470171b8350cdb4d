"""crossent.cross_entropy vs torch.nn.functional.cross_entropy, forward+backward: time, memory, error.

Per case (shape, dtype, load) both methods run in this process on the same tensors (5% of the targets
``ignore_index``, ``reduction="mean"``), timed in turns (:func:`~crossent.bench.measure.interleaved_medians`),
so each ratio to PyTorch comes from one stretch of machine load. Memory is what autograd saves for backward
beyond the logits themselves. The float64 oracle is ``F.cross_entropy`` on the float64 upcast of the same
logits (the tests show it agrees with ``crossent.reference`` to float64 rounding; the numpy reference itself
is too slow at these sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import crossent
from crossent.bench.load import condition
from crossent.bench.measure import DTYPES, interleaved_medians, max_abs_diff, saved_bytes
from crossent.bench.progress import step
from crossent.bench.report import Row

METHODS: Dict[str, Callable] = {"torch": F.cross_entropy, "crossent": crossent.cross_entropy}
SMALL_SHAPES: Tuple[Tuple[int, int], ...] = ((64, 1000), (256, 1000), (128, 32000))  # where fixed costs show
LARGE_SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 32768), (1024, 131072))  # LLM loss heads, 32k and 128k vocab
IGNORED_FRACTION = 0.05  # some targets are ignore_index, as in padded LLM batches


@dataclass(frozen=True)
class Case:
    """One measured configuration: logits (N, C) of ``dtype``, timed ``"quiet"`` or ``"loaded"``."""

    shape: Tuple[int, int]
    dtype: str
    load: str

    @property
    def label(self) -> str:
        """``'256x1000 float32 quiet'``."""
        return f"{self.shape[0]}x{self.shape[1]} {self.dtype} {self.load}"


def run(
    cases: Sequence[Case], device: torch.device, reps: int, min_sample: float = 0.0, bar: Optional[tqdm] = None
) -> List[Row]:
    """:func:`measure` every case in turn, one step of ``bar`` each."""
    rows = []
    for case in cases:
        with step(bar, case.label):
            rows += measure(case, device, reps, min_sample)
    return rows


def measure(case: Case, device: torch.device, reps: int, min_sample: float = 0.0) -> List[Row]:
    """Both methods on one case: one call each for the errors (it is also the warm-up), one for the saved
    bytes, then ``reps`` interleaved timed rounds under the case's load."""
    n, c = case.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (2.0 * torch.randn(n, c, generator=gen)).to(device=device, dtype=DTYPES[case.dtype])
    target = torch.randint(0, c, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < IGNORED_FRACTION] = -100
    target = target.to(device)
    loss64, grad64 = _oracle(logits, target)
    errors, saved, steps = {}, {}, {}
    for name, fn in METHODS.items():
        x = logits.detach().clone().requires_grad_(True)
        loss = fn(x, target)
        loss.backward()
        errors[name] = (abs(loss.double().item() - loss64), max_abs_diff(x.grad, grad64))
        saved[name] = saved_bytes(lambda: fn(x, target), x)
        steps[name] = _timed_step(fn, x, target)
    del grad64, loss
    with condition(case.load):
        seconds = interleaved_medians(steps, reps, min_sample, device)
    return [
        Row("ce", case.shape, case.dtype, case.load, IGNORED_FRACTION, name, s, s / seconds["torch"], saved[name],
            *errors[name])
        for name, s in seconds.items()
    ]  # fmt: skip


def _timed_step(fn: Callable, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One timed forward+backward of ``fn`` on ``x`` (its gradient freshly allocated, as in training)."""

    def once():
        x.grad = None
        fn(x, target).backward()

    return once


def _oracle(logits: torch.Tensor, target: torch.Tensor):
    x = logits.detach().double().requires_grad_(True)
    loss = F.cross_entropy(x, target)
    loss.backward()
    return loss.item(), x.grad

